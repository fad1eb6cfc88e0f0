"""busypoll.py: the poller spins a window after each poke, then parks."""

from __future__ import annotations

import time

import pytest
import trio

from dstfuse import busypoll


async def _until(predicate, limit: float = 5.0) -> None:
    deadline = time.perf_counter() + limit
    while not predicate():
        assert time.perf_counter() < deadline, "not within the limit"
        await trio.sleep(0.001)


async def test_a_poke_spins_the_run_loop_for_a_window_then_it_parks():
    poller = busypoll.install(0.01)
    assert poller is not None and not poller.spinning
    started = time.perf_counter()
    busypoll.poke()
    await trio.lowlevel.checkpoint()
    assert poller.spinning
    await _until(lambda: not poller.spinning)
    assert time.perf_counter() - started >= 0.01
    busypoll.poke()  # wakes the parked task again
    await trio.lowlevel.checkpoint()
    assert poller.spinning
    await _until(lambda: not poller.spinning)


async def test_while_it_spins_other_tasks_run_and_timers_fire():
    """Spinning yields at every step: while I/O keeps poking it for 0.3 s,
    a task sleeping 0.02 s wakes and finishes long before the I/O ends."""
    poller = busypoll.install(0.01)
    order: list[str] = []

    async def io() -> None:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            busypoll.poke()
            await trio.lowlevel.checkpoint()
        order.append("io ended")

    async def sleeper() -> None:
        await trio.sleep(0.02)
        order.append("sleeper woke")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(io)
        nursery.start_soon(sleeper)
        await trio.sleep(0.01)
        assert poller.spinning
    assert order == ["sleeper woke", "io ended"]


async def test_without_a_poller_or_with_window_zero_a_poke_does_nothing():
    busypoll.poke()  # none installed in this run
    assert busypoll.install(0) is None
    busypoll.poke()
    stats = trio.lowlevel.current_statistics()
    assert stats.tasks_runnable == 0


@pytest.mark.parametrize("window", [-1e-3, busypoll.MAX_WINDOW * 2])
def test_a_window_out_of_range_is_refused(window):
    with pytest.raises(ValueError, match="busy-poll window"):
        busypoll.BusyPoll(window)

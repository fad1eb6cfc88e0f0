"""LegDispatch with writes a node started without a runner (`begin_write`):
the same outcomes and the same settling rules as calls run in runners
(dstfuse/mirror/dispatch.py's invariants), under trio's MockClock."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dstfuse.errors import NodeError
from dstfuse.mirror.dispatch import LegDispatch, LegGivenUp
from dstfuse.mirror.legs import LegRole, MirrorLeg
from dstfuse.nodes.base import NodeState, StartedWrite

LEG_TIMEOUT = 4.0


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class _Node:
    """What MirrorLeg looks at of a node."""

    def __init__(self, name: str) -> None:
        self.description = name
        self.state = NodeState.ONLINE


class _Started(StartedWrite):
    """A started write the test ends by hand (`answer`). `flushed`, when
    given, is what its settling waits for after the answer (a node over
    its unflushed limit waits for a FLUSH)."""

    def __init__(self, flushed: trio.Event | None = None) -> None:
        self.on_done = None
        self._done = False
        self._error: NodeError | None = None
        self.settled = 0
        self._ended = trio.Event()
        self._flushed = flushed

    @property
    def done(self) -> bool:
        return self._done

    @property
    def succeeded(self) -> bool:
        return self._done and self._error is None

    @property
    def settles_at_once(self) -> bool:
        return self._done and (self._flushed is None or self._flushed.is_set())

    def answer(self, error: NodeError | None = None) -> None:
        self._done, self._error = True, error
        self._ended.set()
        if self.on_done is not None:
            notify, self.on_done = self.on_done, None
            notify()

    async def settle(self) -> None:
        await self._ended.wait()
        if self._flushed is not None:
            await self._flushed.wait()
        self.settled += 1
        if self._error is not None:
            raise self._error


def _legs(count: int = 2) -> list[MirrorLeg]:
    legs = [MirrorLeg("m", i, _Node(f"node{i}"), None) for i in range(count)]  # type: ignore[arg-type]
    for leg in legs:
        leg.role = LegRole.IN_SYNC
    return legs


@asynccontextmanager
async def _dispatching() -> AsyncIterator[tuple[LegDispatch, trio.Nursery]]:
    """A dispatcher with its background running (cancelled at the end)."""
    dispatch = LegDispatch("m", LEG_TIMEOUT)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatch.run_background)
        yield dispatch, nursery
        nursery.cancel_scope.cancel()


async def _no_runner_call(leg: MirrorLeg) -> None:
    raise AssertionError(f"{leg}: a started write must not run in a runner")


async def test_started_writes_answered_are_settled_by_the_request(autojump_clock):
    legs = _legs()
    started = [_Started(), _Started()]
    async with _dispatching() as (dispatch, nursery):
        outcomes: list = []

        async def request() -> None:
            outcomes.extend(
                await dispatch.run(legs, _no_runner_call, lambda leg: started[leg.index])
            )

        nursery.start_soon(request)
        await trio.sleep(0.1)
        assert not outcomes and [leg.unsettled for leg in legs] == [1, 1]
        started[1].answer()
        started[0].answer(NodeError("node0", "write failed", errno=errno.ENOSPC))
        await trio.sleep(0.1)
        assert outcomes[1] == (None, None)
        error = outcomes[0][1]
        assert isinstance(error, NodeError) and error.errno == errno.ENOSPC  # the real error
        assert [s.settled for s in started] == [1, 1]
        assert [leg.unsettled for leg in legs] == [0, 0]


async def test_a_silent_started_write_is_given_up_then_settled_in_a_runner(autojump_clock):
    legs = _legs()
    started = [_Started(), _Started()]
    async with _dispatching() as (dispatch, nursery):
        begun = trio.current_time()
        started[0].answer()
        outcomes = await dispatch.run(legs, _no_runner_call, lambda leg: started[leg.index])
        assert trio.current_time() - begun == pytest.approx(LEG_TIMEOUT, abs=0.1)
        assert outcomes[0] == (None, None)
        assert isinstance(outcomes[1][1], LegGivenUp)
        # not cancelled: it still runs, and the leg counts it until it ends
        assert legs[1].unsettled == 1 and started[1].on_done is None
        started[1].answer()
        await trio.sleep(0.1)
        assert started[1].settled == 1 and legs[1].unsettled == 0


async def test_a_cancelled_request_leaves_its_started_writes_to_settle(autojump_clock):
    legs = _legs()
    started = [_Started(), _Started()]
    async with _dispatching() as (dispatch, nursery):
        with trio.move_on_after(1):
            await dispatch.run(legs, _no_runner_call, lambda leg: started[leg.index])
        assert [leg.unsettled for leg in legs] == [1, 1]
        for one in started:
            one.answer()
        await trio.sleep(0.1)
        assert [s.settled for s in started] == [1, 1]
        assert [leg.unsettled for leg in legs] == [0, 0]


async def test_a_leg_that_cannot_start_runs_its_call_in_a_runner(autojump_clock):
    legs = _legs()
    started = _Started()
    called: list[int] = []

    async def call(leg: MirrorLeg) -> None:
        called.append(leg.index)
        await trio.sleep(1)

    async with _dispatching() as (dispatch, nursery):
        started.answer()
        outcomes = await dispatch.run(legs, call, lambda leg: started if leg.index == 0 else None)
        assert outcomes == [(None, None), (None, None)]
        assert called == [1] and started.settled == 1
        assert [leg.unsettled for leg in legs] == [0, 0]


async def test_a_write_that_fails_to_start_is_that_legs_failure(autojump_clock):
    legs = _legs()
    started = _Started()
    started.answer()

    def start(leg: MirrorLeg) -> StartedWrite:
        if leg.index == 1:
            raise NodeError(str(leg), "could not seal the frame")
        return started

    async with _dispatching() as (dispatch, _):
        outcomes = await dispatch.run(legs, _no_runner_call, start)
        assert outcomes[0] == (None, None)
        assert isinstance(outcomes[1][1], NodeError) and "seal" in str(outcomes[1][1])
        assert [leg.unsettled for leg in legs] == [0, 0]


async def test_an_answered_write_whose_settling_waits_is_given_up_at_leg_timeout(autojump_clock):
    """Leg 0 acknowledged the write, but its node is over its unflushed
    limit and settling it waits for a FLUSH that does not come (a node that
    froze after the acknowledgement). The request must not wait for that
    FLUSH beyond leg_timeout when leg 1 completed it: the wait goes to a
    runner, and leg 0 is given up as a silent leg would be."""
    legs = _legs()
    flushed = trio.Event()
    started = [_Started(flushed), _Started()]
    async with _dispatching() as (dispatch, _):
        begun = trio.current_time()
        with trio.fail_after(LEG_TIMEOUT * 3):
            for one in started:
                one.answer()
            outcomes = await dispatch.run(legs, _no_runner_call, lambda leg: started[leg.index])
        assert trio.current_time() - begun == pytest.approx(LEG_TIMEOUT, abs=0.1)
        assert isinstance(outcomes[0][1], LegGivenUp) and outcomes[1] == (None, None)
        assert legs[0].unsettled == 1  # still settling, counted
        flushed.set()
        await trio.sleep(0.1)
        assert [s.settled for s in started] == [1, 1]
        assert [leg.unsettled for leg in legs] == [0, 0]


async def test_an_answered_write_whose_flush_comes_in_time_is_the_legs_success(autojump_clock):
    legs = _legs()
    flushed = trio.Event()
    started = [_Started(flushed), _Started()]
    async with _dispatching() as (dispatch, nursery):
        for one in started:
            one.answer()

        async def flush_soon() -> None:
            await trio.sleep(1)
            flushed.set()

        nursery.start_soon(flush_soon)
        begun = trio.current_time()
        outcomes = await dispatch.run(legs, _no_runner_call, lambda leg: started[leg.index])
        assert trio.current_time() - begun == pytest.approx(1, abs=0.1)
        assert outcomes == [(None, None), (None, None)]
        assert [leg.unsettled for leg in legs] == [0, 0]

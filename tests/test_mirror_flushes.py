"""FlushWitness: a leg's FLUSH succeeds only if no FLUSH overlapping it failed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dstfuse.errors import NodeError
from dstfuse.mirror.flushes import FlushWitness
from dstfuse.mirror.legs import LegRole
from dstfuse.mirror.metadata import BLOCK

from .test_mirror import make_nodes, open_mirror, wait_for


class Flushes:
    """FLUSH calls that end when the test says, each with its outcome."""

    def __init__(self) -> None:
        self.calls: list[trio.Event] = []
        self.outcomes: list[BaseException | None] = []

    def call(self, fails: bool = False):
        index = len(self.calls)
        self.calls.append(trio.Event())
        self.outcomes.append(NodeError("node", "flush failed") if fails else None)

        async def flush() -> None:
            await self.calls[index].wait()
            if self.outcomes[index] is not None:
                raise self.outcomes[index]

        return flush


async def _run(witness: FlushWitness, flush, results: dict, key: str) -> None:
    try:
        await witness.run(flush, "leg")
        results[key] = "ok"
    except NodeError as exc:
        results[key] = str(exc)


async def test_a_success_beside_a_failed_flush_fails_once_that_flush_ended():
    witness, flushes, results = FlushWitness(), Flushes(), {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run, witness, flushes.call(fails=True), results, "first")
        nursery.start_soon(_run, witness, flushes.call(), results, "second")
        await trio.testing.wait_all_tasks_blocked()
        flushes.calls[1].set()  # the second answers first, success
        await trio.testing.wait_all_tasks_blocked()
        assert results == {}  # it waits for the first, which began before it ended
        flushes.calls[0].set()
    assert results["first"] == "node: flush failed"
    assert "overlapped" in results["second"]


async def test_a_flush_after_a_failed_one_has_ended_succeeds():
    witness, flushes = FlushWitness(), Flushes()
    first = flushes.call(fails=True)
    flushes.calls[0].set()
    with pytest.raises(NodeError):
        await witness.run(first, "leg")
    second = flushes.call()
    flushes.calls[1].set()
    await witness.run(second, "leg")  # the failure was reported before it began


async def test_a_cancelled_flush_counts_as_failed_for_those_beside_it():
    """A FLUSH given up by the client may still fail on the node."""
    witness, flushes, results = FlushWitness(), Flushes(), {}
    given_up = trio.CancelScope()

    async def abandoned() -> None:
        with given_up:
            await witness.run(flushes.call(), "leg")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run, witness, flushes.call(), results, "before")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(abandoned)
        await trio.testing.wait_all_tasks_blocked()
        given_up.cancel()
        await trio.testing.wait_all_tasks_blocked()
        flushes.calls[0].set()
    assert "overlapped" in results["before"]
    after = flushes.call()
    flushes.calls[2].set()
    await witness.run(after, "leg")  # began once the cancellation was known


async def test_flushes_that_never_overlap_a_failure_all_succeed():
    witness, flushes, results = FlushWitness(), Flushes(), {}
    async with trio.open_nursery() as nursery:
        for key in ("a", "b", "c"):
            nursery.start_soon(_run, witness, flushes.call(), results, key)
        await trio.testing.wait_all_tasks_blocked()
        for call in flushes.calls:
            call.set()
    assert results == {"a": "ok", "b": "ok", "c": "ok"}


async def test_a_flush_failure_nobody_acted_on_yet_keeps_the_bitmap_marked(autojump_clock):
    """Leg 0 fails the user's flush while leg 1 still works on its own, so
    the flush has not marked leg 0 stale yet; a clearing flush meanwhile
    succeeds on both (leg 0's second flush finds an emptied cache) and must
    not clear the region whose write leg 0 may have lost."""
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        # nothing but the test clears the bitmap or gives up on a leg
        options = {"assume_clean": True, "bitmap_idle": "600s", "leg_timeout": "600s"}
        mirror = await open_mirror(nursery, nodes, mount_options=options)
        await mirror.write(0, b"w" * BLOCK)
        bitmap = mirror.runtime.bitmap
        assert 0 in bitmap.desired
        flushes = {0: 0, 1: 0}

        def first_flush(index):
            def check(op, offset, length):
                if op != "flush":
                    return False
                flushes[index] += 1
                return flushes[index] == 1

            return check

        fail_first = first_flush(0)
        nodes[0].fail = lambda op, offset, length: (
            NodeError("m0", "flush failed") if fail_first(op, offset, length) else None
        )
        nodes[1].hold, nodes[1].hold_when = trio.Event(), first_flush(1)
        nursery.start_soon(mirror.flush)
        await trio.testing.wait_all_tasks_blocked()
        assert flushes == {0: 1, 1: 1} and mirror.legs[0].in_sync
        assert await mirror.runtime.cleaner.clear_idle(float("inf")) == 0
        assert 0 in bitmap.desired
        nodes[1].hold.set()
        await wait_for(lambda: mirror.legs[0].role is not LegRole.IN_SYNC)
        assert 0 in bitmap.desired or 0 in mirror.legs[0].pending
        nursery.cancel_scope.cancel()

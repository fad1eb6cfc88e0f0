"""Regression tests for what a data-safety review of the mirror's fault
handling found (each of these passed on the first version of the fix and
showed the bug; now each must hold):

- a write cancelled while on the legs (the mount stopping with I/O in
  flight) never leaves legs that differ recorded in sync;
- a resyncing leg that failed a write no in-sync leg took copies the
  region again (its outcome does not say the write did not land);
- a holder whose lease ran out writes no bitmap block before re-checking it;
- a first use with a leg unreachable is refused (it may hold the storage);
- a mount waiting for a leg whose header cannot be read does not spin.
"""

from __future__ import annotations

import errno

import pytest
import trio

from dstfuse.errors import NodeError, NodeUnavailable, UserError
from dstfuse.mirror.algorithm import Mirror
from dstfuse.mirror.legs import LegRole
from dstfuse.mirror.metadata import BLOCK

from .test_mirror import (
    REGION,
    data_of,
    make_nodes,
    mirror_options,
    open_mirror,
    start_nodes,
    wait_for,
)
from .test_mirror_nodes import MemoryNode
from .test_mirror_trust import ClientView, open_client


async def test_a_cancelled_write_never_leaves_differing_legs_in_sync(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "leg_timeout": "10s"}
        )
        await mirror.write(2 * REGION, b"O" * 4096)
        gate = trio.Event()
        nodes[1].hold = gate
        nodes[1].hold_when = lambda op, offset, length: op == "write" and offset == 2 * REGION
        with trio.move_on_after(1):  # the request is cancelled (the mount stops)
            await mirror.write(2 * REGION, b"N" * 4096)
        assert bytes(nodes[0].data[2 * REGION : 2 * REGION + 4096]) == b"N" * 4096
        assert mirror.legs[1].role is LegRole.STALE  # it may lack the write
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    nodes[1].hold = None
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[0], mirror) == data_of(nodes[1], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


class LandsThenTimesOut(MemoryNode):
    """A node whose write lands but whose answer never comes (once)."""

    trip = None

    async def write(self, offset, data, *, fua=False):
        await super().write(offset, data, fua=fua)
        if self.trip is not None and self.trip(offset):
            self.trip = None
            raise NodeUnavailable(str(self), "write: no answer within the resend budget")


async def test_a_resyncing_leg_that_failed_a_failed_write_copies_it_again(autojump_clock):
    nodes = [MemoryNode("m0", 4 << 20), LandsThenTimesOut("m1", 4 << 20)]
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        await mirror.write(1 * REGION, b"a" * 4096)
        await mirror.write(40 * REGION, b"b" * 4096)
        mirror.legs[1].resync_rate = 4096  # region 1 is done long before region 40
        nodes[1].go_online()
        leg = mirror.legs[1]
        await wait_for(lambda: leg.role is LegRole.RESYNCING and 1 not in leg.pending)
        nodes[0].fail = lambda op, offset, length: (
            NodeError("m0", "EIO") if op == "write" and offset == 1 * REGION else None
        )
        nodes[1].trip = lambda offset: offset == 1 * REGION
        with pytest.raises(NodeError):
            await mirror.write(1 * REGION, b"W" * 4096)
        nodes[0].fail = None
        mirror.legs[1].resync_rate = 0
        await wait_for(lambda: mirror.state == "clean")
        await trio.sleep(30)
        assert data_of(nodes[0], mirror) == data_of(nodes[1], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


class SlowHeaderView(ClientView):
    """This client's reads of the header slots never return (once set)."""

    hang = False

    async def read(self, offset, length):
        if self.hang and offset >= self.node.size - 2 * BLOCK:
            await trio.sleep_forever()
        return await super().read(offset, length)


async def test_a_holder_past_its_lease_writes_no_bitmap_over_the_next_holder(autojump_clock):
    nodes = make_nodes(2)
    await start_nodes(nodes)
    first_views = [SlowHeaderView(node) for node in nodes]
    async with trio.open_nursery() as nursery:
        first = await open_client(nursery, first_views, mount_options={"assume_clean": True})
        await first.write(5 * REGION, b"o" * 4096)
        await trio.sleep(30)
        for view in first_views:
            view.hang = True  # it cannot renew: its lease runs out
        second = await open_client(nursery, [ClientView(node) for node in nodes], client_name="b:2")
        nodes[1].go_offline()
        await wait_for(lambda: second.legs[1].role is LegRole.STALE)
        await second.write(5 * REGION, b"N" * 4096)  # marked on leg 0 only
        await second.aclose()
        with trio.move_on_after(60):
            await first.write(3 * REGION, b"a" * 4096)  # must not touch the bitmap
        nodes[1].go_online()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        await wait_for(lambda: mirror.state == "clean")
        assert bytes(nodes[1].data[5 * REGION : 5 * REGION + 4096]) == b"N" * 4096
        assert data_of(nodes[0], mirror) == data_of(nodes[1], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_first_use_with_a_leg_away_is_refused(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, b"D" * 4096)
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    nodes[0].data[:] = bytes(len(nodes[0].data))  # leg 0 is a new, empty disk
    nodes[1].go_offline()  # leg 1, which holds everything, is away
    async with trio.open_nursery() as nursery:
        with pytest.raises(UserError, match="may hold the storage's data"):
            await open_mirror(nursery, nodes, mount_options={"mount_wait": "2s"})
        nursery.cancel_scope.cancel()
    assert bytes(nodes[1].data[:4096]) == b"D" * 4096


async def test_a_mount_waiting_for_an_unreadable_leg_looks_again_only_now_and_then(
    autojump_clock,
):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    size = len(nodes[1].data)
    reads = []

    def header_reads_fail(op, offset, length):
        if op == "read" and offset >= size - 2 * BLOCK:
            reads.append(trio.current_time())
            return NodeError("m1", "EIO", errno=errno.EIO)
        return None

    nodes[1].fail = header_reads_fail
    mirror = Mirror("vol0", [(n, None) for n in nodes], mirror_options())
    async with trio.open_nursery() as nursery:
        with pytest.raises(UserError, match="may hold newer data"):
            await mirror.start(nursery)
        nursery.cancel_scope.cancel()
    assert len(reads) <= 2 * (10 / 2 + 2)  # a look every 2 s over the 10 s wait

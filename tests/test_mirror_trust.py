"""The mirror under compound faults (issue 9): what it must never do.

Each test is one way the mirror used to lose or hide data: a mount serving
a leg the others left behind, a bitmap cleared over a failed flush, a
write only a resyncing leg took, a dead or silent leg stalling every
write for the whole resend budget, a holder writing after it lost its
lease. They run over in-memory nodes on trio's MockClock; the same faults
against real export processes are in test_mirror_faults.py.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio

from dstfuse.errors import NodeError, UserError
from dstfuse.mirror.algorithm import Mirror
from dstfuse.mirror.legs import LegRole
from dstfuse.nodes.base import Node, NodeState

from .test_mirror import (
    REGION,
    data_of,
    header_of,
    make_nodes,
    mirror_options,
    open_mirror,
    start_nodes,
    wait_for,
)
from .test_mirror_nodes import MemoryNode

KiB = 1024


async def mount_and_close(nodes, **options) -> None:
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, **options)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- 1. the mount never serves a leg the others left behind -----------------------
async def degrade_then_write_alone(nodes) -> bytes:
    """Legs 0 and 1 in sync; leg 1 dies; leg 0 takes a write alone; clean
    umount. Returns what leg 0 alone holds at region 4."""
    payload = os.urandom(4096)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(4 * REGION, b"o" * 4096)
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        await mirror.write(4 * REGION, payload)
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    return payload


async def test_a_mount_refuses_a_leg_the_others_left_behind(autojump_clock):
    nodes = make_nodes(2)
    await degrade_then_write_alone(nodes)
    nodes[0].go_offline()
    nodes[1].go_online()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        with pytest.raises(UserError) as refused:
            await open_mirror(nursery, nodes, mount_options={"mount_wait": "20s"})
        nursery.cancel_scope.cancel()
    message = str(refused.value)
    assert "leg 0" in message and "newer" in message
    assert "primary=1" in message and "force" in message
    assert trio.current_time() - started >= 20  # it waited for leg 0 first


async def test_a_mount_waits_for_the_newer_leg_and_takes_it(autojump_clock):
    nodes = make_nodes(2)
    payload = await degrade_then_write_alone(nodes)
    nodes[0].go_offline()
    nodes[1].go_online()

    async def leg0_returns() -> None:
        await trio.sleep(3)
        nodes[0].go_online()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leg0_returns)
        mirror = await open_mirror(nursery, nodes, mount_options={"mount_wait": "20s"})
        assert await mirror.read(4 * REGION, 4096) == payload
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_client_crash_after_degrading_never_rolls_back(autojump_clock):
    nodes = make_nodes(2)
    payload = os.urandom(4096)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        await mirror.write(6 * REGION, payload)
        nursery.cancel_scope.cancel()  # the client dies: no clean shutdown
    nodes[0].go_offline()
    nodes[1].go_online()
    async with trio.open_nursery() as nursery:
        with pytest.raises(UserError, match="leg 0"):
            await open_mirror(nursery, nodes, mount_options={"mount_wait": "1s"})
        nursery.cancel_scope.cancel()


async def test_a_leg_recorded_outdated_lets_the_survivor_mount_alone(autojump_clock):
    nodes = make_nodes(2)
    payload = await degrade_then_write_alone(nodes)
    nodes[1].go_offline()  # the outdated leg is the one missing: nothing newer is lost
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        mirror = await open_mirror(nursery, nodes, mount_options={"mount_wait": "20s"})
        assert trio.current_time() - started < 1
        assert mirror.state == "degraded"
        assert await mirror.read(4 * REGION, 4096) == payload
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_primary_mounts_the_older_leg_when_the_user_chooses_it(autojump_clock):
    nodes = make_nodes(2)
    await degrade_then_write_alone(nodes)
    nodes[0].go_offline()
    nodes[1].go_online()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"mount_wait": "1s", "primary": "1"}
        )
        assert await mirror.read(4 * REGION, 4096) == b"o" * 4096
        assert mirror.legs[0].role is LegRole.STALE
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_disk_states_are_shown_per_leg(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        assert [leg.disk_state() for leg in mirror.legs] == ["up_to_date", "up_to_date"]
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        await mirror.write(0, b"x" * 4096)
        assert [leg.disk_state() for leg in mirror.legs] == ["up_to_date", "outdated"]
        assert mirror.placements()[1].controls["disk"].read() == "outdated\n"
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- 3. a failed flush keeps the region marked ------------------------------------
async def test_a_leg_failing_the_clearing_flush_keeps_the_region_for_its_resync(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await trio.sleep(30)
        assert not mirror.runtime.bitmap.desired
        payload = os.urandom(4096)
        await mirror.write(2 * REGION, payload)

        def fdatasync_eio(op, offset, length):
            if op != "flush":
                return None
            # the node's write-back failed: the written page never reached its disk
            nodes[1].data[2 * REGION : 2 * REGION + 4096] = bytes(4096)
            nodes[1].fail = None
            return NodeError(str(nodes[1]), "fdatasync failed", errno=errno.EIO)

        nodes[1].fail = fdatasync_eio
        await wait_for(lambda: mirror.legs[1].role is not LegRole.IN_SYNC)
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- 4. a write only a resyncing leg took ----------------------------------------
async def test_a_write_only_the_resyncing_leg_took_is_copied_again(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await trio.sleep(30)
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        await mirror.write(3 * REGION, b"3" * 4096)
        await mirror.write(40 * REGION, b"4" * 4096)
        gate = trio.Event()
        nodes[1].hold = gate  # the copy of region 40 waits: region 3 is done
        nodes[1].hold_when = lambda op, offset, length: op == "write" and offset == 40 * REGION
        nodes[1].go_online()
        leg = mirror.legs[1]
        await wait_for(
            lambda: leg.role is LegRole.RESYNCING and leg.pending is not None
            and 3 not in leg.pending
        )
        nodes[0].fail = lambda op, offset, length: (
            NodeError(str(nodes[0]), "disk", errno=errno.EIO)
            if op == "write" and offset == 3 * REGION else None
        )
        with pytest.raises(NodeError) as failed:
            await mirror.write(3 * REGION, b"N" * 4096)
        assert failed.value.errno == errno.EIO
        nodes[0].fail = None
        gate.set()
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- invariants no test guarded -----------------------------------------------------
async def test_the_bitmap_mark_reaches_every_leg_before_the_data_write(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await trio.sleep(30)
        for node in nodes:
            node.ops.clear()
        await mirror.write(5 * REGION, b"m" * 4096)
        layout = mirror.legs[0].layout
        bitmap_offset = layout.bitmap_block_offset(0)
        for node in nodes:
            kinds = [
                "mark" if offset == bitmap_offset else "data"
                for op, offset, _, _ in node.ops
                if op == "write" and (offset == bitmap_offset or offset == 5 * REGION)
            ]
            assert kinds[:2] == ["mark", "data"], (node, node.ops)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stale_leg_that_is_online_and_nearest_is_never_read(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "read_check": "off"}
        )
        nodes[1].fail = lambda op, offset, length: (
            NodeError(str(nodes[1]), "disk", errno=errno.EIO)
            if op == "write" and offset == 0 else None
        )
        await mirror.write(0, b"n" * 4096)
        nodes[1].fail = None
        assert mirror.legs[1].role is LegRole.STALE
        mirror.legs[1].resync_timeout = 3600
        mirror.legs[1].position = 0  # nearest for a read at 0
        mirror.legs[0].position = mirror.size
        for _ in range(8):
            assert await mirror.read(0, 4096) == b"n" * 4096
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_leg_failing_only_a_data_write_goes_dirty_and_the_write_succeeds(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        nodes[1].fail = lambda op, offset, length: (
            NodeError(str(nodes[1]), "disk", errno=errno.EIO)
            if op == "write" and offset == 7 * REGION else None
        )
        await mirror.write(7 * REGION, b"d" * 4096)
        assert mirror.legs[1].role is LegRole.STALE
        assert not header_of(nodes[0]).members[1].in_sync
        nodes[1].fail = None
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- 5. a dead or silent leg does not stall the mirror ------------------------------
async def test_a_silent_leg_stalls_writes_only_for_the_leg_timeout(autojump_clock):
    nodes = make_nodes(2)
    for node in nodes:
        node.budget = 30.0
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "leg_timeout": "3s"}
        )
        nodes[1].hold = trio.Event()  # frozen: nothing answers, nothing fails
        started = trio.current_time()
        with trio.fail_after(60):
            await mirror.write(0, b"s" * 4096)
        # at most one read_timeout (a check page asked of the silent leg
        # first) plus one leg_timeout (the bitmap mark)
        assert trio.current_time() - started <= 2 + 3 + 0.5
        assert mirror.legs[1].role is LegRole.STALE
        for offset in range(1, 20):
            started = trio.current_time()
            with trio.fail_after(60):
                await mirror.write(offset * REGION, b"t" * 4096)
                await mirror.flush()
            assert trio.current_time() - started < 0.5
        nodes[1].hold.set()  # it thaws; what it held lands, then it resyncs
        nodes[1].hold = None
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_write_given_up_on_lands_before_the_leg_is_resynced(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "leg_timeout": "1s"}
        )
        await trio.sleep(30)
        gate = trio.Event()
        held = []

        def hold_first_data_write(op, offset, length):
            if op == "write" and offset == 9 * REGION and not held:
                held.append(offset)
                return True
            return False

        nodes[1].hold = gate  # leg 1 sits on the old write: the mirror goes on
        nodes[1].hold_when = hold_first_data_write
        with trio.fail_after(60):
            await mirror.write(9 * REGION, b"O" * 4096)
            assert mirror.legs[1].role is LegRole.STALE
            await mirror.write(9 * REGION, b"N" * 4096)  # newer, leg 0 only
            await trio.sleep(20)  # leg 1 is online: it would rejoin now

            async def old_write_lands_late() -> None:
                await trio.sleep(10)
                gate.set()

            nursery.start_soon(old_write_lands_late)
            await wait_for(lambda: gate.is_set() and nodes[1].counters.in_flight == 0)
            await wait_for(lambda: mirror.state == "clean")
        assert nodes[1].data[9 * REGION : 9 * REGION + 4096] == b"N" * 4096
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_an_unreachable_leg_degrades_at_once(autojump_clock):
    nodes = make_nodes(2)
    for node in nodes:
        node.budget = 30.0
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        gate = trio.Event()
        nodes[1].hold = gate
        nodes[1].hold_when = lambda op, offset, length: op == "write" and offset < REGION

        async def node_dies() -> None:
            await trio.sleep(0.2)
            nodes[1].go_offline()  # connection refused: the node is gone

        nursery.start_soon(node_dies)
        started = trio.current_time()
        with trio.fail_after(60):
            await mirror.write(0, b"u" * 4096)
        assert trio.current_time() - started < 1
        assert mirror.legs[1].role is LegRole.STALE
        gate.set()
        nodes[1].hold = None
        nodes[1].go_online()
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_single_leg_keeps_the_whole_budget(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "leg_timeout": "1s"}
        )
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        gate = trio.Event()
        nodes[0].hold = gate  # the last in-sync leg is slow: wait for it

        async def release() -> None:
            await trio.sleep(10)
            gate.set()

        nursery.start_soon(release)
        await mirror.write(0, b"w" * 4096)
        assert mirror.legs[0].in_sync
        nodes[0].hold = None
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_read_waiting_on_a_silent_leg_is_served_by_another(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "read_timeout": "500ms"}
        )
        await mirror.write(0, b"r" * 8192)
        nodes[0].hold = trio.Event()
        nodes[0].hold_when = lambda op, offset, length: op == "read"
        mirror.legs[0].position = 0
        mirror.legs[1].position = mirror.size
        started = trio.current_time()
        with trio.fail_after(60):
            assert await mirror.read(0, 4096) == b"r" * 4096
        assert trio.current_time() - started <= 0.6
        # the next reads do not wait for the silent leg again
        mirror.legs[0].position = 0
        started = trio.current_time()
        for _ in range(4):
            assert await mirror.read(0, 4096) == b"r" * 4096
        assert trio.current_time() - started < 0.1
        nodes[0].hold.set()
        nodes[0].hold = None
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- 2. one writer, fenced ----------------------------------------------------------
class ClientView(Node):
    """One client's path to a shared node: while `frozen`, every request of
    this client waits (its process is stopped); others go on."""

    kind = "M"

    def __init__(self, node: MemoryNode) -> None:
        super().__init__(node.address)
        self.node = node
        self.frozen: trio.Event | None = None

    async def start(self, nursery) -> None:
        self.size, self.writable = self.node.size, self.node.writable
        self._set_state(NodeState.ONLINE)

    async def aclose(self) -> None:
        self._set_state(NodeState.OFFLINE)

    async def _pass(self) -> None:
        await trio.lowlevel.checkpoint()
        while self.frozen is not None:
            await self.frozen.wait()

    async def read(self, offset, length):
        await self._pass()
        return await self.node.read(offset, length)

    async def write(self, offset, data, *, fua=False):
        await self._pass()
        await self.node.write(offset, data, fua=fua)

    async def flush(self):
        await self._pass()
        await self.node.flush()

    async def trim(self, offset, length):
        await self._pass()
        await self.node.trim(offset, length)

    async def write_zeroes(self, offset, length, *, fua=False):
        await self._pass()
        await self.node.write_zeroes(offset, length, fua=fua)

    async def checksum(self, offset, length):
        await self._pass()
        return await self.node.checksum(offset, length)


async def open_client(nursery, views, **options) -> Mirror:
    for view in views:
        await view.start(nursery)
    mirror = Mirror("vol0", [(view, None) for view in views], mirror_options(**options))
    await mirror.start(nursery)
    return mirror


async def test_a_stalled_holder_rechecks_its_lease_and_is_fenced_after_a_takeover(autojump_clock):
    nodes = make_nodes(2)
    await start_nodes(nodes)
    first_views = [ClientView(node) for node in nodes]
    async with trio.open_nursery() as nursery:
        first = await open_client(nursery, first_views, mount_options={"assume_clean": True})
        await first.write(0, b"1" * 4096)
        thaw = trio.Event()
        for view in first_views:
            view.frozen = thaw  # SIGSTOP: none of its requests reach the nodes
        await trio.sleep(1)
        second = await open_client(
            nursery, [ClientView(node) for node in nodes], client_name="second:2"
        )
        await second.write(0, b"2" * 4096)
        await trio.sleep(25)
        for view in first_views:
            view.frozen = None
        thaw.set()  # SIGCONT: whatever it had queued (heartbeats) goes out now
        with pytest.raises(NodeError) as fenced:
            await first.write(0, b"X" * 4096)
        assert fenced.value.errno == errno.EIO
        assert first.state == "fenced"
        await second.write(REGION, b"3" * 4096)  # the new holder goes on
        for node in nodes:
            assert bytes(node.data[:4096]) == b"2" * 4096
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_force_fences_the_old_holder_at_its_next_write(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        first = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        second = Mirror(
            "vol0", [(n, None) for n in nodes],
            mirror_options(client_name="second:2", force=True),
        )
        await second.start(nursery)
        await second.write(0, b"2" * 4096)
        await trio.sleep(first.options.heartbeat_interval * 3)
        with pytest.raises(NodeError):
            await first.write(0, b"X" * 4096)
        assert first.state == "fenced"
        await trio.sleep(10)
        assert header_of(nodes[0]).client_name == "second:2"
        for node in nodes:
            assert bytes(node.data[:4096]) == b"2" * 4096
        await second.aclose()
        nursery.cancel_scope.cancel()

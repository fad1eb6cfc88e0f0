"""The mirror algorithm over in-memory nodes: writes, reads, failures,
degraded operation, resync, crashes, the one-writer rule and split brain.

Every test runs on trio's MockClock (autojump), so heartbeats, resync rate
limits and retry delays take no real time. A client crash is simulated by
cancelling the mirror's nursery without `aclose`: the nodes keep every
acknowledged write, as export nodes do when the client dies.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from dstfuse.errors import NodeError, UserError
from dstfuse.mirror.algorithm import Mirror
from dstfuse.mirror.legs import LegRole
from dstfuse.mirror.metadata import BLOCK, MirrorHeader, newest_header
from dstfuse.storage import Storage

from .test_mirror_nodes import MemoryNode

KiB = 1024
MiB = 1 << 20
REGION = 64 * KiB
LEG_SIZE = 4 * MiB


def make_nodes(count: int = 2, size: int = LEG_SIZE) -> list[MemoryNode]:
    return [MemoryNode(f"m{index}", size) for index in range(count)]


async def start_nodes(nodes: list[MemoryNode]) -> None:
    async with trio.open_nursery() as nursery:
        for node in nodes:
            if node.size == 0:
                await node.start(nursery)


def mirror_options(**changes) -> dict:
    options = {
        "region_size": REGION,
        "resync_size": REGION,
        "resync_rate": 0,
        "client_name": "test-client:1",
        "client_id": os.urandom(16),
        "heartbeat_interval": 2.0,
        "bitmap_idle": 5.0,
    }
    options.update(changes)
    return options


async def open_mirror(nursery, nodes, **options) -> Mirror:
    await start_nodes(nodes)
    mirror = Mirror("vol0", [(node, None) for node in nodes], mirror_options(**options))
    await mirror.start(nursery)
    return mirror


async def wait_for(condition, timeout: float = 600.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


def header_of(node: MemoryNode) -> MirrorHeader:
    size = len(node.data)
    return newest_header(
        [bytes(node.data[size - 2 * BLOCK : size - BLOCK]), bytes(node.data[size - BLOCK :])]
    )


def data_of(node: MemoryNode, mirror: Mirror) -> bytes:
    return bytes(node.data[: mirror.size])


def placement(mirror: Mirror, index: int):
    return mirror.placements()[index]


# -- first use -------------------------------------------------------------
async def test_first_use_copies_leg0_to_the_others_and_writes_metadata_at_the_end(autojump_clock):
    nodes = make_nodes(3)
    nodes[0].data[: 2 * MiB] = os.urandom(2 * MiB)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        assert mirror.state == "resyncing"
        assert [mirror.node_state(p) for p in mirror.placements()] == [
            "clean", "resyncing", "resyncing",
        ]
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror) == data_of(nodes[2], mirror)
        done, total = mirror.resync_progress(placement(mirror, 1))
        assert done == total == mirror.size
        headers = [header_of(node) for node in nodes]
        assert len({h.storage_id for h in headers}) == 1
        assert [h.leg_index for h in headers] == [0, 1, 2]
        assert all(h.self_record.in_sync and not h.clean for h in headers)
        assert headers[0].client_name == "test-client:1"
        # storage size: the leg minus its metadata area, in whole blocks
        assert mirror.size == headers[0].layout.data_capacity
        assert mirror.size % BLOCK == 0 and LEG_SIZE - 64 * KiB < mirror.size < LEG_SIZE
        await mirror.aclose()
        assert all(header_of(node).clean for node in nodes)
        nursery.cancel_scope.cancel()


async def test_first_use_of_identical_legs_moves_no_data(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        await wait_for(lambda: mirror.state == "clean")
        data_writes = [op for op in nodes[1].ops if op[0] == "write" and op[1] < mirror.size]
        assert data_writes == []
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_assume_clean_takes_every_leg_as_in_sync(autojump_clock):
    nodes = make_nodes(2)
    nodes[1].data[:4096] = b"\x01" * 4096
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": "on"})
        assert mirror.state == "clean"
        assert nodes[1].data[:4096] == b"\x01" * 4096
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_first_use_refuses_when_leg0_is_unreachable(autojump_clock):
    nodes = make_nodes(2)
    await start_nodes(nodes)
    nodes[0].go_offline()
    async with trio.open_nursery() as nursery:
        with pytest.raises(UserError, match="leg 0.*unreachable"):
            await open_mirror(nursery, nodes)
        nursery.cancel_scope.cancel()


# -- writes and reads --------------------------------------------------------
async def test_writes_reach_every_leg_and_reads_spread_over_legs(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        storage = Storage("vol0", mirror)
        payload = os.urandom(256 * KiB)
        await storage.write(100 * KiB, payload)
        assert nodes[0].data[100 * KiB : 356 * KiB] == payload
        assert nodes[1].data[100 * KiB : 356 * KiB] == payload
        before = [node.counters.bytes_read for node in nodes]
        rng = random.Random(1)
        for _ in range(64):
            offset = rng.randrange(0, mirror.size // BLOCK - 4) * BLOCK
            assert await storage.read(offset, 4 * BLOCK) == bytes(
                nodes[0].data[offset : offset + 4 * BLOCK]
            )
        grown = [node.counters.bytes_read - b for node, b in zip(nodes, before, strict=True)]
        assert all(g > 0 for g in grown), grown
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_read_goes_to_the_leg_whose_last_request_ended_nearest(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        mirror.legs[0].position = 3 * MiB
        mirror.legs[1].position = 0

        def data_reads(node):
            return [op[1] for op in node.ops if op[0] == "read" and op[1] < mirror.size]

        await mirror.read(8 * KiB, 4 * KiB)
        assert data_reads(nodes[1]) == [8 * KiB] and data_reads(nodes[0]) == []
        await mirror.read(3 * MiB, 4 * KiB)  # leg 1 is now at 12K: leg 0 is nearer
        assert data_reads(nodes[0]) == [3 * MiB]
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_leg_failing_a_write_goes_dirty_and_the_write_succeeds(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        nodes[1].fail_all()
        await mirror.write(0, b"a" * 4096)
        assert mirror.legs[1].role is LegRole.STALE
        assert mirror.state == "degraded"
        assert mirror.node_state(placement(mirror, 1)) == "dirty"
        # the survivor's header records the stale leg before the write returned
        assert not header_of(nodes[0]).members[1].in_sync
        assert await mirror.read(0, 4096) == b"a" * 4096
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_leg_failing_a_flush_goes_dirty_and_the_flush_succeeds(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, b"f" * 4096)
        nodes[1].fail_all()
        await mirror.flush()  # fsync must not fail while one leg is good
        assert mirror.legs[1].role is LegRole.STALE
        assert not header_of(nodes[0]).members[1].in_sync
        assert nodes[0].flushes >= 1
        nodes[0].fail_all()
        with pytest.raises(NodeError) as info:
            await mirror.flush()
        assert info.value.errno == errno.EIO
        nursery.cancel_scope.cancel()


async def test_write_failing_on_every_leg_raises_eio_and_keeps_the_last_leg(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        for node in nodes:
            node.fail = lambda op, offset, length, node=node: (
                NodeError(str(node), "disk", errno=errno.EIO)
                if op == "write" and offset < 1 * MiB
                else None
            )
        with pytest.raises(NodeError) as caught:
            await mirror.write(0, b"a" * 4096)
        assert caught.value.errno == errno.EIO
        # the legs may differ in the region now: leg 0 is kept, leg 1 goes
        # stale and resyncs it from leg 0 (the region stays marked till then)
        assert mirror.legs[0].in_sync and mirror.legs[1].role is not LegRole.IN_SYNC
        assert 0 in mirror.runtime.bitmap.desired
        for node in nodes:
            node.fail = None
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[0], mirror) == data_of(nodes[1], mirror)
        nursery.cancel_scope.cancel()


async def test_a_failed_read_is_served_from_another_leg_and_repaired(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        payload = os.urandom(8192)
        await mirror.write(64 * KiB, payload)
        nodes[0].fail = lambda op, offset, length: (
            NodeError("m0", "bad sector", errno=errno.EIO) if op == "read" and offset == 64 * KiB
            else None
        )
        for leg in mirror.legs:
            leg.position = 64 * KiB
        mirror.legs[1].position = 0  # leg 0 is nearest: it is asked first
        assert await mirror.read(64 * KiB, 8192) == payload
        assert mirror.legs[0].read_repairs == 1
        assert placement(mirror, 0).controls["read_repairs"].read() == "1\n"
        assert ("write", 64 * KiB, 8192, False) in nodes[0].ops
        assert mirror.legs[0].in_sync
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_block_changed_behind_the_mirror_fails_its_check_and_is_repaired(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        payload = os.urandom(64 * KiB)
        await mirror.write(128 * KiB, payload)
        nodes[1].data[136 * KiB : 140 * KiB] = b"\xee" * 4096  # rot on leg 1
        mirror.legs[0].position = 3 * MiB
        mirror.legs[1].position = 128 * KiB  # leg 1 is asked first
        assert await mirror.read(128 * KiB, 64 * KiB) == payload
        assert mirror.legs[1].read_repairs == 1
        assert nodes[1].data[128 * KiB : 192 * KiB] == payload
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_bad_block_with_no_good_copy_is_an_error_not_silent_data(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, os.urandom(4096))
        nodes[0].data[0:4096] = b"\x01" * 4096
        nodes[1].data[0:4096] = b"\x02" * 4096
        with pytest.raises(NodeError, match="block check"):
            await mirror.read(0, 4096)
        nursery.cancel_scope.cancel()


async def test_read_check_off_serves_what_the_leg_has(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True, "read_check": "off"}
        )
        await mirror.write(0, os.urandom(4096))
        nodes[0].data[0:4096] = b"\x01" * 4096
        nodes[1].data[0:4096] = b"\x01" * 4096
        assert await mirror.read(0, 4096) == b"\x01" * 4096
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- degraded operation and resync -------------------------------------------
async def test_offline_leg_misses_writes_and_resyncs_only_the_written_regions(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await trio.sleep(30)  # let start-up marks clear: nothing is marked now
        assert not mirror.runtime.bitmap.desired
        nodes[1].go_offline()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        assert mirror.state == "degraded"
        assert mirror.node_state(placement(mirror, 1)) == "offline"
        written = {}
        for region in (3, 10, 11, 40):
            payload = os.urandom(8192)
            await mirror.write(region * REGION + 4096, payload)
            written[region] = payload
        # marked durably on the survivor before the writes completed
        marked = mirror.runtime.bitmap.desired
        assert {r for r in range(mirror.runtime.geometry.regions) if r in marked} == set(written)
        assert nodes[1].data[3 * REGION + 4096 : 3 * REGION + 12288] == bytes(8192)
        nodes[1].go_online()
        await wait_for(lambda: mirror.state == "clean")
        done, total = mirror.resync_progress(placement(mirror, 1))
        assert done == total == 4 * REGION
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_writes_during_resync_land_on_both_legs_and_the_legs_end_identical(autojump_clock):
    nodes = make_nodes(2)
    nodes[0].data[: 3 * MiB] = os.urandom(3 * MiB)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, resync_rate=512 * KiB)
        assert mirror.state == "resyncing"
        rng = random.Random(7)
        expected = bytearray(nodes[0].data[: mirror.size])

        async def writer(seed: int) -> None:
            local = random.Random(seed)
            for _ in range(40):
                offset = local.randrange(0, mirror.size // BLOCK - 8) * BLOCK
                payload = local.randbytes(local.choice([1, 2, 8]) * BLOCK)
                await mirror.write(offset, payload)
                expected[offset : offset + len(payload)] = payload
                await trio.sleep(local.random() * 0.2)

        async with trio.open_nursery() as writers:
            for _ in range(4):
                writers.start_soon(writer, rng.randrange(1 << 30))
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[0], mirror) == bytes(expected)
        assert data_of(nodes[1], mirror) == bytes(expected)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_write_to_the_window_being_copied_waits_for_the_copy(autojump_clock):
    nodes = make_nodes(2)
    nodes[0].data[:REGION] = b"\x05" * REGION
    async with trio.open_nursery() as nursery:
        await start_nodes(nodes)
        gate = trio.Event()
        nodes[1].hold = gate  # the resync's data writes to leg 1 are held
        nodes[1].hold_when = lambda op, offset, length: op == "write" and offset < MiB
        mirror = await open_mirror(nursery, nodes)
        await wait_for(lambda: mirror.runtime.resync.window is not None)
        window = mirror.runtime.resync.window
        wrote = trio.Event()

        async def write_into_window():
            await mirror.write(window.offset, b"\x09" * 4096)
            wrote.set()

        nursery.start_soon(write_into_window)
        await trio.sleep(1)
        assert not wrote.is_set()
        nodes[1].hold = None
        gate.set()
        await wrote.wait()
        await wait_for(lambda: mirror.state == "clean")
        assert nodes[1].data[window.offset : window.offset + 4096] == b"\x09" * 4096
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_resync_is_rate_limited_and_progress_moves(autojump_clock):
    nodes = make_nodes(2, size=2 * MiB)
    nodes[0].data[: 2 * MiB] = os.urandom(2 * MiB)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, resync_rate=256 * KiB)
        started = trio.current_time()
        seen = set()
        while mirror.state != "clean":
            seen.add(mirror.resync_progress(placement(mirror, 1))[0])
            await trio.sleep(0.5)
        elapsed = trio.current_time() - started
        total = mirror.resync_progress(placement(mirror, 1))[1]
        assert elapsed >= total / (256 * KiB) - 1
        assert len(seen) > 4  # progress was visible while it moved
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_leg_offline_at_start_is_adopted_when_it_returns(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    nodes[1].go_offline()
    async with trio.open_nursery() as nursery:
        # leg 1 may be newer for all leg 0 knows: the user says go on (force)
        mirror = await open_mirror(nursery, nodes, mount_options={"force": True})
        assert mirror.state == "degraded"
        await mirror.write(5 * REGION, b"z" * 4096)
        nodes[1].go_online()
        await wait_for(lambda: mirror.state == "clean")
        assert mirror.resync_progress(placement(mirror, 1))[1] == REGION
        assert nodes[1].data[5 * REGION : 5 * REGION + 4096] == b"z" * 4096
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- crashes -------------------------------------------------------------------
async def test_after_a_client_crash_only_marked_regions_resync_from_the_newest_leg(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, os.urandom(4096))
        await trio.sleep(30)  # idle: region 0 is cleared
        assert not mirror.runtime.bitmap.desired
        for region in (2, 7):
            await mirror.write(region * REGION, os.urandom(4096))
        # the crash leaves leg 1 behind on region 7 (a write it never got)
        nodes[1].data[7 * REGION : 7 * REGION + 4096] = bytes(4096)
        nursery.cancel_scope.cancel()  # crash: no aclose
    assert not header_of(nodes[0]).clean
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)  # the old holder's heartbeat stopped
        assert mirror.state == "resyncing"
        await wait_for(lambda: mirror.state == "clean")
        assert mirror.resync_progress(placement(mirror, 1)) == (2 * REGION, 2 * REGION)
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_clean_shutdown_clears_the_bitmap_and_the_next_mount_is_clean(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, os.urandom(REGION * 3))
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    header = header_of(nodes[0])
    assert header.clean and header.client_id == bytes(16)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        assert mirror.state == "clean"
        assert header_of(nodes[0]).generation == header.generation + 1
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stale_leg_stays_stale_across_mounts_and_resyncs_its_regions(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        nodes[1].fail_all()
        await mirror.write(9 * REGION, b"q" * 4096)
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    nodes[1].fail = None
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        await wait_for(lambda: mirror.state == "clean")
        assert mirror.resync_progress(placement(mirror, 1))[1] == REGION
        assert nodes[1].data[9 * REGION : 9 * REGION + 4096] == b"q" * 4096
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_torn_header_write_falls_back_to_the_other_slot(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    newest = header_of(nodes[0])
    size = len(nodes[0].data)
    slot = size - 2 * BLOCK if newest.sequence % 2 == 0 else size - BLOCK
    nodes[0].data[slot + 100 : slot + 200] = os.urandom(100)  # tear the newest slot
    older = header_of(nodes[0])
    assert older.sequence == newest.sequence - 1
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)
        assert mirror.size == newest.data_size
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- one writer ------------------------------------------------------------------
async def test_a_second_mount_is_refused_while_the_holder_heartbeats(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        first = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        second = Mirror("vol0", [(n, None) for n in nodes], mirror_options(client_name="other:2"))
        with pytest.raises(UserError, match=r"vol0 is mounted by test-client:1 since .*force"):
            await second.start(nursery)
        await first.aclose()
        nursery.cancel_scope.cancel()


async def test_force_takes_over_without_waiting(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        first = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        started = trio.current_time()
        second = Mirror(
            "vol0", [(n, None) for n in nodes], mirror_options(client_name="other:2", force=True)
        )
        await second.start(nursery)
        assert trio.current_time() - started < 1
        assert header_of(nodes[0]).client_name == "other:2"
        del first
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_heartbeat_advances_while_mounted(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        before = header_of(nodes[1]).heartbeat
        await trio.sleep(10)
        assert header_of(nodes[1]).heartbeat >= before + 4
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- split brain -----------------------------------------------------------------
async def split_brain(nodes: list[MemoryNode]) -> None:
    """Mount with leg 1 away, write; then with leg 0 away, write (each
    forced: the user overrides the wait for a leg that may be newer)."""
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    for away, payload in ((1, b"A"), (0, b"B")):
        nodes[away].go_offline()
        async with trio.open_nursery() as nursery:
            mirror = await open_mirror(nursery, nodes, mount_options={"force": True})
            await mirror.write((2 + away) * REGION, payload * 4096)
            await mirror.aclose()
            nursery.cancel_scope.cancel()
        nodes[away].go_online()


async def test_split_brain_is_refused_with_a_way_out(autojump_clock):
    nodes = make_nodes(2)
    await split_brain(nodes)
    async with trio.open_nursery() as nursery:
        with pytest.raises(UserError, match=r"split brain.*-o primary=0 or -o primary=1"):
            await open_mirror(nursery, nodes)
        nursery.cancel_scope.cancel()


async def test_primary_resolves_split_brain_from_the_chosen_leg(autojump_clock):
    nodes = make_nodes(2)
    await split_brain(nodes)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"primary": "1"})
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[0], mirror) == data_of(nodes[1], mirror)
        assert nodes[0].data[2 * REGION : 2 * REGION + 4096] == b"B" * 4096
        assert nodes[0].data[3 * REGION : 3 * REGION + 4096] == bytes(4096)  # A's change lost
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_returning_leg_written_without_us_is_not_resynced(autojump_clock):
    nodes = make_nodes(2)
    await split_brain(nodes)
    nodes[0].go_offline()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes)  # only leg 1: it is the source
        nodes[0].go_online()
        await trio.sleep(20)
        assert mirror.legs[0].role is LegRole.STALE
        assert "split brain" in mirror.legs[0].blocked
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- controls ------------------------------------------------------------------------
async def test_writing_dirty_forces_a_full_resync_and_clean_marks_in_sync(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        controls = placement(mirror, 1).controls
        nodes[1].data[0:4096] = b"\x07" * 4096  # differs: the full resync must fix it
        controls["dirty"].write("1\n")
        assert mirror.legs[1].role is LegRole.STALE
        await wait_for(lambda: mirror.state == "clean")
        assert mirror.resync_progress(placement(mirror, 1)) == (mirror.size, mirror.size)
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        nodes[1].fail_all()
        await mirror.write(0, b"w" * 4096)
        nodes[1].fail = None
        with pytest.raises(UserError, match="only in-sync leg"):
            placement(mirror, 0).controls["dirty"].write("1")
        mirror.legs[1].resync_timeout = 3600  # keep it from rejoining by itself
        controls["clean"].write("1")
        await wait_for(lambda: mirror.state == "clean")
        assert nodes[1].data[0:4096] != b"w" * 4096  # clean trusts the user: nothing copied
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_resync_controls_validate_their_input(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        controls = placement(mirror, 0).controls
        controls["resync_size"].write("1M\n")
        assert controls["resync_size"].read() == f"{MiB}\n"
        for bad in ("0", "-4K", "3000", "1G", "lots"):
            with pytest.raises(UserError, match="resync_size"):
                controls["resync_size"].write(bad)
        controls["resync_timeout"].write("250")
        assert controls["resync_timeout"].read() == "250\n"
        controls["resync_timeout"].write("2s")
        assert controls["resync_timeout"].read() == "2000\n"
        for bad in ("0", "-1", "2h", "soon"):
            with pytest.raises(UserError, match="resync_timeout"):
                controls["resync_timeout"].write(bad)
        controls["resync_rate"].write("10M/s")
        assert controls["resync_rate"].read() == f"{10 * MiB}\n"
        with pytest.raises(UserError, match="resync_rate"):
            controls["resync_rate"].write("fast")
        assert controls["read_repairs"].write is None
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_crashed_holder_is_taken_over_once_its_heartbeat_stands_still(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await trio.sleep(5)
        nursery.cancel_scope.cancel()  # kill -9: the heartbeat stops
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, client_name="next:2")
        waited = trio.current_time() - started
        assert mirror.options.holder_timeout <= waited < mirror.options.holder_timeout + 2
        assert header_of(nodes[0]).client_name == "next:2"
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_holder_that_unmounts_while_we_watch_lets_us_in(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        first = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})

        async def unmount_soon():
            await trio.sleep(1)  # before its next heartbeat
            await first.aclose()

        nursery.start_soon(unmount_soon)
        second = Mirror("vol0", [(n, None) for n in nodes], mirror_options(client_name="b:2"))
        await second.start(nursery)
        assert header_of(nodes[1]).client_name == "b:2"
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_a_slow_leg_within_its_budget_delays_writes_but_loses_none(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        gate = trio.Event()
        nodes[1].hold = gate
        nodes[1].hold_when = lambda op, offset, length: op == "write" and offset < MiB

        async def release_later():
            await trio.sleep(2)
            gate.set()

        nursery.start_soon(release_later)
        started = trio.current_time()
        await mirror.write(0, b"s" * 8192)
        assert trio.current_time() - started >= 2  # waited for the slow leg
        assert nodes[1].data[:8192] == b"s" * 8192
        assert mirror.state == "clean"
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_trim_write_zeroes_and_flush_reach_every_leg(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, os.urandom(64 * KiB))
        await mirror.trim(4 * KiB, 8 * KiB)
        await mirror.write_zeroes(32 * KiB, 6 * KiB, fua=True)
        await mirror.flush()
        for node in nodes:
            assert node.data[4 * KiB : 12 * KiB] == bytes(8 * KiB)
            assert node.data[32 * KiB : 38 * KiB] == bytes(6 * KiB)
            assert node.flushes >= 1
        assert data_of(nodes[0], mirror) == data_of(nodes[1], mirror)
        # the trimmed blocks' checks say "zeroes": a read of them is checked
        nodes[0].data[4 * KiB : 8 * KiB] = b"\x01" * 4096
        mirror.legs[0].position = 4 * KiB
        mirror.legs[1].position = 3 * MiB
        assert await mirror.read(4 * KiB, 4 * KiB) == bytes(4 * KiB)
        assert mirror.legs[0].read_repairs == 1
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_leg_failing_during_its_resync_goes_stale_and_finishes_later(autojump_clock):
    nodes = make_nodes(2)
    nodes[0].data[: 2 * MiB] = os.urandom(2 * MiB)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, resync_rate=256 * KiB)
        await wait_for(lambda: mirror.resync_progress(placement(mirror, 1))[0] > 0)
        nodes[1].fail_all()
        await wait_for(lambda: mirror.legs[1].role is LegRole.STALE)
        assert mirror.state == "degraded"
        nodes[1].fail = None
        await wait_for(lambda: mirror.state == "clean")
        assert data_of(nodes[1], mirror) == data_of(nodes[0], mirror)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_linear_of_mirrors_and_a_mirror_of_linears_stack(autojump_clock):
    from dstfuse.algorithms import algorithm_class
    from dstfuse.nodes.stacked import StorageNode

    nodes = make_nodes(4, size=2 * MiB)
    async with trio.open_nursery() as nursery:
        await start_nodes(nodes)
        halves = []
        for name, pair in (("m0", nodes[:2]), ("m1", nodes[2:])):
            mirror = Mirror(name, [(n, None) for n in pair], mirror_options(assume_clean=True))
            await mirror.start(nursery)
            inner = StorageNode(Storage(name, mirror), poll_interval=0.5)
            await inner.start(nursery)
            halves.append((inner, None))
        linear = Storage("big", algorithm_class("linear")("big", halves, {}))
        payload = os.urandom(256 * KiB)
        boundary = halves[0][0].size - 128 * KiB
        await linear.write(boundary, payload)
        assert await linear.read(boundary, len(payload)) == payload
        assert nodes[0].data[boundary : boundary + 128 * KiB] == payload[: 128 * KiB]
        assert nodes[1].data[boundary : boundary + 128 * KiB] == payload[: 128 * KiB]
        assert nodes[3].data[: 128 * KiB] == payload[128 * KiB :]
        nursery.cancel_scope.cancel()


async def test_cancelling_the_nursery_ends_every_background_task(autojump_clock):
    nodes = make_nodes(3)
    with trio.move_on_after(100) as scope:
        async with trio.open_nursery() as nursery:
            mirror = await open_mirror(
                nursery, nodes, mount_options={"assume_clean": True}, resync_rate=64 * KiB
            )
            placement(mirror, 2).controls["dirty"].write("1")
            mirror.controls()["verify"].write("verify")
            await wait_for(lambda: mirror.state == "resyncing")
            assert mirror.controls()["verify"].read().startswith("running")
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught  # every task ended with the nursery


def marked(mirror: Mirror) -> int:
    """The count `.dst/<storage>/bitmap` reports."""
    return int(mirror.runtime.bitmap_text().split()[1])


async def test_regions_being_cleared_are_reported_marked_until_the_clear_is_done(
    autojump_clock,
):
    """The lazy clearing takes idle regions out of the in-memory bitmap
    first, then flushes every leg and writes the bitmap without them; if a
    leg fails meanwhile they are marked again. Until the clear is done they
    are still marked on disk, so `.dst/<storage>/bitmap` counts them (it
    said 0 while the flush ran: a test that waited for 0 and then killed a
    leg saw every region marked again)."""
    nodes = make_nodes()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        await wait_for(lambda: marked(mirror) == 0)
        for region in (1, 5, 9, 13):  # apart and mid-region: no stream marks ahead
            await mirror.write(region * REGION + 8192, os.urandom(4096))
        assert marked(mirror) == 4
        nodes[1].hold = trio.Event()  # the clearing's flush of leg 1 waits
        nodes[1].hold_when = lambda op, offset, length: op == "flush"
        await wait_for(lambda: len(mirror.runtime.bitmap.clearing) == 4)
        assert marked(mirror) == 4
        nodes[1].fail_all()
        nodes[1].hold.set()
        await wait_for(lambda: not mirror.legs[1].in_sync)
        assert marked(mirror) == 4
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_an_idle_mirror_keeps_no_buffer_of_a_finished_write(autojump_clock):
    """The dispatcher's parked runner tasks hold nothing of the requests
    they ran: a write's data is freed once the write has returned."""
    import gc
    import weakref

    class Buffer(bytearray):  # bytearray itself takes no weak reference
        pass

    nodes = make_nodes()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        data = Buffer(os.urandom(64 * KiB))
        freed = weakref.ref(data)
        await mirror.write(0, data)
        del data
        gc.collect()
        assert freed() is None, [type(r) for r in gc.get_referrers(freed())]
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_while_writes_go_on_the_most_recent_idle_regions_stay_marked(autojump_clock):
    """The hot set (`bitmap_hot`, DRBD's activity log): while the storage
    is being written, idle regions leave the bitmap only beyond the hot
    set, least recently written first, so a writer going round a working
    set pays no clearing flush and no marking FUA; once the storage is
    quiet for `bitmap_idle`, every idle region is cleared. (Without the
    hot set, the clearing took every idle region at once: 1 stayed.)"""
    nodes = make_nodes()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, assume_clean=True, bitmap_hot=str(4 * REGION)
        )
        await wait_for(lambda: marked(mirror) == 0)
        for region in (1, 5, 9, 13, 17, 21):  # apart, mid-region: no mark-ahead
            await mirror.write(region * REGION + 8192, os.urandom(4096))
            await trio.sleep(0.5)
        flushes = [node.flushes for node in nodes]
        for _ in range(30):  # 15 s of writes to one more region
            await mirror.write(30 * REGION + 8192, os.urandom(4096))
            await trio.sleep(0.5)
        assert sorted(mirror.runtime.bitmap.desired) == [13, 17, 21, 30]
        assert all(node.flushes > before for node, before in zip(nodes, flushes, strict=True))
        await trio.sleep(8)  # quiet for bitmap_idle: everything idle goes
        assert marked(mirror) == 0
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_writer_inside_the_hot_set_causes_no_clearing_flush(autojump_clock):
    """With the default hot set (1 GiB, more than this storage), a writer
    going round 12 regions for a minute, each one idle for 6 s of every 6.5
    (longer than bitmap_idle), costs the legs no flush at all until it
    stops. (Without the hot set each region was cleared, with a flush of
    both legs, and marked again on every round.)"""
    nodes = make_nodes()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        await wait_for(lambda: marked(mirror) == 0)
        flushes = [node.flushes for node in nodes]
        for step in range(120):
            await mirror.write((step % 12) * 4 * REGION + 8192, os.urandom(4096))
            await trio.sleep(0.5)
        assert [node.flushes for node in nodes] == flushes
        assert marked(mirror) == 12
        await trio.sleep(8)
        assert marked(mirror) == 0
        assert all(node.flushes > before for node, before in zip(nodes, flushes, strict=True))
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_zeroed_checks_are_called_valid_only_after_a_flush_made_them_durable(
    autojump_clock,
):
    """First use zeroes the check arrays; a FUA header vouches for itself
    only, so the headers say CHECKS_VALID only once a FLUSH of every leg
    has made the zeroing durable (a crash before it only costs the
    checks: the next mount zeroes them again)."""
    nodes = make_nodes()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        assert not any(header_of(node).checks_valid for node in nodes)
        await mirror.write(8192, os.urandom(4096))
        await mirror.flush()
        assert all(header_of(node).checks_valid for node in nodes)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_checks_zeroed_at_mount_are_never_called_valid_after_a_flush_failed_everywhere(
    autojump_clock,
):
    """A FLUSH that failed on every in-sync leg may have dropped the dirty
    pages, the mount's zeroing of the check arrays among them: no later
    flush of this mount may make the headers call the checks valid."""
    nodes = make_nodes()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        await mirror.write(8192, os.urandom(4096))
        for node in nodes:
            node.fail = lambda op, offset, length, node=node: (
                NodeError(str(node), "flush failed", errno=errno.EIO) if op == "flush" else None
            )
        with pytest.raises(NodeError):
            await mirror.flush()
        for node in nodes:
            node.fail = None
        await wait_for(lambda: mirror.state == "clean")
        await mirror.write(8192, os.urandom(4096))
        await mirror.flush()
        assert not any(header_of(node).checks_valid for node in nodes)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_read_whose_legs_all_went_stale_meanwhile_asks_the_leg_left(autojump_clock):
    """Seeds 8014 and 8019 of a 150-example run (2026-12-02): leg 0 was
    given up as slow (leg 1 could serve the read), then leg 1 went stale
    before it was asked, and the read found no leg and crashed (IndexError
    in `_settle_rejected`). It now asks the legs that may serve it again:
    leg 0, the last one, with its full budget."""
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.write(0, b"r" * 4096)
        mirror.legs[0].position, mirror.legs[1].position = 0, 3 * MiB  # leg 0 first
        nodes[0].hold = trio.Event()
        nodes[0].hold_when = lambda op, offset, length: op == "read" and offset == 0
        result: list[bytes] = []

        async def read() -> None:
            result.append(bytes(await mirror.read(0, 4096)))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        nodes[1].fail_all()
        await mirror.write(2 * MiB, b"x" * 4096)  # fails on leg 1 only: it goes stale
        assert mirror.legs[1].role is LegRole.STALE
        await trio.sleep(3)  # past read_timeout (2 s): leg 0 was given up as slow
        nodes[0].hold.set()
        await wait_for(lambda: bool(result))
        assert result == [b"r" * 4096]
        nursery.cancel_scope.cancel()

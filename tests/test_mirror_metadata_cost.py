"""What the mirror's durable metadata costs on the write path, counted per
leg on in-memory nodes (docs/mirror-metadata.md, "Cost on the write path"):
a region already marked costs no metadata request; writers waiting on the
same bitmap block share one write; a sequential stream marks ahead; the
check pages never add a synchronous write to a data write.
"""

from __future__ import annotations

import trio

from dstfuse.mirror.bitmap import MARK_AHEAD

from .test_mirror import REGION, make_nodes, open_mirror

KiB = 1024
MiB = 1 << 20


def metadata_ops(mirror, leg_index: int, node) -> list[tuple]:
    """The node's requests outside the data area, and its flushes."""
    return [op for op in node.ops if op[0] == "flush" or op[1] >= mirror.size]


def bitmap_writes(mirror, leg_index: int, node) -> int:
    layout = mirror.legs[leg_index].layout
    return sum(
        1
        for op in node.ops
        if op[0] == "write" and layout.bitmap_offset <= op[1] < layout.slot_offsets[0]
    )


async def test_a_write_to_a_marked_region_sends_no_metadata_and_no_flush(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        await mirror.write(0, b"a" * 4096)
        for node in nodes:
            node.ops.clear()
        for block in range(1, 16):
            await mirror.write(block * 4096, b"b" * 4096)
        for index, node in enumerate(nodes):
            assert metadata_ops(mirror, index, node) == []
            assert len(node.ops) == 15
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_writers_waiting_on_one_bitmap_block_share_its_write(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        for node in nodes:
            node.ops.clear()
        # 32 writers on 32 different unmarked regions at once (QD32)
        async with trio.open_nursery() as writers:
            for region in range(0, 64, 2):
                writers.start_soon(mirror.write, region * REGION, b"c" * 4096)
        for index, node in enumerate(nodes):
            # the first write in flight, then one for everyone who came meanwhile
            assert bitmap_writes(mirror, index, node) <= 2
        assert all(mirror.runtime.bitmap.is_marked(region) for region in range(0, 64, 2))
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_sequential_stream_marks_ahead_in_one_bitmap_write(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        for node in nodes:
            node.ops.clear()
        regions = 36
        for offset in range(0, regions * REGION, 16 * KiB):
            await mirror.write(offset, b"d" * 16 * KiB)
        for index, node in enumerate(nodes):
            # one mark per MARK_AHEAD + 1 regions, not one per region
            assert bitmap_writes(mirror, index, node) <= regions // (MARK_AHEAD + 1) + 2
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_random_writes_do_not_mark_ahead(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        for region in (3, 10, 20, 30):
            await mirror.write(region * REGION + 8 * KiB, b"e" * 4096)
        assert len(mirror.runtime.bitmap.desired) == 4
        await mirror.aclose()
        nursery.cancel_scope.cancel()


# -- block checks off the write path ---------------------------------------
BIG_LEG = 64 * MiB  # 32 check pages, four times the smallest cache


def check_writes_held(mirror, index: int, pages: int = 1 << 30):
    """Hold writes of the first `pages` check pages."""
    layout = mirror.legs[index].layout

    def held(op: str, offset: int, length: int) -> bool:
        return op == "write" and layout.checks_offset <= offset < min(
            layout.bitmap_offset, layout.checks_offset + pages * 4096
        )

    return held


def unmarked_regions_have_true_or_zero_checks(mirror, node) -> list[int]:
    """Regions the on-disk bitmap does not mark whose on-disk entries are
    neither zero nor the digest of the on-disk data (checks.py's crash rule)."""
    from dstfuse.mirror.bitmap import RegionBits
    from dstfuse.mirror.checks import block_digest
    from dstfuse.mirror.metadata import unpack_bitmap_block

    layout = mirror.legs[0].layout
    geometry = mirror.runtime.geometry
    raw = bytes(node.data[layout.bitmap_offset : layout.bitmap_offset + 4096])
    bits = unpack_bitmap_block(mirror.membership.storage_id, 0, raw)
    marked = RegionBits(geometry.regions)
    marked.set_block_bytes(0, bits)
    wrong = []
    for region in range(geometry.regions):
        if region in marked:
            continue
        start, end = geometry.region_bounds(region)
        for block in range(start // 4096, end // 4096):
            at = layout.checks_offset + block * 8
            entry = int.from_bytes(node.data[at : at + 8], "little")
            data = node.data[block * 4096 : (block + 1) * 4096]
            if entry not in (0, block_digest(data)):
                wrong.append(region)
                break
    return wrong


async def test_a_data_write_never_waits_for_an_evicted_check_page(autojump_clock):
    nodes = make_nodes(2, BIG_LEG)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True, check_cache_pages=8)
        for index, node in enumerate(nodes):
            node.hold = trio.Event()
            node.hold_when = check_writes_held(mirror, index)
        with trio.fail_after(10):
            # one write in each of 14 check pages: the cache holds 8, the
            # writer's queue 8 more
            for page in range(14):
                await mirror.write(page * 2 * MiB, b"f" * 4096)
        for node in nodes:
            node.hold.set()
            node.hold = None
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_region_is_cleared_only_after_its_evicted_check_page_landed(autojump_clock):
    nodes = make_nodes(2, BIG_LEG)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, assume_clean=True, check_cache_pages=8, region_size=2 * MiB
        )
        for page in range(14):
            await mirror.write(page * 2 * MiB, b"old" * 1365 + b"o")
        await trio.sleep(30)  # cleared: the old bytes' entries are on disk
        assert not mirror.runtime.bitmap.desired
        for index, node in enumerate(nodes):
            node.hold = trio.Event()
            node.hold_when = check_writes_held(mirror, index, pages=6)  # the evicted ones
        with trio.fail_after(10):
            for page in range(14):
                await mirror.write(page * 2 * MiB, bytes([page + 1]) * 4096)
        await trio.sleep(30)  # the lazy clearing runs while the page writes hang
        for node in nodes:
            assert unmarked_regions_have_true_or_zero_checks(mirror, node) == []
        for node in nodes:
            node.hold.set()
            node.hold = None
        await trio.sleep(30)
        assert not mirror.runtime.bitmap.desired  # cleared once the pages landed
        for node in nodes:
            assert unmarked_regions_have_true_or_zero_checks(mirror, node) == []
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stream_not_aligned_to_regions_marks_ahead_too(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        for node in nodes:
            node.ops.clear()
        regions = 36
        for offset in range(4 * KiB, regions * REGION, 24 * KiB):
            await mirror.write(offset, b"g" * 24 * KiB)
        for index, node in enumerate(nodes):
            assert bitmap_writes(mirror, index, node) <= regions // (MARK_AHEAD + 1) + 2
        await mirror.aclose()
        nursery.cancel_scope.cancel()

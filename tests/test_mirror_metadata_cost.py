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


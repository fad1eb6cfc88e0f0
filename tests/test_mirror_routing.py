"""Which leg a mirror's reads go to: at depth, every in-sync leg serves
reads (a mirror reads at least as fast as one node), one at a time
(routing.py)."""

from __future__ import annotations

import trio
import trio.testing

from .test_mirror import make_nodes, open_mirror

KiB = 1024


def data_reads(mirror, node) -> int:
    return sum(1 for op in node.ops if op[0] == "read" and op[1] < mirror.size)


async def test_sequential_reads_in_flight_are_spread_over_the_legs(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        await mirror.read(0, 4096)  # the check page is cached
        for node in nodes:
            node.ops.clear()
            node.hold = trio.Event()
            node.hold_when = lambda op, offset, length: op == "read"
        async with trio.open_nursery() as readers:
            for index in range(8):  # in order, as a sequential reader issues them
                readers.start_soon(mirror.read, index * 64 * KiB, 64 * KiB)
                await trio.testing.wait_all_tasks_blocked()
            in_flight = [node.counters.in_flight for node in nodes]
            for node in nodes:
                node.hold.set()
        # nearest-first alone would send all eight to one leg
        assert sorted(in_flight) == [4, 4]
        assert [data_reads(mirror, node) for node in nodes] == [4, 4]
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_a_lone_read_still_goes_to_the_nearest_leg(autojump_clock):
    nodes = make_nodes(2)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, assume_clean=True)
        mirror.legs[0].position = 0
        mirror.legs[1].position = 1 << 20
        for node in nodes:
            node.ops.clear()
        for index in range(4):  # one at a time: each continues leg 1's stream
            await mirror.read((1 << 20) + index * 4096, 4096)
        assert [data_reads(mirror, node) for node in nodes] == [0, 4]
        await mirror.aclose()
        nursery.cancel_scope.cancel()

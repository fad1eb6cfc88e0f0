"""Removing a mirror leg from the middle over in-memory nodes: writes in
flight during the removal and renumbering, and a leg that was offline
through the renumbering coming back (MockClock, autojump)."""

from __future__ import annotations

import random

import trio

from dstfuse.mirror.metadata import Renumbering

from .test_mirror import REGION, data_of, header_of, make_nodes, open_mirror, placement, wait_for


async def test_writes_during_the_removal_of_leg_0_complete_and_the_legs_stay_identical(
    autojump_clock,
):
    nodes = make_nodes(3)
    rng = random.Random(14)
    written: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})

        async def writer(seed: int) -> None:
            local = random.Random(seed)
            for _ in range(40):
                offset = local.randrange(0, mirror.size // 4096) * 4096
                data = local.randbytes(4096)
                await mirror.write(offset, data)
                written[offset] = data
                await trio.sleep(local.random() * 0.01)

        async with trio.open_nursery() as writers:
            for _ in range(8):
                writers.start_soon(writer, rng.randrange(1 << 30))
            await trio.sleep(0.05)
            mirror.check_removal((0,))
            gone = mirror.remove_legs((0,))
            assert gone[0].node is nodes[0]
        await wait_for(lambda: len(mirror.legs) == 2 and mirror.membership.renumbered)
        assert [leg.node for leg in mirror.legs] == nodes[1:]
        assert [leg.index for leg in mirror.legs] == [0, 1]
        assert [p.directory for p in mirror.placements()] == ["n-0-0", "n-0-1"]
        assert placement(mirror, 0).node is nodes[1]
        for offset, data in written.items():
            assert await mirror.read(offset, 4096) == data
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    assert data_of(nodes[1], mirror) == data_of(nodes[2], mirror)
    for position, node in enumerate(nodes[1:]):
        header = header_of(node)
        assert header.leg_index == position and len(header.members) == 2
        assert header.renumbered == Renumbering(0b1, header.renumbered.generation, 0)
    assert not header_of(nodes[0]).self_record.in_sync


async def test_a_leg_offline_through_a_renumbering_is_translated_when_it_returns(
    autojump_clock,
):
    nodes = make_nodes(3)
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    nodes[2].go_offline()
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"force": True})
        await mirror.write(5 * REGION, b"z" * 4096)
        mirror.check_removal((0,))
        mirror.remove_legs((0,))
        await wait_for(lambda: len(mirror.legs) == 2 and mirror.membership.renumbered)
        assert header_of(nodes[2]).leg_index == 2  # still the old numbering
        nodes[2].go_online()
        await wait_for(lambda: mirror.state == "clean")
        # the bitmap said what it missed: a partial copy, not a refusal
        assert mirror.resync_progress(placement(mirror, 1))[1] == REGION
        assert nodes[2].data[5 * REGION : 5 * REGION + 4096] == b"z" * 4096
        assert header_of(nodes[2]).leg_index == 1
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    assert data_of(nodes[1], mirror) == data_of(nodes[2], mirror)

"""Online verify and repair through the storage's `verify` control file, over
in-memory nodes (checksums computed by the nodes) and over stacked local
nodes (a leg that is itself a linear storage)."""

from __future__ import annotations

import os

import pytest
import trio

from dstfuse.algorithms import algorithm_class
from dstfuse.errors import UserError
from dstfuse.mirror.metadata import BLOCK
from dstfuse.nodes.local import LocalNode
from dstfuse.nodes.stacked import StorageNode
from dstfuse.storage import Storage

from .test_mirror import REGION, data_of, mirror_options, open_mirror, wait_for
from .test_mirror_nodes import MemoryNode

MiB = 1 << 20


async def run_verify(mirror, word: str = "verify") -> str:
    control = mirror.controls()["verify"]
    control.write(word + "\n")
    assert control.read().startswith("running ")
    await wait_for(lambda: not control.read().startswith("running"))
    return control.read()


async def test_verify_of_equal_legs_reports_nothing_and_moves_no_data(autojump_clock):
    nodes = [MemoryNode(f"m{i}", 4 * MiB) for i in range(2)]
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        assert mirror.controls()["verify"].read() == "idle\n"
        await mirror.write(0, os.urandom(REGION * 2))
        reads_before = [n.counters.bytes_read for n in nodes]
        text = await run_verify(mirror)
        assert text == "done: 0 differing ranges\n"
        assert [n.counters.bytes_read for n in nodes] == reads_before
        assert all(any(op[0] == "checksum" for op in n.ops) for n in nodes)
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_verify_finds_exactly_the_changed_blocks_and_repair_fixes_them(autojump_clock):
    nodes = [MemoryNode(f"m{i}", 4 * MiB) for i in range(2)]
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(nursery, nodes, mount_options={"assume_clean": True})
        payload = os.urandom(8 * REGION)
        await mirror.write(0, payload)
        nodes[1].data[5 * BLOCK : 7 * BLOCK] = b"\x01" * (2 * BLOCK)  # behind its back
        nodes[0].data[3 * REGION + 100] ^= 0xFF
        text = await run_verify(mirror)
        assert text == (
            f"done: 2 differing ranges\n{5 * BLOCK} {2 * BLOCK}\n{3 * REGION} {BLOCK}\n"
        )
        assert data_of(nodes[0], mirror) != data_of(nodes[1], mirror)  # verify changes nothing
        text = await run_verify(mirror, "repair")
        assert text == (
            f"done: 2 differing ranges, 2 repaired\n{5 * BLOCK} {2 * BLOCK} repaired\n"
            f"{3 * REGION} {BLOCK} repaired\n"
        )
        # the block checks chose the good copy of each block, whichever leg had it
        assert data_of(nodes[0], mirror)[: 8 * REGION] == payload
        assert data_of(nodes[1], mirror)[: 8 * REGION] == payload
        assert await run_verify(mirror) == "done: 0 differing ranges\n"
        await mirror.aclose()
        nursery.cancel_scope.cancel()


async def test_verify_refuses_bad_words_a_second_run_and_a_degraded_mirror(autojump_clock):
    nodes = [MemoryNode(f"m{i}", 4 * MiB) for i in range(2)]
    async with trio.open_nursery() as nursery:
        mirror = await open_mirror(
            nursery, nodes, mount_options={"assume_clean": True}, resync_rate=MiB
        )
        control = mirror.controls()["verify"]
        with pytest.raises(UserError, match="'verify' or 'repair'"):
            control.write("check")
        control.write("verify")
        with pytest.raises(UserError, match="already running"):
            control.write("verify")
        await wait_for(lambda: control.read().startswith("done"))
        nodes[1].fail_all()
        await mirror.write(0, b"x" * BLOCK)
        with pytest.raises(UserError, match="verify needs two"):
            control.write("verify")
        assert control.read().startswith("failed: ")
        nursery.cancel_scope.cancel()


async def test_verify_compares_bytes_when_a_stacked_legs_digest_differs(tmp_path):
    """Leg 0 is a linear of two files, so its checksum over the boundary is a
    digest of digests; the bytes are equal, so nothing is reported."""
    paths = [tmp_path / name for name in ("a.img", "b.img", "c.img")]
    for path, size in zip(paths, (1 * MiB, 3 * MiB, 4 * MiB), strict=True):
        path.write_bytes(b"")
        os.truncate(path, size)
    async with trio.open_nursery() as nursery:
        local = [LocalNode(path) for path in paths]
        for node in local:
            await node.start(nursery)
        pieces = [(local[0], None), (local[1], None)]
        linear = Storage("lin", algorithm_class("linear")("lin", pieces, {}))
        stacked = StorageNode(linear, poll_interval=0.5)
        await stacked.start(nursery)
        mirror = algorithm_class("mirror")(
            "vol0", [(stacked, None), (local[2], None)], mirror_options(region_size=2 * MiB)
        )
        await mirror.start(nursery)
        await wait_for(lambda: mirror.state == "clean")
        payload = os.urandom(2 * MiB)
        await mirror.write(0, payload)
        assert await stacked.checksum(0, 2 * MiB) != await local[2].checksum(0, 2 * MiB)
        assert await run_verify(mirror) == "done: 0 differing ranges\n"
        await mirror.aclose()
        assert paths[2].read_bytes()[: 2 * MiB] == payload
        assert (paths[0].read_bytes() + paths[1].read_bytes())[: 2 * MiB] == payload
        await stacked.aclose()
        for node in local:
            await node.aclose()
        nursery.cancel_scope.cancel()

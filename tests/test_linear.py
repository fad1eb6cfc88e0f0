"""The linear algorithm and the Storage front over local nodes on temp files:
placement, splitting at node boundaries, size limits, bounds and errors."""

from __future__ import annotations

import errno
import os

import pytest
import trio
import xxhash

from dstfuse.algorithms import algorithm_class
from dstfuse.errors import DstError, RequestOutOfRange
from dstfuse.nodes.local import LocalNode
from dstfuse.storage import Storage

KIB = 1024


@pytest.fixture
def backing_files(tmp_path):
    paths = []
    for index, size in enumerate([64 * KIB, 32 * KIB, 128 * KIB]):
        path = tmp_path / f"node{index}.img"
        path.write_bytes(b"")
        os.truncate(path, size)
        paths.append(path)
    return paths


async def open_linear(nursery, paths, limits=None, read_only=False):
    nodes = []
    for path in paths:
        node = LocalNode(path, read_only=read_only)
        await node.start(nursery)
        nodes.append(node)
    limits = limits or [None] * len(nodes)
    linear = algorithm_class("linear")("big", list(zip(nodes, limits, strict=True)), {})
    return Storage("big", linear), nodes


async def test_size_is_the_sum_and_nodes_are_placed_one_after_another(backing_files):
    async with trio.open_nursery() as nursery:
        storage, nodes = await open_linear(nursery, backing_files)
        assert storage.size == (64 + 32 + 128) * KIB
        placements = storage.placements()
        assert [(p.start, p.size) for p in placements] == [
            (0, 64 * KIB), (64 * KIB, 32 * KIB), (96 * KIB, 128 * KIB),
        ]
        assert [p.directory for p in placements] == ["n-0-0", "n-65536-1", "n-98304-2"]
        for node in nodes:
            await node.aclose()


async def test_request_crossing_boundaries_lands_on_each_node_at_the_right_offset(backing_files):
    async with trio.open_nursery() as nursery:
        storage, nodes = await open_linear(nursery, backing_files)
        data = os.urandom(64 * KIB)  # 48K..112K: tail of node0, all of node1, head of node2
        await storage.write(48 * KIB, data)
        await storage.flush()
        assert await storage.read(48 * KIB, len(data)) == data
        files = [p.read_bytes() for p in backing_files]
        assert files[0][48 * KIB :] == data[: 16 * KIB]
        assert files[1] == data[16 * KIB : 48 * KIB]
        assert files[2][: 16 * KIB] == data[48 * KIB :]
        assert files[2][16 * KIB :] == bytes(112 * KIB)
        digest = await storage.checksum(64 * KIB, 32 * KIB)
        assert digest == xxhash.xxh3_128_digest(data[16 * KIB : 48 * KIB])
        await storage.trim(60 * KIB, 8 * KIB)
        assert await storage.read(60 * KIB, 8 * KIB) == bytes(8 * KIB)
        await storage.write_zeroes(96 * KIB, 4 * KIB)
        assert backing_files[2].read_bytes()[: 4 * KIB] == bytes(4 * KIB)
        for node in nodes:
            await node.aclose()


async def test_size_limit_uses_only_the_first_bytes_of_a_node(backing_files):
    async with trio.open_nursery() as nursery:
        storage, nodes = await open_linear(nursery, backing_files[:2], limits=[16 * KIB, None])
        assert storage.size == 48 * KIB
        await storage.write(12 * KIB, b"\xaa" * 8 * KIB)
        assert backing_files[0].read_bytes()[12 * KIB : 16 * KIB] == b"\xaa" * 4 * KIB
        assert backing_files[0].read_bytes()[16 * KIB :] == bytes(48 * KIB)
        assert backing_files[1].read_bytes()[: 4 * KIB] == b"\xaa" * 4 * KIB
        for node in nodes:
            await node.aclose()


async def test_requests_past_the_end_are_refused_and_reads_are_cut_short(backing_files):
    async with trio.open_nursery() as nursery:
        storage, nodes = await open_linear(nursery, backing_files)
        end = storage.size
        with pytest.raises(RequestOutOfRange) as info:
            await storage.write(end - 10, b"x" * 20)
        assert info.value.errno == errno.EINVAL and "big" in str(info.value)
        with pytest.raises(RequestOutOfRange):
            await storage.trim(end, 1)
        assert await storage.read(end - 10, 100) == bytes(10)
        assert await storage.read(end, 100) == b""
        for node in nodes:
            await node.aclose()


async def test_read_only_node_makes_the_storage_read_only(backing_files):
    async with trio.open_nursery() as nursery:
        storage, nodes = await open_linear(nursery, backing_files, read_only=True)
        assert not storage.writable
        with pytest.raises(DstError) as info:
            await storage.write(0, b"x")
        assert info.value.errno == errno.EROFS
        for node in nodes:
            await node.aclose()

"""RemoteNode against the real export node over real sockets, with faults:
connections cut, bits flipped on the wire, the node paused (SIGSTOP), killed
(-9) and restarted on the same port, and gone for good. Whatever happens
within the resend budget, every write completes and the node's file holds
exactly the data written; past the budget the caller gets EIO."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dstfuse.address import parse_address
from dstfuse.config import Timeouts
from dstfuse.errors import NodeUnavailable
from dstfuse.export.backend import Backend
from dstfuse.export.served import ServedExport
from dstfuse.export.server import ExportServer
from dstfuse.nodes.base import NodeState
from dstfuse.nodes.remote import RemoteNode

from .faultproxy import TO_CLIENT, TO_NODE, FaultProxy
from .mounts import exported, free_tcp_port

SIZE = 8 << 20
PATTERN = b"KNOWN-PLAINTEXT-PATTERN-0123456789"


def make_disk(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as disk:
        disk.truncate(size)
    return path


@asynccontextmanager
async def served(path: Path, *, key: bytes | None = None):
    """An in-process ExportServer for `path` on 127.0.0.1, with a FaultProxy
    in front; yields (server port, proxy)."""
    export = ServedExport("disk", Backend(path))
    server = ExportServer([export], [("127.0.0.1", 0)], key=key)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.serve)
        proxy = FaultProxy("127.0.0.1", addresses[0].port)
        await nursery.start(proxy.run)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def remote_node(port: int, timeouts: Timeouts, *, key: bytes | None = None):
    async with trio.open_nursery() as nursery:
        node = RemoteNode(
            parse_address(f"127.0.0.1:{port}"), export=None, timeouts=timeouts, key=key,
        )
        await node.start(nursery)
        try:
            yield node
        finally:
            await node.aclose()
            nursery.cancel_scope.cancel()


async def write_blocks(node: RemoteNode, expected: bytearray, count: int, block: int = 65536):
    """Write `count` random blocks at random block-aligned offsets, keeping
    `expected` (the image the node's file must end up equal to) in step."""
    rng = os.urandom
    blocks = len(expected) // block
    for _ in range(count):
        index = int.from_bytes(rng(4), "big") % blocks
        data = rng(block)
        await node.write(index * block, data)
        expected[index * block : (index + 1) * block] = data


FAST = Timeouts(resend=1.0, max_resends=10, keepalive=0.5, connect=2.0)


async def test_writes_survive_connections_cut_repeatedly(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    expected = bytearray(SIZE)
    async with served(disk) as proxy, remote_node(proxy.port, FAST) as node:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(write_blocks, node, expected, 30)
            for _ in range(5):
                await trio.sleep(0.15)
                proxy.cut()
        await node.flush()
        assert node.counters.reconnects >= 1
    assert disk.read_bytes() == bytes(expected)


async def test_large_frames_over_a_slow_link_with_cuts_arrive_whole(tmp_path):
    """1 MiB writes and reads at QD4 over a link that trickles 16 KiB at a
    time: frames leave in parts (the socket fills, the sender takes the
    tails) and arrive in pieces (read in place, sized from the header),
    and the connection is cut twice in the middle of such frames."""
    disk = make_disk(tmp_path / "disk.img")
    expected = bytearray(SIZE)
    block = 1 << 20
    async with served(disk) as proxy, remote_node(proxy.port, FAST) as node:
        proxy.slow = (16 << 10, 0.001)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(write_blocks, node, expected, 4, block)
                for _ in range(2):
                    await trio.sleep(0.3)
                    proxy.cut()
            await node.flush()

            async def read_back(offset: int) -> None:
                assert await node.read(offset, block) == bytes(expected[offset : offset + block])

            async with trio.open_nursery() as nursery:
                for offset in range(0, SIZE, block):
                    nursery.start_soon(read_back, offset)
        assert node.counters.reconnects >= 1
    assert disk.read_bytes() == bytes(expected)


async def test_large_reads_are_their_frames_own_buffers_and_nothing_changes_them(tmp_path):
    """A 1 MiB read is handed over without a copy: a read-only view of the
    receive buffer of its own frame (Node.read's `ReadData`). Reads and
    writes after it, of the same range too, at QD8, never change it."""
    disk = make_disk(tmp_path / "disk.img")
    block = 1 << 20
    first, second = os.urandom(SIZE), os.urandom(SIZE)
    async with served(disk) as proxy, remote_node(proxy.port, FAST) as node:
        await node.write(0, first)
        kept = [await node.read(offset, block) for offset in range(0, SIZE, block)]
        assert all(type(data) is memoryview and data.readonly for data in kept)
        assert len({id(data.obj) for data in kept}) == len(kept)
        async with trio.open_nursery() as nursery:
            for offset in range(0, SIZE, block):
                nursery.start_soon(node.write, offset, second[offset : offset + block])
                nursery.start_soon(node.read, offset, block)
        assert b"".join(kept) == first
        assert await node.read(0, SIZE) == second


@pytest.mark.parametrize("direction", [TO_NODE, TO_CLIENT])
async def test_flipped_bit_is_detected_and_the_transaction_resent(tmp_path, direction):
    disk = make_disk(tmp_path / "disk.img")
    expected = bytearray(SIZE)
    async with served(disk) as proxy, remote_node(proxy.port, FAST) as node:
        await write_blocks(node, expected, 5)
        proxy.corrupt_next(direction, 3)
        await write_blocks(node, expected, 20)
        assert proxy.corrupted == 3
        assert node.counters.reconnects >= 1
        for offset in range(0, SIZE, 1 << 20):
            assert await node.read(offset, 1 << 20) == bytes(expected[offset : offset + (1 << 20)])
    assert disk.read_bytes() == bytes(expected)


async def test_encrypted_stream_never_shows_plaintext_and_tampering_is_resent(tmp_path):
    key = os.urandom(32)
    disk = make_disk(tmp_path / "disk.img")
    async with served(disk, key=key) as proxy, remote_node(proxy.port, FAST, key=key) as node:
        proxy.record = True
        data = PATTERN * (65536 // len(PATTERN))
        await node.write(0, data)
        assert await node.read(0, len(data)) == data
        proxy.corrupt_next(TO_NODE)
        await node.write(1 << 20, data)
        assert node.counters.reconnects == 1
        recorded = proxy.recorded[TO_NODE] + proxy.recorded[TO_CLIENT]
        assert len(recorded) > 2 * len(data)
        assert PATTERN[:16] not in recorded
    content = disk.read_bytes()
    assert content[: len(data)] == data and content[1 << 20 : (1 << 20) + len(data)] == data


@pytest.mark.slow
async def test_node_paused_and_continued_within_the_budget_loses_nothing(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    expected = bytearray(SIZE)
    with exported(disk, tmp_path, tcp=True) as export:
        process = export.process
        async with remote_node(parse_address(export.address).port, FAST) as node:
            await write_blocks(node, expected, 10)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_blocks, node, expected, 20)
                await trio.sleep(0.1)
                os.kill(process.pid, signal.SIGSTOP)
                await trio.sleep(3)  # keepalive declares it silent; budget is 11 s
                os.kill(process.pid, signal.SIGCONT)
            await node.flush()
    assert disk.read_bytes() == bytes(expected)


@pytest.mark.slow
async def test_node_killed_and_restarted_on_the_same_port_mid_write(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    port = free_tcp_port()
    expected = bytearray(SIZE)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with exported(disk, tmp_path / "first", port=port) as export:
        first = export.process
        async with remote_node(port, FAST) as node:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(write_blocks, node, expected, 40)
                await trio.sleep(0.3)
                os.kill(first.pid, signal.SIGKILL)
                first.wait()
                await trio.sleep(1)
                assert node.state is NodeState.OFFLINE
                with exported(disk, tmp_path / "second", port=port):
                    await trio.sleep(0)  # the writers finish inside this block
                    while nursery.child_tasks:
                        await trio.sleep(0.05)
                    await node.flush()
            assert node.counters.reconnects >= 1
    # kill -9 keeps what the node wrote in the page cache: the file is whole
    assert disk.read_bytes() == bytes(expected)


@pytest.mark.slow
async def test_node_gone_past_the_budget_gives_eio_naming_the_node(tmp_path, caplog):
    disk = make_disk(tmp_path / "disk.img")
    budget = Timeouts(resend=0.5, max_resends=3, keepalive=0.5, connect=1.0)
    with exported(disk, tmp_path, tcp=True) as export:
        process = export.process
        port = parse_address(export.address).port
        async with remote_node(port, budget) as node:
            await node.write(0, b"a" * 4096)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            start = time.monotonic()
            with caplog.at_level(logging.ERROR), pytest.raises(NodeUnavailable) as info:
                await node.write(4096, b"b" * 4096)
            assert time.monotonic() - start < 5
            assert info.value.errno == errno.EIO
            assert f"127.0.0.1:{port}" in str(info.value)
            assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records)

"""`MemoryNode`, the in-memory node the mirror's unit tests run on, and the
tests that it keeps the Node contract the mirror relies on.

A MemoryNode holds its bytes in a bytearray and lets a test inject what
real nodes do: fail requests (`fail`), hold them (`hold`, a slow or paused
node), go OFFLINE and come back (requests wait for the node like a
RemoteNode's do, up to `budget` seconds, then raise NodeUnavailable), and
have bytes changed behind the mirror's back (`data`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
import trio
import xxhash

from dstfuse.errors import NodeError, NodeUnavailable, RequestOutOfRange
from dstfuse.nodes.base import Node, NodeState


class MemoryNode(Node):
    kind = "M"

    def __init__(self, name: str, size: int, *, budget: float = 5.0) -> None:
        super().__init__(name)
        self.data = bytearray(size)
        self.budget = budget
        #: (op, offset, length) -> an exception to raise, or None
        self.fail: Callable[[str, int, int], BaseException | None] | None = None
        #: while set, requests for which `hold_when(op, offset, length)` is
        #: true (all when it is None) wait for this event first
        self.hold: trio.Event | None = None
        self.hold_when: Callable[[str, int, int], bool] | None = None
        self.ops: list[tuple[str, int, int, bool]] = []
        self.fua_writes = 0
        self.flushes = 0

    async def start(self, nursery: trio.Nursery) -> None:
        self.size = len(self.data)
        self.writable = True
        self._set_state(NodeState.ONLINE)

    async def aclose(self) -> None:
        self._set_state(NodeState.OFFLINE)

    def go_offline(self) -> None:
        self._set_state(NodeState.OFFLINE)

    def go_online(self) -> None:
        self._set_state(NodeState.ONLINE)

    def fail_all(self, exc_type: type[NodeError] = NodeError, code: int = errno.EIO) -> None:
        self.fail = lambda op, offset, length: exc_type(str(self), f"{op} failed", errno=code)

    async def _request(self, op: str, offset: int, length: int, fua: bool = False) -> None:
        self.counters.requests += 1
        self.counters.in_flight += 1
        try:
            await trio.lowlevel.checkpoint()
            if self.hold is not None and (
                self.hold_when is None or self.hold_when(op, offset, length)
            ):
                await self.hold.wait()
            if self.state is NodeState.OFFLINE:
                with trio.move_on_after(self.budget):
                    await self.wait_state_change(NodeState.OFFLINE)
                if self.state is NodeState.OFFLINE:
                    self.counters.errors += 1
                    raise NodeUnavailable(str(self), f"{op}: unreachable")
            error = self.fail(op, offset, length) if self.fail else None
            if error is not None:
                self.counters.errors += 1
                raise error
            self.ops.append((op, offset, length, fua))
        finally:
            self.counters.in_flight -= 1

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        await self._request("read", offset, length)
        self.counters.bytes_read += length
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        payload = bytes(data)
        await self._request("write", offset, len(payload), fua)
        self.data[offset : offset + len(payload)] = payload
        self.counters.bytes_written += len(payload)
        self.fua_writes += fua

    async def flush(self) -> None:
        await self._request("flush", 0, 0)
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        await self._request("trim", offset, length)
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_range(offset, length)
        await self._request("write_zeroes", offset, length, fua)
        self.data[offset : offset + length] = bytes(length)

    async def checksum(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        await self._request("checksum", offset, length)
        return xxhash.xxh3_128_digest(bytes(self.data[offset : offset + length]))


# -- the node's own contract ---------------------------------------------
async def test_memory_node_reads_what_was_written_and_checksums_it():
    node = MemoryNode("m0", 64 * 1024)
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
    await node.write(4096, b"x" * 4096, fua=True)
    assert await node.read(4096, 4096) == b"x" * 4096
    assert await node.checksum(4096, 4096) == xxhash.xxh3_128_digest(b"x" * 4096)
    await node.trim(4096, 4096)
    assert await node.read(4096, 4096) == bytes(4096)
    assert node.fua_writes == 1
    with pytest.raises(RequestOutOfRange):
        await node.read(60 * 1024, 8192)


async def test_memory_node_offline_requests_wait_then_fail_unavailable():
    node = MemoryNode("m0", 8192, budget=0.05)
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
    node.go_offline()
    with pytest.raises(NodeUnavailable):
        await node.read(0, 4096)

    async def back_soon():
        await trio.sleep(0.01)
        node.go_online()

    node.budget = 5.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(back_soon)
        assert await node.read(0, 4096) == bytes(4096)

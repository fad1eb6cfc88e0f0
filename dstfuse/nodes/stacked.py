"""StorageNode: a storage used as a node of another storage (stacking).

Like DST's stacked block devices, a storage (say a mirror `vol0`) can be one
node of another storage (a linear `big`). This node forwards every request to
the inner `Storage`, so the inner storage's algorithm, bounds and
writability checks apply unchanged. It never closes the inner storage:
whoever built the storage (`assembly.py`) owns it and closes it after the
outer storage.

The node is ONLINE unless the inner storage's state is "failed". The
algorithm interface has no change notification, so a small watcher task
re-reads the state every `poll_interval` seconds and announces changes
through `wait_state_change` like any other node.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

import trio

from ..errors import DstError, NodeError
from ..storage import Storage
from .base import Node, NodeState, ReadData

log = logging.getLogger(__name__)

T = TypeVar("T")


class StorageNode(Node):
    """The storage `storage` as a node; `description` is ``S: <name>``."""

    kind = "S"

    def __init__(self, storage: Storage, *, poll_interval: float = 1.0) -> None:
        super().__init__(storage.name)
        self.storage = storage
        self._poll_interval = poll_interval
        self._watcher = trio.CancelScope()

    # -- lifecycle ------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        self.size = self.storage.size
        self._refresh()
        nursery.start_soon(self._watch)

    async def aclose(self) -> None:
        self._watcher.cancel()

    def _refresh(self) -> None:
        self.writable = self.storage.writable
        failed = self.storage.state == "failed"
        state = NodeState.OFFLINE if failed else NodeState.ONLINE
        if state is not self.state:
            log.info("%s: storage state %s, node %s", self, self.storage.state, state.value)
        self._set_state(state)

    async def _watch(self) -> None:
        with self._watcher:
            while True:
                await trio.sleep(self._poll_interval)
                self._refresh()

    # -- I/O ------------------------------------------------------------
    async def _call(self, request: Awaitable[T]) -> T:
        """Run one request on the inner storage, counting it; inner errors
        become this node's `NodeError` with the same errno, so the outer
        storage's log names both storages."""
        self.counters.requests += 1
        self.counters.in_flight += 1
        try:
            return await request
        except NodeError as exc:
            self.counters.errors += 1
            raise NodeError(str(self), str(exc), errno=exc.errno) from exc
        except DstError as exc:
            self.counters.errors += 1
            raise NodeError(str(self), str(exc), errno=exc.errno) from exc
        finally:
            self.counters.in_flight -= 1

    async def read(self, offset: int, length: int) -> ReadData:
        self.check_range(offset, length)
        data = await self._call(self.storage.read(offset, length))
        if len(data) != length:
            raise NodeError(str(self), f"short read at {offset}: {len(data)} of {length} bytes")
        self.counters.bytes_read += length
        return data

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        await self._call(self.storage.write(offset, data, fua=fua))
        self.counters.bytes_written += len(data)

    async def flush(self) -> None:
        await self._call(self.storage.flush())

    async def trim(self, offset: int, length: int) -> None:
        self.check_writable()
        self.check_range(offset, length)
        await self._call(self.storage.trim(offset, length))

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, length)
        await self._call(self.storage.write_zeroes(offset, length, fua=fua))

    async def checksum(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return await self._call(self.storage.checksum(offset, length))

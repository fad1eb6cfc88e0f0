"""`LocalNode`: a file or block device on this host, as a node of a storage.

It owns one `Backend` (the same disk code the export server uses) and adds
what the `Node` interface promises: bounds and writability checks before any
I/O, `NodeError` with the disk's errno on failure, counters, and the node
state (ONLINE from `start` until `aclose`). It never retries: a local disk
that fails has failed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from ..errors import NodeError, NodeRefused
from ..export.backend import Backend
from .base import Node, NodeState

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class LocalNode(Node):
    """The file or block device at `path`; `read_only` opens it O_RDONLY and
    makes the node refuse writes with EROFS."""

    kind = "L"

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        self.read_only = read_only
        self._backend: Backend | None = None

    # -- lifecycle ------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Open the file; a path that cannot be opened is the user's to fix,
        so it raises NodeRefused (a UserError) with the OS's errno."""
        if self._backend is not None:
            return
        try:
            # open() can block (NFS, a slow device), so it runs in a thread.
            backend = await trio.to_thread.run_sync(
                lambda: Backend(self.path, read_only=self.read_only)
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NodeRefused(
                str(self), f"cannot open {self.path}: {reason}", errno=exc.errno or errno.EIO
            ) from None
        self._backend = backend
        self.size = backend.size
        self.writable = not self.read_only
        self._set_state(NodeState.ONLINE)
        log.info("%s: opened (%d bytes, %s)", self, self.size, "ro" if self.read_only else "rw")

    async def aclose(self) -> None:
        backend, self._backend = self._backend, None
        self._set_state(NodeState.OFFLINE)
        if backend is not None:
            await backend.aclose()

    # -- I/O ------------------------------------------------------------
    def _open_backend(self) -> Backend:
        if self._backend is None:
            raise NodeError(str(self), "node is not open", errno=errno.EIO)
        return self._backend

    async def _io(self, what: str, call: Callable[[Backend], Awaitable[_T]]) -> _T:
        backend = self._open_backend()
        self.counters.requests += 1
        self.counters.in_flight += 1
        try:
            return await call(backend)
        except OSError as exc:
            self.counters.errors += 1
            code = exc.errno or errno.EIO
            log.warning("%s: %s failed: %s", self, what, os.strerror(code))
            raise NodeError(str(self), f"{what} failed: {os.strerror(code)}", errno=code) from None
        finally:
            self.counters.in_flight -= 1

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        data = await self._io(
            f"read [{offset}, +{length})", lambda backend: backend.read(offset, length)
        )
        self.counters.bytes_read += length
        return data

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        await self._io(
            f"write [{offset}, +{len(data)})",
            lambda backend: backend.write(offset, data, fua=fua),
        )
        self.counters.bytes_written += len(data)

    async def flush(self) -> None:
        await self._io("flush", lambda backend: backend.flush())

    async def trim(self, offset: int, length: int) -> None:
        self.check_writable()
        self.check_range(offset, length)
        await self._io(
            f"trim [{offset}, +{length})", lambda backend: backend.trim(offset, length)
        )

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, length)
        await self._io(
            f"write-zeroes [{offset}, +{length})",
            lambda backend: backend.write_zeroes(offset, length, fua=fua),
        )

    async def checksum(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return await self._io(
            f"checksum [{offset}, +{length})", lambda backend: backend.checksum(offset, length)
        )

"""A storage: one logical device made of nodes by an algorithm.

The storage is the single entry point for I/O from the filesystem layer. It
checks every request against the storage's size and writability before the
algorithm sees it, so algorithms and nodes never get an out-of-range request
from here. It does not log failures: the filesystem layer, which turns them
into errnos, logs each once with the storage's name.
"""

from __future__ import annotations

import errno
import logging

import trio

from .algorithms import Algorithm, Placement
from .errors import DstError, RequestOutOfRange
from .nodes.base import Node, ReadData

log = logging.getLogger(__name__)


class Storage:
    """Named logical device; `algorithm` does the placement and the I/O."""

    def __init__(self, name: str, algorithm: Algorithm) -> None:
        self.name = name
        self.algorithm = algorithm

    @property
    def size(self) -> int:
        return self.algorithm.size

    @property
    def writable(self) -> bool:
        return self.algorithm.writable

    @property
    def state(self) -> str:
        return self.algorithm.state

    def placements(self) -> list[Placement]:
        return self.algorithm.placements()

    def append_nodes(self, nodes: list[tuple[Node, int | None]]) -> None:
        """Grow by started `nodes` placed after the last byte (a reload);
        the algorithm must be one that `grows_by_appending`."""
        self.algorithm.append(nodes)

    async def start(self, nursery: trio.Nursery) -> None:
        await self.algorithm.start(nursery)

    async def aclose(self) -> None:
        await self.algorithm.aclose()

    # -- checks ---------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestOutOfRange(
                f"storage {self.name}: request [{offset}, +{length}) is past the end "
                f"({self.size} bytes)"
            )

    def _check_writable(self) -> None:
        if not self.writable:
            raise DstError(f"storage {self.name} is read-only", errno=errno.EROFS)

    # -- I/O ------------------------------------------------------------
    async def read(self, offset: int, length: int) -> ReadData:
        """Read; a read starting inside but reaching past the end is cut
        short at the end, like a read of a regular file."""
        if offset >= self.size or length == 0:
            return b""
        length = min(length, self.size - offset)
        return await self.algorithm.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        if len(data):
            await self.algorithm.write(offset, data, fua=fua)

    async def flush(self) -> None:
        await self.algorithm.flush()

    async def trim(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if length:
            await self.algorithm.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if length:
            await self.algorithm.write_zeroes(offset, length, fua=fua)

    async def checksum(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return await self.algorithm.checksum(offset, length)

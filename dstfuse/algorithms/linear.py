"""Linear concatenation: nodes placed one after another (DST's linear).

Node i covers storage bytes [start_i, start_i + size_i), with start_0 = 0 and
start_{i+1} = start_i + size_i. A request crossing a boundary is split into
one piece per node; the pieces run concurrently and the request completes
when every piece has (the first error, if any, is raised after all ended).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence

from ..fanout import gather_or_raise
from ..nodes.base import Node, ReadData
from .base import Algorithm, Placement, SizeFinding


class Linear(Algorithm):
    name = "linear"
    grows_by_appending = True

    def __init__(
        self, storage_name: str, nodes: list[tuple[Node, int | None]], options: dict
    ) -> None:
        super().__init__(storage_name, nodes, options)
        if not nodes:
            raise ValueError(f"storage {storage_name}: linear needs at least one node")
        self._placements: list[Placement] = []
        self._starts: list[int] = []
        self._size = 0
        self.append(nodes)

    def append(self, nodes: list[tuple[Node, int | None]]) -> None:
        """Place `nodes` after the current end (a reload grows the storage
        so). Existing placements never move; the size grows last, so a
        request checked against the new size always finds its node placed."""
        start = self._size
        for node, limit in nodes:
            size = node.size if limit is None else min(limit, node.size)
            cookie = len(self._placements)
            self._placements.append(Placement(node=node, start=start, size=size, cookie=cookie))
            self._starts.append(start)
            start += size
        self._size = start

    @classmethod
    async def find_size(
        cls, storage_name: str, nodes: Sequence[tuple[Node | None, int]], options: Mapping
    ) -> SizeFinding:
        return SizeFinding(sum(used for _, used in nodes))

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        for placement in self._placements:  # per write: no generator
            if not placement.node.writable:
                return False
        return True

    def placements(self) -> list[Placement]:
        return list(self._placements)

    def _within_one(self, offset: int, length: int) -> tuple[Placement, int] | None:
        """(placement, node offset) when [offset, +length) lies on one node
        (the common case, without building pieces), else None."""
        placement = self._placements[bisect.bisect_right(self._starts, offset) - 1]
        node_offset = offset - placement.start
        if node_offset + length <= placement.size:
            return placement, node_offset
        return None

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Placement, int, int, int]]:
        """Yield (placement, node offset, piece length, offset into request)."""
        index = bisect.bisect_right(self._starts, offset) - 1
        done = 0
        while done < length:
            placement = self._placements[index]
            node_offset = offset + done - placement.start
            piece = min(length - done, placement.size - node_offset)
            if piece > 0:
                yield placement, node_offset, piece, done
                done += piece
            index += 1

    async def read(self, offset: int, length: int) -> ReadData:
        one = self._within_one(offset, length)
        if one is not None:
            return await one[0].node.read(one[1], length)
        pieces = list(self._pieces(offset, length))
        buffer = bytearray(length)

        def reader(p: Placement, node_offset: int, piece: int, at: int):
            async def call() -> None:
                buffer[at : at + piece] = await p.node.read(node_offset, piece)

            return call

        await gather_or_raise([reader(*args) for args in pieces])
        return bytes(buffer)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        one = self._within_one(offset, len(data))
        if one is not None:
            await one[0].node.write(one[1], data, fua=fua)
            return
        view = memoryview(data)
        await gather_or_raise(
            [
                lambda p=p, o=o, n=n, at=at: p.node.write(o, view[at : at + n], fua=fua)
                for p, o, n, at in self._pieces(offset, len(data))
            ]
        )

    async def flush(self) -> None:
        await gather_or_raise([p.node.flush for p in self._placements])

    async def trim(self, offset: int, length: int) -> None:
        await gather_or_raise(
            [lambda p=p, o=o, n=n: p.node.trim(o, n) for p, o, n, _ in self._pieces(offset, length)]
        )

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await gather_or_raise(
            [
                lambda p=p, o=o, n=n: p.node.write_zeroes(o, n, fua=fua)
                for p, o, n, _ in self._pieces(offset, length)
            ]
        )

    async def checksum(self, offset: int, length: int) -> bytes:
        """Checksums per node piece folded into one digest; equal ranges on
        equal layouts give equal digests, which is all verify needs."""
        import xxhash

        digests = await gather_or_raise(
            [
                lambda p=p, o=o, n=n: p.node.checksum(o, n)
                for p, o, n, _ in self._pieces(offset, length)
            ]
        )
        if len(digests) == 1:
            return digests[0]
        return xxhash.xxh3_128_digest(b"".join(digests))

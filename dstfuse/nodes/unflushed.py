"""Writes a remote node acknowledged but has not yet flushed, kept for replay.

A WRITE without FUA is acknowledged once it is in the node host's page
cache; a host reboot before the next FLUSH loses it. `UnflushedWrites`
keeps the data of those writes (WRITE, TRIM, WRITE_ZEROES; FUA writes too,
so that a replay never puts an older write over a newer durable one) per
node, in acknowledgement order, so that a node that comes back as a new
instance gets them again before anything else (NFSv3's unstable writes
and write verifier).

Invariants:
- entries are in acknowledgement order; overlapping writes are never in
  flight together (`WriteOrder`), so for overlapping ones that is also
  submission order and a replay in this order restores the newest data;
- `release(mark)` drops only entries whose sequence number is at most the
  `mark()` taken before the FLUSH was sent, so an entry acknowledged after
  the FLUSH went out is never released by it;
- `size` (data bytes plus ENTRY_COST per entry) never exceeds `limit`:
  past it the oldest entries are dropped (`make_room`), and what is dropped
  is remembered as *unprotected* until a FLUSH covers it; a node reboot in
  between turns the unprotected writes into a `Loss`;
- the unprotected ranges are at most MAX_UNPROTECTED_RANGES (coarsened by
  merging neighbours pairwise: a range reported lost may be larger than
  what was lost, never smaller).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..protocol import Command, Flag
from .base import NodeCounters

#: Bytes charged per kept entry on top of its data, so that data-less
#: entries (TRIM, WRITE_ZEROES) count against the limit too.
ENTRY_COST = 64
#: Unprotected ranges remembered exactly; more are merged.
MAX_UNPROTECTED_RANGES = 1024


@dataclass(slots=True)
class KeptWrite:
    """One acknowledged, unflushed write; `data` can never change: the
    caller's bytes (or a view of bytes) as given, else a private copy."""

    seq: int
    command: Command
    offset: int
    length: int
    flags: Flag
    data: bytes | memoryview = field(repr=False)

    @property
    def cost(self) -> int:
        return len(self.data) + ENTRY_COST


@dataclass(frozen=True)
class Loss:
    """Unflushed writes a node reboot destroyed: `bytes` written in them,
    `writes` how many, `regions` the (offset, length) ranges they covered."""

    bytes: int
    writes: int
    regions: tuple[tuple[int, int], ...]

    def __add__(self, other: Loss) -> Loss:
        regions = _Ranges()
        for offset, length in self.regions + other.regions:
            regions.add(offset, length)
        return Loss(self.bytes + other.bytes, self.writes + other.writes, regions.as_tuple())


class _Ranges:
    """A sorted list of disjoint [start, end) ranges, at most
    MAX_UNPROTECTED_RANGES long (neighbours merged pairwise past that)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def add(self, offset: int, length: int) -> None:
        start, end = offset, offset + length
        # every range that touches [start, end] is merged into it
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]
        if len(self._starts) > MAX_UNPROTECTED_RANGES:
            # Merge neighbours pairwise: half as many ranges in one pass, so
            # the cost per add stays constant on average.
            self._starts = self._starts[::2]
            self._ends = self._ends[1::2] + self._ends[-1:] * (len(self._ends) % 2)

    def as_tuple(self) -> tuple[tuple[int, int], ...]:
        return tuple((s, e - s) for s, e in zip(self._starts, self._ends, strict=True))


def unchangeable(data: bytes | memoryview) -> bytes | memoryview:
    """`data` itself when nothing can change its bytes (a bytes object, or
    a view of at least half of one: what FUSE hands a write, and a mirror's
    view of it, so the legs of a mirror share one buffer), else a copy. A
    replay must resend exactly the bytes the node acknowledged, whatever
    the caller does with a mutable buffer afterwards; and a kept view holds
    its whole buffer, which is why a small piece of a large one (a write
    split across nodes) is copied: what is kept is at most twice what the
    limit counts."""
    if type(data) is bytes:
        return data
    if isinstance(data, memoryview) and type(data.obj) is bytes:
        if 2 * data.nbytes >= len(data.obj):
            return data
    return bytes(data)


class UnflushedWrites:
    """The kept writes of one node; `limit` bytes at most (0: keep none).
    `size` (what they cost, `KeptWrite.cost`) is mirrored into
    `counters.unflushed` when counters are given."""

    def __init__(self, limit: int, counters: NodeCounters | None = None) -> None:
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.limit = limit
        self._counters = counters
        self._size = 0
        self._kept: deque[KeptWrite] = deque()
        self._seq = 0
        self._unprotected = _Ranges()
        self._unprotected_bytes = 0
        self._unprotected_writes = 0
        self._newest_unprotected = 0  # seq of the newest write dropped unflushed

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value
        if self._counters is not None:
            self._counters.unflushed = value

    def __len__(self) -> int:
        return len(self._kept)

    def __iter__(self) -> Iterator[KeptWrite]:
        """Kept writes, oldest first (a snapshot)."""
        return iter(list(self._kept))

    @property
    def unprotected(self) -> bool:
        """True while some acknowledged write is neither kept nor flushed."""
        return bool(self._unprotected)

    def record(
        self, command: Command, offset: int, length: int, flags: Flag, data: bytes | memoryview
    ) -> None:
        """Keep a write the node just acknowledged (its data as
        `unchangeable` gives it), or, when it cannot fit at all, remember it
        as unprotected."""
        self._seq += 1
        entry = KeptWrite(self._seq, command, offset, length, flags, b"")
        if len(data) + ENTRY_COST > self.limit:
            if not (flags & Flag.FUA and not self._kept):
                self._drop(entry)
            # else durable already, and no kept write could be replayed over it
            return
        entry.data = unchangeable(data)
        self._kept.append(entry)
        self.size += entry.cost

    def make_room(self) -> None:
        """Drop the oldest entries until `size` is within `limit`."""
        while self.size > self.limit:
            entry = self._kept.popleft()
            self.size -= entry.cost
            self._drop(entry)

    def _drop(self, entry: KeptWrite) -> None:
        self._unprotected.add(entry.offset, entry.length)
        self._unprotected_bytes += entry.length
        self._unprotected_writes += 1
        self._newest_unprotected = max(self._newest_unprotected, entry.seq)

    def mark(self) -> int:
        """The sequence number a FLUSH about to be sent covers."""
        return self._seq

    def release(self, mark: int) -> None:
        """A FLUSH sent after `mark()` returned `mark` succeeded: drop what
        it made durable, and forget unprotected writes it covered."""
        while self._kept and self._kept[0].seq <= mark:
            self.size -= self._kept.popleft().cost
        if self._unprotected and self._newest_unprotected <= mark:
            self._forget_unprotected()

    def lose_unprotected(self) -> Loss | None:
        """The node came back as a new instance: the unprotected writes are
        gone (the kept ones are replayed by the caller). None if nothing was."""
        if not self._unprotected:
            return None
        loss = Loss(self._unprotected_bytes, self._unprotected_writes, self._unprotected.as_tuple())
        self._forget_unprotected()
        return loss

    def _forget_unprotected(self) -> None:
        self._unprotected = _Ranges()
        self._unprotected_bytes = self._unprotected_writes = 0
        self._newest_unprotected = 0

"""The write-intent bitmap: which regions may differ between the legs.

`WriteIntentBitmap` keeps two bit sets over the storage's regions: `desired`
(what the on-disk bitmap should say) and `durable` (what is known to be on
stable storage on every leg that receives writes). A writer calls `mark`
before it writes a region; `mark` returns only once a FUA write of the
bitmap block holding that region has been acknowledged, so after any crash a
region that may have been written is marked on every leg that took data.
Clearing (`clear`) happens lazily, only for regions the caller has proved
idle and flushed; a writer arriving meanwhile simply marks the region again.

Bitmap block writes are serialised per block and each one carries the
block's current `desired` bits, taken under the block's lock, so the last
write to land always reflects the newest state. This module never decides
which legs get the bytes: the `write_block` callable given by the mirror
does. `RegionActivity` tracks in-flight writes per region for the lazy
clearing and for read checks.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator

import trio

from .metadata import BITMAP_BLOCK_BYTES, BITS_PER_BITMAP_BLOCK, ceil_div

log = logging.getLogger(__name__)

_NONZERO = re.compile(rb"[^\x00]")

#: Regions a sequential writer marks beyond the one it reaches, in the same
#: bitmap write (32 MiB at 4 MiB regions: one FUA per 36 MiB, not per 4).
MARK_AHEAD = 8


class RegionBits:
    """A set of region indices in [0, count), one bit each (a 10 TiB storage
    of 4 MiB regions takes 320 KiB). Bits past `count` are always zero."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._bytes = bytearray(ceil_div(count, 8))

    def __contains__(self, region: int) -> bool:
        return bool(self._bytes[region >> 3] >> (region & 7) & 1)

    def add(self, region: int) -> None:
        self._bytes[region >> 3] |= 1 << (region & 7)

    def discard(self, region: int) -> None:
        self._bytes[region >> 3] &= ~(1 << (region & 7)) & 0xFF

    def __len__(self) -> int:
        return int.from_bytes(self._bytes, "little").bit_count()

    def __bool__(self) -> bool:
        return _NONZERO.search(self._bytes) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegionBits) and other._bytes == self._bytes

    def copy(self) -> RegionBits:
        clone = RegionBits(self.count)
        clone._bytes[:] = self._bytes
        return clone

    def set_all(self) -> None:
        self._bytes[:] = b"\xff" * len(self._bytes)
        self._trim()

    def clear_all(self) -> None:
        self._bytes[:] = bytes(len(self._bytes))

    def update(self, other: RegionBits) -> None:
        """Union in place."""
        mine = int.from_bytes(self._bytes, "little") | int.from_bytes(other._bytes, "little")
        self._bytes[:] = mine.to_bytes(len(self._bytes), "little")

    def _trim(self) -> None:
        extra = len(self._bytes) * 8 - self.count
        if extra:
            self._bytes[-1] &= 0xFF >> extra

    def next_set(self, start: int) -> int | None:
        """The smallest member >= start, or None."""
        if start >= self.count:
            return None
        index = start >> 3
        value = self._bytes[index] >> (start & 7)
        if value:
            return start + ((value & -value).bit_length() - 1)
        match = _NONZERO.search(self._bytes, index + 1)
        if match is None:
            return None
        byte = match.start()
        value = self._bytes[byte]
        return byte * 8 + ((value & -value).bit_length() - 1)

    def __iter__(self) -> Iterator[int]:
        region = self.next_set(0)
        while region is not None:
            yield region
            region = self.next_set(region + 1)

    # -- bitmap blocks ---------------------------------------------------
    def block_bytes(self, block: int) -> bytes:
        """The BITMAP_BLOCK_BYTES bytes of on-disk block `block`."""
        start = block * BITMAP_BLOCK_BYTES
        chunk = bytes(self._bytes[start : start + BITMAP_BLOCK_BYTES])
        return chunk + bytes(BITMAP_BLOCK_BYTES - len(chunk))

    def set_block_bytes(self, block: int, bits: bytes) -> None:
        start = block * BITMAP_BLOCK_BYTES
        room = len(self._bytes) - start
        if room > 0:
            self._bytes[start : start + min(room, BITMAP_BLOCK_BYTES)] = bits[:room]
            self._trim()

    def add_block(self, block: int) -> None:
        """Mark every region of on-disk block `block` (a block that failed
        its check)."""
        first = block * BITS_PER_BITMAP_BLOCK
        for region in range(first, min(first + BITS_PER_BITMAP_BLOCK, self.count)):
            self.add(region)

    def intersect_block(self, block: int, bits: bytes) -> None:
        mine = self.block_bytes(block)
        both = int.from_bytes(mine, "little") & int.from_bytes(bits, "little")
        self.set_block_bytes(block, both.to_bytes(BITMAP_BLOCK_BYTES, "little"))


def bitmap_blocks(regions: int) -> int:
    """The bitmap blocks a storage of `regions` regions has (at least one)."""
    return max(1, ceil_div(regions, BITS_PER_BITMAP_BLOCK))


def block_of(region: int) -> int:
    return region // BITS_PER_BITMAP_BLOCK


class WriteIntentBitmap:
    """The in-memory half of the bitmap and the rules for writing it.

    `write_block(index, bits)` must put the block's bits on every leg that
    receives data writes, durably (FUA), and raise NodeError if no leg took
    them. What is written for a region is `desired | clearing`: a region
    being cleared stays set on disk until the cleaner has flushed its data
    and check pages (`finish_clear`), even if a writer re-marking another
    region of the block writes the block meanwhile."""

    def __init__(
        self, regions: int, write_block: Callable[[int, bytes], Awaitable[None]]
    ) -> None:
        self.regions = regions
        self.blocks = bitmap_blocks(regions)
        self.desired = RegionBits(regions)
        self.durable = RegionBits(regions)
        self.clearing = RegionBits(regions)
        self._write_block = write_block
        self._locks = [trio.Lock() for _ in range(self.blocks)]

    def load(self, bits: RegionBits) -> None:
        """Start from bits read from the legs (not yet durable everywhere:
        the caller rewrites every block before writes begin)."""
        self.desired = bits.copy()
        self.durable = RegionBits(self.regions)
        self.clearing = RegionBits(self.regions)

    def is_marked(self, region: int) -> bool:
        return region in self.desired

    def disk_bits(self, block: int) -> bytes:
        """What block `block` must say on disk now."""
        wanted = int.from_bytes(self.desired.block_bytes(block), "little")
        wanted |= int.from_bytes(self.clearing.block_bytes(block), "little")
        return wanted.to_bytes(BITMAP_BLOCK_BYTES, "little")

    async def mark(self, regions: Iterable[int], *, stream: bool = False) -> list[int]:
        """Return once every region is durably marked on the write targets.
        A region already durable costs nothing (no I/O, no wait). Writers
        waiting for the same block share one write: a writer arriving while
        a write of its block is in flight adds its bits and waits for the
        block's lock; the first one to get it writes every bit added so far
        and the others find theirs durable. A stream that reaches a new
        region right after the one before it (`stream`: the caller saw the
        region before written just now) marks the next MARK_AHEAD regions
        of the block in the same write (marking
        more than written is always safe: it costs a resync of those regions
        after a crash, and they are cleared when idle). Returns the regions
        marked ahead (the caller records them as just touched)."""
        needed = [region for region in regions if region not in self.durable]
        if not needed:
            return []
        ahead = self._ahead_of(needed) if stream else []
        for region in needed + ahead:
            self.desired.add(region)
        by_block: dict[int, list[int]] = {}
        for region in needed:
            by_block.setdefault(block_of(region), []).append(region)
        for block, wanted in sorted(by_block.items()):
            await self._publish(block, wanted)
        return ahead

    def _ahead_of(self, needed: list[int]) -> list[int]:
        """Regions to mark with `needed` when the write continues a stream
        whose previous region is durably marked: the next ones, unmarked,
        of the last needed region's block (it is written anyway)."""
        first, last = needed[0], needed[-1]
        if first == 0 or first - 1 not in self.durable:
            return []
        end = min((block_of(last) + 1) * BITS_PER_BITMAP_BLOCK, self.regions,
                  last + 1 + MARK_AHEAD)
        return [region for region in range(last + 1, end) if region not in self.desired]

    async def _publish(self, block: int, wanted: list[int] | None) -> None:
        """Write block `block`; with `wanted`, only if one of those regions
        is not durable yet (a write issued while we waited carried them)."""
        async with self._locks[block]:
            if wanted is not None and all(region in self.durable for region in wanted):
                return
            bits = self.disk_bits(block)
            await self._write_block(block, bits)
            # What the write carried is durable, except bits unmarked while
            # it was in flight, which stay unmarked.
            self.durable.set_block_bytes(block, bits)
            self.durable.intersect_block(block, self.desired.block_bytes(block))

    def begin_clear(self, regions: Iterable[int]) -> list[int]:
        """Unmark idle regions in memory (a writer arriving from now on
        marks its region again); they stay set on disk until `finish_clear`.
        Returns the regions."""
        cleared = list(regions)
        for region in cleared:
            self.desired.discard(region)
            self.durable.discard(region)
            self.clearing.add(region)
        return cleared

    async def finish_clear(self, regions: list[int]) -> None:
        """The regions' data and checks are flushed on every leg: write their
        blocks without them. A failure leaves them set on disk, which only
        costs a resync of those regions after a crash."""
        for region in regions:
            self.clearing.discard(region)
        for block in sorted({block_of(region) for region in regions}):
            await self._publish(block, None)

    def abort_clear(self, regions: list[int]) -> None:
        """The flush failed: the regions stay marked."""
        for region in regions:
            self.clearing.discard(region)
            self.desired.add(region)

    async def publish_all(self, write: Callable[[int, bytes], Awaitable[None]]) -> None:
        """Write every block with `write` (a leg joining the write targets,
        or all legs at start), each under its lock so that no concurrent
        mark or clear is reordered around it."""
        for block in range(self.blocks):
            async with self._locks[block]:
                await write(block, self.disk_bits(block))

    def set_durable_everywhere(self) -> None:
        """After `publish_all` reached every write target."""
        self.durable = self.desired.copy()

    async def mark_all(self) -> None:
        """Mark every region durably (before a full resync of a leg)."""
        self.desired.set_all()
        for block in range(self.blocks):
            await self._publish(block, None)


class RegionActivity:
    """In-flight writes per region and a serial number per write, so that
    the bitmap is cleared only for idle regions and a read check can tell
    whether a write touched its range while it ran. Entries exist only for
    regions written since they were last cleared."""

    def __init__(self) -> None:
        self.serial = 0
        self._active: dict[int, int] = {}
        #: region -> (serial of the last write begun or ended there, time)
        self._last: dict[int, tuple[int, float]] = {}
        #: start serial of each read in flight -> how many (read checks
        #: need the history of writes since the oldest of them)
        self._reads: dict[int, int] = {}
        #: when a write last began or ended anywhere (-inf: none yet)
        self.last_write = -math.inf

    def begin_read(self) -> int:
        self._reads[self.serial] = self._reads.get(self.serial, 0) + 1
        return self.serial

    def end_read(self, serial: int) -> None:
        count = self._reads[serial] - 1
        if count:
            self._reads[serial] = count
        else:
            del self._reads[serial]

    def begin(self, regions: range) -> None:
        self.serial += 1
        self.last_write = now = trio.current_time()
        for region in regions:
            self._active[region] = self._active.get(region, 0) + 1
            self._last[region] = (self.serial, now)

    def end(self, regions: range) -> None:
        self.serial += 1
        self.last_write = now = trio.current_time()
        for region in regions:
            count = self._active[region] - 1
            if count:
                self._active[region] = count
            else:
                del self._active[region]
            self._last[region] = (self.serial, now)

    def touch(self, regions: Iterable[int]) -> None:
        """Regions marked ahead of a stream count as written now for the
        lazy clearing; their serial is kept (0 when they have none), so
        read checks see no write there."""
        now = trio.current_time()
        for region in regions:
            previous = self._last.get(region)
            self._last[region] = (previous[0] if previous is not None else 0, now)

    def written_since(self, region: int, since: float) -> bool:
        """A write was in flight or ended in `region` after `since`."""
        if region in self._active:
            return True
        last = self._last.get(region)
        return last is not None and last[1] > since

    def is_active(self, region: int) -> bool:
        return region in self._active

    def quiet_since(self, regions: range, serial: int) -> bool:
        """No write was in flight or began in `regions` after `serial`."""
        for region in regions:
            if region in self._active:
                return False
            last = self._last.get(region)
            if last is not None and last[0] > serial:
                return False
        return True

    def idle(self, regions: Iterable[int], older_than: float) -> list[int]:
        """Regions with no write in flight and none ended after `older_than`."""
        result = []
        for region in regions:
            if region in self._active:
                continue
            last = self._last.get(region)
            if last is None or last[1] <= older_than:
                result.append(region)
        return result

    def least_recent(self, regions: list[int], count: int) -> list[int]:
        """The `count` regions of `regions` written (or touched) longest
        ago; regions with no history (marked before this mount) first.
        A partial selection (heapq), not a sort: after a full resync every
        region of a 10 TiB storage may be idle."""
        if count >= len(regions):
            return regions
        last = self._last
        return heapq.nsmallest(
            count, regions, key=lambda region: last[region][1] if region in last else -math.inf
        )

    def forget(self, regions: Iterable[int]) -> None:
        """Drop history no read in flight can still need."""
        oldest = min(self._reads, default=self.serial)
        for region in regions:
            last = self._last.get(region)
            if region not in self._active and last is not None and last[0] <= oldest:
                del self._last[region]

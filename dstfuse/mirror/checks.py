"""Block checks: a 64-bit digest per 4 KiB data block, kept in the check array.

`BlockChecks` lets the mirror notice a leg that returns wrong bytes (a block
changed behind its back, a disk that rots) and serve the read from another
leg. Each entry is xxh3-64 of one data block, or 0 for "unknown" (never
written through the mirror, written partially, or trimmed unevenly); unknown
blocks are never checked.

Memory is bounded: entries live in 4 KiB pages (512 entries, 2 MiB of data
each) in an LRU cache of `cache_pages` pages; a page is loaded from an
in-sync leg on first use and written back lazily: with the bitmap's lazy
clearing, at shutdown, and after eviction by a background writer
(`run_writer`), so a data write never waits for a check page write.

Crash rule (see docs/mirror-metadata.md): a region's entries on disk are
correct or zero whenever the region is not marked in the write-intent
bitmap, because the bitmap is cleared only after the pages covering a region
were written: `write_back` of a region's pages also writes (or waits for)
their evicted versions still queued or on the wire, and a page's writes land
in the order of its versions. A page written early (evicted) while its
region is marked is always allowed: marked regions' entries may be anything.
After an unclean shutdown the regions marked then are
`untrusted` until resync rewrites their entries; untrusted entries are never
checked and are zeroed before the region's bit is cleared.

This module never chooses legs and never decides what a mismatch means.
"""

from __future__ import annotations

import logging
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

import trio
import xxhash

from ..errors import NodeError
from .bitmap import RegionBits
from .metadata import BLOCK, CHECKS_PER_PAGE, ceil_div

log = logging.getLogger(__name__)

#: Default cache: 16 MiB of entries, covering 8 GiB of data.
DEFAULT_CACHE_PAGES = 4096
UNKNOWN = 0


def block_digest(block: bytes | memoryview) -> int:
    """The entry for one full block; 0 is reserved for "unknown"."""
    return xxhash.xxh3_64_intdigest(block) or 1


ZERO_BLOCK_DIGEST = block_digest(bytes(BLOCK))


def digests_of(offset: int, data: bytes | memoryview) -> tuple[int, list[int]]:
    """(first block, entry per block touched) for data written at `offset`;
    blocks only partly covered get UNKNOWN (their other bytes are not here)."""
    view = memoryview(data)
    first = offset // BLOCK
    if len(view) == BLOCK and not offset % BLOCK:  # the common one-block write
        return first, [xxhash.xxh3_64_intdigest(view) or 1]
    end = offset + len(view)
    head = -offset % BLOCK  # bytes before the first whole block
    whole = (len(view) - head) // BLOCK if len(view) >= head else 0
    digest = xxhash.xxh3_64_intdigest
    entries = [UNKNOWN] if head else []
    entries.extend(
        digest(view[at : at + BLOCK]) or 1
        for at in range(head, head + whole * BLOCK, BLOCK)
    )
    while len(entries) < ceil_div(end, BLOCK) - first:
        entries.append(UNKNOWN)
    return first, entries


def uniform_entries(offset: int, length: int, value: int) -> tuple[int, list[int]]:
    """Entries for a trim or write-zeroes: `value` for whole blocks,
    UNKNOWN for partial ones."""
    first = offset // BLOCK
    end = offset + length
    entries = []
    for block in range(first, ceil_div(end, BLOCK)):
        start = block * BLOCK
        whole = start >= offset and start + BLOCK <= end
        entries.append(value if whole else UNKNOWN)
    return first, entries


class BlockChecks:
    """The check array of one mirror, cached.

    `load_page(page)` reads a page from an in-sync leg; `write_page(page,
    bytes)` writes it to every leg receiving writes (raising NodeError if
    none took it). Callers pin the pages they touch across awaits
    (`pin`/`unpin`), so a page is never evicted between being read and
    being updated."""

    def __init__(
        self,
        data_size: int,
        region_size: int,
        load_page: Callable[[int], Awaitable[bytes]],
        write_page: Callable[[int, bytes], Awaitable[None]],
        *,
        cache_pages: int = DEFAULT_CACHE_PAGES,
    ) -> None:
        self.blocks = data_size // BLOCK
        self.pages = max(1, ceil_div(self.blocks, CHECKS_PER_PAGE))
        self.region_size = region_size
        self.blocks_per_region = region_size // BLOCK
        self.untrusted = RegionBits(ceil_div(data_size, region_size))
        self.mismatches = 0
        self._load_page = load_page
        self._write_page = write_page
        self._cache_pages = max(8, cache_pages)
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._pins: dict[int, int] = {}
        self._loading: dict[int, trio.Event] = {}
        #: evicted dirty pages not yet written: page -> its newest bytes
        self._writing: dict[int, bytes] = {}
        #: pages with a write on the wire (one at a time per page)
        self._inflight: set[int] = set()
        #: pages whose evicted bytes could not be written: their regions are
        #: untrusted, and `write_back` fails for them until they are written
        self._lost: set[int] = set()
        self._written = trio.Event()
        self._queued = trio.Event()
        self._backlog = max(8, self._cache_pages // 4)

    # -- geometry --------------------------------------------------------
    def pages_of(self, first_block: int, count: int) -> range:
        if count <= 0:
            return range(0)
        last = (first_block + count - 1) // CHECKS_PER_PAGE
        return range(first_block // CHECKS_PER_PAGE, last + 1)

    def pages_of_regions(self, regions: Iterable[int]) -> set[int]:
        pages: set[int] = set()
        for region in regions:
            first = region * self.blocks_per_region
            count = min(self.blocks_per_region, self.blocks - first)
            pages.update(self.pages_of(first, count))
        return pages

    def regions_of_page(self, page: int) -> range:
        first_block = page * CHECKS_PER_PAGE
        last_block = min(first_block + CHECKS_PER_PAGE, self.blocks) - 1
        per_region = self.blocks_per_region
        return range(first_block // per_region, last_block // per_region + 1)

    @property
    def cached_pages(self) -> int:
        return len(self._cache)

    @property
    def dirty_pages(self) -> int:
        return len(self._dirty)

    # -- cache -----------------------------------------------------------
    async def pin(self, pages: Iterable[int]) -> list[int]:
        """Load and pin pages; returns what to pass to `unpin`. Raises
        NodeError if a page cannot be loaded (nothing stays pinned then)."""
        pinned: list[int] = []
        try:
            for page in pages:
                self._pins[page] = self._pins.get(page, 0) + 1
                pinned.append(page)
                await self._ensure(page)
        except BaseException:
            self.unpin(pinned)
            raise
        return pinned

    def pin_cached(self, pages: range) -> list[int] | None:
        """`pin` without waiting when every page is cached already: count
        the pins and mark the pages recently used, as `pin` does. It adds
        nothing, so it never evicts: a cache over its bound (every page was
        pinned at once) or a long queue of evicted pages is dealt with by the
        next `pin` that loads a page. None, with nothing pinned, when one is
        not cached (then `pin` them)."""
        cache = self._cache
        for page in pages:
            if page not in cache:
                return None
        pins = self._pins
        for page in pages:
            pins[page] = pins.get(page, 0) + 1
            cache.move_to_end(page)
        return list(pages)

    def unpin(self, pages: list[int]) -> None:
        for page in pages:
            count = self._pins[page] - 1
            if count:
                self._pins[page] = count
            else:
                del self._pins[page]

    async def _ensure(self, page: int) -> None:
        while page not in self._cache:
            loading = self._loading.get(page)
            if loading is not None:
                await loading.wait()
                continue
            event = self._loading[page] = trio.Event()
            try:
                pending = self._writing.get(page)
                raw = pending if pending is not None else await self._load_page(page)
                self._cache[page] = bytearray(raw)
            finally:
                del self._loading[page]
                event.set()
        self._cache.move_to_end(page)
        await self._evict()

    async def _evict(self) -> None:
        """Keep the cache at its bound. A dirty victim's bytes go to the
        background writer (`run_writer`): the request that evicted it does
        not wait for a check page write, unless the writer is `_backlog`
        pages behind (memory stays bounded)."""
        while len(self._cache) > self._cache_pages:
            victim = next((p for p in self._cache if p not in self._pins), None)
            if victim is None:
                return  # everything pinned: exceed the bound for a moment
            data = bytes(self._cache.pop(victim))
            if victim not in self._dirty:
                continue
            self._dirty.discard(victim)
            self._writing[victim] = data
            self._queued.set()
        while len(self._writing) > self._backlog:
            await self._write_queued(next(iter(self._writing)))

    async def run_writer(self, workers: int = 4) -> None:
        """Write evicted pages in the background (the mirror's task), up to
        `workers` at once."""
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        while True:
            page = next((p for p in self._writing if p not in self._inflight), None)
            if page is None:
                await self._queued.wait()
                self._queued = trio.Event()
                continue
            await self._write_queued(page)

    async def _write_queued(self, page: int) -> None:
        try:
            await self._write_now(page)
        except NodeError as exc:
            log.warning("check page %d could not be written (%s); its regions are no "
                        "longer checked", page, exc)
            self._writing.pop(page, None)
            self._lost.add(page)
            for region in self.regions_of_page(page):
                self.untrusted.add(region)

    async def _write_now(self, page: int) -> None:
        """Write the page's newest bytes (the cached dirty page, else the
        evicted ones), after any write of it still on the wire: writes of a
        page land in the order of its versions. Raises NodeError if no leg
        took it; a cached page stays dirty then."""
        while page in self._inflight:
            await self._written.wait()
        if page in self._dirty and page in self._cache:
            data = bytes(self._cache[page])
            self._dirty.discard(page)
            self._writing.pop(page, None)  # older than the cached bytes
            cached = True
        elif page in self._writing:
            data = self._writing[page]
            cached = False
        else:
            return
        self._inflight.add(page)
        try:
            await self._write_page(page, data)
        except BaseException:
            if cached:
                self._dirty.add(page)
                if page not in self._cache:  # evicted meanwhile: keep its bytes
                    self._writing.setdefault(page, data)
            raise
        else:
            if not cached and self._writing.get(page) is data:
                del self._writing[page]
            self._lost.discard(page)
        finally:
            self._inflight.discard(page)
            self._written.set()
            self._written = trio.Event()

    def page_bytes(self, page: int) -> bytes:
        """The bytes of a pinned page."""
        return bytes(self._cache[page])

    def _entries(self, page: int) -> memoryview:
        return memoryview(self._cache[page]).cast("Q")

    # -- entries ---------------------------------------------------------
    def store(self, first_block: int, entries: list[int], *, only_known: bool = False) -> None:
        """Set entries; their pages must be pinned. `only_known` leaves the
        entries of blocks given as UNKNOWN (partly covered) as they are."""
        if len(entries) == 1:  # the common one-block write
            page, index = divmod(first_block, CHECKS_PER_PAGE)
            if not only_known or entries[0] != UNKNOWN:
                self._entries(page)[index] = entries[0]
            self._dirty.add(page)
            return
        position = 0
        while position < len(entries):
            page, index = divmod(first_block + position, CHECKS_PER_PAGE)
            count = min(CHECKS_PER_PAGE - index, len(entries) - position)
            chunk = entries[position : position + count]
            view = self._entries(page)
            if only_known:
                for offset, value in enumerate(chunk):
                    if value != UNKNOWN:
                        view[index + offset] = value
            else:
                view[index : index + count] = array("Q", chunk)  # type: ignore[call-overload]
            self._dirty.add(page)
            position += count

    def lookup(self, block: int) -> int:
        """An entry of a pinned page (UNKNOWN for untrusted regions)."""
        if block // self.blocks_per_region in self.untrusted:
            return UNKNOWN
        page, index = divmod(block, CHECKS_PER_PAGE)
        return self._entries(page)[index]

    def mismatching(self, offset: int, data: bytes | memoryview) -> list[int]:
        """Blocks of a read at `offset` whose bytes disagree with a known
        entry (pages pinned); partial blocks are not checked."""
        if len(data) == BLOCK and not offset % BLOCK:  # the common one-block read
            block = offset // BLOCK
            page, index = divmod(block, CHECKS_PER_PAGE)
            expected = self._entries(page)[index]
            if (
                expected == UNKNOWN
                or block // self.blocks_per_region in self.untrusted
                or (xxhash.xxh3_64_intdigest(data) or 1) == expected
            ):
                return []
            return [block]
        view = memoryview(data)
        first = -(-offset // BLOCK)
        last = (offset + len(view)) // BLOCK
        digest = xxhash.xxh3_64_intdigest
        untrusted = self.untrusted
        per_region = self.blocks_per_region
        bad = []
        block = first
        while block < last:
            page, index = divmod(block, CHECKS_PER_PAGE)
            end = min(block - index + CHECKS_PER_PAGE, last)
            entries = self._entries(page)
            start = block * BLOCK - offset
            for current in range(block, end):
                expected = entries[current - block + index]
                if (
                    expected != UNKNOWN
                    and current // per_region not in untrusted
                    and (digest(view[start : start + BLOCK]) or 1) != expected
                ):
                    bad.append(current)
                start += BLOCK
            block = end
        return bad

    def checked_pages(self, offset: int, length: int) -> range:
        """Pages a read of [offset, +length) needs for its check."""
        first = ceil_div(offset, BLOCK)
        return self.pages_of(first, (offset + length) // BLOCK - first)

    def touched_pages(self, offset: int, length: int) -> range:
        first = offset // BLOCK
        return self.pages_of(first, ceil_div(offset + length, BLOCK) - first)

    def trust(self, region: int) -> None:
        """The region's entries were just rewritten from its data."""
        self.untrusted.discard(region)

    def distrust(self, regions: Iterable[int]) -> None:
        for region in regions:
            self.untrusted.add(region)

    # -- write back ------------------------------------------------------
    async def forget_untrusted(self, regions: Iterable[int]) -> None:
        """Zero the entries of untrusted regions among `regions` (before
        their bits are cleared, so stale entries never become trusted)."""
        for region in [r for r in regions if r in self.untrusted]:
            first = region * self.blocks_per_region
            count = min(self.blocks_per_region, self.blocks - first)
            pinned = await self.pin(self.pages_of(first, count))
            try:
                self.store(first, [UNKNOWN] * count)
                self.untrusted.discard(region)
            finally:
                self.unpin(pinned)

    async def write_back(self, pages: Iterable[int] | None = None) -> None:
        """Write dirty pages (all, or those among `pages`) to the legs, the
        evicted ones the background writer has not written yet included,
        and wait for writes of them already on the wire: when it returns,
        every change made to those pages before the call was sent and
        acknowledged (the lazy clearing then flushes and clears). Raises
        NodeError if a page could not be written anywhere; it stays dirty."""
        chosen = None if pages is None else set(pages)
        waiting = self._dirty | set(self._writing) | self._inflight
        for page in sorted(waiting if chosen is None else waiting & chosen):
            await self._write_now(page)
            while page in self._inflight:
                await self._written.wait()
        lost = self._lost if chosen is None else self._lost & chosen
        if lost:
            raise NodeError(
                "check array", f"check page {min(lost)} was lost; its regions stay marked"
            )

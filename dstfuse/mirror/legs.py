"""`MirrorLeg`: one node of a mirror, its role and its metadata I/O.

A leg is the first `size` bytes of its node: data from offset 0, metadata
at the end (metadata.py). This module owns the leg's role and per-leg
settings and counters, and the I/O of its metadata (header slots, bitmap
blocks, check pages). It never decides a role change itself: the mount
(opening.py) and the leg state machine (legstates.py, membership.py) do,
and this module only records it.

Roles:
- IN_SYNC: holds every acknowledged write; receives writes; serves reads.
- RESYNCING: receives every write; serves reads only of regions not in
  `pending` (the regions still to be copied to it).
- STALE: missed writes (failed, offline, or marked dirty); receives nothing
  until it rejoins as RESYNCING. Its header records it as stale, so a crash
  never makes it a source.
"""

from __future__ import annotations

import enum
import logging

import trio

from ..nodes.base import Node, NodeState
from .bitmap import RegionBits, bitmap_blocks
from .flushes import FlushWitness
from .metadata import (
    BLOCK,
    LegLayout,
    MetadataError,
    MirrorHeader,
    newest_header,
    pack_bitmap_block,
    unpack_bitmap_block,
)

log = logging.getLogger(__name__)

#: Default per-leg resync settings (resync_size and resync_rate come from
#: the storage's options; resync_timeout is DST's, in milliseconds).
DEFAULT_RESYNC_TIMEOUT = 1.0
MAX_RESYNC_SIZE = 64 << 20


class LegRole(enum.Enum):
    IN_SYNC = "in_sync"
    RESYNCING = "resyncing"
    STALE = "stale"


class MirrorLeg:
    """One leg. `limit` is the config's `size:` for the node (None: all of
    it); `layout` is None until the node has been seen online."""

    def __init__(self, storage_name: str, index: int, node: Node, limit: int | None) -> None:
        self.storage_name = storage_name
        self.index = index
        self.node = node
        self.limit = limit
        self.layout: LegLayout | None = None
        self.role = LegRole.STALE
        #: the leg's history is unknown: its resync compares every region
        self.full_resync = False
        self.stale_since = 0
        self.synced_at = 0
        #: regions still to copy while RESYNCING
        self.pending: RegionBits | None = None
        #: bumped when regions must be copied again (`LegStates.copy_again`):
        #: a region copy that began before does not take its region off
        #: `pending`, since it may have read the source's bytes from before
        self.recopy_epoch = 0
        self.resync_done = 0
        self.resync_total = 0
        self.resync_size = 4 << 20
        self.resync_rate = 0
        self.resync_timeout = DEFAULT_RESYNC_TIMEOUT
        self.read_repairs = 0
        #: end of the last request sent to it (DST's nearest-leg rule)
        self.position = 0
        #: why the leg cannot rejoin (split brain, too small), for logs
        self.blocked = ""
        #: until then (trio clock) reads ask it after the other legs: it let
        #: a read wait read_timeout
        self.slow_until = -float("inf")
        #: requests the dispatcher stopped waiting for that still run
        self.unsettled = 0
        #: set when `unsettled` reaches 0; made only while someone waits
        self._settled: trio.Event | None = None
        #: the highest header sequence on the leg, once `_sequence_known`
        #: (both slots read): a header written with a lower one would lose to
        #: the older header in the other slot
        self._sequence = 0
        self._sequence_known = False
        self._header_lock = trio.Lock()
        self._flushes = FlushWitness()
        #: FLUSH failures already acted on (`judge_flushes`)
        self._judged_flushes = 0

    def __str__(self) -> str:
        return f"{self.storage_name} leg {self.index} ({self.node.description})"

    # -- state -----------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.node.state is NodeState.ONLINE

    @property
    def size(self) -> int:
        """Bytes of the node this leg uses (0 while never seen online)."""
        size = self.node.size if self.limit is None else min(self.limit, self.node.size)
        return size - size % BLOCK

    @property
    def in_sync(self) -> bool:
        return self.role is LegRole.IN_SYNC

    @property
    def takes_writes(self) -> bool:
        return self.role is not LegRole.STALE

    def readable(self, regions: range) -> bool:
        """May serve a read of these regions."""
        if self.role is LegRole.IN_SYNC:
            return True
        if self.role is LegRole.RESYNCING and self.pending is not None:
            return not any(region in self.pending for region in regions)
        return False

    def settle_one(self) -> None:
        self.unsettled -= 1
        if self.unsettled == 0 and self._settled is not None:
            self._settled.set()
            self._settled = None

    async def wait_settled(self) -> None:
        """Until no request sent to the leg is still running."""
        while self.unsettled:
            if self._settled is None:
                self._settled = trio.Event()
            await self._settled.wait()

    def disk_state(self) -> str:
        """DRBD's disk state of the leg's data: `up_to_date` (holds every
        acknowledged write), `inconsistent` (being copied, or history
        unknown: a full resync is due), `outdated` (left behind; only the
        regions it missed are copied back) or `unknown` (never seen)."""
        if self.role is LegRole.IN_SYNC:
            return "up_to_date"
        if self.layout is None and not self.online:
            return "unknown"
        if self.role is LegRole.RESYNCING or self.full_resync:
            return "inconsistent"
        return "outdated"

    def node_state(self) -> str:
        """The status contract's node state."""
        if not self.online:
            return "offline"
        if self.role is LegRole.RESYNCING:
            return "resyncing"
        if self.role is LegRole.STALE:
            return "dirty"
        return "clean"

    async def flush(self) -> None:
        """FLUSH the node. Success means every write the leg acknowledged
        before the call is durable on it, even when another FLUSH to it
        failed meanwhile (flushes.py); NodeError otherwise. Every flush of
        a leg goes through here."""
        await self._flushes.run(self.node.flush, str(self))

    @property
    def flush_failure_pending(self) -> bool:
        """A FLUSH of this leg failed (writes before it may be lost there)
        and nobody has acted on it yet: the leg is not yet marked stale, nor
        kept knowingly as the last in-sync leg. The bitmap is not cleared
        meanwhile."""
        return self._flushes.failures != self._judged_flushes

    def judge_flushes(self) -> None:
        """The leg's FLUSH failures so far are acted on: it was marked stale
        (or kept as the last in-sync leg, the loss reported), or it starts a
        resync that copies everything it may have lost."""
        self._judged_flushes = self._flushes.failures

    # -- metadata I/O ----------------------------------------------------
    def _layout(self) -> LegLayout:
        if self.layout is None:
            raise RuntimeError(f"{self}: metadata layout not known yet")
        return self.layout

    async def read_header(self) -> MirrorHeader:
        """The newest valid header; raises metadata.MetadataError (no,
        damaged or too new metadata) or NodeError."""
        return newest_header(await self._read_slot_blocks())

    async def _read_slot_blocks(self) -> list[bytes]:
        """Both header slots as stored, learning the sequence to write after
        (where `write_header` writes them once the layout is known)."""
        size = self.size
        offsets = self.layout.slot_offsets if self.layout is not None else (
            size - 2 * BLOCK, size - BLOCK)
        slots = [await self.node.read(offset, BLOCK) for offset in offsets]
        for raw in slots:
            try:
                self._sequence = max(self._sequence, MirrorHeader.unpack(raw).sequence)
            except MetadataError:
                continue
        self._sequence_known = True
        return slots

    async def read_slots(self) -> list[MirrorHeader]:
        """Both header slots that hold a valid header (newest first)."""
        slots = await self._read_slot_blocks()
        headers = []
        for raw in slots:
            try:
                headers.append(MirrorHeader.unpack(raw))
            except MetadataError:
                continue
        return sorted(headers, key=lambda header: header.sequence, reverse=True)

    async def write_header(self, header: MirrorHeader) -> None:
        """Write `header` (its sequence is assigned here) to the slot the
        previous header is not in, with FUA; serialised per leg so the two
        slots always hold the newest and the one before. Headers land in the
        order they were built: every caller builds the header in the call
        itself (no checkpoint between building it and asking for the lock),
        and trio's Lock is fair (FIFO), so an older membership can never be
        written after a newer one."""
        layout = self._layout()
        async with self._header_lock:
            if not self._sequence_known:
                # Never read (the node was unreachable when the mount looked):
                # learn the slots' sequences first.
                await self._read_slot_blocks()
            sequence = self._sequence + 1
            raw = header.with_changes(sequence=sequence).pack()
            await self.node.write(layout.slot_offsets[sequence % 2], raw, fua=True)
            self._sequence = sequence

    async def read_bitmap_block(self, storage_id: bytes, block: int) -> bytes | None:
        raw = await self.node.read(self._layout().bitmap_block_offset(block), BLOCK)
        return unpack_bitmap_block(storage_id, block, raw)

    async def read_bitmap(self, storage_id: bytes, bits: RegionBits) -> None:
        """Add the regions this leg's bitmap marks to `bits`; a damaged
        block counts as marking all its regions."""
        for block in range(bitmap_blocks(bits.count)):
            raw = await self.read_bitmap_block(storage_id, block)
            if raw is None:
                log.warning(
                    "%s: bitmap block %d is damaged; resyncing all its regions", self, block
                )
                bits.add_block(block)
            else:
                other = RegionBits(bits.count)
                other.set_block_bytes(block, raw)
                bits.update(other)

    async def write_bitmap_block(self, storage_id: bytes, block: int, bits: bytes) -> None:
        offset = self._layout().bitmap_block_offset(block)
        await self.node.write(offset, pack_bitmap_block(storage_id, block, bits), fua=True)

    async def read_check_page(self, page: int) -> bytes:
        return await self.node.read(self._layout().checks_page_offset(page), BLOCK)

    async def write_check_page(self, page: int, data: bytes) -> None:
        await self.node.write(self._layout().checks_page_offset(page), data)

    async def zero_checks(self, pages: int) -> None:
        """Set the check array to all unknown (zero). A trim, which reads
        back as zeroes (`Node.trim`) and frees the space: an export node
        punches a hole, where a write-zeroes allocates the whole array
        (4 GiB at 2 TiB of data)."""
        layout = self._layout()
        await self.node.trim(layout.checks_offset, pages * BLOCK)

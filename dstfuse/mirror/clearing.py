"""Clearing the write-intent bitmap: regions leave it only when it is safe.

`BitmapCleaner.run` is the mirror's lazy clearing task: every
`bitmap_idle / 2` it clears the regions no request touched for
`bitmap_idle`. While the storage is being written, it keeps a hot set, as
DRBD's activity log does: idle regions stay marked as long as at most
`hot_regions` are, and beyond that only the least recently written idle
ones are cleared, so a writer going round a working set pays neither the
clearing's flush of every leg nor the FUA bitmap write of marking the
region again; once no write began or ended for `bitmap_idle`, every idle
region is cleared. A crash then resyncs at most the hot set plus what was
in flight. Invariant: a region's bit is cleared only when every leg is
in sync and online, the region is idle, and its data and check pages are
flushed on every leg (`clear_idle`); a leg that fails that flush (or
anything else) meanwhile keeps the region marked for its resync. A fenced
mount clears nothing. A clearing FLUSH that no in-sync leg completed may
have lost writes on every leg (a failed fdatasync drops the dirty pages):
it is kept as `lost_flush` until the user's next flush reports it (EIO),
as Linux reports a writeback error to the next fsync.
"""

from __future__ import annotations

import logging

import trio

from ..errors import NodeError
from .bitmap import RegionActivity, WriteIntentBitmap
from .checks import BlockChecks
from .lease import HolderLease
from .legs import MirrorLeg
from .membership import Membership

log = logging.getLogger(__name__)


class BitmapCleaner:
    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        *,
        bitmap: WriteIntentBitmap,
        checks: BlockChecks | None,
        activity: RegionActivity,
        lease: HolderLease,
        membership: Membership,
        bitmap_idle: float,
        hot_regions: int = 0,
    ) -> None:
        self.storage_name = storage_name
        self._legs = legs
        self._bitmap = bitmap
        self._checks = checks
        self._activity = activity
        self._lease = lease
        self._membership = membership
        self._bitmap_idle = bitmap_idle
        self._hot_regions = hot_regions
        #: a clearing FLUSH that failed on every in-sync leg, not yet reported
        self.lost_flush: NodeError | None = None

    async def run(self) -> None:
        while not self._lease.fenced:  # a fenced mount writes nothing more
            await trio.sleep(max(0.1, self._bitmap_idle / 2))
            try:
                await self.clear_idle(trio.current_time() - self._bitmap_idle)
            except NodeError as exc:
                log.warning("storage %s: bitmap not cleared: %s", self.storage_name, exc)

    def all_in_sync(self) -> bool:
        """Every leg in sync and online, none with a FLUSH failure nobody
        has acted on yet (its leg is about to go stale)."""
        return all(
            leg.in_sync and leg.online and not leg.flush_failure_pending for leg in self._legs
        )

    async def clear_idle(self, older_than: float) -> int:
        """Clear the bits of regions idle since `older_than`, when every leg
        is in sync: their check pages are written, every leg is flushed,
        then the bitmap blocks are written without them. If a write began
        or ended after `older_than`, only the least recently written idle
        regions beyond the hot set are cleared (none while at most
        `hot_regions` are marked)."""
        bitmap = self._bitmap
        if not self.all_in_sync() or not bitmap.desired:
            return 0
        await self._lease.ensure()
        # No await from here to begin_clear: a writer arriving after it
        # marks its region again.
        idle = self._activity.idle(bitmap.desired, older_than)
        if idle and self._activity.last_write > older_than:
            excess = len(bitmap.desired) - self._hot_regions
            idle = self._activity.least_recent(idle, excess) if excess > 0 else []
        if not idle:
            return 0
        regions = bitmap.begin_clear(idle)
        try:
            if self._checks is not None:
                await self._checks.forget_untrusted(regions)
                await self._checks.write_back(self._checks.pages_of_regions(regions))
            try:
                await self._membership.on_every_target(
                    lambda leg: leg.flush(), "the flush"
                )
            except NodeError as exc:
                self.lost_flush = exc
                raise
            self._membership.flushed_everywhere()
            await self._membership.ensure_durable()
        except NodeError:
            bitmap.abort_clear(regions)
            self.distrust_unflushed()
            raise
        if not self.all_in_sync():
            # A leg failed the flush (or anything else) meanwhile: its copy of
            # these regions may be lost, so they stay marked for its resync.
            bitmap.abort_clear(regions)
            return 0
        await bitmap.finish_clear(regions)
        self._activity.forget(regions)
        return len(regions)

    def distrust_unflushed(self) -> None:
        """A FLUSH failed on every in-sync leg: a write since the last flush
        may have reverted to older bytes there (a failed fdatasync drops the
        dirty pages), which is allowed after the EIO but would fail its
        block check. The marked regions' entries are not trusted until the
        regions are rewritten or resynced."""
        if self._checks is not None:
            self._checks.distrust(self._bitmap.desired)
        self._membership.zeroing_may_be_lost()

"""The legs' state machine after start: a leg fails and goes stale, rejoins
and resyncs, is declared in sync again.

`LegStates` makes every change of a leg's role once the storage runs
(watch.py brings stale legs back through `begin_resync`, resync.py reports
through `resync_complete`, the `clean`/`dirty` control files through
`mark_clean`/`mark_dirty`); `Membership` records each change in the legs'
headers. Invariants:
- a leg that missed a write is recorded as stale in the headers of the
  surviving legs before that write completes (`leg_failed`, then
  `ensure_durable`);
- the last in-sync leg is never marked stale: if it fails, the request
  fails and the storage keeps its one complete copy;
- a request that failed on every in-sync leg leaves exactly one of them as
  the reference (`keep_one_copy`), and a resyncing leg that may have taken
  it copies its regions again (`copy_again`): no leg is left different
  from the others without its regions marked for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from ..errors import NodeError, UserError
from ..units import format_size
from .bitmap import RegionBits, WriteIntentBitmap
from .geometry import Geometry
from .legs import LegRole, MirrorLeg
from .membership import Membership

log = logging.getLogger(__name__)

#: Longest wait for flushes and header writes that must finish although the
#: request (or the mount) is being cancelled.
CLOSE_TIMEOUT = 60.0


class LegStates:
    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        membership: Membership,
        geometry: Geometry,
        bitmap: WriteIntentBitmap,
        *,
        wake_resync: Callable[[], None],
        start_background: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> None:
        self.storage_name = storage_name
        self._legs = legs
        self._membership = membership
        self._geometry = geometry
        self._bitmap = bitmap
        self._wake_resync = wake_resync
        self._start_background = start_background

    # -- failures -----------------------------------------------------------
    def leg_failed(self, leg: MirrorLeg, error: BaseException | str) -> bool:
        return self._membership.leg_failed(leg, error)

    async def ensure_durable(self) -> None:
        await self._membership.ensure_durable()

    async def keep_one_copy(
        self, failed: list[MirrorLeg], what: str, *, shield: bool = False
    ) -> None:
        """A request failed on every in-sync leg: their copies of its
        regions may now differ (one wrote part of it, one lost it), and the
        bitmap alone would let them be cleared as equal. One of them (online
        if possible) stays the reference; the others go stale and resync
        the marked regions from it."""
        in_sync = [leg for leg in failed if leg.in_sync]
        if len(in_sync) < 2:
            return
        keep = next((leg for leg in in_sync if leg.online), in_sync[0])
        for leg in in_sync:
            if leg is not keep:
                self.leg_failed(leg, f"the {what} did not complete on every in-sync leg; "
                                f"{keep} is kept")
        with trio.CancelScope(shield=shield) as scope:
            if shield:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            try:
                await self.ensure_durable()
            except NodeError as exc:
                log.error("storage %s: %s", self.storage_name, exc)

    def copy_again(self, targets: list[MirrorLeg], regions: Iterable[int]) -> None:
        """A request failed on every in-sync leg: a resyncing leg that took
        it (or part of it) may now differ from them, so its resync copies
        those regions again."""
        regions = list(regions)
        for leg in targets:
            if leg.role is LegRole.RESYNCING and leg.pending is not None:
                leg.recopy_epoch += 1  # a copy under way may have read the old bytes
                fresh = [region for region in regions if region not in leg.pending]
                for region in fresh:
                    leg.pending.add(region)
                    start, end = self._geometry.region_bounds(region)
                    leg.resync_total += end - start
                if fresh:
                    log.warning(
                        "%s: a request no in-sync leg completed may have reached it; "
                        "%d region(s) are copied again", leg, len(fresh),
                    )
                    self._wake_resync()

    # -- resync -------------------------------------------------------------
    def begin_resync(self, leg: MirrorLeg, pending: RegionBits) -> None:
        """The leg's header records it stale and it has the current bitmap:
        from now on it takes writes and resync copies `pending` to it
        (what a FLUSH that failed before may have lost included: everything
        sent to it before has settled, `LegWatch.rejoin`)."""
        leg.judge_flushes()
        leg.pending = pending
        leg.role = LegRole.RESYNCING
        leg.resync_total = self._geometry.region_bytes(pending)
        leg.resync_done = 0
        log.info(
            "%s: resync of %s (%d regions%s) started",
            leg,
            format_size(leg.resync_total),
            len(pending),
            ", compared first" if leg.full_resync else "",
        )
        self._wake_resync()
        self._membership.kick()

    async def resync_complete(self, leg: MirrorLeg) -> None:
        """All pending regions were copied: flush the leg, record it in sync."""
        try:
            await leg.flush()
        except NodeError as exc:
            self.leg_failed(leg, exc)
            await self.ensure_durable()
            return
        if leg.role is not LegRole.RESYNCING or leg.pending:
            return  # failed meanwhile, or a region must be copied again
        # NodeError (an in-sync leg did not record it) pauses the resync
        promoted = await self._membership.promote(leg)
        if promoted:
            log.info("%s: resync done; leg in sync", leg)
        await self.ensure_durable()

    # -- the user's decisions (control files) ---------------------------------
    def mark_dirty(self, leg: MirrorLeg) -> None:
        """Force a full resync of the leg."""
        if leg.in_sync and not any(o.in_sync for o in self._legs if o is not leg):
            raise UserError(f"{leg} is the only in-sync leg; refusing to mark it dirty")
        log.warning("%s: marked dirty by the user; full resync", leg)
        leg.blocked = ""
        if leg.role is not LegRole.STALE:
            self.leg_failed(leg, "marked dirty by the user")
        leg.full_resync = True
        self._membership.bump(new_generation=False)
        self._start_background(self._membership.publish_quietly)

    def mark_clean(self, leg: MirrorLeg) -> None:
        """Declare the leg in sync (the user vouches for its data)."""
        if not leg.online:
            raise UserError(f"{leg} is offline")
        if leg.layout is None or leg.layout.data_capacity < self._geometry.size:
            raise UserError(f"{leg} has not been examined yet or is too small")
        log.warning("%s: marked clean by the user", leg)
        leg.blocked = ""
        self._start_background(lambda: self._declare_clean(leg))

    async def _declare_clean(self, leg: MirrorLeg) -> None:
        membership = self._membership
        await leg.wait_settled()  # nothing sent before may land after this
        if leg.in_sync:
            return
        leg.judge_flushes()  # the user vouches for its data
        membership.joining.add(leg)
        try:
            await leg.write_header(membership.header(leg))
            await self._bitmap.publish_all(
                lambda block, raw: leg.write_bitmap_block(membership.storage_id, block, raw)
            )
            if not await membership.promote(leg):
                log.warning("%s: cannot be marked clean: it failed meanwhile", leg)
        except NodeError as exc:
            log.warning("%s: cannot be marked clean: %s", leg, exc)
        finally:
            membership.joining.discard(leg)
        await membership.publish_quietly()

    def set_resync_timeout(self, leg: MirrorLeg, seconds: float) -> None:
        leg.resync_timeout = seconds
        self._membership.kick()

"""The mirror's reads: one leg answers, its bytes are checked, bad copies
are repaired.

`MirrorReads` asks the legs in `ReadRouter` order; bytes failing their
block check are rejected and the next leg is asked. A leg that failed a
read or returned bad bytes gets the good bytes written back (read repair),
marked in the write-intent bitmap like any write and admitted in the
storage's `WriteOrder`, and only if no write touched the range since the
read began (that write carries newer data to every leg). It also serves
resync's source reads (inside resync's admitted window) and verify's
repairs. A leg that fails a repair write goes stale (`LegStates`).
"""

from __future__ import annotations

import errno
import logging

from ..errors import NodeError, NodeUnavailable
from ..nodes.base import ReadData
from ..ranges import WriteOrder
from .bitmap import RegionActivity, WriteIntentBitmap
from .checks import UNKNOWN, BlockChecks, digests_of
from .dispatch import LegSlow
from .geometry import Geometry
from .lease import HolderLease
from .legs import LegRole, MirrorLeg
from .legstates import LegStates
from .metadata import BLOCK
from .routing import ReadRouter

log = logging.getLogger(__name__)

#: Rounds of asking the legs a read makes when none answered because each
#: went stale meanwhile (a round needs a role change to end empty).
ASK_ROUNDS = 4


class MirrorReads:
    def __init__(
        self,
        storage_name: str,
        router: ReadRouter,
        geometry: Geometry,
        *,
        activity: RegionActivity,
        bitmap: WriteIntentBitmap,
        checks: BlockChecks | None,
        lease: HolderLease,
        write_order: WriteOrder,
        states: LegStates,
    ) -> None:
        self.storage_name = storage_name
        self._router = router
        self._geometry = geometry
        self._activity = activity
        self._bitmap = bitmap
        #: None when the storage runs with read_check off
        self._checks = checks
        self._lease = lease
        self._write_order = write_order
        self._states = states

    async def read(self, offset: int, length: int) -> ReadData:
        regions = self._geometry.regions_of(offset, length)
        serial = self._activity.begin_read()
        try:
            return await self._read(offset, length, regions, serial)
        finally:
            self._activity.end_read(serial)

    async def source_read(self, offset: int, length: int) -> ReadData:
        """Bytes from an in-sync leg for resync (inside its admitted
        window), checked like a read."""
        regions = self._geometry.regions_of(offset, length)
        serial = self._activity.begin_read()
        try:
            legs = [leg for leg in self._router.order(regions, offset) if leg.in_sync]
            if not legs:
                raise NodeError(f"storage {self.storage_name}", "no in-sync leg to copy from")
            return await self._read(offset, length, regions, serial, admitted=True)
        finally:
            self._activity.end_read(serial)

    async def source_checksum(self, offset: int, length: int) -> bytes:
        regions = self._geometry.regions_of(offset, length)
        legs = [leg for leg in self._router.order(regions, offset) if leg.in_sync]
        return await self._router.first_answer(
            legs,
            lambda leg: leg.node.checksum(offset, length),
            f"the checksum of [{offset}, +{length})",
        )

    async def _read(
        self, offset: int, length: int, regions: range, serial: int, *, admitted: bool = False
    ) -> ReadData:
        """`admitted`: the caller holds a WriteOrder ticket covering the
        range (resync), so a read repair must not admit it again."""
        legs = self._router.order(regions, offset)
        if not legs:
            raise NodeError(
                f"storage {self.storage_name}",
                f"no leg holds [{offset}, +{length}) (all stale)",
                errno=errno.EIO,
            )
        checks = self._checks
        pinned: list[int] = []
        if checks is not None:
            pages = checks.checked_pages(offset, length)
            cached = checks.pin_cached(pages)
            if cached is not None:
                pinned = cached
            else:
                try:
                    pinned = await checks.pin(pages)
                except NodeError as exc:
                    log.warning("storage %s: read not checked: %s", self.storage_name, exc)
                    checks = None
        try:
            failed: list[tuple[MirrorLeg, BaseException | None]] = []
            rejected: list[tuple[MirrorLeg, ReadData]] = []
            good: ReadData | None = None
            for _ in range(ASK_ROUNDS):
                good = await self._ask(legs, offset, length, regions, serial, checks,
                                       failed, rejected)  # fmt: skip
                if good is not None or failed or rejected:
                    break
                # No leg answered: each went stale while another was being
                # asked, or was given up as slow for a later one that then
                # went stale. Ask the legs that may serve it now.
                legs = self._router.order(regions, offset)
                if not legs:
                    break
            if good is None and not (failed or rejected):
                raise NodeError(
                    f"storage {self.storage_name}",
                    f"no leg could serve [{offset}, +{length}): the legs kept going stale",
                    errno=errno.EIO,
                )
            if good is None:
                good = self._settle_rejected(offset, length, failed, rejected, checks)
                rejected = []
            repairs = failed + [(leg, None) for leg, _ in rejected]
            if repairs:
                await self._read_repair(offset, good, repairs, regions, serial, admitted)
            return good
        finally:
            if checks is not None:
                checks.unpin(pinned)

    async def _ask(
        self,
        legs: list[MirrorLeg],
        offset: int,
        length: int,
        regions: range,
        serial: int,
        checks: BlockChecks | None,
        failed: list[tuple[MirrorLeg, BaseException | None]],
        rejected: list[tuple[MirrorLeg, ReadData]],
    ) -> ReadData | None:
        """Ask `legs` in order for the bytes; the first that passed their
        check, or None (what failed and what was rejected are added to
        `failed` and `rejected`)."""
        for position, leg in enumerate(legs):
            if not leg.readable(regions):
                # it went stale while an earlier leg was being asked:
                # its bytes may be older than a write that went on without it
                continue
            leg.position = offset + length
            last = True
            for later in legs[position + 1 :]:
                if later.readable(regions):
                    last = False
                    break
            try:
                data = await self._router.read(leg, offset, length, last=last)
            except LegSlow:
                continue  # silent: another leg serves it; writes decide its fate
            except NodeError as exc:
                failed.append((leg, exc))
                continue
            if not leg.readable(regions) or (leg.flush_failure_pending and not last):
                # it went stale, or a FLUSH of it failed (dropping what it
                # had not written), while it was being asked: its bytes may
                # be older than an acknowledged write
                continue
            if checks is not None and self._activity.quiet_since(regions, serial):
                wrong = checks.mismatching(offset, data)
                if wrong and self._activity.quiet_since(regions, serial):
                    checks.mismatches += 1
                    log.warning(
                        "%s: %d block(s) of [%d, +%d) fail their check (first at %d)",
                        leg,
                        len(wrong),
                        offset,
                        length,
                        wrong[0] * BLOCK,
                    )
                    rejected.append((leg, data))
                    continue
            return data
        return None

    def _settle_rejected(
        self,
        offset: int,
        length: int,
        failed: list[tuple[MirrorLeg, BaseException | None]],
        rejected: list[tuple[MirrorLeg, ReadData]],
        checks: BlockChecks | None,
    ) -> ReadData:
        """No leg gave bytes passing their check. Several legs agreeing on
        the bytes outvote the entries (which are rewritten); otherwise the
        read fails."""
        if len(rejected) >= 2 and len({data for _, data in rejected}) == 1:
            data = rejected[0][1]
            log.error(
                "storage %s: legs agree on [%d, +%d) but not with its block checks; "
                "trusting the legs",
                self.storage_name,
                offset,
                length,
            )
            if checks is not None:
                checks.store(*digests_of(offset, data), only_known=True)
            return data
        if rejected:
            raise NodeError(
                f"storage {self.storage_name}",
                f"[{offset}, +{length}) fails its block check on every leg that has it",
                errno=errno.EIO,
            )
        first = failed[0][1]
        assert isinstance(first, NodeError)
        raise NodeError(
            f"storage {self.storage_name}", f"read failed on every leg: {first}", errno=first.errno
        )

    async def _read_repair(
        self,
        offset: int,
        good: ReadData,
        repairs: list[tuple[MirrorLeg, BaseException | None]],
        regions: range,
        serial: int,
        admitted: bool = False,
    ) -> None:
        """Write the good bytes back to legs that failed or returned bad
        bytes, unless a write touched the range since the read began (the
        write then carries newer data to every leg). An unreachable leg is
        marked stale instead."""
        reachable = []
        for leg, error in repairs:
            if isinstance(error, NodeUnavailable) or not leg.online:
                self._states.leg_failed(leg, error or "offline")
            else:
                reachable.append((leg, error))
        if reachable:
            ticket = None if admitted else await self._write_order.admit(offset, len(good))
            try:
                if self._activity.quiet_since(regions, serial):
                    for leg, error in reachable:
                        if leg.role is LegRole.STALE or not await self._repair_write(
                            leg, offset, good
                        ):
                            continue
                        leg.read_repairs += 1
                        log.warning(
                            "%s: read repair of [%d, +%d) (%s)",
                            leg,
                            offset,
                            len(good),
                            error if error is not None else "block check failed",
                        )
            finally:
                if ticket is not None:
                    self._write_order.release(ticket)
        await self._states.ensure_durable()

    async def repair_block(self, offset: int, copies: list[tuple[MirrorLeg, ReadData]]) -> bool:
        """Verify's repair of one block at `offset`: the caller holds the
        region's WriteOrder ticket. The source is the first in-sync leg
        whose bytes pass the block check (the first in-sync leg if the block
        has none); the others get its bytes. True if every leg now agrees."""
        checks = self._checks
        expected = UNKNOWN
        pinned: list[int] = []
        if checks is not None:
            try:
                pinned = await checks.pin(checks.touched_pages(offset, BLOCK))
                expected = checks.lookup(offset // BLOCK)
            except NodeError:
                pinned = []
        try:
            source = copies[0]
            if expected != UNKNOWN:
                for leg, data in copies:
                    if digests_of(offset, data)[1][0] == expected:
                        source = (leg, data)
                        break
            data = source[1]
            ok = True
            for leg, other in copies:
                if other == data:
                    continue
                if not await self._repair_write(leg, offset, data):
                    ok = False
                    continue
                log.warning(
                    "%s: verify repaired [%d, +%d) from leg %d", leg, offset, BLOCK, source[0].index
                )
            if checks is not None and pinned:
                checks.store(*digests_of(offset, data))
        finally:
            if checks is not None:
                checks.unpin(pinned)
        await self._states.ensure_durable()
        return ok

    async def _repair_write(self, leg: MirrorLeg, offset: int, data: ReadData) -> bool:
        """Write good bytes over a leg's bad ones, marked in the bitmap like
        any write (a crash mid-repair then resyncs the region). The caller
        holds a WriteOrder ticket for the range. False if the leg failed."""
        regions = self._geometry.regions_of(offset, len(data))
        await self._lease.ensure()
        self._activity.begin(regions)
        try:
            try:
                await self._bitmap.mark(regions)
            except NodeError as exc:
                log.warning("%s: not repaired, the bitmap could not be marked: %s", leg, exc)
                return False
            await self._lease.ensure()
            try:
                await leg.node.write(offset, data)
            except NodeError as exc:
                self._states.leg_failed(leg, exc)
                return False
        finally:
            self._activity.end(regions)
        return True

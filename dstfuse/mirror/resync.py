"""Background resync: copy the regions a leg missed, one window at a time.

`Resync.run` is the mirror's one resync task. It walks the regions pending
on resyncing legs from the start of the storage to the end, in windows of
`resync_size` bytes (DST's sliding window), rate-limited to `resync_rate`
bytes per second. Each window is admitted in the mirror's `WriteOrder`
before it is read from an in-sync leg and written to the targets, so a user
write to the window waits for the copy and a copy never lands after a newer
write. Writes to regions not yet copied go to the resyncing leg too (it is a
write target), but such a region stays pending until it has been copied
whole: a write may cover only part of it.

Legs whose history is unknown (`full_resync`) are compared first: the
window's checksum is computed on the source and on the target nodes
(`Node.checksum`, where the data lives) and the bytes move only when they
differ, so a first sync of identical (say, all-zero) legs moves no data.

This module never changes a leg's role itself; it reports to the leg
state machine (`ResyncReports`: `leg_failed`, `resync_complete`). It never
cancels a sibling request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import NodeError
from ..fanout import gather
from ..ranges import WriteOrder
from .checks import BlockChecks, digests_of
from .geometry import Geometry
from .lease import HolderLease
from .legs import LegRole, MirrorLeg

log = logging.getLogger(__name__)


class RateLimit:
    """Paces background I/O at `rate` bytes per second (0 = unlimited): each
    `take(n)` waits until the bytes before it have had their time."""

    def __init__(self) -> None:
        self._next = 0.0

    async def take(self, nbytes: int, rate: int) -> None:
        if rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + nbytes / rate
        if start > now:
            await trio.sleep_until(start)


@dataclass(frozen=True)
class ResyncWindow:
    """The range being copied now, for status and logs."""

    offset: int
    length: int
    targets: tuple[int, ...]


class ResyncSource(Protocol):
    """Where resync reads from: an in-sync leg, checked like a read."""

    async def source_read(self, offset: int, length: int) -> bytes: ...

    async def source_checksum(self, offset: int, length: int) -> bytes: ...


class ResyncReports(Protocol):
    """What resync reports to the leg state machine."""

    def leg_failed(self, leg: MirrorLeg, error: BaseException | str) -> bool: ...

    async def resync_complete(self, leg: MirrorLeg) -> None: ...

    async def ensure_durable(self) -> None: ...


class Wakeup:
    """Wakes the resync task: `set()` after a leg starts resyncing or gets
    regions to copy again; a `set()` before the task waits is not lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float = float("inf")) -> None:
        """Until `set()` (or `timeout`), then take the wake-up."""
        with trio.move_on_after(timeout):
            await self._event.wait()
        self._event = trio.Event()


class Resync:
    """The resync task of one mirror, woken by `wakeup`. `checks` is None
    when the storage runs with read_check off."""

    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        geometry: Geometry,
        *,
        write_order: WriteOrder,
        lease: HolderLease,
        checks: BlockChecks | None,
        source: ResyncSource,
        reports: ResyncReports,
        wakeup: Wakeup,
    ) -> None:
        self.storage_name = storage_name
        self._legs = legs
        self._geometry = geometry
        self._write_order = write_order
        self._lease = lease
        self._checks = checks
        self._source = source
        self._reports = reports
        self._wakeup = wakeup
        self._rate = RateLimit()
        self.window: ResyncWindow | None = None

    async def run(self) -> None:
        while True:
            if not self._targets():
                await self._wakeup.wait()
                continue
            try:
                await self._pass()
            except NodeError as exc:
                # No in-sync leg could serve the copy: try again later.
                log.warning("storage %s: resync paused: %s", self.storage_name, exc)
                await self._wakeup.wait(self._retry_delay())

    def _retry_delay(self) -> float:
        return max((leg.resync_timeout for leg in self._legs), default=1.0)

    def _targets(self) -> list[MirrorLeg]:
        return [
            leg
            for leg in self._legs
            if leg.role is LegRole.RESYNCING and leg.pending is not None
        ]

    async def _pass(self) -> None:
        """One sweep from the start to the end over the pending regions."""
        region = 0
        while True:
            targets = self._targets()
            for leg in targets:
                if not leg.pending:
                    await self._reports.resync_complete(leg)
            targets = [leg for leg in self._targets() if leg.pending]
            if not targets:
                return
            upcoming = [
                found
                for leg in targets
                if (found := leg.pending.next_set(region)) is not None  # type: ignore[union-attr]
            ]
            if not upcoming:
                return  # regions behind us were added: the next sweep takes them
            region = min(upcoming)
            legs = [leg for leg in targets if region in leg.pending]  # type: ignore[operator]
            await self._copy_region(region, legs)
            region += 1

    async def _copy_region(self, region: int, legs: list[MirrorLeg]) -> None:
        start, end = self._geometry.region_bounds(region)
        window = min(leg.resync_size for leg in legs)
        rates = [leg.resync_rate for leg in legs if leg.resync_rate > 0]
        rate = min(rates) if rates and len(rates) == len(legs) else 0
        read_whole = True
        compared = {leg for leg in legs if leg.full_resync}
        # A leg that fails and rejoins while this region is copied gets a
        # new pending set: the region is done only for the sets seen here.
        pending = {leg: leg.pending for leg in legs}
        # A request that failed on every in-sync leg meanwhile may have
        # reverted the source's bytes after this copy read them: then the
        # region stays pending and is copied again (`copy_again`).
        epochs = {leg: leg.recopy_epoch for leg in legs}
        offset = start
        while offset < end:
            length = min(window, end - offset)
            await self._rate.take(length, rate)
            live = [
                leg
                for leg in legs
                if leg.role is LegRole.RESYNCING and leg.pending is pending[leg]
            ]
            if not live:
                return
            ticket = await self._write_order.admit(offset, length)
            self.window = ResyncWindow(offset, length, tuple(leg.index for leg in live))
            try:
                copied = await self._copy_window(offset, length, live)
                read_whole = read_whole and copied
            finally:
                self.window = None
                self._write_order.release(ticket)
            offset += length
        done = [
            leg
            for leg in legs
            if leg.role is LegRole.RESYNCING and leg.pending is pending[leg]
        ]
        if read_whole and self._checks is not None:
            self._checks.trust(region)
        compare_only = [leg for leg in done if leg in compared]
        if compare_only:
            await self._write_region_checks(region, compare_only)
        for leg in done:
            if (
                leg.pending is not None
                and leg.pending is pending[leg]
                and leg.recopy_epoch == epochs[leg]
            ):
                if region in leg.pending:
                    leg.pending.discard(region)
                    leg.resync_done += end - start

    async def _copy_window(self, offset: int, length: int, legs: list[MirrorLeg]) -> bool:
        """Bring [offset, +length) of `legs` up to the source; True if the
        source's bytes were read (and the window's checks rewritten)."""
        reports = self._reports
        copy = [leg for leg in legs if not leg.full_resync]
        compare = [leg for leg in legs if leg.full_resync]
        if compare:
            # The source's and the targets' digests are computed at once,
            # each on its own node.
            outcomes = await gather(
                [lambda: self._source.source_checksum(offset, length)]
                + [lambda leg=leg: leg.node.checksum(offset, length) for leg in compare]
            )
            reference, error = outcomes[0]
            if error is not None:
                raise error
            for leg, (digest, error) in zip(compare, outcomes[1:], strict=True):
                if error is not None:
                    reports.leg_failed(leg, error)
                elif digest != reference:
                    copy.append(leg)
        if not copy:
            return False
        data = await self._source.source_read(offset, length)
        await self._lease.ensure()
        outcomes = await gather(
            [lambda leg=leg: leg.node.write(offset, data) for leg in copy]
        )
        for leg, (_, error) in zip(copy, outcomes, strict=True):
            if error is not None:
                reports.leg_failed(leg, error)
        await self._rewrite_checks(offset, data)
        await reports.ensure_durable()
        return True

    # -- the block checks of copied and compared regions ----------------------
    async def _rewrite_checks(self, offset: int, data: bytes) -> None:
        """Set the check entries of a range from bytes just read from an
        in-sync leg inside an admitted window."""
        checks = self._checks
        if checks is None:
            return
        try:
            pinned = await checks.pin(checks.touched_pages(offset, len(data)))
        except NodeError:
            checks.distrust(self._geometry.regions_of(offset, len(data)))
            return
        try:
            checks.store(*digests_of(offset, data))
        finally:
            checks.unpin(pinned)

    async def _write_region_checks(self, region: int, legs: list[MirrorLeg]) -> None:
        """Write the check pages of a region to legs whose resync compared
        it without copying (their pages may be another storage's)."""
        checks = self._checks
        if checks is None:
            return
        pages = sorted(checks.pages_of_regions([region]))
        try:
            pinned = await checks.pin(pages)
        except NodeError as exc:
            log.warning("storage %s: %s", self.storage_name, exc)
            return
        try:
            for page in pages:
                raw = checks.page_bytes(page)
                outcomes = await gather(
                    [
                        lambda leg=leg, page=page, raw=raw: leg.write_check_page(page, raw)
                        for leg in legs
                    ]
                )
                for leg, (_, error) in zip(legs, outcomes, strict=True):
                    if error is not None:
                        self._reports.leg_failed(leg, error)
        finally:
            checks.unpin(pinned)

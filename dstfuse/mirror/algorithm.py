"""The mirror algorithm: every leg holds the whole storage (DST's mirror).

`Mirror` fans writes out to every leg that takes writes and completes them
when all have answered (`fanout.gather`, never cancelling a sibling); a leg
that fails is marked stale and the write succeeds if an in-sync leg took it.
Reads go to the readable leg whose previous request ended nearest the new
one (DST's rule) and fail over to the others; a leg that failed a read or
returned bytes failing their block check gets the good bytes written back
(read repair).

Invariants this module keeps (docs/mirror-metadata.md gives the reasons):
- a region is durably marked in the write-intent bitmap on every write
  target before any byte of a write reaches a leg;
- a leg that missed a write is recorded as stale in the headers of the
  surviving legs before that write completes;
- overlapping writes, resync windows, verify regions and read repairs are
  admitted in one `WriteOrder`, so every leg applies them in the same order;
- bits are cleared only when every leg is in sync, the region is idle, and
  its data and check pages are flushed on every leg;
- the last in-sync leg is never marked stale: if it fails, the request
  fails and the storage keeps its one complete copy.

It never reaches around the `Node` interface and never blocks the event loop.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

from ..algorithms.base import Algorithm, ControlFile, Placement
from ..errors import NodeError, NodeUnavailable, UserError
from ..fanout import gather
from ..nodes.base import Node, NodeState
from ..ranges import WriteOrder
from ..units import format_size
from .bitmap import RegionActivity, RegionBits, WriteIntentBitmap
from .checks import (
    UNKNOWN,
    ZERO_BLOCK_DIGEST,
    BlockChecks,
    digests_of,
    uniform_entries,
)
from .controls import leg_controls
from .dispatch import LegDispatch, LegSlow
from .history import FULL, IN_SYNC, LegFinding, NewerLegMayBeMissing, StartPlan, plan_start
from .lease import HolderLease
from .legs import LegRole, MirrorLeg
from .membership import Membership
from .metadata import (
    BLOCK,
    MAX_LEGS,
    ceil_div,
    leg_layout,
    round_down,
)
from .options import MOUNT_OPTIONS, MirrorOptions
from .resync import Resync
from .sizing import find_mirror_size
from .startup import examine_leg, take_write_grants, wait_for_holder
from .verify import OnlineVerify
from .watch import LegWatch

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Longest wait for flushes and header writes at shutdown.
CLOSE_TIMEOUT = 60.0
#: A leg that let a read wait `read_timeout` is asked last for this many
#: read timeouts (a frozen node costs the reads one timeout, not each one).
SLOW_LEG_HOLD = 5
#: A mount waiting for missing legs looks at every leg again this often
#: (a leg whose header read failed may answer without a state change).
MISSING_LEG_POLL = 2.0


class Mirror(Algorithm):
    """Replicated storage over 1 to MAX_LEGS legs (see the module doc)."""

    name = "mirror"
    mount_options = MOUNT_OPTIONS
    minimum_nodes = 2
    serves_without_a_node = True
    find_size = staticmethod(find_mirror_size)

    def __init__(
        self, storage_name: str, nodes: list[tuple[Node, int | None]], options: dict
    ) -> None:
        super().__init__(storage_name, nodes, options)
        if not 0 < len(nodes) <= MAX_LEGS:
            raise UserError(f"storage {storage_name}: a mirror has 1 to {MAX_LEGS} nodes")
        self.options = settings = MirrorOptions.parse(storage_name, options)
        self.legs = [
            MirrorLeg(storage_name, index, node, limit) for index, (node, limit) in enumerate(nodes)
        ]
        self.resync_rate = settings.resync_rate
        for leg in self.legs:
            leg.resync_size = settings.resync_size
            leg.resync_rate = settings.resync_rate

        self.write_order = WriteOrder()
        self.dispatch = LegDispatch(storage_name, settings.leg_timeout)
        self.membership = Membership(storage_name, self.legs, settings, self.dispatch)
        self.lease = HolderLease(storage_name, self.membership, settings)
        self._activity = RegionActivity()
        self._size = 0
        self.region_size = settings.region_size
        self.regions = 0
        self.bitmap: WriteIntentBitmap | None = None
        self.checks: BlockChecks | None = None
        self._rotor = 0
        self._started = False
        self._closed = False
        self._tasks: trio.Nursery | None = None
        self._background = trio.CancelScope()
        self._placements: list[Placement] = []
        self.resync = Resync(self)
        self.verify = OnlineVerify(self)
        self._watch = LegWatch(self)

    # -- Algorithm: description ------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return all(leg.node.writable for leg in self.legs if leg.in_sync)

    def placements(self) -> list[Placement]:
        return list(self._placements)

    @property
    def state(self) -> str:
        if not self._started:
            return "clean"
        if self.lease.fenced:
            return "fenced"
        if not any(leg.in_sync and leg.online for leg in self.legs):
            return "failed"
        if any(leg.role is LegRole.STALE or not leg.online for leg in self.legs):
            return "degraded"
        if any(leg.role is LegRole.RESYNCING for leg in self.legs):
            return "resyncing"
        return "clean"

    def _leg_of(self, placement: Placement) -> MirrorLeg:
        return self.legs[placement.cookie]

    def node_state(self, placement: Placement) -> str:
        return self._leg_of(placement).node_state()

    def resync_progress(self, placement: Placement) -> tuple[int, int]:
        leg = self._leg_of(placement)
        return (leg.resync_done, leg.resync_total)

    def controls(self) -> dict[str, ControlFile]:
        return {
            "verify": ControlFile(read=self.verify.read, write=self.verify.write),
            "bitmap": ControlFile(read=self._bitmap_text),
        }

    def _bitmap_text(self) -> str:
        """`marked <n> of <regions> regions of <bytes>`: regions that may
        differ between the legs (written recently, or missed by a leg)."""
        marked = len(self.bitmap.desired) if self.bitmap is not None else 0
        return f"marked {marked} of {self.regions} regions of {self.region_size}\n"

    # -- geometry --------------------------------------------------------
    def _regions_of(self, offset: int, length: int) -> range:
        last = (offset + max(length, 1) - 1) // self.region_size
        return range(offset // self.region_size, last + 1)

    def region_bounds(self, region: int) -> tuple[int, int]:
        start = region * self.region_size
        return start, min(start + self.region_size, self._size)

    def _region_bytes(self, regions: RegionBits) -> int:
        total = len(regions) * self.region_size
        last = self.regions - 1
        if self.regions and last in regions:
            total -= self.regions * self.region_size - self._size
        return total

    # -- start -----------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Read every leg's metadata, refuse a held storage or split brain,
        decide each leg's role, write the new generation's headers and
        bitmaps, then start heartbeats, leg watchers, resync and the
        bitmap's lazy clearing in `nursery`."""
        plan, findings = await self._plan()
        for note in plan.notes:
            log.warning("storage %s: %s", self.storage_name, note)
        await self._apply(plan, findings)
        self._started = True
        await nursery.start(self._run_background)
        self._report_start()

    async def _plan(self) -> tuple[StartPlan, list[LegFinding]]:
        """Examine the legs until a plan can be made: another holder is
        waited out (or refused) by `wait_for_holder`; missing legs that may
        hold newer data are waited for up to `mount_wait`, then refused.
        Only then are the legs' write grants taken (the nodes fence the old
        holder), and the plan is made again from what the legs hold now."""
        options = self.options
        deadline = trio.current_time() + options.mount_wait
        granted = False
        while True:
            findings = [await examine_leg(leg) for leg in self.legs]
            if not granted and await wait_for_holder(
                self.storage_name, self.legs, findings, options
            ):
                continue
            try:
                plan = plan_start(
                    self.storage_name,
                    findings,
                    primary=options.primary,
                    assume_clean=options.assume_clean,
                    force=options.force,
                )
            except NewerLegMayBeMissing as exc:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise UserError(f"{exc} (waited {options.mount_wait:g} s)") from None
                missing = [self.legs[index] for index in exc.missing]
                log.warning(
                    "storage %s: waiting up to %.0f s for %s: %s may hold newer data",
                    self.storage_name,
                    left,
                    ", ".join(map(str, missing)),
                    "they" if len(missing) > 1 else "it",
                )
                await self._wait_for_any_online(missing, min(left, MISSING_LEG_POLL))
                continue
            if granted:
                return plan, findings
            await take_write_grants(self.storage_name, self.legs)
            granted = True

    @staticmethod
    async def _wait_for_any_online(legs: list[MirrorLeg], timeout: float) -> None:
        """Until one of the offline `legs` comes online, or `timeout` (an
        online leg whose header could not be read is just looked at again)."""
        legs = [leg for leg in legs if not leg.online]
        with trio.move_on_after(timeout):
            if not legs:
                await trio.sleep_forever()
            async with trio.open_nursery() as race:
                for leg in legs:

                    async def online(leg: MirrorLeg = leg) -> None:
                        await leg.node.wait_state_change(NodeState.OFFLINE)
                        race.cancel_scope.cancel()

                    race.start_soon(online)

    async def _apply(self, plan: StartPlan, findings: list[LegFinding]) -> None:
        """Turn the plan into legs' roles, the bitmap and written headers."""
        reachable = {f.index for f in findings if f.reachable}
        if plan.fresh:
            self.membership.storage_id = uuid.uuid4().bytes
            self.membership.created_us = int(time.time() * 1e6)
            self.region_size = self.options.region_size
        else:
            assert plan.storage_id is not None and plan.region_size is not None
            self.membership.storage_id = plan.storage_id
            self.membership.generation = plan.generation
            self.region_size = plan.region_size
            source_header = findings[plan.source].header
            self.membership.created_us = source_header.created_us if source_header else 0
            if self.region_size != self.options.region_size:
                log.info(
                    "storage %s: keeping the region size it was created with (%s, not %s)",
                    self.storage_name,
                    format_size(self.region_size),
                    format_size(self.options.region_size),
                )
        for leg in self.legs:
            if leg.index in reachable:
                try:
                    leg.layout = leg_layout(leg.size, self.region_size)
                except ValueError as exc:
                    raise UserError(f"{leg}: {exc}") from None
        if plan.data_size is not None:
            self._size = plan.data_size
        else:
            capacities = [self.legs[i].layout.data_capacity for i in reachable]  # type: ignore[union-attr]
            self._size = round_down(min(capacities))
        for index in sorted(reachable):
            leg = self.legs[index]
            assert leg.layout is not None
            if leg.layout.data_capacity < self._size:
                raise UserError(
                    f"{leg}: holds {format_size(leg.layout.data_capacity)} of data, less than "
                    f"the storage's {format_size(self._size)}"
                )
        self.regions = ceil_div(self._size, self.region_size)
        self.membership.data_size = self._size
        self.membership.region_size = self.region_size
        self.bitmap = WriteIntentBitmap(self.regions, self._write_bitmap_block)
        if self.options.read_check:
            self.checks = BlockChecks(
                self._size,
                self.region_size,
                self._load_check_page,
                self._write_check_page,
                cache_pages=self.options.check_cache_pages,
            )
        self._placements = [self._placement(leg) for leg in self.legs]

        bits = RegionBits(self.regions)
        for index in plan.bitmap_legs:
            await self.read_bitmap(self.legs[index], bits)
        self.bitmap.load(bits)

        for leg in self.legs:
            role = plan.roles[leg.index]
            leg.role = LegRole.IN_SYNC if role == IN_SYNC else LegRole.STALE
            leg.full_resync = role == FULL
            if role != IN_SYNC:
                leg.stale_since = self.membership.generation + 1
        if any(leg.full_resync and leg.index in reachable for leg in self.legs):
            self.bitmap.desired.set_all()
        if self.checks is not None and plan.unclean:
            self.checks.distrust(bits)
        zero_checks = plan.fresh or not plan.checks_valid or self.checks is None
        self.membership.checks_valid = self.checks is not None

        self.membership.generation += 1
        self.membership.holder_epoch = self.membership.generation
        self.membership.held_since_us = int(time.time() * 1e6)
        targets = [self.legs[i] for i in sorted(reachable)]
        if zero_checks:
            await self._each(targets, self._zero_checks)
        else:
            fresh = [leg for leg in targets if leg.full_resync]
            await self._each(fresh, self._zero_checks)
        await self._each(targets, lambda leg: leg.write_header(self.membership.header(leg)))
        await self._each(
            targets,
            lambda leg: self.bitmap.publish_all(  # type: ignore[union-attr]
                lambda block, raw: leg.write_bitmap_block(self.membership.storage_id, block, raw)
            ),
        )
        self.bitmap.set_durable_everywhere()
        self.lease.granted()
        for leg in targets:
            if leg.role is LegRole.STALE:
                self.begin_resync(leg, self.bitmap.desired.copy())
        if not any(leg.in_sync for leg in self.legs):
            raise UserError(f"storage {self.storage_name}: no leg holds the storage's data")

    @staticmethod
    async def _zero_checks(leg: MirrorLeg) -> None:
        assert leg.layout is not None
        await leg.zero_checks(leg.layout.checks_length // BLOCK)

    async def _each(
        self, legs: list[MirrorLeg], call: Callable[[MirrorLeg], Awaitable[object]]
    ) -> None:
        """Start-up I/O on several legs: any failure fails the mount (the
        node answered moments ago; a mount must not start half-written)."""
        outcomes = await gather([lambda leg=leg: call(leg) for leg in legs])
        for leg, (_, error) in zip(legs, outcomes, strict=True):
            if error is not None:
                raise NodeError(
                    str(leg),
                    f"start-up metadata I/O failed: {error}",
                    errno=getattr(error, "errno", errno.EIO),
                )

    async def read_bitmap(self, leg: MirrorLeg, bits: RegionBits) -> None:
        assert self.bitmap is not None
        for block in range(self.bitmap.blocks):
            raw = await leg.read_bitmap_block(self.membership.storage_id, block)
            if raw is None:
                log.warning("%s: bitmap block %d is damaged; resyncing all its regions", leg, block)
                bits.add_block(block)
            else:
                other = RegionBits(self.regions)
                other.set_block_bytes(block, raw)
                bits.update(other)

    def _report_start(self) -> None:
        for leg in self.legs:
            log.info("%s: %s", leg, leg.node_state())
        log.info(
            "storage %s: mirror of %d legs, %s, generation %d, state %s",
            self.storage_name,
            len(self.legs),
            format_size(self._size),
            self.membership.generation,
            self.state,
        )

    def _placement(self, leg: MirrorLeg) -> Placement:
        return Placement(
            node=leg.node,
            start=0,
            size=self._size,
            cookie=leg.index,
            controls=leg_controls(self, leg),
        )

    # -- membership --------------------------------------------------------
    def leg_failed(self, leg: MirrorLeg, error: BaseException | str) -> bool:
        return self.membership.leg_failed(leg, error)

    async def ensure_membership_durable(self) -> None:
        await self.membership.ensure_durable()

    def begin_resync(self, leg: MirrorLeg, pending: RegionBits) -> None:
        """The leg's header records it stale and it has the current bitmap:
        from now on it takes writes and resync copies `pending` to it."""
        leg.pending = pending
        leg.role = LegRole.RESYNCING
        leg.resync_total = self._region_bytes(pending)
        leg.resync_done = 0
        log.info(
            "%s: resync of %s (%d regions%s) started",
            leg,
            format_size(leg.resync_total),
            len(pending),
            ", compared first" if leg.full_resync else "",
        )
        self.resync.wake()
        self.membership.kick()

    async def resync_complete(self, leg: MirrorLeg) -> None:
        """All pending regions were copied: flush the leg, record it in sync."""
        try:
            await leg.node.flush()
        except NodeError as exc:
            self.leg_failed(leg, exc)
            await self.ensure_membership_durable()
            return
        if leg.role is not LegRole.RESYNCING or leg.pending:
            return  # failed meanwhile, or a region must be copied again
        self.membership.mark_in_sync(leg)
        log.info("%s: resync done; leg in sync", leg)
        await self.ensure_membership_durable()

    # -- background ------------------------------------------------------
    async def _run_background(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._background:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                await tasks.start(self.dispatch.run_background)
                tasks.start_soon(self.resync.run)
                tasks.start_soon(self.lease.heartbeat, tasks)
                tasks.start_soon(self._bitmap_loop)
                for leg in self.legs:
                    tasks.start_soon(self._watch.watch, leg)
                task_status.started()

    def start_background(self, task: Callable[[], Awaitable[None]]) -> None:
        if self._tasks is None:
            raise UserError(f"storage {self.storage_name} is not started")
        self._tasks.start_soon(task)

    def retry_delay(self) -> float:
        return max((leg.resync_timeout for leg in self.legs), default=1.0)

    async def _bitmap_loop(self) -> None:
        while not self.lease.fenced:  # a fenced mount writes nothing more
            await trio.sleep(max(0.1, self.options.bitmap_idle / 2))
            try:
                await self._clear_idle(trio.current_time() - self.options.bitmap_idle)
            except NodeError as exc:
                log.warning("storage %s: bitmap not cleared: %s", self.storage_name, exc)

    async def _clear_idle(self, older_than: float) -> int:
        """Clear the bits of regions idle since `older_than`, when every leg
        is in sync: their check pages are written, every leg is flushed,
        then the bitmap blocks are written without them."""
        bitmap = self.bitmap
        assert bitmap is not None
        if not all(leg.in_sync and leg.online for leg in self.legs) or not bitmap.desired:
            return 0
        await self.lease.ensure()
        idle = self._activity.idle(bitmap.desired, older_than)
        if not idle:
            return 0
        regions = bitmap.begin_clear(idle)
        try:
            if self.checks is not None:
                await self.checks.forget_untrusted(regions)
                await self.checks.write_back(self.checks.pages_of_regions(regions))
            await self._flush_every_leg()
        except NodeError:
            bitmap.abort_clear(regions)
            self._distrust_unflushed()
            raise
        if not all(leg.in_sync and leg.online for leg in self.legs):
            # A leg failed the flush (or anything else) meanwhile: its copy of
            # these regions may be lost, so they stay marked for its resync.
            bitmap.abort_clear(regions)
            return 0
        await bitmap.finish_clear(regions)
        self._activity.forget(regions)
        return len(regions)

    async def _flush_every_leg(self) -> None:
        """FLUSH every leg taking writes; a leg that fails it is marked dirty
        (its regions resync later), so the flush fails only if no in-sync
        leg completed it."""
        await self.membership.on_every_target(lambda leg: leg.node.flush(), "the flush")
        await self.ensure_membership_durable()

    # -- metadata I/O for the bitmap and checks ---------------------------
    async def _write_bitmap_block(self, block: int, bits: bytes) -> None:
        await self.membership.on_every_target(
            lambda leg: leg.write_bitmap_block(self.membership.storage_id, block, bits),
            f"bitmap block {block}",
        )

    async def _load_check_page(self, page: int) -> bytes:
        legs = [leg for leg in self._read_order(range(0)) if leg.in_sync]
        return await self._first_answer(
            legs, lambda leg: leg.read_check_page(page), f"check page {page}"
        )

    async def _ask(
        self, leg: MirrorLeg, call: Callable[[MirrorLeg], Awaitable[T]], *, last: bool
    ) -> T:
        """`call(leg)`, given up after `read_timeout` (LegSlow) unless it is
        the `last` leg that could answer: a silent leg delays a read by at
        most that much when another leg has the data. Reads are safe to
        abandon (nothing changes on the node)."""
        if last:
            return await call(leg)
        with trio.move_on_after(self.options.read_timeout):
            return await call(leg)
        # asked last for a while, so the next reads do not wait for it too
        leg.slow_until = trio.current_time() + SLOW_LEG_HOLD * self.options.read_timeout
        raise LegSlow(str(leg), f"no answer within read_timeout ({self.options.read_timeout:g} s)")

    async def _first_answer(
        self, legs: list[MirrorLeg], call: Callable[[MirrorLeg], Awaitable[T]], what: str
    ) -> T:
        """The answer of the first leg (in `legs`' order) that gives one."""
        errors: list[NodeError] = []
        for position, leg in enumerate(legs):
            try:
                return await self._ask(leg, call, last=position == len(legs) - 1)
            except NodeError as exc:
                errors.append(exc)
        raise NodeError(
            f"storage {self.storage_name}",
            f"no leg answered for {what}: {'; '.join(map(str, errors)) or 'no leg holds it'}",
            errno=errors[-1].errno if errors else errno.EIO,
        )

    async def _write_check_page(self, page: int, data: bytes) -> None:
        await self.membership.on_every_target(
            lambda leg: leg.write_check_page(page, data), f"check page {page}"
        )

    async def write_region_checks(self, region: int, legs: list[MirrorLeg]) -> None:
        """Write the check pages of a region to legs whose resync compared
        it without copying (their pages may be another storage's)."""
        checks = self.checks
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
                        self.leg_failed(leg, error)
        finally:
            checks.unpin(pinned)

    def checks_trust(self, region: int) -> None:
        if self.checks is not None:
            self.checks.trust(region)

    async def checks_rewrite(self, offset: int, data: bytes) -> None:
        """Set the check entries of a range from bytes just read from an
        in-sync leg inside an admitted window."""
        checks = self.checks
        if checks is None:
            return
        try:
            pinned = await checks.pin(checks.touched_pages(offset, len(data)))
        except NodeError:
            checks.distrust(self._regions_of(offset, len(data)))
            return
        try:
            checks.store(*digests_of(offset, data))
        finally:
            checks.unpin(pinned)

    # -- reads -----------------------------------------------------------
    def _read_order(self, regions: range, offset: int = 0) -> list[MirrorLeg]:
        """Readable legs: online ones nearest first (DST), ties broken by
        fewer requests in flight, then in turn; a leg that lately let a read
        wait `read_timeout` after the others; offline ones last."""
        legs = [leg for leg in self.legs if leg.readable(regions)]
        count = len(self.legs)
        self._rotor += 1
        now = trio.current_time()
        online = sorted(
            (leg for leg in legs if leg.online),
            key=lambda leg: (
                leg.slow_until > now,
                abs(leg.position - offset),
                leg.node.counters.in_flight,
                (leg.index - self._rotor) % count,
            ),
        )
        return online + [leg for leg in legs if not leg.online]

    async def read(self, offset: int, length: int) -> bytes:
        regions = self._regions_of(offset, length)
        serial = self._activity.begin_read()
        try:
            return await self._read(offset, length, regions, serial)
        finally:
            self._activity.end_read(serial)

    async def _read(
        self, offset: int, length: int, regions: range, serial: int, *, admitted: bool = False
    ) -> bytes:
        """`admitted`: the caller holds a WriteOrder ticket covering the
        range (resync), so a read repair must not admit it again."""
        legs = self._read_order(regions, offset)
        if not legs:
            raise NodeError(
                f"storage {self.storage_name}",
                f"no leg holds [{offset}, +{length}) (all stale)",
                errno=errno.EIO,
            )
        checks = self.checks
        pinned: list[int] = []
        if checks is not None:
            try:
                pinned = await checks.pin(checks.checked_pages(offset, length))
            except NodeError as exc:
                log.warning("storage %s: read not checked: %s", self.storage_name, exc)
                checks = None
        try:
            failed: list[tuple[MirrorLeg, BaseException | None]] = []
            rejected: list[tuple[MirrorLeg, bytes]] = []
            good: bytes | None = None
            for position, leg in enumerate(legs):
                leg.position = offset + length
                try:
                    data = await self._ask(
                        leg,
                        lambda leg: leg.node.read(offset, length),
                        last=position == len(legs) - 1,
                    )
                except LegSlow:
                    continue  # silent: another leg serves it; writes decide its fate
                except NodeError as exc:
                    failed.append((leg, exc))
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
                good = data
                break
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

    def _settle_rejected(
        self,
        offset: int,
        length: int,
        failed: list[tuple[MirrorLeg, BaseException | None]],
        rejected: list[tuple[MirrorLeg, bytes]],
        checks: BlockChecks | None,
    ) -> bytes:
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
        good: bytes,
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
                self.leg_failed(leg, error or "offline")
            else:
                reachable.append((leg, error))
        if reachable:
            ticket = None if admitted else await self.write_order.admit(offset, len(good))
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
                    self.write_order.release(ticket)
        await self.ensure_membership_durable()

    async def _repair_write(self, leg: MirrorLeg, offset: int, data: bytes) -> bool:
        """Write good bytes over a leg's bad ones, marked in the bitmap like
        any write (a crash mid-repair then resyncs the region). The caller
        holds a WriteOrder ticket for the range. False if the leg failed."""
        assert self.bitmap is not None
        regions = self._regions_of(offset, len(data))
        await self.lease.ensure()
        self._activity.begin(regions)
        try:
            try:
                await self.bitmap.mark(regions)
            except NodeError as exc:
                log.warning("%s: not repaired, the bitmap could not be marked: %s", leg, exc)
                return False
            await self.lease.ensure()
            try:
                await leg.node.write(offset, data)
            except NodeError as exc:
                self.leg_failed(leg, exc)
                return False
        finally:
            self._activity.end(regions)
        return True

    async def source_read(self, offset: int, length: int) -> bytes:
        """Bytes from an in-sync leg for resync (inside its admitted
        window), checked like a read."""
        regions = self._regions_of(offset, length)
        serial = self._activity.begin_read()
        try:
            legs = [leg for leg in self._read_order(regions, offset) if leg.in_sync]
            if not legs:
                raise NodeError(f"storage {self.storage_name}", "no in-sync leg to copy from")
            return await self._read(offset, length, regions, serial, admitted=True)
        finally:
            self._activity.end_read(serial)

    async def source_checksum(self, offset: int, length: int) -> bytes:
        regions = self._regions_of(offset, length)
        legs = [leg for leg in self._read_order(regions, offset) if leg.in_sync]
        return await self._first_answer(
            legs,
            lambda leg: leg.node.checksum(offset, length),
            f"the checksum of [{offset}, +{length})",
        )

    # -- writes ----------------------------------------------------------
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data)
        entries = digests_of(offset, view) if self.checks is not None else None
        await self._mutate(
            "write", offset, len(view), lambda leg: leg.node.write(offset, view, fua=fua), entries
        )

    async def trim(self, offset: int, length: int) -> None:
        entries = uniform_entries(offset, length, ZERO_BLOCK_DIGEST)
        await self._mutate(
            "trim", offset, length, lambda leg: leg.node.trim(offset, length), entries
        )

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        entries = uniform_entries(offset, length, ZERO_BLOCK_DIGEST)
        await self._mutate(
            "write-zeroes",
            offset,
            length,
            lambda leg: leg.node.write_zeroes(offset, length, fua=fua),
            entries,
        )

    async def _mutate(
        self,
        what: str,
        offset: int,
        length: int,
        call: Callable[[MirrorLeg], Awaitable[None]],
        entries: tuple[int, list[int]] | None,
    ) -> None:
        bitmap, checks = self.bitmap, self.checks
        assert bitmap is not None
        regions = self._regions_of(offset, length)
        ticket = await self.write_order.admit(offset, length)
        try:
            await self.lease.ensure()  # before any byte, metadata included
            self._activity.begin(regions)
            pinned: list[int] = []
            try:
                if checks is not None:
                    try:
                        pinned = await checks.pin(checks.touched_pages(offset, length))
                    except NodeError as exc:
                        log.warning("storage %s: %s; range not checked", self.storage_name, exc)
                        checks.distrust(regions)
                await bitmap.mark(regions)
                await self.lease.ensure()
                targets = [leg for leg in self.legs if leg.takes_writes]
                try:
                    outcomes = await self.dispatch.run(targets, call)
                except trio.Cancelled:
                    if pinned and checks is not None and entries is not None:
                        # some legs may hold the new bytes, some the old
                        checks.store(offset // BLOCK, [UNKNOWN] * len(entries[1]))
                    await self._abandoned(targets, regions, what)
                    raise
                failures = []
                took = False
                for leg, (_, error) in zip(targets, outcomes, strict=True):
                    if error is None:
                        leg.position = offset + length
                        took = took or leg.in_sync
                    elif isinstance(error, NodeError):
                        failures.append((leg, error))
                    else:
                        raise error
                if pinned and checks is not None:
                    if took:
                        checks.store(*entries)  # type: ignore[misc]
                    else:
                        first = offset // BLOCK
                        checks.store(first, [UNKNOWN] * len(entries[1]))  # type: ignore[index]
                if not took:
                    self._copy_again(targets, regions)
                    await self._keep_one_copy([leg for leg, _ in failures], what)
                    error = failures[0][1] if failures else None
                    raise NodeError(
                        f"storage {self.storage_name}",
                        f"{what} [{offset}, +{length}) failed on every in-sync leg: {error}",
                        errno=error.errno if error is not None else errno.EIO,
                    )
                for leg, error in failures:
                    self.leg_failed(leg, error)
                await self.ensure_membership_durable()
            finally:
                if checks is not None:
                    checks.unpin(pinned)
                self._activity.end(regions)
        finally:
            self.write_order.release(ticket)

    async def _abandoned(self, targets: list[MirrorLeg], regions: range, what: str) -> None:
        """A write was cancelled while on the legs (the request was
        interrupted, the mount is stopping): some legs may have it and some
        not. All but one in-sync leg go stale and resync its regions;
        resyncing legs copy them again."""
        self._copy_again(targets, regions)
        in_sync = [leg for leg in targets if leg.in_sync]
        await self._keep_one_copy(in_sync, f"cancelled {what}", shield=True)

    async def _keep_one_copy(
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
                await self.ensure_membership_durable()
            except NodeError as exc:
                log.error("storage %s: %s", self.storage_name, exc)

    def _distrust_unflushed(self) -> None:
        """A FLUSH failed on every in-sync leg: a write since the last flush
        may have reverted to older bytes there (a failed fdatasync drops the
        dirty pages), which is allowed after the EIO but would fail its
        block check. The marked regions' entries are not trusted until the
        regions are rewritten or resynced."""
        if self.checks is not None and self.bitmap is not None:
            self.checks.distrust(self.bitmap.desired)

    def _copy_again(self, targets: list[MirrorLeg], regions: Iterable[int]) -> None:
        """A request failed on every in-sync leg: a resyncing leg that took
        it (or part of it) may now differ from them, so its resync copies
        those regions again."""
        regions = list(regions)
        for leg in targets:
            if leg.role is LegRole.RESYNCING and leg.pending is not None:
                fresh = [region for region in regions if region not in leg.pending]
                for region in fresh:
                    leg.pending.add(region)
                    start, end = self.region_bounds(region)
                    leg.resync_total += end - start
                if fresh:
                    log.warning(
                        "%s: a request no in-sync leg completed may have reached it; "
                        "%d region(s) are copied again", leg, len(fresh),
                    )
                    self.resync.wake()

    async def repair_block(self, offset: int, copies: list[tuple[MirrorLeg, bytes]]) -> bool:
        """Verify's repair of one block at `offset`: the caller holds the
        region's WriteOrder ticket. The source is the first in-sync leg
        whose bytes pass the block check (the first in-sync leg if the block
        has none); the others get its bytes. True if every leg now agrees."""
        checks = self.checks
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
        await self.ensure_membership_durable()
        return ok

    async def flush(self) -> None:
        await self.lease.ensure()
        legs = [leg for leg in self.legs if leg.takes_writes]
        outcomes = await self.dispatch.run(legs, lambda leg: leg.node.flush())
        answers = list(zip(legs, outcomes, strict=True))
        took = any(error is None and leg.in_sync for leg, (_, error) in answers)
        errors = [(leg, error) for leg, (_, error) in answers if error]
        if not took:
            # Any write since the last flush may be lost on the in-sync legs
            # and kept on a resyncing one: those copy every marked region again.
            assert self.bitmap is not None
            self._copy_again(legs, self.bitmap.desired)
            self._distrust_unflushed()
            await self._keep_one_copy([leg for leg, _ in errors], "flush")
            error = errors[0][1] if errors else None
            raise NodeError(
                f"storage {self.storage_name}",
                f"flush failed on every in-sync leg: {error}",
                errno=getattr(error, "errno", errno.EIO),
            )
        for leg, error in errors:
            self.leg_failed(leg, error)
        await self.ensure_membership_durable()

    async def checksum(self, offset: int, length: int) -> bytes:
        legs = self._read_order(self._regions_of(offset, length), offset)
        return await self._first_answer(
            legs,
            lambda leg: leg.node.checksum(offset, length),
            f"the checksum of [{offset}, +{length})",
        )

    # -- controls --------------------------------------------------------
    def mark_dirty(self, leg: MirrorLeg) -> None:
        """Force a full resync of the leg."""
        if leg.in_sync and not any(o.in_sync for o in self.legs if o is not leg):
            raise UserError(f"{leg} is the only in-sync leg; refusing to mark it dirty")
        log.warning("%s: marked dirty by the user; full resync", leg)
        leg.blocked = ""
        if leg.role is not LegRole.STALE:
            self.leg_failed(leg, "marked dirty by the user")
        leg.full_resync = True
        self.membership.bump(new_generation=False)
        self.start_background(self.membership.publish_quietly)

    def mark_clean(self, leg: MirrorLeg) -> None:
        """Declare the leg in sync (the user vouches for its data)."""
        if not leg.online:
            raise UserError(f"{leg} is offline")
        if leg.layout is None or leg.layout.data_capacity < self._size:
            raise UserError(f"{leg} has not been examined yet or is too small")
        log.warning("%s: marked clean by the user", leg)
        leg.blocked = ""
        self.start_background(lambda: self._declare_clean(leg))

    async def _declare_clean(self, leg: MirrorLeg) -> None:
        assert self.bitmap is not None
        await leg.wait_settled()  # nothing sent before may land after this
        if leg.role is not LegRole.IN_SYNC:
            self.membership.joining.add(leg.index)
            try:
                await leg.write_header(self.membership.header(leg))
                await self.bitmap.publish_all(
                    lambda block, raw: leg.write_bitmap_block(
                        self.membership.storage_id, block, raw
                    )
                )
            except NodeError as exc:
                log.warning("%s: cannot be marked clean: %s", leg, exc)
                return
            finally:
                self.membership.joining.discard(leg.index)
        self.membership.mark_in_sync(leg)
        await self.membership.publish_quietly()

    def set_resync_timeout(self, leg: MirrorLeg, seconds: float) -> None:
        leg.resync_timeout = seconds
        self.membership.kick()

    # -- shutdown --------------------------------------------------------
    async def aclose(self) -> None:
        """Stop background work, flush every leg, clear the bitmap of idle
        regions when all legs are in sync, write the check pages, and
        record a clean shutdown that releases the storage."""
        if not self._started or self._closed:
            return
        self._closed = True
        self.dispatch.stop()
        self._background.cancel()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await self._close_metadata()
        if scope.cancelled_caught:
            log.error(
                "storage %s: shutdown did not finish in %.0f s; next mount resyncs "
                "the marked regions",
                self.storage_name,
                CLOSE_TIMEOUT,
            )

    async def _close_metadata(self) -> None:
        if self.lease.fenced:
            log.error("storage %s: fenced; nothing written at shutdown", self.storage_name)
            return
        try:
            await self.flush()
        except NodeError as exc:
            log.error("storage %s: final flush failed: %s", self.storage_name, exc)
            return
        try:
            if all(leg.in_sync and leg.online for leg in self.legs):
                await self._clear_idle(float("inf"))
            if self.checks is not None:
                await self.checks.forget_untrusted(list(self.checks.untrusted))
                await self.checks.write_back()
                await self.flush()
        except NodeError as exc:
            log.warning(
                "storage %s: check pages not written (%s); they are rebuilt as "
                "unknown at the next mount",
                self.storage_name,
                exc,
            )
            self.membership.checks_valid = False
        legs = [leg for leg in self.legs if leg.takes_writes and leg.layout is not None]
        outcomes = await gather(
            [
                lambda leg=leg: leg.write_header(self.membership.header(leg, clean=True))
                for leg in legs
            ]
        )
        for leg, (_, error) in zip(legs, outcomes, strict=True):
            if error is not None:
                log.error("%s: clean-shutdown record not written: %s", leg, error)
        log.info(
            "storage %s: closed (generation %d, %d regions still marked)",
            self.storage_name,
            self.membership.generation,
            len(self.bitmap.desired) if self.bitmap else 0,
        )

"""Opening a mirror: read every leg, decide, write the new generation.

`open_mirror` examines the legs (startup.py) until a plan can be made
(history.py): another holder is waited out or refused, missing legs that
may hold newer data are waited for up to `mount_wait`, then refused. It then
fixes the geometry (an existing storage keeps its size and region size),
decides each leg's role, loads the bitmap from the legs the plan names,
and writes the new generation's headers and bitmaps to every reachable leg
before the lease is granted: any failure there fails the mount (the node
answered moments ago; a mount must not start half-written). Nothing runs in
the background yet; the stale legs that are reachable are returned to be
resynced.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..errors import NodeError, UserError
from ..fanout import gather
from ..nodes.base import NodeState
from ..units import format_size
from .bitmap import RegionBits, WriteIntentBitmap
from .checks import BlockChecks
from .geometry import Geometry
from .history import FULL, IN_SYNC, LegFinding, NewerLegMayBeMissing, StartPlan, plan_start
from .lease import HolderLease
from .legs import LegRole, MirrorLeg
from .membership import Membership
from .metadata import BLOCK, leg_layout, round_down
from .options import MirrorOptions
from .routing import ReadRouter
from .startup import examine_leg, take_write_grants, wait_for_holder

log = logging.getLogger(__name__)

#: A mount waiting for missing legs looks at every leg again this often
#: (a leg whose header read failed may answer without a state change).
MISSING_LEG_POLL = 2.0


@dataclass(frozen=True)
class Opened:
    """What a started mirror runs on. `checks` is None with read_check off;
    `resync_from_start` are the reachable stale legs, whose headers and
    bitmaps are written: they resync `bitmap.desired` from now on."""

    geometry: Geometry
    bitmap: WriteIntentBitmap
    checks: BlockChecks | None
    resync_from_start: list[MirrorLeg]


async def open_mirror(
    storage_name: str,
    legs: list[MirrorLeg],
    options: MirrorOptions,
    membership: Membership,
    lease: HolderLease,
    router: ReadRouter,
) -> Opened:
    opening = _Opening(storage_name, legs, options, membership, router)
    plan, findings = await opening.plan()
    for note in plan.notes:
        log.warning("storage %s: %s", storage_name, note)
    opened = await opening.apply(plan, findings)
    lease.granted()
    return opened


class _Opening:
    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        options: MirrorOptions,
        membership: Membership,
        router: ReadRouter,
    ) -> None:
        self.storage_name = storage_name
        self.legs = legs
        self.options = options
        self.membership = membership
        self.router = router

    async def plan(self) -> tuple[StartPlan, list[LegFinding]]:
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
                await _wait_for_any_online(missing, min(left, MISSING_LEG_POLL))
                continue
            if granted:
                return plan, findings
            await take_write_grants(self.storage_name, self.legs)
            granted = True

    async def apply(self, plan: StartPlan, findings: list[LegFinding]) -> Opened:
        """Turn the plan into legs' roles, the bitmap and written headers."""
        membership, options = self.membership, self.options
        reachable = {f.index for f in findings if f.reachable}
        if plan.fresh:
            membership.storage_id = uuid.uuid4().bytes
            membership.created_us = int(time.time() * 1e6)
            region_size = options.region_size
        else:
            assert plan.storage_id is not None and plan.region_size is not None
            membership.storage_id = plan.storage_id
            membership.generation = plan.generation
            region_size = plan.region_size
            source_header = findings[plan.source].header
            membership.created_us = source_header.created_us if source_header else 0
            if region_size != options.region_size:
                log.info(
                    "storage %s: keeping the region size it was created with (%s, not %s)",
                    self.storage_name,
                    format_size(region_size),
                    format_size(options.region_size),
                )
        for leg in self.legs:
            if leg.index in reachable:
                try:
                    leg.layout = leg_layout(leg.size, region_size)
                except ValueError as exc:
                    raise UserError(f"{leg}: {exc}") from None
        if plan.data_size is not None:
            size = plan.data_size
        else:
            capacities = [self.legs[i].layout.data_capacity for i in reachable]  # type: ignore[union-attr]
            size = round_down(min(capacities))
        for index in sorted(reachable):
            leg = self.legs[index]
            assert leg.layout is not None
            if leg.layout.data_capacity < size:
                raise UserError(
                    f"{leg}: holds {format_size(leg.layout.data_capacity)} of data, less than "
                    f"the storage's {format_size(size)}"
                )
        geometry = Geometry(size, region_size)
        membership.data_size = size
        membership.region_size = region_size
        bitmap = WriteIntentBitmap(geometry.regions, self._write_bitmap_block)
        checks = None
        if options.read_check:
            checks = BlockChecks(
                size,
                region_size,
                self._load_check_page,
                self._write_check_page,
                cache_pages=options.check_cache_pages,
            )

        bits = RegionBits(geometry.regions)
        for index in plan.bitmap_legs:
            await self.legs[index].read_bitmap(membership.storage_id, bits)
        bitmap.load(bits)

        source_header = None if plan.fresh else findings[plan.source].header
        for leg in self.legs:
            role = plan.roles[leg.index]
            leg.role = LegRole.IN_SYNC if role == IN_SYNC else LegRole.STALE
            leg.full_resync = role == FULL or leg.index in plan.unknown_history
            if role != IN_SYNC:
                leg.stale_since = membership.generation + 1
            elif source_header is not None and (row := source_header.member(leg.index)):
                # kept across mounts: history.py reads it to tell a claim
                # made before the leg last caught up from a real split
                leg.synced_at = row.synced_at
        if any(leg.full_resync and leg.index in reachable for leg in self.legs):
            bitmap.desired.set_all()
        if checks is not None and plan.unclean:
            checks.distrust(bits)
        zero_checks = plan.fresh or not plan.checks_valid or checks is None

        membership.generation += 1
        membership.holder_epoch = membership.generation
        # A removal begun before a crash and completed by this config is
        # renumbered at this generation; one the config undid is dropped.
        assert plan.renumbered is None or plan.renumbered.generation <= membership.generation
        membership.renumbered = plan.renumbered
        membership.removing = 0
        membership.held_since_us = int(time.time() * 1e6)
        targets = [self.legs[i] for i in sorted(reachable)]
        zeroed = targets if zero_checks else [leg for leg in targets if leg.full_resync]
        await _each(zeroed, _zero_checks)
        membership.expect_checks(checks is not None, zeroed=bool(zeroed))
        await _each(targets, lambda leg: leg.write_header(membership.header(leg)))
        await _each(
            targets,
            lambda leg: bitmap.publish_all(
                lambda block, raw: leg.write_bitmap_block(membership.storage_id, block, raw)
            ),
        )
        bitmap.set_durable_everywhere()
        if not any(leg.in_sync for leg in self.legs):
            raise UserError(f"storage {self.storage_name}: no leg holds the storage's data")
        stale = [leg for leg in targets if leg.role is LegRole.STALE]
        return Opened(geometry, bitmap, checks, stale)

    # -- metadata I/O of the bitmap and the checks -----------------------------
    async def _write_bitmap_block(self, block: int, bits: bytes) -> None:
        membership = self.membership
        await membership.on_every_target(
            lambda leg: leg.write_bitmap_block(membership.storage_id, block, bits),
            f"bitmap block {block}",
        )

    async def _load_check_page(self, page: int) -> bytes:
        legs = [leg for leg in self.router.order(range(0)) if leg.in_sync]
        return await self.router.first_answer(
            legs, lambda leg: leg.read_check_page(page), f"check page {page}"
        )

    async def _write_check_page(self, page: int, data: bytes) -> None:
        await self.membership.on_every_target(
            lambda leg: leg.write_check_page(page, data), f"check page {page}"
        )


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


async def _zero_checks(leg: MirrorLeg) -> None:
    assert leg.layout is not None
    await leg.zero_checks(leg.layout.checks_length // BLOCK)


async def _each(legs: list[MirrorLeg], call: Callable[[MirrorLeg], Awaitable[object]]) -> None:
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

"""Watching legs: heartbeats, legs going offline, and stale legs coming back.

`LegWatch` runs the mirror's per-leg background work (the heartbeat is the
holder's lease, lease.py):

- one watcher per leg (`node.wait_state_change`): an in-sync leg whose node
  goes OFFLINE is marked stale at once, unless it is the last in-sync leg
  online, so writes stop waiting for it; a stale leg whose node is ONLINE
  rejoins after its `resync_timeout` (doubled after each failed attempt);
- rejoining: the leg's header is written first (recording it stale), then
  every bitmap block, and only then does it become a resync target, so
  every region marked from then on is marked on it too. A leg first seen
  after start-up is examined like at mount: same storage and history known
  -> partial resync; no or foreign metadata -> full resync; written without
  the legs in sync here (split brain) or too small -> refused until the
  user decides (`dirty`/`clean` control files, or a remount with primary=).
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from ..errors import NodeError
from ..nodes.base import NodeState
from ..units import format_size
from .bitmap import RegionBits, WriteIntentBitmap
from .geometry import Geometry
from .legs import LegRole, MirrorLeg
from .membership import Membership
from .metadata import BLOCK, leg_layout
from .numbering import in_numbering
from .startup import examine_leg

log = logging.getLogger(__name__)

#: Longest pause of a watcher with nothing to do (it wakes on any change).
IDLE_WAIT = 60.0


class Resyncs(Protocol):
    def begin_resync(self, leg: MirrorLeg, pending: RegionBits) -> None:
        """The leg's header and bitmap are written: it resyncs `pending`."""
        ...


class LegWatch:
    """`checks`: the storage keeps block checks (a leg resynced in full
    gets its check pages zeroed first)."""

    def __init__(
        self,
        legs: list[MirrorLeg],
        membership: Membership,
        geometry: Geometry,
        bitmap: WriteIntentBitmap,
        *,
        checks: bool,
        resyncs: Resyncs,
    ) -> None:
        self._legs = legs
        self._membership = membership
        self._geometry = geometry
        self._bitmap = bitmap
        self._checks = checks
        self._resyncs = resyncs

    # -- watching -------------------------------------------------------------
    async def _wait_change(self, leg: MirrorLeg, seen: NodeState, timeout: float) -> None:
        """Until the node's state differs from `seen`, any leg's role
        changes, or `timeout` passes."""
        changed = self._membership.changed
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as race:

                async def node_change() -> None:
                    await leg.node.wait_state_change(seen)
                    race.cancel_scope.cancel()

                async def role_change() -> None:
                    await changed.wait()
                    race.cancel_scope.cancel()

                race.start_soon(node_change)
                race.start_soon(role_change)

    async def watch(self, leg: MirrorLeg) -> None:
        legs = self._legs
        attempts = 0
        while leg in legs:  # a leg removed by a reload is watched no more
            seen = leg.node.state
            if leg.in_sync:
                attempts = 0
            if leg.role is not LegRole.STALE and not leg.online:
                if any(other.in_sync and other.online for other in legs if other is not leg):
                    if self._membership.leg_failed(leg, "node offline"):
                        await self._membership.publish_quietly()
            elif leg.role is LegRole.STALE and leg.online and not leg.blocked:
                # Back off while attempts keep failing (a leg that rejoins and
                # fails again must not spin); only its node going away cuts
                # the wait short.
                with trio.move_on_after(leg.resync_timeout * 2 ** min(attempts, 5)):
                    await leg.node.wait_state_change(seen)
                if leg.role is LegRole.STALE and leg.online and not leg.blocked:
                    attempts += 1
                    await self.rejoin(leg)
                continue
            await self._wait_change(leg, seen, IDLE_WAIT)

    # -- rejoining ----------------------------------------------------------------
    async def rejoin(self, leg: MirrorLeg) -> bool:
        """Bring a stale, online leg back as a resync target (see the module
        doc); False if it cannot come back now."""
        membership, bitmap = self._membership, self._bitmap
        extra = RegionBits(self._geometry.regions)
        await leg.wait_settled()  # nothing sent before may land after its resync
        if leg.role is not LegRole.STALE or not leg.online:
            return False
        try:
            if leg.layout is None or leg.layout.leg_size != leg.size:
                leg.layout = None
                if not await self._adopt(leg, extra):
                    return False
            membership.joining.add(leg)
            if leg.full_resync:
                await bitmap.mark_all()
            else:
                bitmap.desired.update(extra)
            await leg.write_header(membership.header(leg))
            await bitmap.publish_all(
                lambda block, raw: leg.write_bitmap_block(membership.storage_id, block, raw)
            )
        except NodeError as exc:
            membership.joining.discard(leg)
            log.warning("%s: cannot rejoin yet: %s", leg, exc)
            return False
        if leg not in membership.joining:
            return False  # a bitmap or header write to it failed meanwhile
        membership.joining.discard(leg)
        if leg.role is not LegRole.STALE or not leg.online:
            return False
        pending = bitmap.desired.copy()
        pending.update(bitmap.clearing)
        self._resyncs.begin_resync(leg, pending)
        return True

    async def _adopt(self, leg: MirrorLeg, extra: RegionBits) -> bool:
        """First sight of a leg that was offline at start: partial resync
        (its bitmap's regions are added to `extra`), full resync, or refused
        (`leg.blocked` says why)."""
        size = self._geometry.size
        try:
            layout = leg_layout(leg.size, self._geometry.region_size)
        except ValueError as exc:
            return self._block(leg, str(exc))
        if layout.data_capacity < size:
            return self._block(
                leg,
                f"holds {format_size(layout.data_capacity)} of data, less than the storage's "
                f"{format_size(size)}",
            )
        leg.layout = layout
        finding = await examine_leg(leg)
        header = finding.header
        problem = finding.problem
        if header is not None and header.storage_id == self._membership.storage_id:
            # in the numbering this mirror runs with (numbering.py)
            translated = in_numbering(header, self._membership.renumbered)
            header, problem = translated.header, translated.problem
        if header is None:
            log.warning("%s: %s; full resync", leg, problem)
            leg.full_resync = True
        elif header.storage_id != self._membership.storage_id:
            log.warning(
                "%s: holds another storage (id %s); overwritten by a full resync",
                leg, header.storage_id.hex()[:8],
            )
            leg.full_resync = True
        elif header.leg_index != leg.index and not header.self_record.in_sync:
            # a former leg, not up to date, added back at another position
            log.warning(
                "%s: held leg %d of this storage, not up to date; full resync",
                leg, header.leg_index,
            )
            leg.full_resync = True
        elif header.leg_index != leg.index:
            return self._block(
                leg,
                f"holds leg {header.leg_index} of this storage, not leg {leg.index}; "
                "fix the order of nodes in the config",
            )
        elif header.self_record.in_sync and any(
            other.in_sync
            and (record := header.member(other.index)) is not None
            and not record.in_sync
            for other in self._legs
        ):
            return self._block(
                leg,
                f"split brain: it was written without the legs in sync here (its generation "
                f"{header.generation}); unmount and mount with -o primary=<leg> to choose",
            )
        else:
            # A full resync decided at mount (history unknown there) stays one.
            leg.full_resync = leg.full_resync or header.self_record.full_resync
            if not leg.full_resync:
                await leg.read_bitmap(self._membership.storage_id, extra)
        if leg.full_resync and self._checks:
            await leg.zero_checks(layout.checks_length // BLOCK)
        return True

    @staticmethod
    def _block(leg: MirrorLeg, reason: str) -> bool:
        leg.blocked = reason
        log.error("%s: cannot rejoin: %s", leg, reason)
        return False

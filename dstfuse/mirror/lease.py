"""The holder's lease: one writer per mirror, and fencing of a stale one.

A mount holds a storage from the header it writes at start (its client id,
and `holder_epoch`: the generation it mounted at, higher than any holder's
before it). It keeps the storage by renewing a lease: every
`heartbeat_interval` each write target's header slots are read back and,
unless a newer holder wrote there, the header is rewritten with the
heartbeat counter advanced. A renewal that an in-sync leg acknowledged
lets the holder write for `lease_time` from the moment the renewal was
sent. Another mount takes over only after watching the heartbeat stand
still for `holder_timeout` (startup.wait_for_holder), which is longer than
the lease by `heartbeat_interval + 1` s: a holder that stalled (a frozen
process, a cut network) has stopped writing before a taker starts.

Invariants:
- every write path calls `ensure()` first: within the lease it costs one
  comparison; after it (any stall) the holder record is read back from the
  legs before anything is written;
- once a slot shows another holder with a higher epoch, or a leg's node
  refuses this mount because another client took its write grant over
  (the taker's node-side fencing, startup.take_write_grants), this mount is
  fenced for good: every later `ensure()` raises EIO, nothing more is
  written (no heartbeat, no clean-shutdown record), and `state` says so;
- a slot written late by an older holder (a heartbeat that was in flight
  when it froze) has a lower epoch and never fences the newer one.
"""

from __future__ import annotations

import errno
import logging

import trio

from ..errors import NodeError
from ..fanout import gather
from .legs import MirrorLeg
from .membership import Membership
from .metadata import MirrorHeader
from .options import MirrorOptions

log = logging.getLogger(__name__)


class HolderLease:
    def __init__(self, storage_name: str, membership: Membership, options: MirrorOptions) -> None:
        self._storage_name = storage_name
        self._membership = membership
        self._options = options
        #: when the last acknowledged renewal was sent (trio clock)
        self._renewed_at = -float("inf")
        self._beating: set[MirrorLeg] = set()
        self._renewing = trio.Lock()

    def granted(self) -> None:
        """The mount's own headers were just written: the lease starts."""
        self._renewed_at = trio.current_time()

    @property
    def fenced(self) -> str:
        return self._membership.fenced

    def valid(self) -> bool:
        return not self.fenced and trio.current_time() < self._renewed_at + self._options.lease_time

    async def ensure(self) -> None:
        """Return if this mount may write now; raise NodeError (EIO) if it
        is fenced or cannot renew its lease on any in-sync leg."""
        if self.valid():
            return
        async with self._renewing:
            if self.valid():
                return
            self._check_fenced()
            sent = trio.current_time()
            legs = self._membership.targets()
            outcomes = await gather([lambda leg=leg: self._renew(leg) for leg in legs])
            self._check_fenced()
            renewed = [leg for leg, (took, _) in zip(legs, outcomes, strict=True) if took]
            if not any(leg.in_sync for leg in renewed):
                errors = [str(error) for _, error in outcomes if error is not None]
                raise NodeError(
                    f"storage {self._storage_name}",
                    f"the holder's lease could not be renewed on any in-sync leg "
                    f"({'; '.join(errors) or 'no leg'}); not writing",
                    errno=errno.EIO,
                )
            self._renewed_at = max(self._renewed_at, sent)

    def _check_fenced(self) -> None:
        if self.fenced:
            raise NodeError(
                f"storage {self._storage_name}", f"fenced: {self.fenced}", errno=errno.EIO
            )

    # -- heartbeat ------------------------------------------------------------
    async def heartbeat(self, tasks: trio.Nursery) -> None:
        """Renew the lease on every write target each interval, each leg
        on its own so one slow leg delays no other."""
        while not self.fenced:
            await trio.sleep(self._options.heartbeat_interval)
            self._membership.heartbeat += 1
            for leg in self._membership.targets():
                if leg.online and leg not in self._beating:
                    self._beating.add(leg)
                    tasks.start_soon(self._beat, leg)

    async def _beat(self, leg: MirrorLeg) -> None:
        sent = trio.current_time()
        try:
            if await self._renew(leg) and leg.in_sync:
                self._renewed_at = max(self._renewed_at, sent)
        except NodeError as exc:
            if self.fenced:
                return  # the node refused us: the mount is fenced (logged once)
            if self._membership.leg_failed(leg, f"heartbeat failed: {exc}"):
                await self._membership.publish_quietly()
        finally:
            self._beating.discard(leg)

    async def _renew(self, leg: MirrorLeg) -> bool:
        """Read the leg's header slots back, then rewrite its header with
        the current heartbeat; False (and fenced) if a newer holder wrote
        there meanwhile."""
        for slot in await leg.read_slots():
            if self._newer_holder(slot):
                self._fence(leg, slot)
                return False
        if self.fenced:
            return False
        await leg.write_header(self._membership.header(leg))
        return True

    def _newer_holder(self, slot: MirrorHeader) -> bool:
        membership = self._membership
        return (
            slot.storage_id == membership.storage_id
            and slot.client_id not in (self._options.client_id, bytes(16))
            and slot.holder_epoch > membership.holder_epoch
        )

    def _fence(self, leg: MirrorLeg, slot: MirrorHeader) -> None:
        if self.fenced:
            return
        self._membership.fenced = (
            f"{slot.client_name or 'another client'} took the storage over "
            f"(found on {leg}); this mount writes nothing more"
        )
        log.error("storage %s: %s", self._storage_name, self.fenced)

"""Membership: which legs are in sync, as recorded in every leg's header.

`Membership` owns the storage's identity (id, generation, holder, heartbeat)
and the rule that makes a failed leg safe to leave behind: a leg that missed
a write is recorded as stale in the headers of the surviving legs before
that write completes (`leg_failed` bumps the generation; writers then await
`ensure_durable`). It builds each leg's header and writes the new ones to
every leg that takes writes; it never decides when a leg is resynced.
Once `fenced` (another mount took the storage over: found by the lease in
a header, or by a leg's node whose write grant was taken), it writes
nothing.

Invariants:
- the last in-sync leg is never marked stale. If it fails, the request
  fails and the storage keeps its one complete copy;
- a leg counts as in sync only once every in-sync leg's header records it
  so (`promote`). A leg marked stale therefore always has a header that
  records in sync some leg that goes on without it, and a mount of it
  alone is refused; without this, a source whose header write failed as
  a resynced leg was promoted would be left behind recording that leg as
  still being copied, and mounted alone later it would serve data older
  than what the promoted leg took.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable

import trio

from ..errors import NodeError
from ..fanout import gather
from .dispatch import LegDispatch
from .legs import LegRole, MirrorLeg
from .metadata import (
    FLAG_CHECKS_VALID,
    FLAG_CLEAN,
    MEMBER_FULL_RESYNC,
    MEMBER_IN_SYNC,
    MemberRecord,
    MirrorHeader,
    Renumbering,
)
from .options import MirrorOptions

log = logging.getLogger(__name__)

#: A leg `Membership.promote` is recording in sync, and its record.
Promoted = tuple[MirrorLeg, MemberRecord]


class Membership:
    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        options: MirrorOptions,
        dispatch: LegDispatch,
    ) -> None:
        self.storage_name = storage_name
        self._dispatch = dispatch
        self.legs = legs
        self.options = options
        self.storage_id = b""
        self.generation = 0
        self.created_us = 0
        self.held_since_us = 0
        #: the generation this mount took the storage at (lease.py)
        self.holder_epoch = 0
        self._fenced = ""
        self.heartbeat = 0
        self.data_size = 0
        self.region_size = options.region_size
        #: the headers call the check arrays valid (`expect_checks`)
        self.checks_valid = True
        #: this mount zeroed checks that no FLUSH has made durable yet
        self._checks_await_flush = False
        #: legs being brought back: they receive metadata but no data yet
        self.joining: set[MirrorLeg] = set()
        #: the last removal that renumbered the legs (numbering.py), recorded
        #: in every header so a leg left one renumbering behind is understood
        self.renumbered: Renumbering | None = None
        #: legs (bits, current numbering) being removed: recorded stale, the
        #: renumbering without them follows (removing.py)
        self.removing = 0
        self._version = 0
        self._durable = 0
        self._lock = trio.Lock()
        self._changed = trio.Event()

    @property
    def fenced(self) -> str:
        """Why this mount may write no more ("" while it holds the storage):
        set by the lease when a newer holder's header is found, or found
        here as soon as any leg's node is fenced (another client took that
        export's write grant over, which for a leg means another mount took
        the storage over: writing on the other legs would split it)."""
        if not self._fenced:
            for leg in self.legs:
                if leg.node.fenced is not None:
                    self._fenced = (
                        f"another client took the write grant of {leg} over "
                        f"({leg.node.fenced}); this mount writes nothing more"
                    )
                    log.error("storage %s: %s", self.storage_name, self._fenced)
                    break
        return self._fenced

    @fenced.setter
    def fenced(self, reason: str) -> None:
        self._fenced = reason

    # -- headers ----------------------------------------------------------
    def records(self, promoted: Promoted | None = None) -> tuple[MemberRecord, ...]:
        """The member table now; `promoted`: a leg `promote` records in sync,
        with the record to write for it instead of its current one."""
        records = []
        for leg in self.legs:
            if promoted is not None and leg is promoted[0]:
                records.append(promoted[1])
                continue
            flags = MEMBER_IN_SYNC if leg.in_sync else 0
            if leg.full_resync and not leg.in_sync:
                flags |= MEMBER_FULL_RESYNC
            records.append(MemberRecord(flags, leg.stale_since, leg.synced_at))
        return tuple(records)

    def header(
        self, leg: MirrorLeg, *, clean: bool = False, promoted: Promoted | None = None
    ) -> MirrorHeader:
        """Leg `leg`'s header now; `clean` for the shutdown record, which
        also releases the storage (no holder); `promoted` as in `records`."""
        assert leg.layout is not None
        flags = (FLAG_CLEAN if clean else 0) | (FLAG_CHECKS_VALID if self.checks_valid else 0)
        return MirrorHeader(
            storage_id=self.storage_id,
            leg_index=leg.index,
            generation=self.generation,
            leg_size=leg.layout.leg_size,
            data_size=self.data_size,
            region_size=self.region_size,
            members=self.records(promoted),
            flags=flags,
            created_us=self.created_us,
            client_id=bytes(16) if clean else self.options.client_id,
            client_name="" if clean else self.options.client_name,
            held_since_us=0 if clean else self.held_since_us,
            holder_epoch=0 if clean else self.holder_epoch,
            heartbeat=self.heartbeat,
            heartbeat_us=int(time.time() * 1e6),
            renumbered=self.renumbered,
            removing=self.removing,
            layout=leg.layout,
        )

    async def record_clean_shutdown(self) -> None:
        """Write the clean-shutdown record, which releases the storage, to
        every leg that takes writes; a leg it fails on is logged (the next
        mount finds that leg's previous header)."""
        legs = [leg for leg in self.legs if leg.takes_writes and leg.layout is not None]
        outcomes = await gather(
            [lambda leg=leg: leg.write_header(self.header(leg, clean=True)) for leg in legs]
        )
        for leg, (_, error) in zip(legs, outcomes, strict=True):
            if error is not None:
                log.error("%s: clean-shutdown record not written: %s", leg, error)

    def targets(self) -> list[MirrorLeg]:
        """Legs that get metadata writes: every write target and any leg
        being brought back."""
        return [
            leg
            for leg in self.legs
            if (leg.takes_writes or leg in self.joining) and leg.layout is not None
        ]

    # -- changes ----------------------------------------------------------
    @property
    def changed(self) -> trio.Event:
        """Set at the next change of any leg's role or settings."""
        return self._changed

    def expect_checks(self, kept: bool, *, zeroed: bool) -> None:
        """At mount: block checks are `kept` (read_check on). If this mount
        `zeroed` part of the check array, the headers call the checks valid
        only once a FLUSH has made the zeroing durable on every write
        target (`flushed_everywhere`): a FUA header vouches for itself only
        (RWF_DSYNC, NBD's FUA), and zeroes still in a page cache when the
        power goes would bring old entries back as trusted ones. A crash
        before that flush only costs the checks, zeroed again at the next
        mount."""
        self.checks_valid = kept and not zeroed
        self._checks_await_flush = kept and zeroed

    def flushed_everywhere(self) -> None:
        """Every write target acknowledged a FLUSH (a leg that failed it is
        no longer one): what this mount zeroed is durable, and the next
        metadata update (`ensure_durable`) records the checks valid."""
        if self._checks_await_flush:
            self._checks_await_flush = False
            self.checks_valid = True
            self.bump(new_generation=False)

    def zeroing_may_be_lost(self) -> None:
        """A FLUSH failed on every in-sync leg: its dirty pages may be gone,
        the mount's zeroing of the check arrays with them, so no later flush
        may make the headers call the checks valid during this mount."""
        self._checks_await_flush = False

    def kick(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def bump(self, *, new_generation: bool = True) -> None:
        """The records changed: a new generation (unless only a flag
        changed) that `ensure_durable` will write."""
        if new_generation:
            self.generation += 1
        self._version += 1
        self.kick()

    async def ensure_durable(self) -> None:
        """Return once the headers of every write target record the current
        membership; raises NodeError if no in-sync leg took them."""
        while self._durable < self._version:
            async with self._lock:
                version = self._version
                if self._durable >= version:
                    return
                await self.on_every_target(
                    lambda leg: leg.write_header(self.header(leg)), "the metadata update"
                )
                self._durable = version

    async def publish_quietly(self) -> None:
        """`ensure_durable` for background tasks: a failure is logged (the
        next request that needs the record fails with it)."""
        try:
            await self.ensure_durable()
        except NodeError as exc:
            log.error("storage %s: %s", self.storage_name, exc)

    async def on_every_target(
        self, call: Callable[[MirrorLeg], Awaitable[object]], what: str
    ) -> None:
        """Run `call` on every leg that takes writes, concurrently (a leg
        the dispatcher gives up on counts as failed). A leg it fails on is
        marked dirty; NodeError (EIO) unless an in-sync leg
        succeeded, so one dead leg never fails the storage."""
        if self.fenced:
            raise NodeError(
                f"storage {self.storage_name}", f"fenced: {self.fenced}", errno=errno.EIO
            )
        legs = self.targets()
        outcomes = await self._dispatch.run(legs, call)
        took = False
        for leg, (_, error) in zip(legs, outcomes, strict=True):
            if error is None:
                took = took or leg.in_sync
            else:
                self.leg_failed(leg, error)
        if not took:
            raise NodeError(
                f"storage {self.storage_name}", f"no in-sync leg took {what}", errno=errno.EIO
            )

    def leg_failed(self, leg: MirrorLeg, error: BaseException | str) -> bool:
        """Mark a leg stale after it failed a request; False (nothing done)
        if it is already stale or is the last in-sync leg."""
        leg.judge_flushes()
        if leg.role is LegRole.STALE:
            if leg in self.joining:
                log.warning("%s: failed while rejoining: %s", leg, error)
                self.joining.discard(leg)
            return False
        if leg.in_sync and not any(other.in_sync for other in self.legs if other is not leg):
            log.error("%s: the last in-sync leg failed: %s", leg, error)
            return False
        log.warning("%s: %s; marked dirty until it is resynced", leg, error)
        leg.role = LegRole.STALE
        leg.pending = None
        leg.stale_since = self.generation + 1
        self.joining.discard(leg)
        self.bump()
        return True

    async def promote(self, leg: MirrorLeg) -> bool:
        """Make `leg` (resynced with nothing pending, or vouched for by the
        user while joining) an in-sync leg, recorded first (module doc): a
        new generation recording it in sync goes to the in-sync legs while
        it still counts as not in sync, so a leg failing that write is
        judged without it (a sole source stays the last in-sync leg), and
        the leg's own header never calls it in sync before they all do. It
        becomes in sync only if every in-sync leg took the record; the
        caller then writes every target's header (`ensure_durable`). False
        if the leg failed meanwhile or has regions to copy again; NodeError
        if an in-sync leg did not take the record (the leg stays as it was:
        try again later). Either way the headers are due again: the same
        generation on success, a new one otherwise (legs that took the
        record call the leg in sync)."""
        async with self._lock:
            role = leg.role
            self.bump()  # the headers are due until this ends, whichever way
            record = MemberRecord(MEMBER_IN_SYNC, 0, self.generation)
            holders = [target for target in self.targets() if target.in_sync]
            outcomes = await self._dispatch.run(
                holders,
                lambda target: target.write_header(self.header(target, promoted=(leg, record))),
            )
            refused = [
                (target, error)
                for target, (_, error) in zip(holders, outcomes, strict=True)
                if error is not None
            ]
            for target, error in refused:
                self.leg_failed(target, error)
            if refused or leg.role is not role or leg.pending:
                self.bump()  # some legs may hold the record: a new generation undoes it
                if refused:
                    raise NodeError(
                        f"storage {self.storage_name}",
                        f"{leg} is not recorded in sync: in-sync leg(s) "
                        f"{', '.join(str(target.index) for target, _ in refused)} did not "
                        "take the metadata update",
                    )
                return False
            leg.role = LegRole.IN_SYNC
            leg.pending = None
            leg.full_resync = False
            leg.stale_since = 0
            leg.synced_at = record.synced_at
            self.bump(new_generation=False)
            return True

"""The mirror algorithm: every leg holds the whole storage (DST's mirror).

`Mirror` is the data path: it fans writes out to every leg that takes
writes and completes them when all have answered (`LegDispatch`, never
cancelling a sibling); a leg that fails is marked stale and the write
succeeds if an in-sync leg took it. Reads go to the readable leg whose
previous request ended nearest the new one (DST's rule) and fail over to the
others, with read repair (reads.py). Opening the storage is opening.py; the
parts that run once it is open (leg states, resync, verify, leg watchers,
bitmap clearing) are built whole in `MirrorRuntime` (runtime.py).

Invariants this module keeps (docs/mirror-metadata.md gives the reasons):
- a region is durably marked in the write-intent bitmap on every write
  target before any byte of a write reaches a leg;
- a leg that missed a write is recorded as stale in the headers of the
  surviving legs before that write completes;
- overlapping writes, resync windows, verify regions and read repairs are
  admitted in one `WriteOrder`, so every leg applies them in the same order;
- bits are cleared only when every leg is in sync, the region is idle, and
  its data and check pages are flushed on every leg (clearing.py);
- the last in-sync leg is never marked stale: if it fails, the request
  fails and the storage keeps its one complete copy.

It never reaches around the `Node` interface and never blocks the event loop.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from ..algorithms.base import Algorithm, ControlFile, Placement
from ..errors import NodeError, UserError
from ..nodes.base import Node, ReadData, StartedWrite
from ..ranges import WriteOrder
from ..units import format_size
from .adding import admit_leg, check_new_leg
from .checks import UNKNOWN, ZERO_BLOCK_DIGEST, digests_of, uniform_entries
from .controls import leg_controls
from .dispatch import LegDispatch
from .lease import HolderLease
from .legs import LegRole, MirrorLeg
from .legstates import CLOSE_TIMEOUT
from .membership import Membership
from .metadata import BLOCK, MAX_LEGS
from .opening import Opened, open_mirror
from .options import CONFIG_OPTIONS, MOUNT_OPTIONS, MirrorOptions
from .removing import (
    begin_removal,
    refuse_unsafe_removal,
    refuse_while_removing,
    retire_legs,
)
from .routing import ReadRouter
from .runtime import MirrorRuntime
from .sizing import find_mirror_size

log = logging.getLogger(__name__)

#: A write reaching a region's first byte within this many seconds of a
#: write to the region before its own first region continues a stream: the
#: bitmap marks ahead (bitmap.py).
STREAM_WINDOW = 1.0


class Mirror(Algorithm):
    """Replicated storage over 1 to MAX_LEGS legs (see the module doc)."""

    name = "mirror"
    mount_options = MOUNT_OPTIONS
    config_options = CONFIG_OPTIONS
    minimum_nodes = 2
    serves_without_a_node = True
    adds_legs = True
    replicated = True
    writes_metadata = True
    find_size = staticmethod(find_mirror_size)

    def __init__(
        self, storage_name: str, nodes: list[tuple[Node, int | None]], options: dict
    ) -> None:
        super().__init__(storage_name, nodes, options)
        if not 0 < len(nodes) <= MAX_LEGS:
            raise UserError(f"storage {storage_name}: a mirror has 1 to {MAX_LEGS} nodes")
        self.options = settings = MirrorOptions.parse(storage_name, options)
        self.legs = [self._new_leg(index, node, limit) for index, (node, limit) in enumerate(nodes)]
        self.write_order = WriteOrder()
        self.dispatch = LegDispatch(storage_name, settings.leg_timeout)
        self.membership = Membership(storage_name, self.legs, settings, self.dispatch)
        self.lease = HolderLease(storage_name, self.membership, settings)
        self.router = ReadRouter(storage_name, self.legs, settings.read_timeout)
        self._runtime: MirrorRuntime | None = None
        self._closed = False
        self._background = trio.CancelScope()
        self._placements: list[Placement] = []

    @property
    def runtime(self) -> MirrorRuntime:
        """The started mirror's parts; UserError before start."""
        if self._runtime is None:
            raise UserError(f"storage {self.storage_name} is not started")
        return self._runtime

    # -- Algorithm: description ------------------------------------------
    @property
    def size(self) -> int:
        return self._runtime.geometry.size if self._runtime is not None else 0

    @property
    def writable(self) -> bool:
        return all(leg.node.writable for leg in self.legs if leg.in_sync)

    def placements(self) -> list[Placement]:
        return list(self._placements)

    @property
    def state(self) -> str:
        if self._runtime is None:
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
        # by node, not position: a removal renumbers the legs after it
        for leg in self.legs:
            if leg.node is placement.node:
                return leg
        raise UserError(f"storage {self.storage_name}: {placement.directory} was removed")

    def node_state(self, placement: Placement) -> str:
        return self._leg_of(placement).node_state()

    def resync_progress(self, placement: Placement) -> tuple[int, int]:
        leg = self._leg_of(placement)
        return (leg.resync_done, leg.resync_total)

    def controls(self) -> dict[str, ControlFile]:
        return {
            "verify": ControlFile(
                read=lambda: self.runtime.verify.read(),
                write=lambda text: self.runtime.verify.write(text),
            ),
            "bitmap": ControlFile(read=lambda: self.runtime.bitmap_text()),
        }

    def _new_leg(self, index: int, node: Node, limit: int | None) -> MirrorLeg:
        leg = MirrorLeg(self.storage_name, index, node, limit)
        leg.resync_size = self.options.resync_size
        leg.resync_rate = self.options.resync_rate
        return leg

    # -- adding legs (reload) --------------------------------------------
    async def check_append(self, nodes: list[tuple[Node, int | None]]) -> None:
        """UserError (one line) unless every node can be added as a leg
        (adding.check_new_leg); reads only."""
        live = self.runtime
        if len(self.legs) + len(nodes) > MAX_LEGS:
            raise UserError(f"storage {self.storage_name}: a mirror has at most {MAX_LEGS} legs")
        if self.lease.fenced:
            raise UserError(f"storage {self.storage_name} is fenced: {self.lease.fenced}")
        refuse_while_removing(self.storage_name, self.legs)
        for position, (node, limit) in enumerate(nodes, start=len(self.legs)):
            await check_new_leg(
                self._new_leg(position, node, limit), live.geometry, self.membership.storage_id
            )

    def append(self, nodes: list[tuple[Node, int | None]]) -> None:
        """Add `nodes` (checked by `check_append`) as new legs at the end:
        each joins as a stale leg whose history is unknown (it takes no write
        and serves no read), and `admit_leg` records it in the legs' headers,
        then brings it up to date in the background."""
        live = self.runtime
        for node, limit in nodes:
            leg = self._new_leg(len(self.legs), node, limit)
            leg.full_resync = True
            self.legs.append(leg)
            self._placements.append(self._placement(leg))
            log.info("%s: added by a reload; recording it before it takes writes", leg)
            live.tasks.start_soon(
                lambda leg=leg: admit_leg(
                    leg,
                    self.membership,
                    live.geometry,
                    checks=live.checks is not None,
                    watch=live.watch.watch,
                )
            )
        self.membership.kick()

    def check_removal(self, positions: tuple[int, ...]) -> None:
        """UserError (one line) unless the legs at `positions` can be
        removed now (removing.refuse_unsafe_removal)."""
        if self._runtime is None:
            raise UserError(f"storage {self.storage_name} is not started")
        refuse_unsafe_removal(self.storage_name, self.legs, list(positions))

    def remove_legs(self, positions: tuple[int, ...]) -> list[MirrorLeg]:
        """Remove the legs at `positions` (checked by `check_removal` with
        no await since): they stop at once, and `retire_legs` records the
        removal, renumbers the legs after them and closes their nodes in
        the background. The legs."""
        gone = [self.legs[position] for position in positions]
        begin_removal(gone, self.membership)
        self.runtime.tasks.start_soon(
            retire_legs, gone, self.membership, self.legs, self._placements, self._placement
        )
        return gone

    def _placement(self, leg: MirrorLeg) -> Placement:
        live = self.runtime
        return Placement(
            node=leg.node,
            start=0,
            size=live.geometry.size,
            cookie=leg.index,
            controls=leg_controls(live.states, leg),
        )

    # -- start -----------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Open the storage (opening.py: refuse a held storage or split
        brain, decide each leg's role, write the new generation's headers
        and bitmaps), then start heartbeats, leg watchers, resync and the
        bitmap's lazy clearing in `nursery`."""
        opened = await open_mirror(
            self.storage_name, self.legs, self.options, self.membership, self.lease, self.router
        )
        self._runtime = await nursery.start(self._run_background, opened)
        self._placements = [self._placement(leg) for leg in self.legs]
        for leg in self.legs:
            log.info("%s: %s", leg, leg.node_state())
        log.info(
            "storage %s: mirror of %d legs, %s, generation %d, state %s",
            self.storage_name,
            len(self.legs),
            format_size(self.size),
            self.membership.generation,
            self.state,
        )

    async def _run_background(
        self, opened: Opened, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._background:
            async with trio.open_nursery() as tasks:
                live = MirrorRuntime(
                    self.storage_name,
                    self.legs,
                    self.options,
                    opened,
                    membership=self.membership,
                    lease=self.lease,
                    write_order=self.write_order,
                    router=self.router,
                    tasks=tasks,
                )
                for leg in opened.resync_from_start:
                    live.states.begin_resync(leg, live.bitmap.desired.copy())
                await tasks.start(self.dispatch.run_background)
                tasks.start_soon(live.resync.run)
                tasks.start_soon(self.lease.heartbeat, tasks)
                tasks.start_soon(live.cleaner.run)
                if live.checks is not None:
                    tasks.start_soon(live.checks.run_writer)
                for leg in self.legs:
                    tasks.start_soon(live.watch.watch, leg)
                task_status.started(live)

    # -- reads -----------------------------------------------------------
    async def read(self, offset: int, length: int) -> ReadData:
        return await self.runtime.reads.read(offset, length)

    async def checksum(self, offset: int, length: int) -> bytes:
        legs = self.router.order(self.runtime.geometry.regions_of(offset, length), offset)
        return await self.router.first_answer(
            legs,
            lambda leg: leg.node.checksum(offset, length),
            f"the checksum of [{offset}, +{length})",
        )

    # -- writes ----------------------------------------------------------
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data)
        entries = digests_of(offset, view) if self.runtime.checks is not None else None
        await self._mutate(
            "write",
            offset,
            len(view),
            lambda leg: leg.node.write(offset, view, fua=fua),
            entries,
            start=lambda leg: leg.node.begin_write(offset, view, fua=fua),
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
        start: Callable[[MirrorLeg], StartedWrite | None] | None = None,
    ) -> None:
        """`call(leg)` on every leg that takes writes (`start`: how to send
        it without a runner, `LegDispatch.run`), inside the write order, the
        lease, the bitmap marks and the block checks."""
        live = self.runtime
        bitmap, checks, states, activity = live.bitmap, live.checks, live.states, live.activity
        regions = live.geometry.regions_of(offset, length)
        ticket = await self.write_order.admit(offset, length)
        try:
            await self.lease.ensure()  # before any byte, metadata included
            activity.begin(regions)
            pinned: list[int] = []
            try:
                if checks is not None:
                    pages = checks.touched_pages(offset, length)
                    try:
                        cached = checks.pin_cached(pages)
                        pinned = cached if cached is not None else await checks.pin(pages)
                    except NodeError as exc:
                        log.warning("storage %s: %s; range not checked", self.storage_name, exc)
                        checks.distrust(regions)
                # a write that reaches a region's first byte just after a
                # write to the region before its own first one continues a
                # sequential stream
                stream = (
                    regions.start > 0
                    and (len(regions) > 1 or offset % live.geometry.region_size == 0)
                    and activity.written_since(
                        regions.start - 1, trio.current_time() - STREAM_WINDOW
                    )
                )
                activity.touch(await bitmap.mark(regions, stream=stream))
                await self.lease.ensure()
                targets = [leg for leg in self.legs if leg.takes_writes]
                try:
                    outcomes = await self.dispatch.run(targets, call, start)
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
                    states.copy_again(targets, regions)
                    await states.keep_one_copy([leg for leg, _ in failures], what)
                    error = failures[0][1] if failures else None
                    raise NodeError(
                        f"storage {self.storage_name}",
                        f"{what} [{offset}, +{length}) failed on every in-sync leg: {error}",
                        errno=error.errno if error is not None else errno.EIO,
                    )
                for leg, error in failures:
                    states.leg_failed(leg, error)
                await states.ensure_durable()
            finally:
                if checks is not None:
                    checks.unpin(pinned)
                activity.end(regions)
        finally:
            self.write_order.release(ticket)

    async def _abandoned(self, targets: list[MirrorLeg], regions: range, what: str) -> None:
        """A write was cancelled while on the legs (the request was
        interrupted, the mount is stopping): some legs may have it and some
        not. All but one in-sync leg go stale and resync its regions;
        resyncing legs copy them again."""
        states = self.runtime.states
        states.copy_again(targets, regions)
        in_sync = [leg for leg in targets if leg.in_sync]
        await states.keep_one_copy(in_sync, f"cancelled {what}", shield=True)

    async def flush(self) -> None:
        live = self.runtime
        await self.lease.ensure()
        legs = [leg for leg in self.legs if leg.takes_writes]
        outcomes = await self.dispatch.run(legs, lambda leg: leg.flush())
        answers = list(zip(legs, outcomes, strict=True))
        took = any(error is None and leg.in_sync for leg, (_, error) in answers)
        errors = [(leg, error) for leg, (_, error) in answers if error]
        lost, live.cleaner.lost_flush = live.cleaner.lost_flush, None
        if not took:
            # Any write since the last flush may be lost on the in-sync legs
            # and kept on a resyncing one: those copy every marked region again.
            live.states.copy_again(legs, live.bitmap.desired)
            live.cleaner.distrust_unflushed()
            for leg, _ in errors:
                leg.judge_flushes()  # the loss is reported: EIO below
            await live.states.keep_one_copy([leg for leg, _ in errors], "flush")
            error = errors[0][1] if errors else None
            raise NodeError(
                f"storage {self.storage_name}",
                f"flush failed on every in-sync leg: {error}",
                errno=getattr(error, "errno", errno.EIO),
            )
        for leg, error in errors:
            live.states.leg_failed(leg, error)
        self.membership.flushed_everywhere()
        await live.states.ensure_durable()
        if lost is not None:
            raise NodeError(
                f"storage {self.storage_name}",
                f"an earlier flush (the bitmap's clearing) failed on every in-sync leg: "
                f"writes acknowledged before it may be lost ({lost})",
                errno=errno.EIO,
            )

    # -- shutdown --------------------------------------------------------
    async def aclose(self) -> None:
        """Stop background work, flush every leg, clear the bitmap of idle
        regions when all legs are in sync, write the check pages, and
        record a clean shutdown that releases the storage."""
        if self._runtime is None or self._closed:
            return
        self._closed = True
        self.dispatch.stop()
        self._background.cancel()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await self._close_metadata(self._runtime)
        if scope.cancelled_caught:
            log.error(
                "storage %s: shutdown did not finish in %.0f s; next mount resyncs "
                "the marked regions",
                self.storage_name,
                CLOSE_TIMEOUT,
            )

    async def _close_metadata(self, live: MirrorRuntime) -> None:
        if self.lease.fenced:
            log.error("storage %s: fenced; nothing written at shutdown", self.storage_name)
            return
        try:
            await self.flush()
        except NodeError as exc:
            log.error("storage %s: final flush failed: %s", self.storage_name, exc)
            return
        checks = live.checks
        try:
            if live.cleaner.all_in_sync():
                await live.cleaner.clear_idle(float("inf"))
            if checks is not None:
                await checks.forget_untrusted(list(checks.untrusted))
                await checks.write_back()
                await self.flush()
        except NodeError as exc:
            log.warning(
                "storage %s: check pages not written (%s); they are rebuilt as "
                "unknown at the next mount",
                self.storage_name,
                exc,
            )
            self.membership.checks_valid = False
        await self.membership.record_clean_shutdown()
        log.info(
            "storage %s: closed (generation %d, %d regions still marked)",
            self.storage_name,
            self.membership.generation,
            len(live.bitmap.desired),
        )

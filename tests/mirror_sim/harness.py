"""The simulation: disks, the clients that mount them, the model, and the
invariants checked after every step.

A `Simulation` lives inside one `trio.run` (MockClock, autojump) and owns a
nursery in which every mount runs in a task of its own: a client crash is
the cancellation of that task (nothing flushed, no shutdown record), a
clean umount is `aclose` first. The mirror is driven only through its
public surface (`Mirror(...)`, `start`, `read`, `write`, `flush`, `trim`,
`write_zeroes`, `aclose`, `state`, `legs[i].role`, and the reload seam
`check_append`/`append`, `check_removal`/`remove_legs`); the write-intent
bitmap, a resyncing leg's pending regions and whether the membership is
recorded are read in `marked_regions`, `pending_regions` and `recorded`
alone, so a rename in the mirror touches one place.

Invariants (`check`, after every step; a breach raises `Violation` with the
steps so far):
- a read returns, per block, a write the model allows (last acknowledged,
  or old/new around a failed one); a corrupted block may read as garbage;
- a leg the mirror reports in sync (or a resyncing leg in its copied
  regions) holds, in its cache, what the model allows and, on its durable
  image, what the model allows after a crash: flushed data survives the
  loss of any other leg;
- two such legs agree in every region the bitmap does not mark;
- only the holder's writes land (`SimDisk.late_writes` stays empty);
- one membership: once the mirror has recorded its membership, the newest
  header of every leg that takes writes has its generation and a row for
  every leg up to the last that takes writes, each saying in sync exactly
  when the mirror says so;
- a leg serves a read only while its role allows it (in sync, or resyncing
  and the region copied): an added leg reads nothing before its copy;
- a leg a reload removed that missed an acknowledged write is never in sync
  right after a mount (never a source), whichever config the mount used;
  a reload is refused only for a cause (`add_leg`, `remove_leg`); a
  `Settle` with every leg healthy ends clean (steps.py);
- a request fails only while a fault explains it: a write, flush or read
  fails although an in-sync leg is healthy -> bug; a mount is refused
  although every leg is reachable and healthy -> bug (unless a forced mount
  may have split the history), or although the previous clean umount
  recorded exactly the unreachable legs as out of date -> bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from dstfuse.errors import DstError, NodeError, UserError
from dstfuse.mirror.algorithm import Mirror
from dstfuse.mirror.legs import LegRole
from dstfuse.mirror.metadata import MetadataError, newest_header
from dstfuse.mirror.removing import REMOVING

from .disks import BLOCK, GARBAGE, SimDisk, SimNode, decode_block, payload
from .model import AckModel, LegConfig

KiB = 1024
REGION = 64 * KiB
#: 1 MiB legs: 16 regions of 64 KiB, so random writes collide often
LEG_SIZE = 1 << 20
#: what a connection waits for an unreachable node (a RemoteNode's budget)
BUDGET = 3.0
#: at most this many legs in a config, and disks in all (reload steps add disks)
MAX_CONFIG_LEGS = 4
MAX_DISKS = 6
#: the longest any one step may take in simulated time before it counts as hung
STEP_TIMEOUT = 900.0
#: how long after a failed FLUSH dropped a leg's cache the mirror may still
#: report the leg in sync (the failure is handled when every leg answered)
DROP_GRACE = 2 * BUDGET + 10.0
HEARTBEAT = 2.0
BITMAP_IDLE = 5.0


class Violation(AssertionError):
    """An invariant broke; the message says which and lists the steps."""


@dataclass
class Mount:
    """One client's mount of the storage (a `dstfuse mount` process)."""

    client: str
    mirror: Mirror
    #: per leg position: its connection and its disk's number (a reload
    #: appends; a removed leg's entries stay until a new leg takes its place)
    nodes: list[SimNode]
    disk_numbers: list[int]
    #: the mount's tasks: the mirror's background work, and requests in flight
    tasks: trio.Nursery
    ended: trio.Event
    #: the mirror may have fenced itself: its writes may fail
    may_be_fenced: bool = False
    #: legs a reload added in this mount
    added: list = field(default_factory=list)

    def leg_state(self) -> str:
        return ", ".join(
            f"{leg.index}:{leg.role.value}{'' if leg.online else '/offline'}"
            for leg in self.mirror.legs
        )


@dataclass
class SessionEnd:
    """How the last session ended: `clean` (umount), the disks of its legs,
    which of them it had in sync and which were healthy."""

    clean: bool
    disks: tuple[int, ...]
    in_sync: frozenset[int]
    healthy: frozenset[int]


def marked_regions(mirror: Mirror) -> set[int]:
    """Regions the write-intent bitmap marks (or is clearing) now."""
    bitmap = mirror.runtime.bitmap
    marked = set(bitmap.desired)
    marked.update(bitmap.clearing)
    return marked


def recorded(mirror: Mirror) -> bool:
    """The mirror's current membership is durable on its write targets
    (nothing changed since its last header write)."""
    membership = mirror.membership
    return membership._durable >= membership._version


def pending_regions(leg) -> set[int] | None:
    """A resyncing leg's regions still to copy (None: all of them)."""
    pending = getattr(leg, "pending", None)
    return None if pending is None else set(pending)


@dataclass
class Stats:
    """What a scenario did (for the volume of a run)."""

    steps: int = 0
    writes_ok: int = 0
    writes_failed: int = 0
    reads: int = 0
    flushes: int = 0
    mounts: int = 0
    refusals: int = 0
    crashes: int = 0
    takeovers: int = 0
    garbage_reads: int = 0
    legs_added: int = 0
    legs_removed: int = 0
    reloads_refused: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


class Simulation:
    def __init__(
        self,
        nursery: trio.Nursery,
        legs: int = 2,
        *,
        leg_size: int = LEG_SIZE,
        budget: float = BUDGET,
        resync_rate: int = 0,
        read_check: bool = True,
    ) -> None:
        self.nursery = nursery
        self.leg_size = leg_size
        self.disks = [SimDisk(f"d{i}", leg_size) for i in range(legs)]
        #: which disks the config file names as legs (and what it named before)
        self.configs = LegConfig(list(range(legs)))
        #: acknowledged writes, trims and write-zeroes so far
        self.mutations = 0
        #: reads a leg served although its role forbade it (found in a node)
        self.unreadable_reads: list[str] = []
        self.budget = budget
        self.resync_rate = resync_rate
        #: with read_check off the mirror cannot tell rot: scenarios then corrupt nothing
        self.read_check = read_check
        self.holder: Mount | None = None
        self.mounts = 0
        self.write_ids = 0
        self.model: AckModel | None = None
        self.blocks = 0
        self.last_session: SessionEnd | None = None
        #: a forced or primary= mount left some legs out: their history and
        #: the mounted one's may have split, so a mount of all may be refused
        self.split_possible = False
        #: data blocks corrupted on some disk since their last acknowledged
        #: write: garbage there may be the rot (or a copy of it), not a bug
        self.rotted: set[int] = set()
        #: ... and, until a FLUSH or FUA makes their rewrite durable, on the media
        self.rot_on_media: set[int] = set()
        #: data block -> when the user last wrote it (acknowledged or failed)
        self.written_at: dict[int, float] = {}
        #: a FLUSH the user did not send (the bitmap's clearing) lost
        #: acknowledged writes on every in-sync leg: the next flush must fail
        self.loss_owed = False
        self.history: list[str] = []
        self.stats = Stats()

    # -- reporting -------------------------------------------------------------
    def violation(self, what: str) -> Violation:
        steps = "\n  ".join(self.history)
        holder = f"; legs {self.holder.leg_state()}" if self.holder else ""
        return Violation(f"{what}{holder}\nsteps:\n  {steps}")

    def note(self, line: str) -> None:
        self.history.append(line)

    # -- mounts ------------------------------------------------------------------
    def _options(self, client: str, number: int, force: bool, primary: int | None) -> dict:
        mount_options: dict[str, object] = {"read_check": "on" if self.read_check else "off"}
        if force:
            mount_options["force"] = True
        if primary is not None:
            mount_options["primary"] = str(primary)
        return {
            "region_size": REGION,
            "resync_size": REGION,
            "resync_rate": self.resync_rate,
            "client_name": client,
            "client_id": number.to_bytes(16, "little"),
            "heartbeat_interval": HEARTBEAT,
            "bitmap_idle": BITMAP_IDLE,
            "mount_options": mount_options,
        }

    def config_disks(self) -> list[SimDisk]:
        return [self.disks[number] for number in self.configs.current]

    async def open_mount(self, *, force: bool = False, primary: int | None = None) -> Mount:
        """Start a new client's mirror over the disks the config names, as
        they are; raises what `Mirror.start` raises (UserError: refused)."""
        self.mounts += 1
        client = f"client{self.mounts}:1"
        numbers = list(self.configs.current)
        nodes = [SimNode(self.disks[number], client, budget=self.budget) for number in numbers]
        for node in nodes:
            await node.start(self.nursery)
        mirror = Mirror(
            "vol0",
            [(node, None) for node in nodes],
            self._options(client, self.mounts, force, primary),
        )
        for index, node in enumerate(nodes):
            self._wire(mirror, node, index)
        ended = trio.Event()

        async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with trio.open_nursery() as tasks:
                    try:
                        await mirror.start(tasks)
                    except DstError as exc:
                        tasks.cancel_scope.cancel()
                        task_status.started((None, exc))
                        return
                    task_status.started((tasks, None))
                    await trio.sleep_forever()
            finally:
                for node in list(nodes):  # with the legs a reload added
                    await node.aclose()
                ended.set()

        tasks, error = await self.nursery.start(serve)
        if error is not None:
            raise error
        mount = Mount(client, mirror, nodes, numbers, tasks, ended)
        if self.model is None:
            self.blocks = mirror.size // BLOCK
            self.model = AckModel(self.blocks)
        for disk in self.disks:
            disk.data_limit = mirror.size
        return mount

    def _wire(self, mirror: Mirror, node: SimNode, index: int) -> None:
        """Tell the node its leg (for the record of failed flushes and the
        check of who serves reads)."""
        node.leg_index = index
        node.legs_in_sync = lambda: frozenset(leg.index for leg in mirror.legs if leg.in_sync)

        def served(offset: int, length: int) -> None:
            if offset >= mirror.size or index >= len(mirror.legs):
                return  # metadata, or the leg is gone
            leg = mirror.legs[index]
            if leg.node is not node:
                return
            regions = range(offset // REGION, (offset + length - 1) // REGION + 1)
            pending = pending_regions(leg)
            readable = leg.role is LegRole.IN_SYNC or (
                leg.role is LegRole.RESYNCING
                and pending is not None
                and not pending.intersection(regions)
            )
            if not readable:
                self.unreadable_reads.append(
                    f"leg {index} ({leg.role.value}, pending "
                    f"{sorted(pending_regions(leg) or ())}) was read at [{offset}, +{length})"
                )

        node.on_read = served

    # -- reloads (the seam `dstfuse reload` uses: live_reload.py, assembly.py) ------
    def reload_expected(self, mount: Mount) -> bool:
        """A reload of this mount may be refused only for a reason outside
        the mirror's legs: it is fenced, or a removal is still recorded."""
        return not mount.may_be_fenced and not any(
            leg.blocked == REMOVING for leg in mount.mirror.legs
        )

    async def add_leg(self, number: int | None) -> None:
        """The config gets disk `number` (None: a fresh one) as a new last
        leg, and the mount reloads it: `Mirror.check_append`, then, with no
        await in between, `Mirror.append` (what `Assembly.extend` and
        `LiveReload` do for a mirror)."""
        mount = self.holder
        assert mount is not None
        mirror = mount.mirror
        fresh = number is None
        if number is None:
            number = len(self.disks)
            disk = SimDisk(f"d{number}", self.leg_size)
            disk.data_limit = mirror.size
            disk.set_owner(mount.client)
            self.disks.append(disk)
        disk = self.disks[number]
        index = len(mirror.legs)
        node = SimNode(disk, mount.client, budget=self.budget)
        await node.start(self.nursery)
        self._wire(mirror, node, index)
        expected_ok = fresh and disk.healthy and self.reload_expected(mount)
        try:
            await mirror.check_append([(node, None)])
        except UserError as exc:
            await node.aclose()
            self.stats.reloads_refused += 1
            self.note(f"    -> refused: {exc}")
            if expected_ok:
                raise self.violation(f"adding a fresh, healthy disk was refused: {exc}") from None
            return
        mirror.append([(node, None)])
        mount.added.append(mirror.legs[index])
        if index < len(mount.nodes):
            mount.nodes[index], mount.disk_numbers[index] = node, number
        else:
            mount.nodes.append(node)
            mount.disk_numbers.append(number)
        self.configs.reloaded(mount.disk_numbers[: index + 1])
        self.stats.legs_added += 1
        self.note(f"    -> disk {number} added as leg {index}: legs {mount.leg_state()}")

    async def remove_leg(self, position: int) -> None:
        """The config loses the leg at `position` and the mount reloads it.
        Only the last leg is drawn (`Mirror.check_removal`, then with no
        await in between `Mirror.remove_legs`, as `LiveReload` does): the
        model does not follow the renumbering a removal from the middle
        makes yet."""
        mount = self.holder
        assert mount is not None
        mirror = mount.mirror
        config = self.configs.current
        assert position == len(config) - 1, "the model follows removals of the last leg only"
        if len(config) - 1 < Mirror.minimum_nodes:
            # the config parser refuses the file before the mount sees it
            self.stats.reloads_refused += 1
            self.note(f"    -> refused: a mirror needs at least {Mirror.minimum_nodes} nodes")
            return
        positions = tuple(range(position, len(config)))
        count = len(positions)
        kept = mirror.legs[: len(mirror.legs) - count]
        safe = any(leg.in_sync for leg in kept)
        try:
            mirror.check_removal(positions)
        except UserError as exc:
            self.stats.reloads_refused += 1
            self.note(f"    -> refused: {exc}")
            if safe and self.reload_expected(mount):
                raise self.violation(
                    f"removing leg {position} was refused although leg(s) "
                    f"{[leg.index for leg in kept if leg.in_sync]} stay in sync: {exc}"
                ) from None
            return
        if not safe:
            raise self.violation(
                f"removing leg {position} was accepted although no remaining leg is in sync"
            )
        gone = mirror.remove_legs(positions)
        for leg in gone:
            self.configs.removal_began(mount.disk_numbers[leg.index], self.mutations)
        self.configs.reloaded(mount.disk_numbers[:position])
        self.stats.legs_removed += count
        self.note(f"    -> leg {position} (disk {mount.disk_numbers[position]}) being removed")

    async def end(self, mount: Mount) -> None:
        """Kill the client (no flush, no shutdown record)."""
        mount.tasks.cancel_scope.cancel()
        await mount.ended.wait()
        self.loss_owed = False  # owed by that mount's flushes; the session is over
        self._losses_reported()

    def set_owner(self, client: str | None) -> None:
        for disk in self.disks:
            disk.set_owner(client)

    # -- health -------------------------------------------------------------------
    def leg_healthy(self, mount: Mount, index: int) -> bool:
        node = mount.nodes[index]
        return node.disk.healthy and not node.stalled and not node.lost

    def all_legs_healthy(self, mount: Mount) -> bool:
        return all(self.leg_healthy(mount, leg.index) for leg in mount.mirror.legs)

    def waits_for_the_user(self, mount: Mount) -> bool:
        """A leg this mount's reload added could not be recorded or
        prepared: adding.py leaves it dirty until the user writes its
        `dirty` control file (not retried by itself)."""
        return any(
            leg.blocked and leg.blocked != REMOVING and any(leg is other for other in mount.added)
            for leg in mount.mirror.legs
        )

    def healthy_in_sync_leg(self, mount: Mount) -> bool:
        return any(
            leg.in_sync and self.leg_healthy(mount, leg.index) for leg in mount.mirror.legs
        )

    # -- I/O through the holder -------------------------------------------------------
    def next_write_id(self) -> int:
        self.write_ids += 1
        return self.write_ids

    async def mutate(self, op: str, first: int, count: int, fua: bool) -> None:
        mount, model = self.holder, self.model
        assert mount is not None and model is not None
        expected_ok = self.healthy_in_sync_leg(mount) and not mount.may_be_fenced
        mirror = mount.mirror
        write_id = 0 if op != "write" else self.next_write_id()
        try:
            if op == "write":
                await mirror.write(first * BLOCK, payload(write_id, first, count), fua=fua)
            elif op == "trim":
                await mirror.trim(first * BLOCK, count * BLOCK)
            else:
                await mirror.write_zeroes(first * BLOCK, count * BLOCK, fua=fua)
        except NodeError as exc:
            self.stats.writes_failed += 1
            model.failed(first, count, write_id)
            self._written(first, count)
            self.note(f"    -> {op} failed: {exc}")
            if expected_ok:
                raise self.violation(
                    f"{op} of blocks [{first}, +{count}) failed although an in-sync leg "
                    f"was healthy: {exc}"
                ) from None
            return
        self.stats.writes_ok += 1
        self.mutations += 1
        self.rotted.difference_update(range(first, first + count))
        if fua and op != "trim":
            self.rot_on_media.difference_update(range(first, first + count))
        model.acknowledged(first, count, write_id, fua=fua and op != "trim")
        self._written(first, count)
        if op == "write":
            self.note(f"    -> write id {write_id} acknowledged")

    async def read(self, first: int, count: int) -> None:
        mount, model = self.holder, self.model
        assert mount is not None and model is not None
        # a fenced mount's connections refuse reads too (the export's grant)
        expected_ok = (
            self.healthy_in_sync_leg(mount)
            and not mount.may_be_fenced
            and not self.rotted.intersection(range(first, first + count))
        )
        self.stats.reads += 1
        try:
            data = await mount.mirror.read(first * BLOCK, count * BLOCK)
        except NodeError as exc:
            self.note(f"    -> read failed: {exc}")
            if expected_ok:
                raise self.violation(
                    f"read of blocks [{first}, +{count}) failed although an in-sync leg "
                    f"was healthy: {exc}"
                ) from None
            return
        for i in range(count):
            block = first + i
            got = decode_block(memoryview(data)[i * BLOCK : (i + 1) * BLOCK], block)
            if got == GARBAGE and block in self.rotted:
                self.stats.garbage_reads += 1
                continue
            if not model.allows(block, got):
                raise self.violation(
                    f"read of block {block} returned write {got}; the model allows "
                    f"{sorted(model.current[block])}"
                )

    async def flush(self) -> None:
        mount, model = self.holder, self.model
        assert mount is not None and model is not None
        owed, self.loss_owed = self.loss_owed, False
        # A FLUSH of the mirror's own that failed on every in-sync leg may
        # fail this one even if it dropped nothing acknowledged: the mirror
        # cannot tell (clearing.py's `lost_flush`, like the kernel's fsync).
        failed_before = bool(self._flushes_failed_everywhere(mount))
        expected_ok = (
            self.healthy_in_sync_leg(mount) and not mount.may_be_fenced and not owed
            and not failed_before
        )
        self.stats.flushes += 1
        try:
            await mount.mirror.flush()
        except NodeError as exc:
            self._losses_reported()
            model.volatile_lost()
            self.note(f"    -> flush failed: {exc}")
            if expected_ok:
                raise self.violation(
                    f"flush failed although an in-sync leg was healthy: {exc}"
                ) from None
            return
        self._losses_reported()
        if owed:
            raise self.violation(
                "a flush succeeded although a flush the mirror sent itself had failed on "
                "every in-sync leg since the last one, losing acknowledged writes there"
            )
        model.flushed()
        self.rot_on_media &= self.rotted

    def _written(self, first: int, count: int) -> None:
        now = trio.current_time()
        for block in range(first, first + count):
            self.written_at[block] = now

    def _losses_reported(self) -> None:
        """A user FLUSH answered: failed flushes before it are its business."""
        for disk in self.disks:
            disk.flush_failures.clear()

    # -- invariants ---------------------------------------------------------------------
    def check(self) -> None:
        late = [write for disk in self.disks for write in disk.late_writes]
        if late:
            raise self.violation(
                "writes of a client that no longer holds the storage landed: "
                + "; ".join(map(str, late[:5]))
            )
        if self.unreadable_reads:
            raise self.violation(
                "a leg served a read its role forbids: " + "; ".join(self.unreadable_reads[:3])
            )
        mount, model = self.holder, self.model
        if mount is None or model is None:
            return
        mirror = mount.mirror
        self._check_membership(mount)
        for leg in mirror.legs:
            if leg.in_sync:
                self.configs.caught_up(mount.disk_numbers[leg.index])
        dropped = self._settle_dropped(mount)
        marked = marked_regions(mirror)
        region_blocks = REGION // BLOCK
        readable: list[tuple[int, set[int] | None, list[int], set[int]]] = []
        for leg in mirror.legs:
            node = mount.nodes[leg.index]
            if leg.role is LegRole.IN_SYNC:
                unreadable: set[int] | None = set()
            elif leg.role is LegRole.RESYNCING:
                unreadable = pending_regions(leg)
            else:
                continue
            if unreadable is None:
                continue
            exempt = self.rotted | node.lost | dropped.get(leg.index, set())
            ids = node.disk.data_ids(self.blocks)
            durable = node.disk.data_ids(self.blocks, durable=True)
            for block in range(self.blocks):
                if block in exempt or block // region_blocks in unreadable:
                    continue
                if not model.allows(block, ids[block]):
                    raise self.violation(
                        f"leg {leg.index} ({leg.role.value}) holds write {ids[block]} at block "
                        f"{block}; the model allows {sorted(model.current[block])}"
                    )
                if (
                    leg.in_sync
                    and block not in self.rot_on_media
                    and not model.durable_allows(block, durable[block])
                ):
                    raise self.violation(
                        f"leg {leg.index} (in sync) has write {durable[block]} on stable "
                        f"storage at block {block}; after a crash the model allows "
                        f"{sorted(model.after_crash[block])}"
                    )
            readable.append((leg.index, unreadable, ids, exempt))
        for position, (a, skip_a, ids_a, exempt_a) in enumerate(readable):
            for b, skip_b, ids_b, exempt_b in readable[position + 1 :]:
                for block in range(self.blocks):
                    region = block // region_blocks
                    if (
                        region in marked
                        or region in skip_a  # type: ignore[operator]
                        or region in skip_b  # type: ignore[operator]
                        or block in exempt_a
                        or block in exempt_b
                    ):
                        continue
                    if ids_a[block] != ids_b[block]:
                        raise self.violation(
                            f"legs {a} and {b} differ at block {block} (writes {ids_a[block]} "
                            f"and {ids_b[block]}) in region {region}, which the bitmap does "
                            f"not mark; mirror state {mirror.state}"
                        )

    def _check_membership(self, mount: Mount) -> None:
        """One membership (module doc): what the mirror recorded is what
        the headers of its write targets say."""
        mirror = mount.mirror
        if not recorded(mirror) or mirror.membership.fenced:
            return
        legs = mirror.legs
        generation = mirror.membership.generation
        writing = [leg.index for leg in legs if leg.takes_writes]
        for leg in legs:
            if not leg.takes_writes or leg.layout is None:
                continue
            disk = mount.nodes[leg.index].disk
            size = leg.size
            try:
                header = newest_header(
                    [bytes(disk.current[size - 2 * BLOCK : size - BLOCK]),
                     bytes(disk.current[size - BLOCK : size])]
                )
            except MetadataError as exc:
                raise self.violation(
                    f"leg {leg.index} takes writes but has no header: {exc}"
                ) from None
            rows = [member.in_sync for member in header.members]
            wanted = [other.in_sync for other in legs[: len(rows)]]
            if (
                header.generation != generation
                or len(rows) > len(legs)
                or len(rows) <= max(writing)
                or rows != wanted
            ):
                raise self.violation(
                    f"leg {leg.index}'s header (generation {header.generation}, in sync "
                    f"{rows}) is not the membership the mirror recorded (generation "
                    f"{generation}, in sync {[other.in_sync for other in legs]})"
                )

    def removed_source(self, mount: Mount) -> str | None:
        """Right after a mount: a leg in sync whose disk a reload removed
        and that missed an acknowledged write since, or None."""
        for leg in mount.mirror.legs:
            number = mount.disk_numbers[leg.index]
            if leg.in_sync and self.configs.behind(number, self.mutations):
                return (
                    f"disk {number}, removed by a reload and written without since, is leg "
                    f"{leg.index} in sync at mount"
                )
        return None

    def relevant(self, number: int) -> bool:
        """Disk `number` is a leg of the holder or of a config a mount may use."""
        configs = self.configs
        holder = self.holder
        legs = (
            holder.disk_numbers[: len(holder.mirror.legs)] if holder is not None else []
        )
        return number in configs.current or number in (configs.previous or ()) or number in legs

    def cache_lost(self, blocks: set[int]) -> None:
        """A disk lost these blocks' cached bytes: rot under a rewrite that was
        not durable yet is back."""
        self.rotted |= self.rot_on_media.intersection(blocks)

    def _settle_dropped(self, mount: Mount) -> dict[int, set[int]]:
        """Blocks whose cache a failed FLUSH dropped, per leg, that the
        invariants do not hold against the leg (yet). Once the mirror treats
        the leg as behind, they are its business (resync); if it was the
        only in-sync leg, the data is gone and the model forgets it (the
        kernel's fsync has the same rule); otherwise the mirror has
        DROP_GRACE seconds to stop reporting the leg in sync."""
        assert self.model is not None
        now = trio.current_time()
        in_sync = [leg for leg in mount.mirror.legs if leg.in_sync]
        lost = self._lost_on_every_in_sync_leg(mount, in_sync)
        if lost:
            # Nothing holds them any more (a leg copied from one that lost
            # them holds the old bytes too): reads may return what was
            # durable, and the mirror owes the user an EIO at the next flush.
            self.model.forget(lost)
            self.loss_owed = True
        exempt: dict[int, set[int]] = {}
        for leg in mount.mirror.legs:
            disk = mount.nodes[leg.index].disk
            if not disk.dropped:
                continue
            self.cache_lost(set(disk.dropped))
            if not leg.in_sync:
                disk.dropped.clear()
            elif in_sync == [leg]:
                self.model.forget({block for block in disk.dropped if block < self.blocks})
                disk.dropped.clear()
            else:
                exempt[leg.index] = {
                    block for block, when in disk.dropped.items() if now - when < DROP_GRACE
                }
        return exempt

    @staticmethod
    def _flushes_failed_everywhere(
        mount: Mount,
    ) -> list[tuple[float, list[tuple[int, frozenset[int], frozenset[int]]]]]:
        """Since the user's last FLUSH: the moments at which a FLUSH failed
        on every leg in sync then, with each leg's (index, dropped blocks,
        legs in sync) (the legs' flushes of one request fail at the same
        simulated time, before the mirror hears of any)."""
        by_time: dict[float, list[tuple[int, frozenset[int], frozenset[int]]]] = {}
        for leg in mount.mirror.legs:
            for when, dropped, synced in mount.nodes[leg.index].disk.flush_failures:
                by_time.setdefault(when, []).append((leg.index, dropped, synced))
        return [
            (when, failures)
            for when, failures in by_time.items()
            # else another in-sync leg completed that flush
            if failures[0][2] <= {index for index, _, _ in failures}
        ]

    def _lost_on_every_in_sync_leg(self, mount: Mount, in_sync: list) -> set[int]:
        """Data blocks that FLUSHes failing at one moment on every leg in
        sync then dropped from all of them, since the user's last write of
        the block."""
        lost: set[int] = set()
        for when, failures in self._flushes_failed_everywhere(mount):
            common = set.intersection(*(set(dropped) for _, dropped, _ in failures))
            lost |= {
                block for block in common
                if block < self.blocks and when >= self.written_at.get(block, -1.0)
            }
        return lost

    def session_end(self, mount: Mount, clean: bool) -> SessionEnd:
        legs = mount.mirror.legs
        numbers = mount.disk_numbers
        return SessionEnd(
            clean=clean,
            disks=tuple(numbers[: len(legs)]),
            in_sync=frozenset(numbers[leg.index] for leg in legs if leg.in_sync),
            healthy=frozenset(
                numbers[leg.index] for leg in legs if self.leg_healthy(mount, leg.index)
            ),
        )

    def refusal_allowed(self, reachable: Sequence[bool], primary: int | None) -> str | None:
        """None if a refused mount of the current config is a bug now, else
        why it is allowed."""
        config = self.configs.current
        if not all(disk.healthy for disk, up in zip(self.config_disks(), reachable, strict=True)
                   if up):
            return "a reachable leg has a fault"
        last = self.last_session
        if primary is not None:
            if not reachable[primary]:
                return "primary= names an unreachable leg"
            if last is None or config[primary] not in last.in_sync:
                return "primary= names a leg that may not be in sync"
        if all(reachable):
            if self.split_possible and primary is None:
                return "a forced mount may have split the legs' histories"
            return None
        if self.model is None:
            return "first use with a leg unreachable"
        if (
            last is not None
            and last.clean
            and not self.split_possible
            and last.disks == tuple(config)
            and all(number in last.healthy
                    for number, up in zip(config, reachable, strict=True) if up)
            and all((number in last.in_sync) == up
                    for number, up in zip(config, reachable, strict=True))
        ):
            return None  # the umount recorded exactly the missing legs as out of date
        return "the reachable legs cannot prove they hold the newest data"

    def mounts_another_history(self, mount: Mount) -> bool:
        """None of the mount's in-sync legs was in sync when the last
        session ended (after a forced mount: the legs it went without)."""
        last = self.last_session
        numbers = mount.disk_numbers
        in_sync = {numbers[leg.index] for leg in mount.mirror.legs if leg.in_sync}
        return last is not None and not in_sync & last.in_sync

    def adopt_source(self, mount: Mount) -> None:
        """A forced mount: the user chose the in-sync legs' bytes."""
        assert self.model is not None
        for leg in mount.mirror.legs:
            if leg.in_sync:
                disk = mount.nodes[leg.index].disk
                self.model.adopt(
                    disk.data_ids(self.blocks), disk.data_ids(self.blocks, durable=True)
                )
                return

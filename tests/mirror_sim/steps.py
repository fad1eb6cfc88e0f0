"""The simulator's step vocabulary and the hypothesis strategy that draws it.

Each step is a small frozen dataclass whose repr is the step as a test
would write it, so a shrunk failing example reads as a scenario:
`Mount(reachable=(True, True))`, `Write(block=3, count=20)`, `Kill(disk=1)`,
... `Simulation.run` executes one, bounded in simulated time, and checks
the invariants after it. Steps that need a mounted holder are drawn only
while there is one; `Mount` only while there is none.

Reload steps change the config file and reload the mount (`AddLeg`,
`RemoveLeg`); `CrashSoon` kills the client a few scheduler turns later, in
the middle of what a reload started in the background; `Mount(previous=True)`
mounts the config from before the last reload (the user put it back).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from hypothesis import strategies as st

from dstfuse.errors import NodeError, UserError
from dstfuse.mirror.legs import LegRole

from .disks import keep_some, payload
from .harness import (
    BLOCK,
    MAX_CONFIG_LEGS,
    MAX_DISKS,
    STEP_TIMEOUT,
    Simulation,
    pending_regions,
)


class Step:
    needs_holder = True

    async def run(self, sim: Simulation) -> None:
        raise NotImplementedError


# -- I/O through the holder ---------------------------------------------------
@dataclass(frozen=True)
class Write(Step):
    block: int
    count: int
    fua: bool = False

    async def run(self, sim: Simulation) -> None:
        await sim.mutate("write", self.block, self.count, self.fua)


@dataclass(frozen=True)
class Trim(Step):
    block: int
    count: int

    async def run(self, sim: Simulation) -> None:
        await sim.mutate("trim", self.block, self.count, False)


@dataclass(frozen=True)
class WriteZeroes(Step):
    block: int
    count: int
    fua: bool = False

    async def run(self, sim: Simulation) -> None:
        await sim.mutate("write_zeroes", self.block, self.count, self.fua)


@dataclass(frozen=True)
class Read(Step):
    block: int
    count: int

    async def run(self, sim: Simulation) -> None:
        await sim.read(self.block, self.count)


@dataclass(frozen=True)
class ReadAll(Step):
    """Read the whole storage, a region at a time."""

    async def run(self, sim: Simulation) -> None:
        step = 16
        for first in range(0, sim.blocks, step):
            await sim.read(first, min(step, sim.blocks - first))


@dataclass(frozen=True)
class Flush(Step):
    async def run(self, sim: Simulation) -> None:
        await sim.flush()


@dataclass(frozen=True)
class Sleep(Step):
    """Let background work run: resync, bitmap clearing, heartbeats."""

    seconds: float
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        await trio.sleep(self.seconds)


@dataclass(frozen=True)
class Settle(Step):
    """Wait (at most two minutes) for the storage to become clean. It must,
    if every leg was healthy before and after (one membership, every leg
    copied), unless a forced mount may have split the histories (a leg
    then waits for the user), the holder may be fenced, or a leg a reload
    added could not be recorded (it waits for the user too)."""

    async def run(self, sim: Simulation) -> None:
        mount = sim.holder
        assert mount is not None
        mirror = mount.mirror
        healthy_before = sim.all_legs_healthy(mount)
        with trio.move_on_after(120):
            while mirror.state != "clean":
                await trio.sleep(0.5)
        if (
            mirror.state != "clean"
            and healthy_before
            and sim.all_legs_healthy(mount)
            and not sim.split_possible
            and not mount.may_be_fenced
            and not sim.waits_for_the_user(mount)
        ):
            raise sim.violation(
                f"every leg is healthy but the storage is {mirror.state} after 120 s"
            )


@dataclass(frozen=True)
class AwaitResync(Step):
    """Wait (at most a minute) until leg `leg` is resyncing and has copied
    `region` (for scenarios that need a write in that window)."""

    leg: int
    region: int

    async def run(self, sim: Simulation) -> None:
        assert sim.holder is not None
        leg = sim.holder.mirror.legs[self.leg]
        with trio.move_on_after(60):
            while True:
                pending = pending_regions(leg)
                if leg.role is LegRole.RESYNCING and pending and self.region not in pending:
                    return
                await trio.sleep(0.05)
        raise AssertionError(f"scenario: leg {self.leg} never resynced region {self.region}")


# -- faults of a node -------------------------------------------------------------
@dataclass(frozen=True)
class Kill(Step):
    """The node's host goes down; with `power_loss`, its cache is lost
    (the dirty blocks `keep_some(seed)` picks survive)."""

    disk: int
    power_loss: bool = False
    seed: int = 0
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        lost = sim.disks[self.disk].die(self.power_loss, keep_some(self.seed))
        sim.cache_lost(lost)
        data = {block for block in lost if block < sim.blocks}
        if not data or sim.model is None or not sim.relevant(self.disk):
            return
        if sim.holder is not None:
            # Until the next FLUSH reports the loss, reads of those blocks
            # may come from this leg's older bytes.
            sim.model.forget(data)
        else:
            sim.model.volatile_lost()


@dataclass(frozen=True)
class Revive(Step):
    disk: int
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].revive()


@dataclass(frozen=True)
class Fail(Step):
    """Requests `ops` on the node fail with EIO, in the `scope` of its bytes
    ("data", "meta" or "all"), for `seconds` (None: until healed)."""

    disk: int
    ops: tuple[str, ...]
    scope: str = "all"
    seconds: float | None = None
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        for op in self.ops:
            sim.disks[self.disk].fail(op, self.scope, self.seconds)


@dataclass(frozen=True)
class FlakyFlush(Step):
    """The node's next FLUSH fails with EIO (its cache is dropped), whoever
    sends it: the user's fsync, a resync's or the bitmap's lazy clearing."""

    disk: int
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].fail_next["flush"] = 1


@dataclass(frozen=True)
class Slow(Step):
    disk: int
    seconds: float
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].delay = self.seconds


@dataclass(frozen=True)
class Heal(Step):
    disk: int
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].heal()


@dataclass(frozen=True)
class Freeze(Step):
    disk: int
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].freeze()


@dataclass(frozen=True)
class Thaw(Step):
    disk: int
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].thaw()


@dataclass(frozen=True)
class Corrupt(Step):
    disk: int
    block: int
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        sim.disks[self.disk].corrupt(self.block)
        sim.rotted.add(self.block)
        sim.rot_on_media.add(self.block)


# -- clients ------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount(Step):
    """A new client mounts with exactly the `reachable` legs up (the
    others' hosts are down); `force` and `primary` as `-o` options; with
    `previous`, the config before the last reload (the user put it back)."""

    reachable: tuple[bool, ...]
    force: bool = False
    primary: int | None = None
    previous: bool = False
    needs_holder = False

    async def run(self, sim: Simulation) -> None:
        assert sim.holder is None
        if self.previous:
            sim.note(f"    -> config back to disks {sim.configs.revert()}")
        for disk, up in zip(sim.config_disks(), self.reachable, strict=True):
            if up and not disk.alive:
                disk.revive()
            elif not up and disk.alive:
                disk.die()
        allowed = sim.refusal_allowed(self.reachable, self.primary)
        sim.stats.mounts += 1
        try:
            mount = await sim.open_mount(force=self.force, primary=self.primary)
        except (UserError, NodeError) as exc:
            sim.stats.refusals += 1
            sim.note(f"    -> refused: {exc}")
            if allowed is None:
                raise sim.violation(
                    f"mount refused although it can be proved safe: {exc}"
                ) from None
            return
        sim.note(f"    -> mounted by {mount.client}: legs {mount.leg_state()}")
        everyone = all(self.reachable)
        chosen = self.primary is not None or (self.force and not everyone)
        if not chosen and (removed := sim.removed_source(mount)) is not None:
            sim.holder = mount
            raise sim.violation(f"a removed leg is a source: {removed}")
        if chosen:
            sim.adopt_source(mount)
            sim.split_possible = not everyone
        elif everyone:
            sim.split_possible = False
        elif sim.split_possible and sim.mounts_another_history(mount):
            # The legs a forced mount went without never learn that the
            # others went on: mounted alone, they serve their own history
            # (README "Split brain"); with every leg the mount is refused.
            sim.adopt_source(mount)
        sim.holder = mount
        sim.set_owner(mount.client)


@dataclass(frozen=True)
class Umount(Step):
    async def run(self, sim: Simulation) -> None:
        mount = sim.holder
        assert mount is not None and sim.model is not None
        flushed = sim.healthy_in_sync_leg(mount) and not mount.may_be_fenced
        end = sim.session_end(mount, clean=True)
        await mount.mirror.aclose()
        await sim.end(mount)
        if flushed:
            sim.model.flushed()
            sim.rot_on_media &= sim.rotted
        else:
            sim.model.volatile_lost()  # its final FLUSH may have failed
        sim.last_session = end
        sim.holder = None
        sim.set_owner(None)


@dataclass(frozen=True)
class Crash(Step):
    """The client dies (kill -9): nothing flushed, no shutdown record. The
    hosts of `power_loss` lose their caches with it (a site power cut;
    `seed` picks the dirty blocks that were written back)."""

    power_loss: tuple[int, ...] = ()
    seed: int = 0

    async def run(self, sim: Simulation) -> None:
        mount = sim.holder
        assert mount is not None and sim.model is not None
        sim.last_session = sim.session_end(mount, clean=False)
        await sim.end(mount)
        sim.stats.crashes += 1
        sim.holder = None
        sim.set_owner(None)
        lost = False
        for index in self.power_loss:
            blocks = sim.disks[index].lose_cache(keep_some(self.seed))
            sim.cache_lost(blocks)
            lost = lost or (bool(blocks) and sim.relevant(index))
        if lost:
            sim.model.volatile_lost()


@dataclass(frozen=True)
class CrashDuringWrite(Step):
    """The client dies `after` seconds into a write of blocks [block, +count)
    (with a slow leg, while some legs have it and others not); the hosts of
    `power_loss` lose their caches with it."""

    block: int
    count: int
    after: float
    power_loss: tuple[int, ...] = ()

    async def run(self, sim: Simulation) -> None:
        mount = sim.holder
        assert mount is not None and sim.model is not None
        write_id = sim.next_write_id()
        data = payload(write_id, self.block, self.count)

        async def write() -> None:
            try:
                await mount.mirror.write(self.block * BLOCK, data)
            except NodeError:
                pass  # the model takes the write as failed either way

        mount.tasks.start_soon(write)
        await trio.sleep(self.after)
        sim.model.failed(self.block, self.count, write_id)
        await Crash(self.power_loss).run(sim)


@dataclass(frozen=True)
class Takeover(Step):
    """A second client mounts while the holder is up: with `stall`, the
    holder's side of the wire goes silent first (a frozen daemon) and comes
    back `thaw_after` seconds after the takeover; then the old holder
    writes `probe_block`, which must fail, and is killed."""

    stall: bool
    force: bool
    thaw_after: float
    probe_block: int

    async def run(self, sim: Simulation) -> None:
        old = sim.holder
        assert old is not None and sim.model is not None
        if self.stall:
            for node in old.nodes:
                node.stall()
        sim.stats.mounts += 1  # the new mount becomes the owner by taking the grants over
        # Health before the attempt, as for a mount: a one-shot fault the
        # new mount's own start-up I/O took leaves the disk healthy after.
        healthy = all(disk.healthy for disk in sim.disks)
        try:
            new = await sim.open_mount(force=self.force)
        except (UserError, NodeError) as exc:
            sim.stats.refusals += 1
            sim.note(f"    -> refused: {exc}")
            if healthy:
                raise sim.violation(f"the takeover was refused: {exc}") from None
            for node in old.nodes:
                node.unstall()
            sim.set_owner(old.client)
            old.may_be_fenced = True
            return
        sim.stats.takeovers += 1
        sim.note(f"    -> taken over by {new.client}: legs {new.leg_state()}")
        sim.holder = new
        await trio.sleep(self.thaw_after)
        for node in old.nodes:
            node.unstall()
        await trio.sleep(1.0)
        write_id = sim.next_write_id()
        probe = payload(write_id, self.probe_block, 1)
        try:
            with trio.fail_after(120):
                await old.mirror.write(self.probe_block * BLOCK, probe)
        except NodeError as exc:
            sim.note(f"    -> the old holder's write failed: {exc}")
        except trio.TooSlowError:
            raise sim.violation("the old holder's write hung after the takeover") from None
        else:
            raise sim.violation(
                f"two writers: {old.client}'s write (id {write_id}) was acknowledged after "
                f"{new.client} took over"
            )
        await sim.end(old)


@dataclass(frozen=True)
class CrashSoon(Step):
    """The client dies after `turns` turns of the scheduler (no simulated
    time passes): in the middle of whatever the last step left running in
    the background, such as a reload's recording of a leg."""

    turns: int
    power_loss: tuple[int, ...] = ()

    async def run(self, sim: Simulation) -> None:
        for _ in range(self.turns):
            await trio.lowlevel.checkpoint()
        await Crash(self.power_loss).run(sim)


# -- reloads ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AddLeg(Step):
    """The config gets `disk` as a new last leg (None: a fresh, empty disk;
    a number: a disk that is no leg now, perhaps one removed before), and
    the mount reloads: the leg is recorded, then copied in the background."""

    disk: int | None = None

    async def run(self, sim: Simulation) -> None:
        await sim.add_leg(self.disk)


@dataclass(frozen=True)
class RemoveLeg(Step):
    """The config loses the leg at `position` and the mount reloads. Only
    the last leg can be removed online today, so only that is drawn."""

    position: int

    async def run(self, sim: Simulation) -> None:
        await sim.remove_leg(self.position)


# -- drawing --------------------------------------------------------------------------
_IO = ["write"] * 8 + ["read"] * 3 + ["readall", "flush", "flush", "trim", "zeroes"]
_TIME = ["sleep", "sleep", "settle"]
_FAULTS = [
    "kill", "revive", "revive", "fail", "fail", "flaky_flush", "heal", "heal", "slow", "freeze",
    "thaw", "corrupt",
]
_CLIENT = ["crash", "crash_mid_write", "crash_soon", "umount", "takeover"]
_RELOAD = ["add_leg", "remove_leg"]
_WITH_HOLDER = _IO + _TIME + _FAULTS + _CLIENT + _RELOAD
_WITHOUT_HOLDER = ["mount"] * 3 + ["mount_some"] * 3 + ["mount_previous"] * 2 + [
    "kill", "revive", "fail", "heal", "corrupt", "sleep"
]

#: every kind of step `draw_step` may draw
KINDS = frozenset(_WITH_HOLDER + _WITHOUT_HOLDER)
#: kinds a scenario may do without (swarm testing: each example enables a
#: subset, so rare combinations of few faults come up more often); with
#: none of the mount kinds left, "mount" stays
OPTIONAL = frozenset(
    _FAULTS + _CLIENT + _RELOAD + ["mount_some", "mount_previous", "trim", "zeroes", "settle"]
)


def _spare_disks(sim: Simulation) -> list[int | None]:
    """What `AddLeg` may add: a disk that is no leg of the holder now, or a
    fresh one (None) while there are fewer than MAX_DISKS; nothing once the
    config has MAX_CONFIG_LEGS legs."""
    holder = sim.holder
    assert holder is not None
    if len(sim.configs.current) >= MAX_CONFIG_LEGS:
        return []
    legs = set(holder.disk_numbers[: len(holder.mirror.legs)])
    spare: list[int | None] = [number for number in range(len(sim.disks)) if number not in legs]
    if len(sim.disks) < MAX_DISKS:
        spare.append(None)
    return spare


def draw_kinds(
    data: st.DataObject,
    without: frozenset[str] = frozenset(),
    *,
    keep: frozenset[str] = frozenset(),
) -> frozenset[str]:
    """The kinds a scenario leaves out: `without` and a drawn subset of
    OPTIONAL, never one of `keep`."""
    enabled = data.draw(
        st.sets(st.sampled_from(sorted(OPTIONAL)), min_size=1).map(lambda s: tuple(sorted(s))),
        label="enabled",
    )
    return without | (OPTIONAL - frozenset(enabled) - keep)


def draw_step(
    data: st.DataObject,
    sim: Simulation,
    without: frozenset[str] = frozenset(),
    emphasis: tuple[str, ...] = (),
) -> Step:
    """One step fit for the simulation's state, drawn from `data`; kinds in
    `without` are never drawn (swarm testing, or looking past a known bug),
    kinds in `emphasis` are drawn once more for each time they appear there."""
    legs = len(sim.configs.current)
    if sim.model is None:
        return Mount(reachable=(True,) * legs)
    if not sim.read_check:
        without = without | {"corrupt"}
    if sim.configs.previous is None:
        without = without | {"mount_previous"}
    if sim.holder is not None and not _spare_disks(sim):
        without = without | {"add_leg"}
    vocabulary = _WITH_HOLDER if sim.holder is not None else _WITHOUT_HOLDER
    kinds = [
        kind
        for kind in vocabulary + [kind for kind in emphasis if kind in vocabulary]
        if kind not in without
    ] or ["mount"]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    disk = st.integers(0, len(sim.disks) - 1)
    position = st.integers(0, legs - 1)
    blocks = sim.blocks

    def extent() -> tuple[int, int]:
        first = data.draw(st.integers(0, blocks - 1), label="block")
        count = data.draw(st.integers(1, min(40, blocks - first)), label="count")
        return first, count

    if kind == "write":
        first, count = extent()
        return Write(first, count, data.draw(st.booleans(), label="fua"))
    if kind == "read":
        return Read(*extent())
    if kind == "readall":
        return ReadAll()
    if kind == "flush":
        return Flush()
    if kind == "trim":
        return Trim(*extent())
    if kind == "zeroes":
        first, count = extent()
        return WriteZeroes(first, count, data.draw(st.booleans(), label="fua"))
    if kind == "sleep":
        return Sleep(data.draw(st.sampled_from([0.5, 1.0, 3.0, 6.0, 12.0, 30.0]), label="s"))
    if kind == "settle":
        return Settle()
    if kind == "kill":
        power = data.draw(st.booleans(), label="power_loss")
        seed = data.draw(st.integers(0, 3), label="seed") if power else 0
        return Kill(data.draw(disk, label="disk"), power, seed)
    if kind == "revive":
        return Revive(data.draw(disk, label="disk"))
    if kind == "fail":
        ops = data.draw(
            st.sets(st.sampled_from(["write", "flush", "read"]), min_size=1).map(
                lambda s: tuple(sorted(s))
            ),
            label="ops",
        )
        scope = data.draw(st.sampled_from(["all", "data", "meta"]), label="scope")
        seconds = data.draw(st.sampled_from([None, 3.0, 10.0, 40.0]), label="seconds")
        return Fail(data.draw(disk, label="disk"), ops, scope, seconds)
    if kind == "flaky_flush":
        return FlakyFlush(data.draw(disk, label="disk"))
    if kind == "heal":
        return Heal(data.draw(disk, label="disk"))
    if kind == "slow":
        seconds = data.draw(st.sampled_from([0.2, 1.0, 2.5]), label="delay")
        return Slow(data.draw(disk, label="disk"), seconds)
    if kind == "freeze":
        return Freeze(data.draw(disk, label="disk"))
    if kind == "thaw":
        return Thaw(data.draw(disk, label="disk"))
    if kind == "corrupt":
        block = data.draw(st.integers(0, blocks - 1), label="block")
        return Corrupt(data.draw(disk, label="disk"), block)
    if kind == "crash":
        power = data.draw(
            st.sets(disk).map(lambda s: tuple(sorted(s))), label="power_loss"
        )
        seed = data.draw(st.integers(0, 3), label="seed") if power else 0
        return Crash(power, seed)
    if kind == "crash_mid_write":
        first, count = extent()
        after = data.draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]), label="after")
        power = data.draw(
            st.sets(disk).map(lambda s: tuple(sorted(s))), label="power_loss"
        )
        return CrashDuringWrite(first, count, after, power)
    if kind == "crash_soon":
        turns = data.draw(st.sampled_from([0, 1, 2, 3, 5, 8, 13, 30]), label="turns")
        power = data.draw(st.sets(disk).map(lambda s: tuple(sorted(s))), label="power_loss")
        return CrashSoon(turns, power)
    if kind == "add_leg":
        return AddLeg(data.draw(st.sampled_from(_spare_disks(sim)), label="disk"))
    if kind == "remove_leg":
        return RemoveLeg(legs - 1)
    if kind == "umount":
        return Umount()
    if kind == "takeover":
        stall = data.draw(st.booleans(), label="stall")
        force = True if not stall else data.draw(st.booleans(), label="force")
        thaw = data.draw(st.sampled_from([0.0, 2.0, 10.0]), label="thaw_after")
        return Takeover(stall, force, thaw, data.draw(st.integers(0, blocks - 1), label="probe"))
    if kind == "mount":
        return Mount((True,) * legs)
    if kind == "mount_previous":
        assert sim.configs.previous is not None
        count = len(sim.configs.previous)
        reachable = tuple(
            data.draw(st.lists(st.booleans(), min_size=count, max_size=count), label="reachable")
        )
        return Mount(reachable, previous=True)
    assert kind == "mount_some"
    reachable = tuple(
        data.draw(st.lists(st.booleans(), min_size=legs, max_size=legs), label="reachable")
    )
    force = data.draw(st.booleans(), label="force")
    primary = data.draw(st.one_of(st.none(), position), label="primary") if force else None
    return Mount(reachable, force and primary is None, primary)


async def run_step(sim: Simulation, step: Step) -> None:
    """Execute one step within STEP_TIMEOUT simulated seconds, then check
    every invariant."""
    if step.needs_holder and sim.holder is None:
        sim.note(f"{step!r} (skipped: nothing mounted)")
        return
    sim.note(repr(step))
    sim.stats.steps += 1
    name = type(step).__name__
    sim.stats.kinds[name] = sim.stats.kinds.get(name, 0) + 1
    try:
        with trio.fail_after(STEP_TIMEOUT):
            await step.run(sim)
    except trio.TooSlowError:
        raise sim.violation(f"{step!r} did not finish in {STEP_TIMEOUT:.0f} s") from None
    sim.check()

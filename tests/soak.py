"""A bounded fault soak: ext4 on a loop device on a mirror of two legs, the
legs served by `dstfuse export` processes on two namespaced hosts
(tests/hosts.py), the client in the root namespace; fio writes with crc32c
verify while a fault injector, every few seconds, does ONE thing to one
part::

    from .soak import SoakSettings, run_soak

    report = run_soak(tmp_path, SoakSettings.from_environment())
    print(report.summary())

Leg 0 is reached directly, leg 1 through a `FaultProxy` relay in the root
namespace (127.0.0.1 -> the host's address), so bytes can be corrupted on
its wire.

Invariants the soak holds the code to (any breach raises `SoakFailure`,
whose message starts with the seed that replays the run):

- a single-leg fault never reaches the writer: every fio segment exits 0
  (no EIO, no verify mismatch) and ext4 counts no error;
- faults never overlap: after each one the storage is `clean` in
  `dstfuse status --json` again within `CLEAN_TIMEOUT` before the next;
- the end: ext4 unmounted and `fsck.ext4 -fn` clean, `dstfuse umount`
  exits 0, and both legs' data areas (the first `.dst/vol0/size` bytes of
  their files) are byte-identical (the test asserts these on the report).

Bounded: one round of every fault kind, then more rounds while `seconds`
(env DSTFUSE_SOAK_SECONDS; none by default) have not passed; each fio segment
is a fixed size and killed past `SEGMENT_TIMEOUT`, every wait has a limit;
the seed (env DSTFUSE_SOAK_SEED) fixes the choice, order and durations of
the faults. Everything started is stopped in `finally`: fio, the relay
thread, ext4, the loop device, the mount, the exports, the namespaces.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .faultproxy import TO_CLIENT, TO_NODE, FaultProxy
from .hosts import Host, hosts
from .mounts import (
    Export,
    Mount,
    ext4_mounted,
    loop_device,
    mounted,
    run,
    run_dstfuse,
    write_config,
)

MiB = 1 << 20
LEG_SIZE = 256 * MiB
#: One fio segment: writes this much at random, then reads it all back.
SEGMENT_SIZE = 16 * MiB
SEGMENT_FILES = 3
SEGMENT_TIMEOUT = 240.0
CLEAN_TIMEOUT = 120.0
#: An 11 s budget per node; a mirror leg is given up after leg_timeout (4 s).
TIMEOUTS = {"resend": "1s", "max_resends": 10, "keepalive": "500ms", "connect": "1s"}
FIRST_MOUNT = ["assume_clean", "bitmap_idle=1s"]
REMOUNT = ["bitmap_idle=1s"]
#: Pause between the storage being clean and the next fault (seconds); the
#: short end hits a leg right after the other finished its resync.
QUIET = (0.5, 2.0)


class SoakFailure(AssertionError):
    """The soak broke an invariant; the message names the seed."""


@dataclass(frozen=True)
class SoakSettings:
    seed: int
    seconds: float

    @classmethod
    def from_environment(cls, default_seconds: float = 0.0) -> SoakSettings:
        seed = os.environ.get("DSTFUSE_SOAK_SEED")
        seconds = os.environ.get("DSTFUSE_SOAK_SECONDS")
        return cls(
            seed=int(seed) if seed else random.SystemRandom().randrange(1 << 32),
            seconds=float(seconds) if seconds else default_seconds,
        )


@dataclass
class SoakReport:
    seed: int
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    events: list[str] = field(default_factory=list)
    segments: int = 0
    bytes_written: int = 0
    bytes_verified: int = 0
    longest_write_ns: int = 0
    longest_clean_wait: float = 0.0
    duration: float = 0.0
    ext4_errors: int = -1
    fsck: str = ""
    fsck_returncode: int = -1
    umount_returncode: int = -1
    umount_stderr: str = ""
    legs_identical: bool = False

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items()))
        return "\n".join([
            f"soak seed {self.seed} (replay: DSTFUSE_SOAK_SEED={self.seed})",
            f"  duration {self.duration:.0f} s, {sum(self.faults.values())} faults: {kinds}",
            f"  fio segments {self.segments}, written {self.bytes_written / MiB:.0f} MiB, "
            f"verified {self.bytes_verified / MiB:.0f} MiB",
            f"  longest write (fio clat max) {self.longest_write_ns / 1e9:.2f} s, "
            f"longest wait for clean {self.longest_clean_wait:.1f} s",
            f"  ext4 errors {self.ext4_errors}, fsck -fn exit {self.fsck_returncode}, "
            f"dstfuse umount exit {self.umount_returncode}, legs identical {self.legs_identical}",
        ])  # fmt: skip


# ------------------------------------------------------------------ relay


class Relay:
    """A `FaultProxy` on 127.0.0.1 in front of `host:port`, run by trio in
    a thread of its own; `corrupt()` flips bits in the next chunks."""

    def __init__(self, host: str, port: int) -> None:
        self.proxy = FaultProxy(host, port)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, name="soak-relay", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # handed to the test thread
            self._errors.append(exc)
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            await nursery.start(self.proxy.run)
            self._ready.set()

    @contextlib.contextmanager
    def running(self) -> Iterator[Relay]:
        self._thread.start()
        try:
            if not self._ready.wait(30) or self._errors:
                raise AssertionError(f"the fault relay did not start: {self._errors}")
            yield self
        finally:
            if self._token is not None and self._scope is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            self._thread.join(30)

    def corrupt(self, direction: str, count: int) -> None:
        trio.from_thread.run_sync(self.proxy.corrupt_next, direction, count, trio_token=self._token)

    def pause(self) -> None:
        """Hold every relayed byte, both ways, until `resume` (what was sent
        before stays in the relay, so it is still in flight)."""
        trio.from_thread.run_sync(self.proxy.pause, trio_token=self._token)

    def resume(self) -> None:
        trio.from_thread.run_sync(self.proxy.resume, trio_token=self._token)


# ------------------------------------------------------------------- legs


@dataclass
class Leg:
    """One mirror leg: its file, the host serving it, the running export
    and the address the client's config names."""

    index: int
    host: Host
    path: Path
    export: Export
    address: str

    @property
    def pid(self) -> int:
        return self.export.process.pid

    def kill(self) -> None:
        self.export.process.kill()
        self.export.process.wait(30)

    def restart(self, env: dict[str, str] | None = None) -> None:
        self.export = self.host.export(self.path, env=env)


# ----------------------------------------------------------------- client


class Client:
    """The root namespace's side: `dstfuse mount --foreground` of the
    config, a loop device (--direct-io=on) on the storage file and ext4 on
    it, each in an ExitStack of its own so a crash can take them apart in
    order."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.mount: Mount | None = None
        self.device = ""
        self.ext4 = directory / "ext4"
        self._mount_stack = contextlib.ExitStack()
        self._fs_stack = contextlib.ExitStack()

    @property
    def mountpoint(self) -> Path:
        return self.directory / "mnt"

    def attach(self, *, options: list[str], mkfs: bool) -> None:
        self.mount = self._mount_stack.enter_context(
            mounted(self.config, self.mountpoint, options=options)
        )
        self.device = self._fs_stack.enter_context(loop_device(self.mount.file("vol0")))
        if mkfs:
            run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                self.device)  # fmt: skip
        else:
            self.fsck()
        self._fs_stack.enter_context(ext4_mounted(self.device, self.ext4, mkfs=False))

    def fsck(self) -> None:
        done = run("fsck.ext4", "-fn", self.device, check=False)
        if done.returncode != 0:
            raise AssertionError(f"fsck.ext4 -fn exited {done.returncode}:\n{done.stdout[-3000:]}")

    def ext4_errors(self) -> int:
        name = os.path.basename(self.device)
        return int(Path(f"/sys/fs/ext4/{name}/errors_count").read_text())

    def detach_fs(self) -> None:
        """ext4 unmounted, loop device detached (the mount stays)."""
        self._fs_stack.close()

    def wait_loop_released(self, timeout: float = 30.0) -> None:
        """No loop device holds the storage file any more (`losetup -d` of
        a busy device only marks it for detaching at its last close)."""
        assert self.mount is not None
        deadline = time.monotonic() + timeout
        while run("losetup", "-j", self.mount.file("vol0")).stdout.strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.device} still holds the storage file {timeout} s "
                                     "after losetup -d (who keeps it open?)")  # fmt: skip
            time.sleep(0.2)

    def crash(self) -> None:
        """kill -9 of the daemon, then the dead mount removed."""
        assert self.mount is not None and self.mount.process is not None
        os.kill(self.mount.pid, signal.SIGKILL)
        self.mount.process.wait(30)
        self._mount_stack.close()
        self.mount = None

    def close(self) -> None:
        try:
            self._fs_stack.close()
        finally:
            self._mount_stack.close()


# ----------------------------------------------------------------- writer


class Writer:
    """fio segments one after another on files in the ext4: each writes
    SEGMENT_SIZE at random (4-64 KiB blocks, O_DIRECT, iodepth 8, crc32c
    in every block), then reads it all back and checks it (verify_fatal)."""

    def __init__(self, ext4: Path, directory: Path, seed: int, report: SoakReport) -> None:
        self.ext4 = ext4
        self.directory = directory
        self.seed = seed
        self.report = report
        self.process: subprocess.Popen | None = None
        self._started = 0.0
        self._output: Path | None = None
        self._errors: Path | None = None

    def start(self) -> None:
        number = self.report.segments
        self._output = self.directory / f"fio-{number}.json"
        self._errors = self.directory / f"fio-{number}.err"
        self._started = time.monotonic()
        with open(self._errors, "wb") as errors:
            self.process = self._spawn(number, errors)

    def _spawn(self, number: int, errors) -> subprocess.Popen:
        return subprocess.Popen(
            [
                "fio", f"--name=soak{number}",
                f"--filename={self.ext4 / f'soak-{number % SEGMENT_FILES}.dat'}",
                f"--size={SEGMENT_SIZE}", "--rw=randwrite", "--bsrange=4k-64k",
                "--direct=1", "--ioengine=libaio", "--iodepth=8",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                f"--randseed={self.seed + number}",
                "--output-format=json", f"--output={self._output}", "--verify_state_save=0",
            ],
            cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
        )  # fmt: skip

    def running(self) -> bool:
        """False once the segment has ended (and was checked)."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            if time.monotonic() - self._started > SEGMENT_TIMEOUT:
                self.stop()
                raise AssertionError(f"fio segment {self.report.segments} stalled "
                                     f"past {SEGMENT_TIMEOUT} s")  # fmt: skip
            return True
        self._finished()
        return False

    def wait(self) -> None:
        """The segment has ended and was checked."""
        while self.running():
            time.sleep(0.2)

    def _finished(self) -> None:
        assert self.process is not None and self._output and self._errors
        number = self.report.segments
        returncode = self.process.returncode
        self.process = None
        errors = self._errors.read_text(errors="replace")
        if returncode != 0:
            raise AssertionError(f"fio segment {number} exited {returncode}: {errors[-2000:]}")
        job = json.loads(self._output.read_text())["jobs"][0]
        if job["error"]:
            raise AssertionError(f"fio segment {number} reports error {job['error']}: {errors}")
        self.report.segments += 1
        self.report.bytes_written += job["write"]["io_bytes"]
        self.report.bytes_verified += job["read"]["io_bytes"]
        self.report.longest_write_ns = max(
            self.report.longest_write_ns, job["write"]["clat_ns"]["max"]
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process = None


# ----------------------------------------------------------------- faults


@dataclass
class Soak:
    """What a fault can act on."""

    legs: list[Leg]
    relay: Relay
    client: Client
    writer: Writer
    report: SoakReport

    def storage_state(self) -> str:
        done = run_dstfuse("status", "--json", self.client.mountpoint, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"dstfuse status exited {done.returncode}: {done.stderr}")
        return json.loads(done.stdout)["storages"]["vol0"]["state"]

    def wait_clean(self) -> None:
        started = time.monotonic()
        while (state := self.storage_state()) != "clean":
            if time.monotonic() - started > CLEAN_TIMEOUT:
                raise AssertionError(f"storage {state}, not clean {CLEAN_TIMEOUT} s after a fault")
            self.writer.running()  # a failing segment is reported at once
            time.sleep(0.25)
        self.report.longest_clean_wait = max(
            self.report.longest_clean_wait, time.monotonic() - started
        )


def kill_node(soak: Soak, rng: random.Random) -> str:
    leg = rng.choice(soak.legs)
    down = rng.uniform(0.5, 3.0)
    leg.kill()
    time.sleep(down)
    leg.restart()
    return f"leg {leg.index} killed (-9), restarted after {down:.1f} s"


def freeze_node(soak: Soak, rng: random.Random) -> str:
    leg = rng.choice(soak.legs)
    frozen = rng.uniform(1.0, 5.0)
    os.kill(leg.pid, signal.SIGSTOP)
    try:
        time.sleep(frozen)
    finally:
        os.kill(leg.pid, signal.SIGCONT)
    return f"leg {leg.index} frozen (SIGSTOP) for {frozen:.1f} s"


def link_down(soak: Soak, rng: random.Random) -> str:
    leg = rng.choice(soak.legs)
    down = rng.uniform(1.0, 5.0)
    with leg.host.link_down():
        time.sleep(down)
    return f"leg {leg.index}'s link down for {down:.1f} s"


def corrupt_bytes(soak: Soak, rng: random.Random) -> str:
    direction = rng.choice([TO_NODE, TO_CLIENT])
    count = rng.randint(1, 3)
    before = soak.relay.proxy.corrupted
    soak.relay.corrupt(direction, count)
    time.sleep(2.0)
    return (f"{count} chunk(s) {direction} of leg 1 corrupted "
            f"({soak.relay.proxy.corrupted - before} done within 2 s)")  # fmt: skip


def reboot_node(soak: Soak, rng: random.Random) -> str:
    """The node's host reboots: the node is stopped, its file written back
    (what the host's disk holds: nothing it acknowledged is lost, so the
    final comparison stays valid), killed, and started as a new instance
    (another DSTFUSE_BOOT_ID): the client must resend every write it keeps
    unflushed before anything else. (A reboot that does lose unflushed
    writes is tested where the flushed state is known: test_node_reboot.py,
    test_mirror_faults.py.)"""
    leg = rng.choice(soak.legs)
    os.kill(leg.pid, signal.SIGSTOP)
    with open(leg.path, "rb+") as file:
        os.fsync(file.fileno())
    leg.kill()
    down = rng.uniform(0.5, 3.0)
    time.sleep(down)
    leg.restart(env={"DSTFUSE_BOOT_ID": str(uuid.uuid4())})
    return f"leg {leg.index}'s host rebooted (a new boot id after {down:.1f} s)"


def crash_client(soak: Soak, rng: random.Random) -> str:
    """The running fio segment finishes; ext4 and the loop device go (an
    ext4 on a dead FUSE file can only fail); then kill -9 of the daemon,
    a plain mount again (it must take the dead holder's lease over), fsck,
    ext4 mounted again."""
    soak.writer.wait()
    soak.client.detach_fs()
    soak.client.wait_loop_released()
    soak.client.crash()
    started = time.monotonic()
    soak.client.attach(options=REMOUNT, mkfs=False)
    return f"client killed (-9), mounted again in {time.monotonic() - started:.1f} s, fsck clean"


#: The fault kinds the injector draws from, by name. A kind is a function
#: doing one fault to one part and returning what it did; it returns only
#: once the fault is over (the node is back, the link up).
FAULTS: dict[str, Callable[[Soak, random.Random], str]] = {
    "kill_node": kill_node,
    "freeze_node": freeze_node,
    "link_down": link_down,
    "corrupt_bytes": corrupt_bytes,
    "crash_client": crash_client,
    "reboot_node": reboot_node,
}


def fault_order(rng: random.Random) -> Iterator[str]:
    """Every kind once per round, in a shuffled order: a short run still
    sees each."""
    while True:
        kinds = sorted(FAULTS)
        rng.shuffle(kinds)
        yield from kinds


# -------------------------------------------------------------------- run


def _config(path: Path, legs: list[Leg]) -> Path:
    storage = {"algorithm": "mirror", "nodes": [{"remote": leg.address} for leg in legs]}
    return write_config(path, {"vol0": storage}, timeouts=TIMEOUTS)


def _leg_file(path: Path) -> Path:
    with open(path, "wb") as file:
        file.truncate(LEG_SIZE)
    return path


def _inject(soak: Soak, settings: SoakSettings, rng: random.Random, started: float) -> None:
    kinds = fault_order(rng)
    while soak.report.faults.keys() < FAULTS.keys() or (
        time.monotonic() - started < settings.seconds
    ):
        deadline = time.monotonic() + rng.uniform(*QUIET)
        while time.monotonic() < deadline:
            if not soak.writer.running():
                soak.writer.start()
            time.sleep(0.2)
        kind = next(kinds)
        at = time.monotonic() - started
        what = FAULTS[kind](soak, rng)
        soak.report.faults[kind] += 1
        soak.report.events.append(f"{at:6.1f} s {kind}: {what}")
        soak.wait_clean()
        if not soak.writer.running():
            soak.writer.start()


def _finish(soak: Soak) -> None:
    soak.writer.wait()
    soak.wait_clean()
    client = soak.client
    soak.report.ext4_errors = client.ext4_errors()
    assert client.mount is not None
    size = int(client.mount.control("vol0", "size"))
    run("umount", client.ext4)
    done = run("fsck.ext4", "-fn", client.device, check=False)
    soak.report.fsck_returncode, soak.report.fsck = done.returncode, done.stdout[-3000:]
    client.detach_fs()
    client.wait_loop_released()
    umount = client.mount.umount()
    soak.report.umount_returncode, soak.report.umount_stderr = umount.returncode, umount.stderr
    soak.report.legs_identical = all(
        _data_area(leg.path, size) == _data_area(soak.legs[0].path, size) for leg in soak.legs[1:]
    )


def _data_area(path: Path, size: int) -> bytes:
    with open(path, "rb") as file:
        return file.read(size)


def run_soak(directory: Path, settings: SoakSettings) -> SoakReport:
    """The soak in `directory` (logs: mnt.log, export-*.log, fio-*.json);
    returns the report once the end checks were made (the caller asserts
    them), raises `SoakFailure` on a breach during the run."""
    longer = f", then faults until {settings.seconds:.0f} s" if settings.seconds else ""
    print(f"soak seed {settings.seed}, every fault kind once{longer} "
          f"(replay: DSTFUSE_SOAK_SEED={settings.seed})", flush=True)  # fmt: skip
    rng = random.Random(settings.seed)
    report = SoakReport(settings.seed)
    started = time.monotonic()
    with hosts(2, directory) as (first, second), contextlib.ExitStack() as stack:
        paths = [_leg_file(directory / "leg0.img"), _leg_file(directory / "leg1.img")]
        exports = [first.export(paths[0]), second.export(paths[1])]
        relay = stack.enter_context(Relay(second.address4, 1025).running())
        legs = [
            Leg(0, first, paths[0], exports[0], exports[0].address),
            Leg(1, second, paths[1], exports[1], relay.address),
        ]
        client = Client(_config(directory / "storage.yaml", legs), directory)
        stack.callback(client.close)
        client.attach(options=FIRST_MOUNT, mkfs=True)
        writer = Writer(client.ext4, directory, settings.seed, report)
        stack.callback(writer.stop)
        soak = Soak(legs, relay, client, writer, report)
        try:
            writer.start()
            _inject(soak, settings, rng, started)
            _finish(soak)
        except AssertionError as exc:
            log = client.mount.log_tail(40) if client.mount is not None else "(no mount)"
            raise SoakFailure(
                f"soak seed {settings.seed} (replay: DSTFUSE_SOAK_SEED={settings.seed}): {exc}\n"
                "faults so far:\n" + "\n".join(report.events) + f"\nmount log:\n{log}"
            ) from exc
        finally:
            report.duration = time.monotonic() - started
    return report


__all__ = ["FAULTS", "SoakFailure", "SoakReport", "SoakSettings", "run_soak"]

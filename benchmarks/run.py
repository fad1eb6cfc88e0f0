#!/usr/bin/env python3
"""dstfuse benchmark: fio through a loop device on a dstfuse storage file,
against the same fio job on `nbdkit file` + `nbdfuse` (the C peer doing the
same job) in the same run, both over TCP loopback (DESIGN.md section 9).

It owns the whole life of what it measures: it makes the backing files (one
size, one backing file system), starts the export nodes and the NBD server,
mounts, attaches loop devices with `losetup --direct-io=on`, fills every
device with one write pass, runs the fio jobs in `benchmarks/jobs/` on every
peer in turn, samples the dstfuse client daemon's RSS and every server's CPU
time, and prints each figure with the ratio dstfuse / nbdfuse (higher is
better). With `--mirror` and `--key` it also compares a two-node mirror and
an encrypted (aes-256-gcm) storage against the plain single-node storage.

Invariants:
- every mount, loop device, process and file it creates is registered for
  tear-down the moment it exists, and torn down in reverse order in a
  `finally`, whatever failed (Ctrl-C and SIGTERM included); each tear-down
  step is bounded in time and a failed one never stops the others;
- it never touches a mount, loop device or process it did not create: loop
  devices are found by `--show`, processes are killed by the pid we started
  (or the pid the mount published), never by name;
- the run is bounded: the planned time and the hard limit are printed before
  anything starts, and no step may run past the limit (fio is killed; the
  tear-down still runs);
- nothing in this process touches a FUSE mount except through a probe with
  a timeout, so a hung daemon cannot hang the benchmark.

It must never be imported by dstfuse itself, and never edits the tree.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB_DIR = HERE / "jobs"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: The dstfuse client daemon's RSS must stay under this during the QD32 runs.
RSS_FLOOR = 200 * MiB
#: Encrypted sequential writes may be at most this much slower than plain ones.
KEY_SLOWDOWN_TARGET = 0.15
#: Ratios against the C peer below this are pointed out for profiling.
PROFILE_BELOW = 0.3

#: Cores of load that is not ours above which a figure is marked disturbed.
IDLE_LOAD = 0.25

STORAGE_NAME = "bench"
RSS_INTERVAL = 0.2
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_T = TypeVar("_T")


class BenchmarkError(Exception):
    """A step failed in a way that stops this peer or the run; one line."""


class DeadlineExceeded(BenchmarkError):
    """The run reached its hard time limit."""


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C so that the tear-down runs."""


# ------------------------------------------------------------------ time


class Deadline:
    """The run's hard limit. Every wait asks `timeout(cap)` for how long it
    may take; past the limit that raises DeadlineExceeded."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, cap: float) -> float:
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"hard time limit of {_duration(self.seconds)} reached")
        return max(0.1, min(cap, left))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


# ------------------------------------------------------------ processes


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    argv: list[str], timeout: float, *, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (killed after `timeout` seconds);
    with `check`, a failure raises BenchmarkError quoting its stderr."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    except FileNotFoundError:
        raise BenchmarkError(f"{argv[0]}: not installed") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # In uninterruptible sleep (a hung mount under losetup, say):
            # waiting for it would hang the tear-down too.
            _log(f"{argv[0]} (pid {proc.pid}) does not die; leaving it")
        raise BenchmarkError(f"{' '.join(argv)}: no answer after {timeout:.0f} s") from None
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BenchmarkError(
            f"{' '.join(argv)} failed ({result.returncode}): {detail[-1] if detail else ''}"
        )
    return result


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the benchmark dies (even by
    SIGKILL), so no export node outlives it. PR_SET_PDEATHSIG = 1."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class Process:
    """A long-running child (export node, nbdkit, nbdfuse) with its output in
    a log file; `stop` ends it by pid: SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: Ctrl-C reaches the benchmark only, which
                # then unmounts before it stops the servers.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {self.name}: {line}" for line in text[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            _log(f"{self.name} (pid {self.pid}) ignored SIGTERM; killing it")
            self.popen.kill()
            self.popen.wait(10)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_pid(name: str, pid: int, grace: float = 10.0) -> None:
    """End a process that is not our child (the daemon a mount left behind)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end and _pid_alive(pid):
            time.sleep(0.1)
    if _pid_alive(pid):
        raise BenchmarkError(f"{name} (pid {pid}) survived SIGKILL")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    """Whether something listens on TCP `port`, from /proc/net (no connect,
    so the server sees no half-open handshake)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_until(what: str, ready: Callable[[], bool], timeout: float, proc: Process | None) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc is not None and not proc.alive():
            raise BenchmarkError(f"{proc.name} exited while {what}\n{proc.log_tail()}")
        if time.monotonic() > end:
            tail = f"\n{proc.log_tail()}" if proc is not None else ""
            raise BenchmarkError(f"timed out after {timeout:.0f} s {what}{tail}")
        time.sleep(0.1)


def probe(what: str, call: Callable[[], _T], timeout: float = 10.0) -> _T:
    """Run `call` (which touches a FUSE mount) in a thread; a mount that does
    not answer within `timeout` raises BenchmarkError instead of hanging us."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"probe {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BenchmarkError(f"{what}: the mount did not answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------- mounts


def _unescape_mount_path(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def mount_device(mountpoint: Path) -> str | None:
    """The "major:minor" of the file system mounted at `mountpoint`, from
    /proc/self/mountinfo (which does not touch the mount), or None."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if _unescape_mount_path(fields[4]) == str(mountpoint):
            found = fields[2]
    return found


def is_mounted(mountpoint: Path) -> bool:
    return mount_device(mountpoint) is not None


def unmount_fuse(mountpoint: Path, first: list[list[str]], timeout: float = 60.0) -> None:
    """Unmount a FUSE mount we made: the commands in `first` (e.g. `dstfuse
    umount`), then `fusermount3 -u`, then `umount -l`; if the mount is still
    there after all of them, abort its FUSE connection."""
    attempts = [*first, ["fusermount3", "-u", str(mountpoint)], ["umount", "-l", str(mountpoint)]]
    for argv in attempts:
        if not is_mounted(mountpoint):
            return
        try:
            result = run(argv, timeout, check=False)
        except BenchmarkError as exc:
            _log(f"unmount {mountpoint}: {exc}")
            continue
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            _log(f"unmount {mountpoint}: {argv[0]} failed: {detail[-1] if detail else ''}")
    device = mount_device(mountpoint)
    if device is not None:
        abort_fuse_connection(mountpoint, device)
        raise BenchmarkError(f"{mountpoint} is still mounted")


def abort_fuse_connection(mountpoint: Path, device: str) -> None:
    major, minor = (int(part) for part in device.split(":"))
    abort = Path(f"/sys/fs/fuse/connections/{os.makedev(major, minor)}/abort")
    if abort.exists():
        _log(f"aborting the FUSE connection of {mountpoint}")
        with contextlib.suppress(OSError):
            abort.write_text("1")


# ----------------------------------------------------------- tear-down


class Teardown:
    """Undo steps, run last-registered-first. A step that fails is reported
    and the others still run; `run_all` is idempotent."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def add(self, what: str, step: Callable[[], None]) -> None:
        self._steps.append((what, step))

    def run_all(self) -> bool:
        clean = True
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except BaseException as exc:  # keep tearing down whatever happened
                clean = False
                _log(f"tear-down: {what}: {exc}")
        return clean


# ---------------------------------------------------------- loop device


class LoopDevice:
    """`losetup --direct-io=on --find --show FILE`; `detach` is idempotent and
    checks sysfs (never the backing file, which may be on a hung mount)."""

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        result = run(["losetup", "--direct-io=on", "--find", "--show", str(backing)], 60)
        self.path = result.stdout.strip()
        if not re.fullmatch(r"/dev/loop\d+", self.path):
            raise BenchmarkError(f"losetup printed {self.path!r}, not a loop device")
        self._sys = Path("/sys/block") / Path(self.path).name

    @property
    def attached(self) -> bool:
        return (self._sys / "loop" / "backing_file").exists()

    @property
    def direct_io(self) -> bool:
        try:
            return (self._sys / "loop" / "dio").read_text().strip() == "1"
        except OSError:
            return False

    @property
    def size(self) -> int:
        return int((self._sys / "size").read_text()) * 512

    def detach(self) -> None:
        for _ in range(10):
            if not self.attached:
                return
            result = run(["losetup", "-d", self.path], 30, check=False)
            if result.returncode == 0:
                # LOOP_CLR_FD on a device still open elsewhere only sets
                # autoclear; wait for it to go.
                end = time.monotonic() + 5
                while self.attached and time.monotonic() < end:
                    time.sleep(0.1)
            if self.attached:
                time.sleep(1)
        if self.attached:
            raise BenchmarkError(f"{self.path} is still attached to {self.backing}")


# ------------------------------------------------------------- sampling


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is state (field 3); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class LoadSnapshot:
    """The machine's CPU time (/proc/stat) and every process's, at one time,
    to tell how much of the machine was ours during a job and how much went
    to other people's work (this box is shared: tests, builds)."""

    stat: tuple[int, ...]
    tasks: dict[int, tuple[int, float]]  # pid -> (ppid, CPU seconds)

    @classmethod
    def take(cls) -> LoadSnapshot:
        with open("/proc/stat") as file:
            stat = tuple(int(value) for value in file.readline().split()[1:])
        tasks: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            tasks[int(entry.name)] = (
                int(fields[1]),
                (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
            )
        return cls(stat, tasks)


def load_between(before: LoadSnapshot, after: LoadSnapshot, roots: set[int]) -> dict[str, float]:
    """CPU seconds between two snapshots: `busy` (the whole machine), `ours`
    (`roots` and their descendants), `kernel` (kernel threads: loop and
    FUSE workers, softirq threads) and `other` (everything else: load that
    is not the benchmark's)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in after.tasks.items():
        children.setdefault(ppid, []).append(pid)
    ours: set[int] = set()
    pending = [pid for pid in roots if pid in after.tasks]
    while pending:
        pid = pending.pop()
        if pid not in ours:
            ours.add(pid)
            pending.extend(children.get(pid, ()))
    used = {"ours": 0.0, "kernel": 0.0}
    for pid, (ppid, seconds) in after.tasks.items():
        spent = seconds - before.tasks.get(pid, (0, 0.0))[1]
        if pid in ours:
            used["ours"] += spent
        elif pid == 2 or ppid == 2:
            used["kernel"] += spent
    delta = [b - a for a, b in zip(before.stat, after.stat, strict=False)]
    # user nice system idle iowait irq softirq steal ...
    in_tasks = sum(delta[0:3]) / _CLOCK_TICKS
    busy = (sum(delta[0:3]) + sum(delta[5:8])) / _CLOCK_TICKS
    return {
        "busy": busy,
        "ours": used["ours"],
        "kernel": used["kernel"],
        "other": max(0.0, in_tasks - used["ours"] - used["kernel"]),
    }


def machine_load(seconds: float) -> dict[str, float]:
    """Cores busy on the machine over the next `seconds` (nothing of ours
    running yet, so `other` is other people's load)."""
    before = LoadSnapshot.take()
    time.sleep(seconds)
    after = LoadSnapshot.take()
    return {
        key: value / seconds for key, value in load_between(before, after, {os.getpid()}).items()
    }


class RssSampler:
    """Peak VmRSS of a set of pids, sampled every RSS_INTERVAL seconds in a
    thread while the `with` block runs (and once at each end)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss sampler", daemon=True)

    def _sample(self) -> None:
        for role, pid in self.pids.items():
            value = rss_bytes(pid)
            if value is not None and value > self.peak.get(role, 0):
                self.peak[role] = value

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------- peers


@dataclass
class Tools:
    python: str
    env: dict[str, str]
    workdir: Path
    logdir: Path
    deadline: Deadline
    teardown: Teardown
    nbd_connections: int | None
    #: Pids whose process trees are the benchmark's (for the load figures).
    own_pids: set[int] = field(default_factory=lambda: {os.getpid()})

    def dstfuse(self, *args: str) -> list[str]:
        return [self.python, "-m", "dstfuse", *args]


class Peer:
    """One stack under test: something that presents `size` bytes of a
    backing file as a file the loop device is attached to. `roles` maps
    "client"/"server..." to the pids whose CPU time and RSS we watch."""

    kind = "peer"

    def __init__(self, label: str, tools: Tools, size: int) -> None:
        self.label = label
        self.tools = tools
        self.size = size
        self.dir = tools.workdir / label
        self.dir.mkdir()
        self.roles: dict[str, int] = {}
        self.loop: LoopDevice | None = None
        self.direct_io: bool | None = None
        self.notes: list[str] = []

    def backing_file(self, name: str) -> Path:
        """A sparse file of `size` bytes in this peer's directory."""
        path = self.dir / name
        with open(path, "wb") as file:
            file.truncate(self.size)
        return path

    def start_process(self, name: str, argv: list[str]) -> Process:
        proc = Process(
            f"{self.label} {name}",
            argv,
            self.tools.logdir / f"{self.label}-{name}.log",
            self.tools.env,
        )
        self.tools.teardown.add(f"stop {proc.name} (pid {proc.pid})", proc.stop)
        return proc

    def start(self) -> Path:
        """Bring the stack up; return the file to attach (on the mount)."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait until the stack is steady (a mirror's resync done), before
        and after the fill pass; default: nothing to wait for."""

    def counters(self) -> dict[str, dict[str, int]]:
        """Per node of the storage, its I/O counters now; {} when the stack
        has none to show."""
        return {}

    def attach(self) -> LoopDevice:
        # Runs after the unmount and the process stops: a loop device that
        # was busy before them is free after them.
        self.tools.teardown.add(f"detach the loop device of {self.label}", self._detach_again)
        target = self.start()
        size = probe(f"stat {target}", lambda: target.stat().st_size, 30)
        if size <= 0:
            raise BenchmarkError(f"{target} is empty")
        loop = LoopDevice(target)
        self.tools.teardown.add(f"detach {loop.path} ({self.label})", loop.detach)
        self.loop = loop
        self.direct_io = loop.direct_io
        self.tools.own_pids.update(self.roles.values())
        if not self.direct_io:
            self.notes.append(f"{loop.path}: losetup could not enable direct I/O")
        return loop

    def _detach_again(self) -> None:
        if self.loop is not None:
            self.loop.detach()


class NbdfusePeer(Peer):
    """`nbdkit file FILE` on a free 127.0.0.1 port and `nbdfuse MNT nbd://...`
    on it: the file is MNT/nbd."""

    kind = "nbdfuse"

    def start(self) -> Path:
        backing = self.backing_file("backing.img")
        port = free_port()
        nbdkit_pid = self.dir / "nbdkit.pid"
        nbdkit = self.start_process(
            "nbdkit",
            [
                "nbdkit",
                "--foreground",
                "--exit-with-parent",
                "--pidfile",
                str(nbdkit_pid),
                "--port",
                str(port),
                "--ipaddr",
                "127.0.0.1",
                "file",
                str(backing),
            ],
        )
        wait_until("starting nbdkit", nbdkit_pid.exists, 30, nbdkit)
        self.roles["server"] = nbdkit.pid

        mountpoint = self.dir / "mnt"
        mountpoint.mkdir()
        fuse_pid = self.dir / "nbdfuse.pid"
        argv = ["nbdfuse", "--pidfile", str(fuse_pid)]
        if self.tools.nbd_connections is not None:
            argv += ["--connections", str(self.tools.nbd_connections)]
        argv += [str(mountpoint), f"nbd://127.0.0.1:{port}"]
        nbdfuse = self.start_process("nbdfuse", argv)
        # Registered after the process, so it runs before the process stop:
        # nbdfuse exits by itself once unmounted.
        self.tools.teardown.add(f"unmount {mountpoint}", lambda: unmount_fuse(mountpoint, []))
        wait_until("mounting nbdfuse", fuse_pid.exists, 30, nbdfuse)
        wait_until("mounting nbdfuse", lambda: is_mounted(mountpoint), 10, nbdfuse)
        self.roles["client"] = nbdfuse.pid
        return mountpoint / "nbd"


class DstfusePeer(Peer):
    """`dstfuse export` per leg on free 127.0.0.1 ports, a storage.yaml with
    one storage (`linear` over one remote node, or `mirror` over several),
    `dstfuse mount`; the file is MNT/bench. With `key`, both sides use a
    fresh `dstfuse keygen` key and aes-256-gcm."""

    kind = "dstfuse"

    def __init__(self, label: str, tools: Tools, size: int, *, legs: int = 1, key: bool = False):
        super().__init__(label, tools, size)
        self.legs = legs
        self.key = key
        self.mountpoint = self.dir / "mnt"

    def start(self) -> Path:
        tools = self.tools
        key_file = None
        if self.key:
            key_file = self.dir / "bench.key"
            run(tools.dstfuse("keygen", "-o", str(key_file)), 60)
        nodes = []
        for leg in range(self.legs):
            backing = self.backing_file(f"leg{leg}.img")
            port = free_port()
            argv = tools.dstfuse("export", str(backing), "--listen", f"127.0.0.1:{port}")
            if key_file is not None:
                argv += ["--key-file", str(key_file)]
            export = self.start_process(f"export{leg}", argv)
            wait_until(
                f"starting dstfuse export {leg}", functools.partial(_listening, port), 60, export
            )
            self.roles[f"server{leg}" if self.legs > 1 else "server"] = export.pid
            nodes.append(f"      - remote: 127.0.0.1:{port}")

        config = self.dir / "storage.yaml"
        lines = []
        if key_file is not None:
            lines += [f"key_file: {key_file}", "cipher: aes-256-gcm"]
        lines += [
            "storages:",
            f"  {STORAGE_NAME}:",
            f"    algorithm: {'mirror' if self.legs > 1 else 'linear'}",
            "    nodes:",
            *nodes,
        ]
        config.write_text("\n".join(lines) + "\n")

        mountpoint = self.mountpoint
        mountpoint.mkdir()
        self.tools.teardown.add(f"unmount {mountpoint}", self._unmount)
        mount_log = tools.logdir / f"{self.label}-mount.log"
        with open(mount_log, "ab") as log_file:
            try:
                # Its own session, like the servers: Ctrl-C must not reach
                # the daemon before the loop device is detached.
                result = subprocess.run(
                    tools.dstfuse("mount", str(config), str(mountpoint)),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=tools.env,
                    timeout=tools.deadline.timeout(120),
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired:
                raise BenchmarkError("dstfuse mount did not return within 120 s") from None
        if result.returncode != 0 or not is_mounted(mountpoint):
            tail = mount_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BenchmarkError(f"dstfuse mount failed ({result.returncode}): " + " | ".join(tail))
        self.roles["client"] = self._find_daemon()
        return mountpoint / STORAGE_NAME

    def _find_daemon(self) -> int:
        """The mount daemon's pid: MOUNTPOINT/.dst/.daemon, else the process
        whose command line names our mount point and that holds /dev/fuse."""
        published = self.mountpoint / ".dst" / ".daemon"
        try:
            text = probe(f"read {published}", published.read_text, 10)
            match = re.search(r"\d+", text)
            if match and _pid_alive(int(match.group())):
                return int(match.group())
        except (OSError, BenchmarkError):
            pass
        pid = self._scan_for_daemon()
        if pid is None:
            raise BenchmarkError(f"cannot find the daemon serving {self.mountpoint}")
        self.notes.append(f"daemon pid {pid} found in /proc (no .dst/.daemon)")
        return pid

    def _scan_for_daemon(self) -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if str(self.mountpoint).encode() not in argv:
                    continue
                fds = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            except OSError:
                continue
            if "/dev/fuse" in fds:
                return int(entry.name)
        return None

    def _unmount(self) -> None:
        # A mount that failed or timed out may still have left a daemon.
        daemon = self.roles.get("client") or self._scan_for_daemon()
        try:
            unmount_fuse(self.mountpoint, [self.tools.dstfuse("umount", str(self.mountpoint))], 120)
        finally:
            if daemon is not None and _pid_alive(daemon):
                # Unmounted (or not) but still running: it is ours to end.
                _kill_pid(f"{self.label} daemon", daemon, grace=20)
            self._collect_runtime_files()

    def _collect_runtime_files(self) -> None:
        """Move the daemon's log and result file (`dstfuse mount` keeps them
        in /run/dstfuse, named after the escaped mount point) into our logs,
        so they are kept with --keep-logs and do not pile up in /run."""
        if is_mounted(self.mountpoint):
            return
        # The mount point is unique through the temporary directory's random
        # suffix; '-' is escaped as \x2d in the file names.
        token = self.tools.workdir.name.rsplit("-", 1)[-1]
        ending = "-" + self.label.replace("-", "\\x2d") + "-mnt"
        places = {Path("/run/dstfuse"), Path(os.environ.get("XDG_RUNTIME_DIR", "/run")) / "dstfuse"}
        for place in places:
            for path in place.glob(f"*{token}*"):
                if path.is_file() and path.stem.endswith(ending):
                    shutil.move(path, self.tools.logdir / f"{self.label}-daemon{path.suffix}")

    COUNTERS = ("requests", "bytes_read", "bytes_written", "resends", "reconnects", "errors")

    def counters(self) -> dict[str, dict[str, int]]:
        """The counters of every node directory in the control tree
        (MOUNTPOINT/.dst/bench/n-*/), read through a probe."""
        storage_dir = self.mountpoint / ".dst" / STORAGE_NAME

        def read_all() -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {}
            for node_dir in sorted(storage_dir.glob("n-*")):
                values = {}
                for name in self.COUNTERS:
                    with contextlib.suppress(OSError, ValueError):
                        values[name] = int((node_dir / name).read_text().split()[0])
                found[node_dir.name] = values
            return found

        try:
            return probe(f"read {storage_dir}", read_all, 10)
        except (OSError, BenchmarkError) as exc:
            if not any("control tree" in note for note in self.notes):
                self.notes.append(f"cannot read node counters from the control tree: {exc}")
            return {}

    def status(self) -> dict[str, Any] | None:
        result = run(self.tools.dstfuse("status", "--json", str(self.mountpoint)), 30, check=False)
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            return None

    def settle(self) -> None:
        if self.legs < 2:
            return
        end = time.monotonic() + self.tools.deadline.timeout(600)
        state = None
        while time.monotonic() < end:
            status = self.status()
            if status is None:
                self.notes.append("dstfuse status --json failed; mirror state unknown")
                return
            state = status.get("storages", {}).get(STORAGE_NAME, {}).get("state")
            if state == "clean":
                return
            time.sleep(1)
        self.notes.append(f"mirror not clean before the measured jobs (state {state})")


# ------------------------------------------------------------------ fio


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    direction: str  # "read" | "write": which side of fio's JSON holds it
    metric: str  # "bw" | "iops"

    @property
    def file(self) -> Path:
        return JOB_DIR / f"{self.name}.fio"


JOBS: tuple[Job, ...] = (
    Job("seq-write", "seq write 1 MiB QD4", "write", "bw"),
    Job("seq-read", "seq read 1 MiB QD4", "read", "bw"),
    Job("rand-write-qd1", "rand write 4 KiB QD1", "write", "iops"),
    Job("rand-read-qd1", "rand read 4 KiB QD1", "read", "iops"),
    Job("rand-write-qd32", "rand write 4 KiB QD32", "write", "iops"),
    Job("rand-read-qd32", "rand read 4 KiB QD32", "read", "iops"),
)
FILL = Job("fill", "fill pass (seq write 1 MiB QD4)", "write", "bw")
KEY_JOBS = ("seq-write", "seq-read")
#: Without these there is nothing to compare; the --mirror/--key peers are optional.
REQUIRED_PEERS = ("nbdfuse", "dstfuse", "nbdfuse-b")


@dataclass
class Result:
    peer: str
    job: str
    bw_bytes: float
    iops: float
    lat_mean_ns: float
    lat_p99_ns: float
    io_bytes: int
    seconds: float
    cpu_cores: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    fio_cpu: float = 0.0
    round: int = 0
    #: Per storage node, how much its counters grew during the job.
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Seconds fio ran, ramp included (the counters' and CPU figures' span).
    wall: float = 0.0
    #: Cores busy during the job: whole machine, ours, kernel threads, other.
    load: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        return self.bw_bytes if metric == "bw" else self.iops

    @property
    def quiet(self) -> bool:
        """Whether other people's work stayed under IDLE_LOAD cores."""
        return self.load.get("other", 0.0) <= IDLE_LOAD


Pair = tuple[Result, Result]


class Results:
    """Every measurement by (peer, job), one per round, in the order taken.
    Figures are quoted as the median over the quiet rounds (other load under
    IDLE_LOAD), or over all rounds when none was quiet; `round_ratios` pairs
    the rounds of two peers, which ran back to back under the same
    conditions (quiet pairs preferred in the same way)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], list[Result]] = {}

    def add(self, result: Result) -> None:
        self._runs.setdefault((result.peer, result.job), []).append(result)

    def runs(self, peer: str, job: str) -> list[Result]:
        return self._runs.get((peer, job), [])

    def all(self) -> list[Result]:
        return [result for runs in self._runs.values() for result in runs]

    def median(self, peer: str, job: str, metric: str = "bw") -> Result | None:
        """The run with the median figure (the lower one of an even count)
        among the quiet runs, or among all runs when none was quiet."""
        runs = self.runs(peer, job)
        pool = sorted([r for r in runs if r.quiet] or runs, key=lambda r: r.value(metric))
        return pool[(len(pool) - 1) // 2] if pool else None

    def pairs(self, subject: str, baseline: str, job: Job) -> tuple[list[Pair], bool]:
        """The rounds in which both peers ran `job`, as (subject, baseline)
        pairs: the quiet pairs if there are any (then True), else all."""
        theirs = {result.round: result for result in self.runs(baseline, job.name)}
        pairs = [
            (mine, theirs[mine.round])
            for mine in self.runs(subject, job.name)
            if mine.round in theirs and theirs[mine.round].value(job.metric) > 0
        ]
        quiet = [(a, b) for a, b in pairs if a.quiet and b.quiet]
        return (quiet, True) if quiet else (pairs, False)


def run_fio(
    job: Job,
    peer: Peer,
    *,
    size: int,
    runtime: float,
    ramp: float,
    tools: Tools,
    round_number: int = 0,
    tag: str = "",
) -> Result:
    """Run one fio job on `peer`'s loop device and measure around it."""
    assert peer.loop is not None
    suffix = f"-r{round_number}" if round_number else ""
    out = tools.logdir / f"{peer.label}-{job.name}{tag}{suffix}.json"
    # Never read a report an earlier run of the same job left.
    out.unlink(missing_ok=True)
    env = dict(
        tools.env,
        DEVICE=peer.loop.path,
        SIZE=str(size),
        RUNTIME=str(int(runtime)),
        RAMP=str(int(ramp)),
    )
    argv = ["fio", "--output-format=json", f"--output={out}", str(job.file)]
    counters_before = peer.counters()
    before = {role: cpu_seconds(pid) for role, pid in peer.roles.items()}
    machine_before = LoadSnapshot.take()
    started = time.monotonic()
    with RssSampler(peer.roles) as rss:
        try:
            result = run(argv, tools.deadline.timeout(ramp + runtime + 60), check=False, env=env)
        except BenchmarkError:
            # fio killed at the hard limit is the limit, not a broken peer.
            tools.deadline.timeout(0)
            raise
    elapsed = time.monotonic() - started
    after = {role: cpu_seconds(pid) for role, pid in peer.roles.items()}
    machine = load_between(machine_before, LoadSnapshot.take(), tools.own_pids)
    counters_after = peer.counters()
    nodes = {
        node: {
            name: value - counters_before[node].get(name, 0)
            for name, value in values.items()
            if name in counters_before.get(node, {})
        }
        for node, values in counters_after.items()
        if node in counters_before
    }
    try:
        report = json.loads(out.read_text())
        stats = report["jobs"][0]
        side = stats[job.direction]
    except (OSError, ValueError, KeyError, IndexError):
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BenchmarkError(
            f"fio {job.name} on {peer.label} gave no report ({result.returncode}): "
            + (detail[-1] if detail else "")
        ) from None
    if result.returncode != 0 or stats.get("error"):
        raise BenchmarkError(
            f"fio {job.name} on {peer.label} failed: error {stats.get('error')} "
            f"({os.strerror(stats['error']) if stats.get('error') else result.returncode})"
        )
    clat = side.get("clat_ns", {})
    percentiles = clat.get("percentile", {})
    cores = {}
    for role in peer.roles:
        start, end = before.get(role), after.get(role)
        if start is not None and end is not None:
            cores[role] = (end - start) / elapsed
    return Result(
        peer=peer.label,
        job=job.name,
        bw_bytes=float(side["bw_bytes"]),
        iops=float(side["iops"]),
        lat_mean_ns=float(side.get("lat_ns", clat).get("mean", 0.0)),
        lat_p99_ns=float(percentiles.get("99.000000", 0.0)),
        io_bytes=int(side["io_bytes"]),
        seconds=stats.get("job_runtime", 0) / 1000,
        cpu_cores=cores,
        peak_rss=dict(rss.peak),
        fio_cpu=(float(stats.get("usr_cpu", 0)) + float(stats.get("sys_cpu", 0))) / 100,
        load={key: value / elapsed for key, value in machine.items()},
        nodes=nodes,
        wall=elapsed,
        round=round_number,
    )


# ------------------------------------------------------------ profiling


def find_py_spy(python: str) -> str | None:
    beside = Path(python).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def summarize_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw
    (collapsed stack) output: lines of `frame;frame;... count`."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text(errors="replace").splitlines()
    except OSError:
        return {
            "samples": 0,
            "main": 0,
            "worker": 0,
            "self": [],
            "inclusive": [],
            "dstfuse": [],
            "layers": [],
        }
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        # Worker threads start in threading's bootstrap; the rest is the
        # main thread, which runs the trio loop.
        threads["worker" if frames[0].startswith("Thread._bootstrap") else "main"] += count
        total += count
        own[frames[-1]] += count
        layers[_layer(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * n / total) for name, n in counter.most_common(top)] if total else []

    # Inclusive shares of the project's own functions (the outer frames
    # every sample has, like main and trio.run, say nothing).
    ours = Counter(
        {
            name: n
            for name, n in inclusive.items()
            if "(dstfuse/" in name and n < 0.8 * total and not name.endswith(_OUTER_FRAMES)
        }
    )
    return {
        "samples": total,
        "main": threads["main"],
        "worker": threads["worker"],
        "self": share(own),
        "inclusive": share(inclusive),
        "dstfuse": share(ours),
        "layers": share(layers),
    }


def _layer(frame: str) -> str:
    """Which layer a (shortened) frame belongs to, for the by-layer split of
    the own samples."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if name.startswith("EpollIOManager.") and ("get_events" in name or "_epoll_wait" in name):
        return "epoll (incl. waiting)"
    if where in ("trio/_socket.py", "trio/_highlevel_socket.py"):
        return "socket calls"
    if (
        where.startswith(("trio/_core/_thread_cache", "trio/_threads", "trio/_core/_entry_queue"))
        or "WakeupSocketpair" in name
    ):
        return "thread handoff"
    if where.startswith("trio/"):
        return "trio scheduler"
    if "pyfuse3" in where:
        return "pyfuse3 (/dev/fuse)"
    if where.startswith("dstfuse/protocol/"):
        return "dstfuse protocol"
    if where.startswith("dstfuse/"):
        return "dstfuse other"
    return "stdlib and other"


#: Frames that only start the program (`main`, a command's `run`): every
#: complete stack has them, so their inclusive share says nothing.
_OUTER_FRAMES = (
    "(dstfuse/__main__.py)",
    "(dstfuse/cli.py)",
    "(dstfuse/daemon.py)",
    "(dstfuse/commands/export.py)",
    "(dstfuse/commands/mount.py)",
)


def _short_frame(frame: str) -> str:
    """`func (/long/path/pkg/mod.py:123)` -> `func (pkg/mod.py)`: lines
    differ per call site, and aggregation wants one row per function."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if not match:
        return frame.strip()
    name, path = match.groups()
    parts = Path(path).parts
    for anchor in ("dstfuse", "trio", "pyfuse3", "cryptography", "xxhash"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{name} ({'/'.join(parts[index:])})"
    return f"{name} ({'/'.join(parts[-2:])})"


def profile_job(
    job: Job,
    peer: Peer,
    *,
    size: int,
    runtime: float,
    ramp: float,
    tools: Tools,
    py_spy: str,
    outdir: Path,
) -> dict[str, Any]:
    """Run `job` once more on `peer` with py-spy recording every Python role
    (client daemon, export nodes); return the result and the summaries."""
    recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    rate = 100
    duration = int(ramp + runtime)
    for role, pid in peer.roles.items():
        raw = outdir / f"{peer.label}-{job.name}-{role}.txt"
        argv = [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(raw),
        ]
        log_file = open(tools.logdir / f"py-spy-{peer.label}-{job.name}-{role}.log", "wb")
        with log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        tools.teardown.add(f"stop py-spy {role}", functools.partial(_stop_popen, proc))
        recorders[role] = (proc, raw)
    try:
        result = run_fio(
            job, peer, size=size, runtime=runtime, ramp=ramp, tools=tools, tag="-profiled"
        )
    finally:
        for proc, _ in recorders.values():
            try:
                proc.wait(tools.deadline.timeout(30))
            except subprocess.TimeoutExpired:
                _stop_popen(proc)
    summaries = {}
    for role, (_, raw) in recorders.items():
        summary = summarize_profile(raw)
        # Share of the run the main thread (the trio loop) was seen running:
        # near 100% means the event loop is the bottleneck.
        summary["main_active"] = summary["main"] / (rate * duration) if duration else 0.0
        summaries[role] = summary
    return {"result": result, "profiles": summaries}


def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ------------------------------------------------------------ reporting


def _figure(value: float, metric: str) -> str:
    if metric == "bw":
        return f"{value / MiB:8.1f} MiB/s"
    return f"{value:8.0f} IOPS "


def _latency(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.0f} us"


def comparison_table(
    title: str,
    subject: str,
    baseline: str,
    results: Results,
    jobs: tuple[Job, ...],
) -> list[str]:
    """One row per job. With several rounds, the rounds quoted are those in
    which neither peer was disturbed (all rounds when there is none: the
    ratio gets a '*'); figures and latencies are the median round of each
    peer among them, the ratio is the median of the per-round ratios, and
    `rounds` shows how many rounds were used and the ratio's range."""
    rounds = max((len(results.runs(subject, job.name)) for job in jobs), default=0)
    spread = rounds > 1
    lines = [
        title,
        f"  {'job':<24} {subject:>15} {baseline:>15} {'ratio':>7} "
        + (" rounds  range       " if spread else "")
        + f"  {'lat mean / p99 (' + subject + ')':<28} lat mean / p99 ({baseline})",
    ]
    starred = False
    slow: list[str] = []
    for job in jobs:
        pairs, quiet = results.pairs(subject, baseline, job)
        if not pairs:
            continue
        mine = _median_by(job, [pair[0] for pair in pairs])
        theirs = _median_by(job, [pair[1] for pair in pairs])
        ratios = sorted(a.value(job.metric) / b.value(job.metric) for a, b in pairs)
        middle = len(ratios) // 2
        ratio = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
        cells = f"{_figure(mine.value(job.metric), job.metric)} "
        cells += f"{_figure(theirs.value(job.metric), job.metric)} {ratio:6.2f}x"
        cells += " " if quiet else "*"
        if spread:
            cells += f" {len(pairs)}/{rounds:<5} {ratios[0]:4.2f}-{ratios[-1]:4.2f}x"
        lat = [f"{_latency(r.lat_mean_ns)} / {_latency(r.lat_p99_ns)}" for r in (mine, theirs)]
        lines.append(f"  {job.title:<24} {cells}  {lat[0]:<28} {lat[1]}")
        starred = starred or not quiet
        if baseline == "nbdfuse" and ratio < PROFILE_BELOW:
            slow.append(job.name)
    if starred:
        lines.append(
            f"  * every round of this job had more than {IDLE_LOAD:.2f} cores of other load "
            "(see the notes)"
        )
    if slow:
        lines.append(
            f"  below {PROFILE_BELOW:.1f}x: {', '.join(slow)} (see where the time goes with "
            "--profile DIR)"
        )
    return lines


def node_table(results: Results, peers: list[Peer]) -> list[str]:
    """What each storage node saw per job (the median round): requests per
    second, average request size, resends and errors."""
    lines: list[str] = []
    for peer in peers:
        for job in (FILL, *JOBS):
            result = results.median(peer.label, job.name, job.metric)
            if result is None or not result.nodes or not result.wall:
                continue
            if not lines:
                lines.append(
                    "storage nodes (control tree counters over each job, ramp included; "
                    "the median round)"
                )
            cells = []
            for node, counters in result.nodes.items():
                requests = counters.get("requests", 0)
                moved = counters.get("bytes_read", 0) + counters.get("bytes_written", 0)
                size = f"{moved / requests / KiB:.0f} KiB" if requests else "-"
                cells.append(
                    f"{node} {requests / result.wall:6.0f} req/s of {size:>8}, "
                    f"{counters.get('resends', 0)} resends, {counters.get('errors', 0)} errors"
                )
            lines.append(f"  {peer.label:<15} {job.title:<32} " + "; ".join(cells))
    return lines


def _median_by(job: Job, runs: list[Result]) -> Result:
    ordered = sorted(runs, key=lambda result: result.value(job.metric))
    return ordered[(len(ordered) - 1) // 2]


def cpu_table(results: Results, peers: list[Peer]) -> list[str]:
    lines = [
        f"CPU: cores busy during each job (the machine has {os.cpu_count()}): the whole machine "
        "(kernel threads, other people's work), fio, and per process with its peak RSS "
        "(the median round)"
    ]
    for peer in peers:
        roles = sorted(peer.roles)
        lines.append(
            f"  {peer.label}: " + ", ".join(f"{role} pid {peer.roles[role]}" for role in roles)
        )
        for job in (FILL, *JOBS):
            result = results.median(peer.label, job.name, job.metric)
            if result is None:
                continue
            cells = "  ".join(
                f"{role} {result.cpu_cores.get(role, 0):4.2f} / "
                f"{result.peak_rss.get(role, 0) / MiB:5.0f} MiB"
                for role in roles
            )
            load = result.load
            lines.append(
                f"    {job.title:<32} machine {load.get('busy', 0):4.2f} (kernel "
                f"{load.get('kernel', 0):4.2f}, other {load.get('other', 0):4.2f})  "
                f"fio {result.fio_cpu:4.2f}  {cells}"
            )
    return lines


# ------------------------------------------------------------------ main


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 512M, 1G)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="fio on a dstfuse storage vs nbdkit file + nbdfuse, both over TCP loopback, "
        "through losetup --direct-io=on. Needs root."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 256 MiB files, 3 s per job after 1 s of ramp",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="also a mirror of two export nodes against the single node",
    )
    parser.add_argument(
        "--key",
        action="store_true",
        help=f"also an aes-256-gcm storage against the plain one ({', '.join(KEY_JOBS)} only)",
    )
    parser.add_argument("--size", type=parse_size, help="backing file size (default 1G)")
    parser.add_argument("--runtime", type=int, help="measured seconds per job (default 20)")
    parser.add_argument("--ramp", type=int, help="seconds before measuring (default 2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every job N times (interleaved rounds); quote medians and the ratio range",
    )
    parser.add_argument(
        "--jobs",
        help="comma-separated job names (default: all): " + ", ".join(job.name for job in JOBS),
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the backing files go, one file system for all peers (default /var/tmp)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="hard limit in seconds for the whole run (default: planned "
        "time + 50%%, at least + 2 min)",
    )
    parser.add_argument(
        "--fill-cap", type=int, help="longest a fill pass may take, seconds (default 180; quick 60)"
    )
    parser.add_argument(
        "--nbd-connections",
        type=int,
        help="nbdfuse --connections (default: nbdfuse's own, multi-conn 4)",
    )
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="measure the method, no dstfuse needed: a second nbdfuse stack "
        "takes dstfuse's place (ratios should be about 1.00x)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after measuring, run each dstfuse job again under py-spy "
        "(client daemon and export nodes) and keep the raw stacks in DIR",
    )
    parser.add_argument(
        "--profile-peer",
        default="dstfuse",
        metavar="LABEL",
        help="the peer --profile profiles: dstfuse (default), dstfuse-mirror, dstfuse-aes",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results here")
    parser.add_argument(
        "--replay",
        type=Path,
        metavar="FILE",
        help="print the report of a run saved with --json again, and exit",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the processes' logs and fio's JSON reports here",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the machine to be idle (other load under "
        f"{IDLE_LOAD:.2f} cores for 5 s)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="python that runs dstfuse (default: this one)"
    )
    return parser


@dataclass
class Plan:
    size: int
    runtime: int
    ramp: int
    fill_cap: int
    repeat: int
    jobs: tuple[Job, ...]
    peers: list[tuple[str, str, dict[str, Any]]]  # (label, kind, options)
    comparisons: list[tuple[str, str, str, tuple[Job, ...]]]  # title, subject, baseline, jobs

    def jobs_for(self, label: str) -> tuple[Job, ...]:
        if label == "dstfuse-aes":
            return tuple(job for job in self.jobs if job.name in KEY_JOBS)
        return self.jobs

    def estimate(self) -> float:
        per_job = self.ramp + self.runtime + 4
        setup = 20 + 10  # start + tear down, per peer
        total = 0.0
        for label, _, _ in self.peers:
            jobs = len(self.jobs_for(label)) * self.repeat
            total += setup + self.fill_cap / 2 + per_job * jobs
        return total


def make_plan(args: argparse.Namespace) -> Plan:
    size = args.size or (256 * MiB if args.quick else GiB)
    runtime = args.runtime or (3 if args.quick else 20)
    ramp = args.ramp if args.ramp is not None else (1 if args.quick else 2)
    fill_cap = args.fill_cap or (60 if args.quick else 180)
    jobs = JOBS
    if args.jobs:
        wanted = [name.strip() for name in args.jobs.split(",") if name.strip()]
        known = {job.name: job for job in JOBS}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(
                f"run.py: unknown job(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        jobs = tuple(known[name] for name in wanted)
    subject = "nbdfuse-b" if args.self_test else "dstfuse"
    peers: list[tuple[str, str, dict[str, Any]]] = [("nbdfuse", "nbdfuse", {})]
    if args.self_test:
        peers.append((subject, "nbdfuse", {}))
    else:
        peers.append((subject, "dstfuse", {}))
    comparisons: list[tuple[str, str, str, tuple[Job, ...]]] = [
        (
            f"{subject} vs nbdfuse (ratio = {subject} / nbdfuse, higher is better)",
            subject,
            "nbdfuse",
            jobs,
        )
    ]
    if args.mirror and not args.self_test:
        peers.append(("dstfuse-mirror", "dstfuse", {"legs": 2}))
        comparisons.append(
            (
                "two-node mirror vs one node (ratio = mirror / single)",
                "dstfuse-mirror",
                "dstfuse",
                jobs,
            )
        )
        comparisons.append(
            (
                "two-node mirror vs nbdfuse (ratio = mirror / nbdfuse)",
                "dstfuse-mirror",
                "nbdfuse",
                jobs,
            )
        )
    if args.key and not args.self_test:
        peers.append(("dstfuse-aes", "dstfuse", {"key": True}))
        key_jobs = tuple(job for job in jobs if job.name in KEY_JOBS)
        comparisons.append(
            (
                "aes-256-gcm vs plain (ratio = encrypted / plain; "
                f"target: writes at most {KEY_SLOWDOWN_TARGET:.0%} slower)",
                "dstfuse-aes",
                "dstfuse",
                key_jobs,
            )
        )
    if args.repeat < 1:
        raise SystemExit("run.py: --repeat must be at least 1")
    return Plan(size, runtime, ramp, fill_cap, args.repeat, jobs, peers, comparisons)


def check_environment(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("run.py: needs root (losetup, FUSE mounts)")
    tools = ["fio", "losetup", "fusermount3", "umount", "nbdkit", "nbdfuse"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"run.py: not installed: {', '.join(missing)}")
    for job in (FILL, *JOBS):
        if not job.file.exists():
            raise SystemExit(f"run.py: missing job file {job.file}")
    if not args.self_test:
        probe_import = subprocess.run(
            [args.python, "-m", "dstfuse", "mount", "--help"],
            capture_output=True,
            text=True,
            env=_child_env(),
            cwd="/",
            timeout=60,
        )
        if probe_import.returncode != 0:
            last = probe_import.stderr.strip().splitlines()[-1:] or [""]
            raise SystemExit(
                f"run.py: dstfuse mount/export are not usable with {args.python}: "
                f"{last[0]} (try --self-test to check the method alone)"
            )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class PeerRecord:
    """A peer as `--json` saved it: what the report needs to print it again."""

    label: str
    kind: str
    roles: dict[str, int]
    notes: list[str]


def replay(path: Path) -> int:
    """Print the report of a run saved with `--json` again (e.g. after the
    report changed); measures nothing."""
    data = json.loads(path.read_text())
    labels = set(data["peers"])
    known = {job.name for job in JOBS}
    names = {r["job"] for r in data["results"]} & known
    args = build_parser().parse_args(
        [
            "--size", str(data["size"]),
            "--runtime", str(data["runtime"]),
            "--ramp", str(data["ramp"]),
            "--repeat", str(data.get("repeat", 1)),
            "--jobs", ",".join(job.name for job in JOBS if job.name in names),
        ]
        + (["--mirror"] if "dstfuse-mirror" in labels else [])
        + (["--key"] if "dstfuse-aes" in labels else [])
        + (["--self-test"] if "nbdfuse-b" in labels else [])
    )  # fmt: skip
    plan = make_plan(args)
    peers: list[Any] = [
        PeerRecord(label, info["kind"], info["roles"], info["notes"])
        for label, info in data["peers"].items()
    ]
    results = Results()
    for record in data["results"]:
        results.add(Result(**record))
    profiles = {
        name: {"result": Result(**outcome["result"]), "profiles": outcome["profiles"]}
        for name, outcome in data.get("profiles", {}).items()
    }
    before_run = data.get("machine_load_before", {"busy": 0.0})
    report(plan, peers, results, data["failures"], profiles, data.get("elapsed", 0), before_run)
    return 1 if data["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replay:
        return replay(args.replay)
    plan = make_plan(args)
    check_environment(args)
    py_spy = None
    if args.profile:
        py_spy = find_py_spy(args.python)
        if py_spy is None:
            raise SystemExit("run.py: --profile needs py-spy (pip install py-spy into the venv)")

    estimate = plan.estimate()
    if py_spy:
        estimate += len(plan.jobs) * (plan.ramp + plan.runtime + 8)
    limit = args.timeout or estimate + max(120.0, estimate / 2)
    print(
        f"dstfuse benchmark: {len(plan.peers)} peers "
        f"({', '.join(label for label, _, _ in plan.peers)}), {len(plan.jobs)} jobs, "
        f"{plan.size / MiB:.0f} MiB files, {plan.ramp} s ramp + {plan.runtime} s per job"
    )
    waiting = f" (after waiting up to {_duration(args.wait_idle)} for an idle machine)"
    print(
        f"planned time about {_duration(estimate)}; hard limit {_duration(limit)}"
        + (waiting if args.wait_idle else ""),
        flush=True,
    )
    before_run = wait_for_idle(args.wait_idle)
    print(
        f"machine before the run: {before_run['busy']:.2f} of {os.cpu_count()} cores busy "
        f"with other work",
        flush=True,
    )

    signal.signal(signal.SIGTERM, _on_sigterm)
    args.dir.mkdir(parents=True, exist_ok=True)
    # realpath now, before anything is mounted below it: resolving later
    # would stat the mounts.
    workdir = Path(os.path.realpath(tempfile.mkdtemp(prefix="dstfuse-bench-", dir=args.dir)))
    logdir = workdir / "logs"
    logdir.mkdir()
    teardown = Teardown()
    teardown.add(f"remove {workdir}", lambda: _remove_workdir(workdir))
    if args.keep_logs:
        teardown.add("keep logs", lambda: _keep_logs(logdir, args.keep_logs))
    tools = Tools(
        args.python, _child_env(), workdir, logdir, Deadline(limit), teardown, args.nbd_connections
    )
    started = time.monotonic()
    results = Results()
    failures: list[str] = []
    peers: list[Peer] = []
    profiles: dict[str, Any] = {}
    try:
        peers = start_peers(plan, tools, failures)
        if len(peers) >= 2:
            measure(plan, peers, tools, results, failures)
            if py_spy and args.profile:
                target = next((p for p in peers if p.label == args.profile_peer), None)
                if target is None:
                    failures.append(f"--profile-peer {args.profile_peer}: no such peer running")
                else:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profiles = run_profiles(plan, target, tools, py_spy, args.profile, failures)
    except KeyboardInterrupt:
        failures.append("interrupted")
    except Interrupted:
        failures.append("terminated (SIGTERM)")
    except BenchmarkError as exc:
        failures.append(str(exc))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _log("tearing down")
        clean = teardown.run_all()
        if not clean:
            failures.append("tear-down incomplete: see the messages above")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    elapsed = time.monotonic() - started
    report(plan, peers, results, failures, profiles, elapsed, before_run)
    if args.json:
        write_json(args.json, plan, peers, results, failures, profiles, before_run, elapsed)
    return 1 if failures else 0


def wait_for_idle(max_seconds: float) -> dict[str, float]:
    """The machine's load over 3 s (5 s windows while waiting, up to
    `max_seconds`, for one with less than IDLE_LOAD cores busy)."""
    end = time.monotonic() + max_seconds
    load = machine_load(3 if max_seconds <= 0 else 5)
    while load["busy"] >= IDLE_LOAD and time.monotonic() < end:
        _log(f"machine busy ({load['busy']:.2f} cores); waiting for it to be idle")
        load = machine_load(5)
    return load


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted()


def _remove_workdir(workdir: Path) -> None:
    mounted = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if _unescape_mount_path(line.split()[4]).startswith(str(workdir) + "/")
    ]
    if mounted:
        raise BenchmarkError(f"not removing {workdir}: something is still mounted in it")
    shutil.rmtree(workdir)


def _keep_logs(logdir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in logdir.iterdir():
        shutil.copy2(item, target / item.name)
    _log(f"logs copied to {target}")


def start_peers(plan: Plan, tools: Tools, failures: list[str]) -> list[Peer]:
    """Every peer that comes up, attached to a loop device and filled. The
    nbdfuse baseline and the main subject are required; the others are
    dropped (and reported) when they fail."""
    peers: list[Peer] = []
    for label, kind, options in plan.peers:
        tools.deadline.timeout(1)
        _log(f"starting {label}")
        peer: Peer
        if kind == "nbdfuse":
            peer = NbdfusePeer(label, tools, plan.size)
        else:
            peer = DstfusePeer(label, tools, plan.size, **options)
        try:
            loop = peer.attach()
        except BenchmarkError as exc:
            if isinstance(exc, DeadlineExceeded) or label in REQUIRED_PEERS:
                raise
            failures.append(f"{label}: {exc}")
            continue
        _log(
            f"{label}: {loop.path} on {loop.backing} ({loop.size / MiB:.0f} MiB, "
            f"direct I/O {'on' if loop.direct_io else 'OFF'})"
        )
        peers.append(peer)
    return peers


def measure(
    plan: Plan,
    peers: list[Peer],
    tools: Tools,
    results: Results,
    failures: list[str],
) -> None:
    # One size for everyone: a mirror keeps its metadata at the end of the
    # legs, so its storage is a little smaller than the backing files.
    assert all(peer.loop is not None for peer in peers)
    size = min(peer.loop.size for peer in peers if peer.loop) // MiB * MiB
    broken: set[str] = set()
    for peer in peers:
        _log(f"{peer.label}: fill pass over {size / MiB:.0f} MiB (at most {plan.fill_cap} s)")
        try:
            peer.settle()
            result = run_fio(FILL, peer, size=size, runtime=plan.fill_cap, ramp=0, tools=tools)
            peer.settle()
        except DeadlineExceeded:
            raise
        except BenchmarkError as exc:
            if peer.label in REQUIRED_PEERS:
                raise
            failures.append(f"{peer.label}: {exc}")
            broken.add(peer.label)
            continue
        results.add(result)
        if result.io_bytes < size:
            peer.notes.append(
                f"fill pass wrote {result.io_bytes / MiB:.0f} of {size / MiB:.0f} "
                "MiB before its time cap: later reads partly hit holes"
            )
    for round_number in range(1, plan.repeat + 1):
        for index, job in enumerate(plan.jobs):
            # Alternate the order so that no peer always runs right after the
            # fill or right after the other peer's writes.
            order = peers if (index + round_number) % 2 else list(reversed(peers))
            for peer in order:
                if job not in plan.jobs_for(peer.label) or peer.label in broken:
                    continue
                where = f"round {round_number}: " if plan.repeat > 1 else ""
                _log(f"{where}{peer.label}: {job.name}")
                try:
                    result = run_fio(
                        job,
                        peer,
                        size=size,
                        runtime=plan.runtime,
                        ramp=plan.ramp,
                        tools=tools,
                        round_number=round_number,
                    )
                except DeadlineExceeded:
                    raise
                except BenchmarkError as exc:
                    failures.append(str(exc))
                    broken.add(peer.label)
                    continue
                results.add(result)
                figure = _figure(result.value(job.metric), job.metric)
                _log(f"{where}{peer.label}: {job.name}: {figure}")


def run_profiles(
    plan: Plan, peer: Peer, tools: Tools, py_spy: str, outdir: Path, failures: list[str]
) -> dict[str, Any]:
    assert peer.loop is not None
    size = peer.loop.size // MiB * MiB
    profiles: dict[str, Any] = {}
    for job in plan.jobs_for(peer.label):
        _log(f"{peer.label}: {job.name} under py-spy")
        try:
            outcome = profile_job(
                job,
                peer,
                size=size,
                runtime=plan.runtime,
                ramp=plan.ramp,
                tools=tools,
                py_spy=py_spy,
                outdir=outdir,
            )
        except DeadlineExceeded:
            raise
        except BenchmarkError as exc:
            failures.append(f"profile {job.name}: {exc}")
            continue
        profiles[job.name] = outcome
    return profiles


def report(
    plan: Plan,
    peers: list[Peer],
    results: Results,
    failures: list[str],
    profiles: dict[str, Any],
    elapsed: float,
    before_run: dict[str, float],
) -> None:
    out: list[str] = [
        "",
        f"results ({plan.size / MiB:.0f} MiB backing files, "
        f"{plan.ramp} s ramp + {plan.runtime} s per job, "
        f"{os.cpu_count()} CPUs, TCP loopback; run took {_duration(elapsed)}; "
        f"other load before the run {before_run['busy']:.2f} cores)",
    ]
    for title, subject, baseline, jobs in plan.comparisons:
        out += ["", *comparison_table(title, subject, baseline, results, jobs)]
    fills = [result for peer in peers for result in results.runs(peer.label, FILL.name)]
    if fills:
        out += [
            "",
            "fill pass: " + ", ".join(f"{r.peer} {r.bw_bytes / MiB:.0f} MiB/s" for r in fills),
        ]
    out += ["", *rss_lines(peers, results)]
    out += ["", *cpu_table(results, peers)]
    nodes = node_table(results, peers)
    if nodes:
        out += ["", *nodes]
    for name, outcome in profiles.items():
        result: Result = outcome["result"]
        job = next(job for job in JOBS if job.name == name)
        out += [
            "",
            f"profile {result.peer} {name} (under py-spy: "
            f"{_figure(result.value(job.metric), job.metric).strip()}; other load "
            f"{result.load.get('other', 0):.2f} cores)",
        ]
        for role, summary in outcome["profiles"].items():
            out.append(
                f"  {role}: {result.cpu_cores.get(role, 0):.2f} cores, {summary['samples']} "
                f"samples ({summary['worker']} in worker threads), trio thread active "
                f"{summary['main_active']:.0%}"
            )
            layers = ", ".join(f"{name} {pct:.0f}%" for name, pct in summary.get("layers", []))
            out.append(f"    by layer: {layers}")
            out.append("    top functions by own samples | dstfuse functions with callees:")
            for (own, own_pct), (inc, inc_pct) in zip(
                summary["self"][:12], summary["dstfuse"][:12], strict=False
            ):
                out.append(f"    {own_pct:5.1f}% {own:<58.58} | {inc_pct:5.1f}% {inc:.58}")
    notes = [f"{peer.label}: {note}" for peer in peers for note in peer.notes]
    for result in results.all():
        if result.load.get("other", 0) > IDLE_LOAD:
            where = f" (round {result.round})" if plan.repeat > 1 and result.round else ""
            notes.append(
                f"{result.peer} {result.job}{where}: disturbed by other load on the machine "
                f"({result.load['other']:.2f} cores)"
            )
    if notes:
        out += ["", "notes:", *(f"  {note}" for note in notes)]
    if failures:
        out += ["", "FAILED:", *(f"  {failure}" for failure in failures)]
    print("\n".join(out), flush=True)


def rss_lines(peers: list[Peer], results: Results) -> list[str]:
    lines = []
    qd32 = [job.name for job in JOBS if job.name.endswith("qd32")]
    for peer in peers:
        if "client" not in peer.roles:
            continue
        peaks = [
            result.peak_rss.get("client", 0)
            for name in qd32
            for result in results.runs(peer.label, name)
        ]
        overall = [r.peak_rss.get("client", 0) for r in results.all() if r.peer == peer.label]
        if not overall:
            continue
        during = f"{max(peaks) / MiB:.0f} MiB during QD32" if peaks else "no QD32 run"
        verdict = ""
        if peer.kind == "dstfuse" and peaks:
            ok = max(peaks) < RSS_FLOOR
            verdict = f"; {'within' if ok else 'OVER'} the {RSS_FLOOR / MiB:.0f} MiB limit"
        lines.append(
            f"peak RSS of the {peer.label} client (pid {peer.roles['client']}): "
            f"{during}, {max(overall) / MiB:.0f} MiB over the run{verdict}"
        )
    return lines


def write_json(
    path: Path,
    plan: Plan,
    peers: list[Peer],
    results: Results,
    failures: list[str],
    profiles: dict[str, Any],
    before_run: dict[str, float],
    elapsed: float,
) -> None:
    data = {
        "elapsed": elapsed,
        "machine_load_before": before_run,
        "size": plan.size,
        "runtime": plan.runtime,
        "ramp": plan.ramp,
        "cpus": os.cpu_count(),
        "peers": {
            peer.label: {
                "kind": peer.kind,
                "roles": peer.roles,
                "notes": peer.notes,
                "loop": peer.loop.path if peer.loop else None,
                "direct_io": peer.direct_io,
            }
            for peer in peers
        },
        "repeat": plan.repeat,
        "results": [vars(result) for result in results.all()],
        "profiles": {
            name: {"result": vars(outcome["result"]), "profiles": outcome["profiles"]}
            for name, outcome in profiles.items()
        },
        "failures": failures,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

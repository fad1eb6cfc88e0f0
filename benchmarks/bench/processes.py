"""Processes and tear-down: the commands the benchmark runs, the children it
keeps (export nodes, nbdkit, nbdfuse), probes of FUSE mounts, unmounting,
loop devices, and the Teardown that undoes all of it.

Invariants:
- every command has a timeout, and a child is ended by the pid we started
  (or the pid a mount published), never by name;
- nothing here touches a FUSE mount except through `probe`, which gives up
  after its timeout, so a hung daemon cannot hang the benchmark;
- `Teardown.run_all` runs every registered step, last first, whatever
  failed, and each step is bounded in time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import REPO
from .system import (
    detach_loop,
    force_unmount,
    free_tcp_port,
    last_line,
    pid_exited,
    run_bounded,
    stop_pid,
    unescape_mount_path,
)

_T = TypeVar("_T")

#: Re-exported for the peers: a free TCP port on 127.0.0.1.
free_port = free_tcp_port


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
            raise DeadlineExceeded(f"hard time limit of {duration(self.seconds)} reached")
        return max(0.1, min(cap, left))


def duration(seconds: float) -> str:
    """`42 s` or `3 min 07 s`."""
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


# ------------------------------------------------------------ processes


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    argv: list[str], timeout: float, *, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (killed after `timeout` seconds);
    with `check`, a failure raises BenchmarkError quoting its stderr."""
    try:
        result = run_bounded(argv, timeout, env=env)
    except FileNotFoundError:
        raise BenchmarkError(f"{argv[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{' '.join(argv)}: no answer after {timeout:.0f} s") from None
    if check and result.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} failed ({result.returncode}): {last_line(result)}")
    return result


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
        """SIGTERM now; SIGKILL if it is still there after the shared
        `stop_pid` waits."""
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        stop_pid(self.pid, self.popen, grace)
        if self.alive():
            raise BenchmarkError(f"{self.name} (pid {self.pid}) survived SIGKILL")


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    return not pid_exited(pid)


def kill_pid(name: str, pid: int, grace: float = 10.0) -> None:
    """End a process that is not our child (the daemon a mount left behind):
    `grace` seconds to exit by itself, then SIGTERM, then SIGKILL."""
    stop_pid(pid, None, grace)
    if pid_alive(pid):
        raise BenchmarkError(f"{name} (pid {pid}) survived SIGKILL")


def listening(port: int) -> bool:
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


def mount_device(mountpoint: Path) -> str | None:
    """The "major:minor" of the file system mounted at `mountpoint`, from
    /proc/self/mountinfo (which does not touch the mount), or None."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if unescape_mount_path(fields[4]) == str(mountpoint):
            found = fields[2]
    return found


def mounted_below(directory: Path) -> list[str]:
    """The mount points inside `directory`, from /proc/self/mountinfo."""
    return [
        unescape_mount_path(line.split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if unescape_mount_path(line.split()[4]).startswith(str(directory) + "/")
    ]


def unmount_fuse(mountpoint: Path, first: list[list[str]], timeout: float = 60.0) -> None:
    """Unmount a FUSE mount we made: the commands in `first` (e.g. `dstfuse
    umount`), then the shared order (`fusermount3 -u`, `-uz`, `umount -l`);
    if the mount is still there after all of them, abort its FUSE
    connection and raise."""
    force_unmount(
        mountpoint,
        first=first,
        timeout=timeout,
        report=lambda line: log(f"unmount {mountpoint}: {line}"),
    )
    device = mount_device(mountpoint)
    if device is not None:
        abort_fuse_connection(mountpoint, device)
        raise BenchmarkError(f"{mountpoint} is still mounted")


def abort_fuse_connection(mountpoint: Path, device: str) -> None:
    """Write 1 to the connection's `abort` in /sys/fs/fuse/connections."""
    major, minor = (int(part) for part in device.split(":"))
    abort = Path(f"/sys/fs/fuse/connections/{os.makedev(major, minor)}/abort")
    if abort.exists():
        log(f"aborting the FUSE connection of {mountpoint}")
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
                log(f"tear-down: {what}: {exc}")
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
        for _ in range(3):
            if not self.attached:
                return
            detach_loop(self.path, 30)
            # LOOP_CLR_FD on a device still open elsewhere only sets
            # autoclear; wait for it to go.
            end = time.monotonic() + 5
            while self.attached and time.monotonic() < end:
                time.sleep(0.1)
        if self.attached:
            raise BenchmarkError(f"{self.path} is still attached to {self.backing}")


def remove_workdir(workdir: Path) -> None:
    """Remove the run's temporary directory, only when nothing is mounted in it."""
    if mounted_below(workdir):
        raise BenchmarkError(f"not removing {workdir}: something is still mounted in it")
    shutil.rmtree(workdir)

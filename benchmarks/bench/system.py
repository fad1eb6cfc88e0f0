"""The mount table, pids, loop devices and ports: the stdlib-only helpers
that the benchmark (`benchmarks/run.py`) and the tests' fixtures
(`tests/mounts.py`) share, so both tear down the same way.

Invariants:
- nothing here touches a FUSE mount: mounts are read from
  /proc/self/mounts, loop devices and processes are handled by path and pid,
  so a hung daemon cannot hang the caller;
- every command runs with a timeout, and a command that does not die when
  killed (uninterruptible sleep under a hung mount) is left behind rather
  than waited for;
- the unmount order is `fusermount3 -u`, then `fusermount3 -uz`, then
  `umount -l` (a stale FUSE mount hangs whoever touches it);
- processes are ended by the pid the caller started or was given, never by
  name.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: How long a killed command may take to be reaped before it is left behind.
REAP_TIMEOUT = 5.0


def run_bounded(
    argv: Sequence[str], timeout: float, *, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion, output captured as text. After
    `timeout` seconds it is killed and subprocess.TimeoutExpired raised;
    FileNotFoundError when it is not installed."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else dict(env),
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        # In uninterruptible sleep (a hung mount under losetup, say),
        # waiting for it would hang the caller's tear-down too.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=REAP_TIMEOUT)
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line a failed command printed (stderr, else stdout)."""
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else ""


# ------------------------------------------------------------ mount table


def unescape_mount_path(text: str) -> str:
    """/proc/self/mounts and mountinfo write space, tab, newline and
    backslash in paths as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def is_mounted(path: Path) -> bool:
    """True if `path` is a mount point in /proc/self/mounts (also when the
    mount is dead and stat() on it would fail with ENOTCONN)."""
    target = os.path.abspath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and unescape_mount_path(fields[1]) == target:
                return True
    return False


def unmount_commands(path: Path) -> list[list[str]]:
    """The unmount steps for a FUSE mount, gentlest first."""
    return [
        ["fusermount3", "-u", str(path)],
        ["fusermount3", "-uz", str(path)],
        ["umount", "-l", str(path)],
    ]


def force_unmount(
    path: Path,
    *,
    first: Sequence[Sequence[str]] = (),
    timeout: float = 30.0,
    report: Callable[[str], None] | None = None,
) -> bool:
    """Remove the mount at `path`: the commands in `first` (e.g. `dstfuse
    umount`), then `unmount_commands`, each only while it is still mounted
    and each bounded by `timeout`. Never raises; a failed step is passed to
    `report` as one line. Returns whether `path` is unmounted now."""
    for argv in [*first, *unmount_commands(path)]:
        if not is_mounted(path):
            return True
        try:
            result = run_bounded(argv, timeout)
        except FileNotFoundError:
            detail = "not installed"
        except subprocess.TimeoutExpired:
            detail = f"no answer after {timeout:.0f} s"
        except OSError as exc:
            detail = exc.strerror or str(exc)
        else:
            if result.returncode == 0:
                continue
            detail = f"failed: {last_line(result)}"
        if report is not None:
            report(f"{argv[0]} {detail}")
    return not is_mounted(path)


# ------------------------------------------------------------------- pids


def pid_exited(pid: int) -> bool:
    """True if `pid` is gone or a zombie (an exited daemon whose new parent
    has not reaped it yet still answers kill(pid, 0))."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            # the state follows the parenthesised command name
            return file.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_pid(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (zombies count as exited) within `timeout`."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)


def stop_pid(pid: int, process: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """Wait up to `timeout` for `pid` to exit by itself, then SIGTERM (half
    that again), then SIGKILL (10 s more at most); reaps it when it is our
    child (`process`). The caller checks `pid_exited` if it must know."""
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout / 2)
        if process.poll() is None:
            process.kill()
            # Bounded: a child in uninterruptible sleep is left, not waited for.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        return
    if wait_pid(pid, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_pid(pid, timeout / 2):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_pid(pid, 10)


def free_tcp_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------ loop devices


def detach_loop(device: str, timeout: float = 30.0) -> None:
    """`losetup -d DEVICE`, retried while the device is busy, for at most
    `timeout` seconds; never raises."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            done = run_bounded(["losetup", "-d", device], 30)
            if done.returncode == 0 or "No such device" in done.stderr:
                return
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)

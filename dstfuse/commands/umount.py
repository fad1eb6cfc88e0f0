"""`dstfuse umount MOUNTPOINT`: unmount, and return only once every write the
mount acknowledged is on the nodes.

It reads the daemon's pid and result file from `MOUNTPOINT/.dst/.daemon`,
unmounts with `fusermount3 -u`, then waits (bounded by --timeout) for the
daemon to exit: the daemon flushes every storage after the unmount and
writes "ok" or "failed: <reason>" to its result file, which decides this
command's exit status. A busy mount is left mounted, with a message naming
the loop device to detach when one holds a storage file.

A mount whose daemon died answers ENOTCONN: nobody can serve it any more,
so unmounting it loses nothing that is not already lost. Such a mount is
unmounted (`fusermount3 -u`, `umount -l` only if that fails) when it is
ours, a `fuse.dstfuse` mount in /proc/self/mountinfo, and still
disconnected right before; any other dead FUSE mount is left alone. The
command then exits 1: the final flush never ran.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

from ..control import CONTROL_DIRECTORY, DAEMON_FILE, DaemonInfo
from ..errors import UserError

HELP = "unmount MOUNTPOINT once every write is acknowledged by the nodes"

DEFAULT_TIMEOUT = 120.0
#: fusermount3 itself never needs long; a hung one is a bug to report.
UNMOUNT_COMMAND_TIMEOUT = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the final flush (default {DEFAULT_TIMEOUT:.0f})",
    )


#: The filesystem type of our mounts in /proc/self/mountinfo (fs.py mounts
#: with subtype=dstfuse).
MOUNT_TYPE = "fuse.dstfuse"


class DaemonGone(UserError):
    """The mount answers ENOTCONN: its FUSE daemon is gone."""


def read_daemon_info(mountpoint: Path) -> DaemonInfo:
    path = mountpoint / CONTROL_DIRECTORY / DAEMON_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{mountpoint} is not a dstfuse mount (no {path})") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise DaemonGone(f"the daemon of {mountpoint} is gone") from None
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return DaemonInfo.parse(text)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


def loop_devices_using(mountpoint: Path) -> list[tuple[str, Path]]:
    """(loop device, storage file) pairs for loop devices backed by a file
    of this mount, from `losetup -j`."""
    found = []
    try:
        names = [name for name in os.listdir(mountpoint) if not name.startswith(".")]
    except OSError:
        return []
    for name in names:
        file = mountpoint / name
        try:
            output = subprocess.run(
                ["losetup", "-j", str(file)],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in output.splitlines():
            device = line.split(":", 1)[0].strip()
            if device:
                found.append((device, file))
    return found


def unmount(mountpoint: Path) -> None:
    """Unmount, or raise UserError saying why not (busy: by what)."""
    command = (
        ["fusermount3", "-u", str(mountpoint)]
        if shutil.which("fusermount3")
        else ["umount", str(mountpoint)]
    )
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=UNMOUNT_COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"{command[0]} did not finish within {UNMOUNT_COMMAND_TIMEOUT:.0f} s"
        ) from None
    if done.returncode == 0:
        return
    message = " ".join(done.stderr.split()) or f"{command[0]} exited with {done.returncode}"
    if "busy" in message.lower():
        loops = loop_devices_using(mountpoint)
        if loops:
            uses = ", ".join(f"{device} uses {file}" for device, file in loops)
            devices = " ".join(device for device, _ in loops)
            raise UserError(
                f"{mountpoint} is busy: {uses}; detach the loop device first "
                f"(losetup -d {devices})"
            )
        raise UserError(
            f"{mountpoint} is busy: a process still has a file or directory in it open "
            f"(see 'fuser -vm {mountpoint}')"
        )
    raise UserError(f"cannot unmount {mountpoint}: {message}")


def mount_type(mountpoint: Path, mountinfo: str) -> str | None:
    """The filesystem type of the topmost mount at `mountpoint` in the text
    of /proc/self/mountinfo, or None if nothing is mounted there."""
    found = None
    for line in mountinfo.splitlines():
        mount_fields, separator, fs_fields = line.partition(" - ")
        fields = mount_fields.split()
        if not separator or len(fields) < 5 or not fs_fields.split():
            continue
        if _unescape(fields[4]) == str(mountpoint):
            found = fs_fields.split()[0]  # later lines are mounted on top
    return found


def _unescape(text: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def unmount_dead(mountpoint: Path) -> str:
    """Unmount our mount at `mountpoint` whose daemon is gone; the command
    that did it. UserError, touching nothing, unless the topmost mount
    there is a dstfuse mount that is still disconnected."""
    try:
        with open("/proc/self/mountinfo") as file:
            # mountinfo names mount points with symbolic links resolved
            found = mount_type(Path(os.path.realpath(mountpoint)), file.read())
    except OSError as exc:
        raise UserError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from None
    if found is None:
        raise UserError(f"{mountpoint} answers ENOTCONN but is not a mount point; leaving it alone")
    if found != MOUNT_TYPE:
        raise UserError(
            f"{mountpoint} is not a dstfuse mount (a {found} mount whose daemon is gone); "
            "leaving it alone"
        )
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UserError(f"{mountpoint}: {exc.strerror}") from None
    else:
        raise UserError(f"{mountpoint} answers again; run 'dstfuse umount {mountpoint}' again")
    failures = []
    for command in (["fusermount3", "-u", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if shutil.which(command[0]) is None:
            failures.append(f"{command[0]} is not installed")
            continue
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=UNMOUNT_COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            failures.append(f"{command[0]} did not finish within {UNMOUNT_COMMAND_TIMEOUT:.0f} s")
            continue
        if done.returncode == 0:
            return " ".join(command)
        failures.append(" ".join(done.stderr.split()) or f"{command[0]} exited {done.returncode}")
    raise UserError(f"cannot unmount {mountpoint}, whose daemon is gone: {'; '.join(failures)}")


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once process `pid` has exited, False if it still runs after
    `timeout` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000))
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def run(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    try:
        info = read_daemon_info(mountpoint)
    except DaemonGone:
        how = unmount_dead(mountpoint)
        raise UserError(
            f"the daemon of {mountpoint} was gone; unmounted it with '{how}'. Its final flush "
            "never ran: writes it acknowledged may not be durable on the nodes (see its log)"
        ) from None
    # Open the pidfd before unmounting, so the pid cannot be reused under us.
    try:
        pidfd: int | None = os.pidfd_open(info.pid)
    except ProcessLookupError:
        raise UserError(f"the daemon of {mountpoint} (pid {info.pid}) is not running") from None
    except OSError:
        pidfd = None
    try:
        unmount(mountpoint)
        exited = _wait(pidfd, info.pid, args.timeout)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if not exited:
        raise UserError(
            f"{mountpoint} is unmounted, but its daemon (pid {info.pid}) is still flushing "
            f"after {args.timeout:.0f} s; its nodes may be unreachable (see its log)"
        )
    if info.result is None:
        raise UserError(
            f"{mountpoint} is unmounted, but its daemon has no result file: cannot confirm "
            "the final flush (see its log)"
        )
    try:
        result = info.result.read_text().strip()
    except FileNotFoundError:
        raise UserError(
            f"the daemon of {mountpoint} (pid {info.pid}) exited without reporting its final "
            "flush; acknowledged writes may not be durable (see its log)"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read {info.result}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        info.result.unlink()
    if result == "ok":
        return 0
    raise UserError(f"{mountpoint} is unmounted, but the final flush {result}")


def _wait(pidfd: int | None, pid: int, timeout: float) -> bool:
    if pidfd is None:
        return wait_for_exit(pid, timeout)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))

"""`dstfuse mount [--foreground] [-o OPT,...] CONFIG MOUNTPOINT`.

With --foreground the mount daemon (`dstfuse.daemon`) runs in this process
and tells systemd READY=1 once live. Without it, this command starts the
daemon as a detached process (new session, stdin /dev/null, output to the
log file `/run/dstfuse/<escaped mountpoint>.log`, or under
$XDG_RUNTIME_DIR for non-root users) and returns 0 only once the daemon
reports over a pipe that the mount is live; otherwise it prints the daemon's
one-line reason, makes sure the daemon is gone, and returns 1. It never
waits without a bound.

Options (-o, comma-separated, repeatable): the mount-wide `allow_other` and
`debug` (libfuse request trace and debug logging), and the options the
algorithms of the config's storages declare (a mirror's `force`,
`primary=`, ...); any other option is refused with one line naming it and
the nearest known one. Every option is handed to the storage algorithms.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import dstfuse

from ..config import load_mount_config, parse_mount_options
from ..daemon import LIVE_TIMEOUT, check_mountpoint, run_mount, runtime_file
from ..errors import UserError

HELP = "mount the storages of CONFIG at MOUNTPOINT, one file per storage"
LOG_LEVEL = logging.INFO

log = logging.getLogger(__name__)

#: After reporting an error, the daemon closes what it opened and exits;
#: past this, it is killed.
CHILD_EXIT_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (for systemd: READY=1 is sent once the mount is live)",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: allow_other, debug, and the algorithms' own (README)",
    )
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("config", metavar="CONFIG", help="storage configuration (YAML)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")


def run(args: argparse.Namespace) -> int:
    if args.foreground or args.ready_fd is not None:
        return run_mount(
            args.config,
            args.mountpoint,
            foreground=args.foreground,
            options=args.options,
            ready_fd=args.ready_fd,
        )
    return start_daemon(args)


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The parent, not the daemon, is what a service manager started.
    env.pop("NOTIFY_SOCKET", None)
    # The daemon runs from "/", so it must find this dstfuse whatever the
    # caller's directory was.
    package_root = str(Path(dstfuse.__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _read_report(fd: int, deadline: float) -> str | None:
    """The daemon's first line on the pipe; None on EOF without one;
    TimeoutError at `deadline`."""
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace").strip() or None
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _last_log_line(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.fstat(file.fileno()).st_size - 4096))
            lines = [line for line in file.read().decode(errors="replace").splitlines() if line]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _stop_child(child: subprocess.Popen) -> None:
    """Make sure the daemon is gone: it was told to exit (or failed)."""
    try:
        child.wait(CHILD_EXIT_TIMEOUT)
        return
    except subprocess.TimeoutExpired:
        pass
    log.warning("mount daemon pid %d did not exit; terminating it", child.pid)
    child.terminate()
    try:
        child.wait(CHILD_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def start_daemon(args: argparse.Namespace) -> int:
    # Check what can be checked here, so the common mistakes fail at once.
    config = load_mount_config(args.config)
    parse_mount_options(args.options, config)
    mountpoint = check_mountpoint(args.mountpoint)
    log_path = runtime_file(mountpoint, ".log")
    read_end, write_end = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "dstfuse",
        *(["-v"] * getattr(args, "verbose", 0)),
        "mount",
        "--foreground",
        "--ready-fd",
        str(write_end),
        *(arg for option in args.options for arg in ("-o", option)),
        str(config.path),
        str(mountpoint),
    ]
    try:
        output = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    except OSError as exc:
        log.warning("cannot open log file %s (%s); daemon output is discarded", log_path, exc)
        output, log_path = subprocess.DEVNULL, None
    try:
        child = subprocess.Popen(
            argv,
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            cwd="/",
            env=_child_environment(),
        )
    finally:
        os.close(write_end)
        if output is not subprocess.DEVNULL:
            output.close()
    where = f"see {log_path}" if log_path is not None else "its output was discarded"
    # Nodes give up after timeouts.connect; the rest is building storages
    # and mounting.
    bound = 2 * config.timeouts.connect + LIVE_TIMEOUT + 30.0
    try:
        try:
            report = _read_report(read_end, time.monotonic() + bound)
        except TimeoutError:
            if child.poll() is None:
                child.terminate()
            _stop_child(child)
            raise UserError(
                f"the mount at {mountpoint} did not become live within {bound:.0f} s ({where})"
            ) from None
    except BaseException:
        if child.poll() is None:
            child.terminate()
            _stop_child(child)
        raise
    finally:
        os.close(read_end)
    if report == "live":
        log.info(
            "%s mounted at %s (daemon pid %d, log %s)",
            config.path,
            mountpoint,
            child.pid,
            log_path or "discarded",
        )
        return 0
    _stop_child(child)
    if report is not None and report.startswith("error "):
        raise UserError(report[len("error ") :])
    last = _last_log_line(log_path)
    raise UserError(
        f"the mount daemon exited with status {child.returncode} before the mount was live "
        f"({where}{'; last line: ' + last if last else ''})"
    )

"""`dstfuse mount [--foreground] [-o OPT,...] CONFIG MOUNTPOINT`.

With --foreground the mount daemon (`dstfuse.daemon`) runs in this process
and tells systemd READY=1 once live. Without it, this command starts the
daemon as a detached process (new session, stdin /dev/null, output to the
log file `/run/dstfuse/<escaped mountpoint>.log`, or under
$XDG_RUNTIME_DIR for non-root users) and returns 0 only once the daemon
reports over a pipe that the mount is live, printing what the daemon
mounted and, for each degraded or failed storage (a mirror with a leg
unreachable), which nodes and why; otherwise it prints the daemon's one-line
reason, makes sure the daemon is gone, and returns 1. It never
waits without a bound.

Options (-o, comma-separated, repeatable): the mount-wide `allow_other`,
`debug` (libfuse request trace and debug logging) and `ro` (read-only:
every node is opened read-only, so no export's write grant is needed;
linear storages only), and the options the algorithms of the config's
storages declare (a mirror's `force`, `primary=`, ...); any other option is
refused with one line naming it and the nearest known one. Every option is
handed to the storage algorithms.
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
from ..export.nbd_tls import server_context

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
        help="mount options: allow_other, debug, ro, and the algorithms' own (README)",
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


def _read_report(fd: int, deadline: float) -> list[str]:
    """The daemon's report on the pipe, one entry per line ("live ...",
    "warning ..." or "error ..."), read until EOF; empty if the daemon
    closed the pipe without one; TimeoutError at `deadline`."""
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return [line for line in data.decode(errors="replace").splitlines() if line]
        data += chunk


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
    server_context(config.nbd_tls)  # unreadable or unusable PEM files
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
    first = report[0] if report else ""
    if first == "live" or first.startswith("live "):
        log.info(
            "%s %s (daemon pid %d, log %s)",
            config.path,
            first.removeprefix("live").strip() or f"mounted at {mountpoint}",
            child.pid,
            log_path or "discarded",
        )
        for line in report[1:]:
            if line.startswith("warning "):
                log.warning("%s", line.removeprefix("warning "))
        return 0
    _stop_child(child)
    if first.startswith("error "):
        raise UserError(first.removeprefix("error "))
    last = _last_log_line(log_path)
    raise UserError(
        f"the mount daemon exited with status {child.returncode} before the mount was live "
        f"({where}{'; last line: ' + last if last else ''})"
    )

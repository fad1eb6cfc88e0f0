"""`dstfuse reload MOUNTPOINT`: re-read the config the mount was started
with and apply the difference online, all or nothing.

The command writes `reload` to `MOUNTPOINT/.dst/.reload` (through the
same file descriptor it then reads the outcome from, so a concurrent
reload cannot answer for it). The daemon (`dstfuse.live_reload`) answers
the write only once the reload is applied or refused; a refusal fails the
write, and the file then says why. The command prints one line: what was
applied, or why nothing was (then on stderr, exit 1). It waits at most
--timeout seconds: a daemon that does not answer (stopped, stuck) is
reported, and a reload it is still doing goes on.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from ..control import CONTROL_DIRECTORY, RELOAD_FILE, ReloadOutcome
from ..errors import UserError
from ..live_reload import RELOAD_WORD
from .umount import read_daemon_info

HELP = "re-read the mount's config and apply the difference online (all or nothing)"

#: Starting appended nodes takes at most about twice timeouts.connect each
#: (all at once); growing a file is instant. Below the mount unit's
#: TimeoutStartSec, which bounds ExecReload too, so that this command, not
#: systemd, reports a reload that takes too long.
DEFAULT_TIMEOUT = 90.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the storages are mounted")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the daemon's answer (default {DEFAULT_TIMEOUT:.0f})",
    )


def request_reload(path: Path) -> tuple[OSError | None, str]:
    """Write the request to the reload file and read the outcome back
    through the same descriptor: (the write's error or None, the text)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise UserError(
            f"{path} does not exist: this mount's daemon predates reload (remount it once)"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot open {path}: {exc.strerror}") from None
    try:
        error: OSError | None = None
        try:
            os.write(fd, f"{RELOAD_WORD}\n".encode())
        except OSError as exc:
            error = exc
        return error, os.pread(fd, 64 * 1024, 0).decode(errors="replace")
    finally:
        os.close(fd)


def reload_within(path: Path, timeout: float) -> tuple[OSError | None, str]:
    """`request_reload` in a daemon thread, given up after `timeout` s."""
    done: list[tuple[OSError | None, str]] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            done.append(request_reload(path))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            failed.append(exc)

    worker = threading.Thread(target=work, name="dstfuse-reload", daemon=True)
    worker.start()
    worker.join(timeout)
    if failed:
        raise failed[0]
    if not done:
        raise UserError(
            f"the daemon did not answer the reload within {timeout:g} s; it may still apply "
            f"it (see {path})"
        )
    return done[0]


def run(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    read_daemon_info(mountpoint)  # one clear line when this is no dstfuse mount
    path = mountpoint / CONTROL_DIRECTORY / RELOAD_FILE
    error, text = reload_within(path, args.timeout)
    try:
        outcome = ReloadOutcome.parse(text)
    except ValueError as exc:
        outcome = None
        problem = str(exc)
    else:
        problem = "no reload recorded"
    if outcome is None:
        reason = f" (the write failed: {error.strerror})" if error is not None else ""
        raise UserError(f"{path}: {problem}{reason}")
    if error is not None or outcome.outcome == "refused":
        raise UserError(outcome.message)
    print(outcome.message if outcome.outcome == "unchanged" else f"applied: {outcome.message}")
    return 0

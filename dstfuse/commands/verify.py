"""`dstfuse verify [--repair] MOUNTPOINT STORAGE`: compare a mirror's legs.

Starts an online verify (or repair) of a mounted mirror by writing `verify`
or `repair` to `MOUNTPOINT/.dst/STORAGE/verify`, polls that file until the
pass is done, and prints the differing ranges (`<offset> <length>` in
bytes, one per line). The checksums are computed on the nodes, so an equal
mirror moves no data; a leg on an NBD server (`N:` in the control tree) has
no checksums, its data is read over the network, and the command says so
on stderr.

Exit status: 0 when the legs are equal; 1 when they differ — also after
--repair repaired every range, so scripts notice that the legs had diverged
(the output then says `repaired`); 1 with one line on stderr for a user
error (no such mount or storage, not a mirror, a verify already running,
a degraded mirror). This command never touches the storage's data itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import time
from pathlib import Path

from ..errors import UserError

HELP = "compare mirror legs (checksums on the nodes); exit 1 if they differ"

#: Seconds between two reads of the verify file.
POLL_INTERVAL = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repair",
        action="store_true",
        help="copy differing ranges from the first in-sync leg whose data passes its checks",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up waiting after this long (the pass goes on in the mount)",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the storages are mounted")
    parser.add_argument("storage", metavar="STORAGE", help="name of a mirror storage")


def verify_file(mountpoint: str, storage: str) -> Path:
    """The storage's verify control file; UserError naming what is missing."""
    root = Path(mountpoint)
    control = root / ".dst"
    try:
        if not control.is_dir():
            raise UserError(f"{mountpoint} is not a dstfuse mount (no .dst directory)")
        directory = control / storage
        if not directory.is_dir():
            raise UserError(f"{mountpoint} has no storage {storage!r}")
        path = directory / "verify"
        if not path.exists():
            algorithm = _read(directory / "alg").strip() or "unknown"
            raise UserError(
                f"storage {storage} is not a mirror (algorithm {algorithm}); only mirrors verify"
            )
    except OSError as exc:
        raise UserError(f"{mountpoint}: {exc.strerror or exc}") from None
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UserError(f"{path}: the mount's daemon is gone (not connected)") from None
        raise UserError(f"{path}: {exc.strerror or exc}") from None


def start(path: Path, storage: str, repair: bool) -> None:
    word = "repair" if repair else "verify"
    try:
        with open(path, "w") as file:
            file.write(word + "\n")
    except OSError as exc:
        state = _read(path)
        if state.startswith("running"):
            raise UserError(f"a verify of storage {storage} is already running") from None
        if state.startswith("failed: "):
            raise UserError(state[len("failed: ") :].strip()) from None
        raise UserError(
            f"cannot start a verify of storage {storage}: {exc.strerror or exc}"
        ) from None


def wait_done(path: Path, timeout: float | None) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        text = _read(path)
        if text.startswith(("done", "failed")):
            return text
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"still {text.strip()} after {timeout:g} s (the pass goes on)")
        time.sleep(POLL_INTERVAL)


def read_over_network(directory: Path) -> list[str]:
    """The `type` lines of the storage's legs that cannot checksum on the
    node (NBD servers, `N: ...`): verify reads their data to compare."""
    legs = []
    for node in sorted(directory.glob("n-*/type")):
        with contextlib.suppress(OSError):
            kind = node.read_text().strip()
            if kind.startswith("N:"):
                legs.append(kind)
    return legs


def run(args: argparse.Namespace) -> int:
    path = verify_file(args.mountpoint, args.storage)
    for leg in read_over_network(path.parent):
        print(
            f"note: leg {leg} is an NBD server, which has no checksums: its data is read "
            "over the network to compare",
            file=sys.stderr,
        )
    start(path, args.storage, args.repair)
    text = wait_done(path, args.timeout)
    lines = text.splitlines()
    if lines[0].startswith("failed"):
        raise UserError(f"verify of storage {args.storage} {lines[0]}")
    ranges = [line for line in lines[1:] if line.strip()]
    if not ranges:
        print(f"storage {args.storage}: legs are equal")
        return 0
    print(f"storage {args.storage}: {lines[0][len('done: '):]} (offset length, bytes)")
    for line in ranges:
        offset, length, *outcome = line.split()
        if not outcome:
            print(f"{offset} {length}")
        elif outcome[0] == "repaired":
            print(f"{offset} {length} repaired")
        else:
            print(f"{offset} {length} NOT repaired")
    sys.stdout.flush()
    return 1


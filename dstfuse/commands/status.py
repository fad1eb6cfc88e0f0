"""`dstfuse status [--json] [--watch] MOUNTPOINT`: show a mount's storages.

Reads the mount's control tree through `dstfuse.statusview` and prints the
human table or the JSON object once, or redraws every second with --watch
until Ctrl-C (which then exits 0). It never writes to the control tree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ..statusview import ResyncSampler, read_mount_status_within, render_status, status_json

HELP = "show the state of a mount's storages and nodes"

#: Seconds between --watch redraws.
WATCH_INTERVAL = 1.0
#: How long the daemon may take to answer for the whole tree.
READ_TIMEOUT = 10.0

_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="redraw every second until Ctrl-C (with --json: one object per line)",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the storages are mounted")


def run(args: argparse.Namespace) -> int:
    try:
        if args.watch:
            return watch(args.mountpoint, as_json=args.json)
        status = read_mount_status_within(args.mountpoint, READ_TIMEOUT)
        if args.json:
            print(json.dumps(status_json(status), indent=2))
        else:
            sys.stdout.write(render_status(status))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`dstfuse status | head`): not a failure.
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def watch(
    mountpoint: str,
    *,
    as_json: bool,
    out: TextIO | None = None,
    interval: float = WATCH_INTERVAL,
    iterations: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    read_timeout: float = READ_TIMEOUT,
) -> int:
    """Redraw the status every `interval` seconds; return 0 on Ctrl-C or
    after `iterations` frames (tests bound it so; the CLI never does).

    Successive samples give each resyncing node its measured rate and ETA.
    A UserError (mount gone, daemon died) ends the watch like a plain status.
    """
    out = out if out is not None else sys.stdout
    sampler = ResyncSampler()
    interactive = out.isatty()
    frame = 0
    try:
        while iterations is None or frame < iterations:
            if frame:
                sleep(interval)
            status = read_mount_status_within(mountpoint, read_timeout)
            sampler.add(status, clock())
            frame += 1
            if as_json:
                out.write(json.dumps(status_json(status)) + "\n")
            else:
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                title = f"dstfuse status {mountpoint}  {stamp}  (every {interval:g}s, Ctrl-C ends)"
                prefix = _CLEAR_SCREEN if interactive else ("\n" if frame > 1 else "")
                out.write(f"{prefix}{title}\n\n{render_status(status, sampler)}")
            out.flush()
    except KeyboardInterrupt:
        if not as_json:
            out.write("\n")
        return 0
    return 0

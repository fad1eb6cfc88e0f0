"""A mirror leg's control files (DST's per-node sysfs files).

`leg_controls` builds the `Placement.controls` of one leg: `clean` and
`dirty` (writing anything marks the leg so: `dirty` forces a full resync,
`clean` declares it in sync), `resync_size` (bytes), `resync_timeout`
(milliseconds, DST's unit: how long a stale leg that is online waits before
it rejoins, doubled after each failed attempt), `resync_rate` (bytes/s,
0 = unlimited), the read-only `read_repairs` counter and `disk`, the leg's
disk state (`up_to_date`, `outdated`, `inconsistent`, `unknown`). Bad input raises a
one-line UserError; this module only parses and validates, the leg state
machine (`LegDecisions`) changes roles.
"""

from __future__ import annotations

from typing import Protocol

from ..algorithms.base import ControlFile
from ..errors import UserError
from ..units import format_size, parse_duration, parse_size
from .legs import MAX_RESYNC_SIZE, MirrorLeg
from .metadata import BLOCK

#: Bounds of resync_timeout, in seconds.
MIN_RESYNC_TIMEOUT = 0.001
MAX_RESYNC_TIMEOUT = 3600.0


class LegDecisions(Protocol):
    """The user's decisions about a leg, carried out by the leg states."""

    def mark_clean(self, leg: MirrorLeg) -> None: ...

    def mark_dirty(self, leg: MirrorLeg) -> None: ...

    def set_resync_timeout(self, leg: MirrorLeg, seconds: float) -> None: ...


def leg_controls(states: LegDecisions, leg: MirrorLeg) -> dict[str, ControlFile]:
    return {
        "clean": ControlFile(read=lambda: "", write=lambda text: states.mark_clean(leg)),
        "dirty": ControlFile(read=lambda: "", write=lambda text: states.mark_dirty(leg)),
        "resync_size": ControlFile(
            read=lambda: f"{leg.resync_size}\n",
            write=lambda text: setattr(leg, "resync_size", parse_resync_size(leg, text)),
        ),
        "resync_timeout": ControlFile(
            read=lambda: f"{round(leg.resync_timeout * 1000)}\n",
            write=lambda text: states.set_resync_timeout(leg, parse_resync_timeout(leg, text)),
        ),
        "resync_rate": ControlFile(
            read=lambda: f"{leg.resync_rate}\n",
            write=lambda text: setattr(leg, "resync_rate", parse_resync_rate(leg, text)),
        ),
        "read_repairs": ControlFile(read=lambda: f"{leg.read_repairs}\n"),
        "disk": ControlFile(read=lambda: f"{leg.disk_state()}\n"),
    }


def parse_resync_size(leg: MirrorLeg, text: str) -> int:
    value = text.strip()
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise UserError(f"{leg}: resync_size: {exc}") from None
    if size < BLOCK or size > MAX_RESYNC_SIZE or size % BLOCK:
        raise UserError(
            f"{leg}: resync_size must be a multiple of 4K from 4K to "
            f"{format_size(MAX_RESYNC_SIZE)}, not {value!r}"
        )
    return size


def parse_resync_timeout(leg: MirrorLeg, text: str) -> float:
    """Milliseconds as DST took them, or a duration with a unit (`2s`)."""
    value = text.strip()
    try:
        seconds = int(value) / 1000 if value.isdigit() else parse_duration(value)
    except ValueError as exc:
        raise UserError(f"{leg}: resync_timeout: {exc} (milliseconds)") from None
    if not MIN_RESYNC_TIMEOUT <= seconds <= MAX_RESYNC_TIMEOUT:
        raise UserError(f"{leg}: resync_timeout must be 1 ms to 1 hour, not {value!r}")
    return seconds


def parse_resync_rate(leg: MirrorLeg, text: str) -> int:
    value = text.strip()
    if value.lower().endswith("/s"):
        value = value[:-2]
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UserError(f"{leg}: resync_rate: {exc} (bytes per second, 0 = unlimited)") from None

"""Adding a leg to a running mirror (`dstfuse reload`).

`check_new_leg` examines a node before the reload changes anything (reads
only) and refuses, with one line, a node that cannot become a leg: offline,
too small, or holding another storage's metadata. `admit_leg` then brings a
leg that the reload appended (in role STALE, history unknown) into the
storage, in this order (docs/mirror-metadata.md, "Adding a leg"):

1. its node takes the export's write grant over (it connected as a probe,
   like every leg before the mount's decision);
2. a new generation is written to the headers of every leg that takes
   writes: their member tables now have a row for the new leg saying it is
   not up to date and needs a full copy (`FULL_RESYNC`). Nothing has been
   written to the new leg yet;
3. its check array is zeroed (nothing on it is trusted), then it rejoins
   like any stale leg (watch.py): its own header (not up to date, full
   copy), then every bitmap block with every region marked, and only then
   does it take writes, while the resync copies (compares first) every
   region. It serves reads only of regions already copied, and is recorded
   up to date (a new generation) once nothing is pending.

A crash at any point leaves the new leg recorded nowhere as up to date:
before step 2 the old legs have no row for it (`history` copies such a leg
in full), from step 2 on their rows say it needs a full copy, and its own
header never says up to date before its copy is complete. A leg that
already holds this storage's metadata (it was a leg once) is copied in full
too: the bitmap was cleared while it was no member, so it cannot tell what
the leg missed; the copy compares first, so equal windows move no data.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..errors import NodeError, UserError
from ..units import format_size
from .geometry import Geometry
from .legs import LegRole, MirrorLeg
from .membership import Membership
from .metadata import BLOCK, MetadataError, leg_layout
from .startup import examine_leg, take_write_grants

log = logging.getLogger(__name__)


async def check_new_leg(leg: MirrorLeg, geometry: Geometry, storage_id: bytes) -> None:
    """UserError (one line) if `leg`, not yet part of the storage, cannot
    be added: its node is offline, it cannot hold the storage, or it holds
    another storage's metadata (refused rather than overwritten: it may be
    a mistyped address)."""
    if not leg.online:
        raise UserError(f"cannot add {leg}: its node is unreachable")
    try:
        layout = leg_layout(leg.size, geometry.region_size)
    except ValueError as exc:
        raise UserError(f"cannot add {leg}: {exc}") from None
    if layout.data_capacity < geometry.size:
        raise UserError(
            f"cannot add {leg}: it holds {format_size(layout.data_capacity)} of data, less "
            f"than the storage's {format_size(geometry.size)}"
        )
    finding = await examine_leg(leg)
    header = finding.header
    if header is not None and header.storage_id != storage_id:
        raise UserError(
            f"cannot add {leg}: it holds another mirror storage (id "
            f"{header.storage_id.hex()[:8]}); refusing to overwrite it (wipe the node first "
            "if its data is no longer needed)"
        )
    if not finding.reachable:
        raise UserError(f"cannot add {leg}: {finding.problem}")
    if header is not None:
        log.info(
            "%s: holds this storage's metadata from generation %d; it is compared in full "
            "(equal windows move no data)",
            leg,
            header.generation,
        )


async def admit_leg(
    leg: MirrorLeg,
    membership: Membership,
    geometry: Geometry,
    *,
    checks: bool,
    watch: Callable[[MirrorLeg], Awaitable[None]],
) -> None:
    """Steps 1 to 3 of the module doc for `leg`, appended STALE with
    `full_resync` set; then `watch` watches the leg for good (it rejoins
    and is resynced like any stale leg, watch.py). A failure leaves the leg stale and
    blocked (`leg.blocked` says why): it receives nothing."""
    assert leg.role is LegRole.STALE and leg.full_resync
    name = membership.storage_name
    try:
        await take_write_grants(name, [leg])
    except UserError as exc:
        _block(leg, str(exc))
        return
    leg.stale_since = membership.generation + 1
    membership.bump()
    try:
        await membership.ensure_durable()
    except NodeError as exc:
        _block(leg, f"its membership could not be recorded: {exc}")
        return
    log.info(
        "%s: added at generation %d, not up to date; full copy follows",
        leg,
        membership.generation,
    )
    try:
        # A former leg's slots hold headers of higher sequence than this
        # object knows: reading them makes the ones written from now on the
        # newest. Not before the record above: the first request to the
        # node exercises the grant taken over, which a mount taken over
        # meanwhile must not do (the record's writes find it fenced first).
        await leg.read_header()
    except (MetadataError, NodeError):
        pass  # no valid header to write above (a failing node fails later)
    leg.layout = layout = leg_layout(leg.size, geometry.region_size)
    if checks:
        try:
            await leg.zero_checks(layout.checks_length // BLOCK)
        except NodeError as exc:
            _block(leg, f"its check array could not be cleared: {exc}")
            return
    await watch(leg)


def _block(leg: MirrorLeg, reason: str) -> None:
    leg.blocked = reason
    log.error("%s: cannot be added: %s", leg, reason)

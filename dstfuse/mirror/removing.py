"""Removing legs of a running mirror, any of them (`dstfuse reload`).

`refuse_unsafe_removal` refuses, with one line, a removal that would leave
no up-to-date leg, or that comes while an earlier one is still being
recorded. `begin_removal` (no await: the reload applies it at once) stops
the legs: they take no more writes, serve no more reads, and never rejoin.
`retire_legs` then finishes, in this order (docs/mirror-metadata.md
section 10):

1. a new generation G1 is written to the headers of every remaining leg
   that takes writes, recording the legs as not up to date and as being
   removed (`removing`, still in the old numbering). Every write that did
   not reach them waits for this record before it completes, as after a
   leg failure;
2. each removed leg's own header is rewritten, if it is reachable, to say
   it is not up to date, so no later mount takes it as a source;
3. once nothing sent to them still runs, with no await in between: they
   leave the leg list, the legs after them are renumbered (`leg.index`,
   the member-table rows, the control tree's `n-0-<index>` entries), and
   the renumbering generation G is started, recording
   `Renumbering(removed, G, previous)`;
4. G is written to every remaining leg (FUA, like every header), then the
   removed legs' nodes are flushed and closed.

A crash at any point leaves one consistent membership, which the next
mount finds through numbering.py: before step 1 is durable no write
completed without the legs (the config without them is refused: the
headers record them up to date; the old config mounts as before); from
step 1 on the new config completes the removal and the old config keeps
them as stale legs; from the first header of step 4 on, a leg whose header
is still older is translated (one renumbering behind), and the old config
is refused when it lists a removed leg before a remaining one (it would
renumber them back), or copies the removed legs in full when they were
the last ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..algorithms.base import Placement
from ..errors import NodeError, UserError
from .legs import LegRole, MirrorLeg
from .membership import Membership
from .metadata import Renumbering, numbering_of

log = logging.getLogger(__name__)

#: `leg.blocked` of a leg being removed (the watcher never rejoins it).
REMOVING = "being removed by a reload"


def refuse_while_removing(storage_name: str, legs: list[MirrorLeg]) -> None:
    """UserError (one line) while an earlier removal is still being
    recorded: one membership change at a time."""
    busy = [str(leg.index) for leg in legs if leg.blocked == REMOVING]
    if busy:
        raise UserError(
            f"storage {storage_name}: the removal of leg(s) {', '.join(busy)} is still being "
            "recorded; reload again in a moment"
        )


def refuse_unsafe_removal(storage_name: str, legs: list[MirrorLeg], gone: list[int]) -> None:
    """UserError (one line) unless the legs at positions `gone` can go: no
    other removal is under way, and at least one up-to-date leg remains."""
    refuse_while_removing(storage_name, legs)
    kept = [leg for leg in legs if leg.index not in gone]
    if not any(leg.in_sync for leg in kept):
        up_to_date = [str(leg.index) for leg in legs if leg.in_sync]
        which = ", ".join(up_to_date) or "none"
        raise UserError(
            f"storage {storage_name}: cannot remove leg(s) "
            f"{', '.join(map(str, gone))}: no remaining leg is up to date "
            f"(up to date now: leg(s) {which}); wait until another leg is in sync"
        )


def begin_removal(gone: list[MirrorLeg], membership: Membership) -> None:
    """Stop the legs `gone` at once: no more writes or reads to them, no
    rejoining; a new generation records them stale and being removed."""
    for leg in gone:
        leg.blocked = REMOVING
        if leg.role is not LegRole.STALE:
            leg.role = LegRole.STALE
            leg.pending = None
            leg.stale_since = membership.generation + 1
        membership.joining.discard(leg)
        membership.removing |= 1 << leg.index
        log.info("%s: removal started; it takes no more writes", leg)
    membership.bump()


async def retire_legs(
    gone: list[MirrorLeg],
    membership: Membership,
    legs: list[MirrorLeg],
    placements: list[Placement],
    place: Callable[[MirrorLeg], Placement],
) -> None:
    """Steps 1 to 4 of the module doc, after `begin_removal`. `legs` is the
    mirror's leg list and `placements` its control-tree placements, both
    rebuilt in place at step 3 (`place` makes a leg's placement)."""
    name = membership.storage_name
    try:
        await membership.ensure_durable()
    except NodeError as exc:
        log.error(
            "storage %s: the removal of %s could not be recorded (%s); they stay stale legs",
            name, ", ".join(map(str, gone)), exc,
        )  # fmt: skip
        return
    for leg in gone:
        if leg.layout is not None and leg.online:
            try:
                await leg.write_header(membership.header(leg))
            except NodeError as exc:
                log.warning("%s: its own header could not be marked outdated: %s", leg, exc)
    for leg in gone:
        await leg.wait_settled()
    renumber(gone, membership, legs, placements, place)
    try:
        await membership.ensure_durable()
    except NodeError as exc:
        log.error("storage %s: the renumbered membership was not written: %s", name, exc)
    for leg in gone:
        if leg.online:
            try:
                await leg.flush()
            except NodeError as exc:
                log.warning("%s: final flush failed: %s", leg, exc)
        await leg.node.aclose()
        log.info(
            "%s: removed; the legs renumbered at generation %d; node closed",
            leg, membership.renumbered.generation if membership.renumbered else 0,
        )  # fmt: skip


def renumber(
    gone: list[MirrorLeg],
    membership: Membership,
    legs: list[MirrorLeg],
    placements: list[Placement],
    place: Callable[[MirrorLeg], Placement],
) -> None:
    """Step 3 of the module doc, with no await: the legs `gone` leave
    `legs`, the others take their new positions, `placements` is rebuilt,
    and the renumbering generation is started (its headers are written by
    the next `ensure_durable`). Requests in flight hold leg objects, not
    positions, so they complete on the legs they were sent to."""
    removed = 0
    for leg in gone:
        removed |= 1 << leg.index
        legs.remove(leg)
    moved = []
    for position, leg in enumerate(legs):
        if leg.index != position:
            moved.append(f"leg {leg.index} is now leg {position}")
            leg.index = position
    membership.renumbered = Renumbering(
        removed, membership.generation + 1, previous=numbering_of(membership.renumbered)
    )
    membership.removing = 0
    membership.bump()
    placements[:] = [place(leg) for leg in legs]
    log.info(
        "storage %s: renumbered at generation %d (%s)",
        membership.storage_name,
        membership.generation,
        "; ".join(moved) or "no leg moved",
    )

"""Removing the last legs of a running mirror (`dstfuse reload`).

`refuse_unsafe_removal` refuses, with one line, a removal that would leave no
up-to-date leg. `begin_removal` (no await: the reload applies it at once)
stops the leg: it takes no more writes and serves no more reads, and it
never rejoins. `retire_leg` then finishes, in this order
(docs/mirror-metadata.md, "Removing a leg"):

1. a new generation is written to the headers of every remaining leg that
   takes writes, recording the leg as not up to date (every write that did
   not reach it waits for this record before it completes, as after a leg
   failure);
2. the leg's own header is rewritten to say it is not up to date, if it is
   reachable, so that a later mount of the old config never takes it as a
   source (its data is also older than the others' from now on);
3. once nothing sent to it still runs, it leaves the member list, a new
   generation without its row is written to the remaining legs, and its
   node is closed.

A crash at any point leaves one consistent membership: before step 1
completed no write completed without the leg; from step 1 on the remaining
legs record it stale (the bitmap keeps what it missed: nothing is cleared
while a leg is stale); from step 3 on they have no row for it, which the
mount decision treats as unknown history (a full copy) should the old
config bring it back.
"""

from __future__ import annotations

import logging

from ..algorithms.base import Placement
from ..errors import NodeError, UserError
from .legs import LegRole, MirrorLeg
from .membership import Membership

log = logging.getLogger(__name__)

#: `leg.blocked` of a leg being removed (the watcher never rejoins it).
REMOVING = "being removed by a reload"


def refuse_while_removing(storage_name: str, legs: list[MirrorLeg]) -> None:
    """UserError (one line) while an earlier removal is still being
    recorded: the member list shrinks only at its end, one change at a time."""
    busy = [str(leg.index) for leg in legs if leg.blocked == REMOVING]
    if busy:
        raise UserError(
            f"storage {storage_name}: the removal of leg(s) {', '.join(busy)} is still being "
            "recorded; reload again in a moment"
        )


def refuse_unsafe_removal(storage_name: str, legs: list[MirrorLeg], count: int) -> None:
    """UserError (one line) unless the last `count` legs can go: no other
    removal is under way, and at least one up-to-date leg remains."""
    refuse_while_removing(storage_name, legs)
    kept, gone = legs[: len(legs) - count], legs[len(legs) - count :]
    if not any(leg.in_sync for leg in kept):
        up_to_date = [str(leg.index) for leg in gone if leg.in_sync]
        which = ", ".join(up_to_date) or "none"
        raise UserError(
            f"storage {storage_name}: cannot remove leg(s) "
            f"{', '.join(str(leg.index) for leg in gone)}: no remaining leg is up to date "
            f"(up to date now: leg(s) {which}); wait until another leg is in sync"
        )


def begin_removal(leg: MirrorLeg, membership: Membership) -> None:
    """Stop `leg` at once: no more writes or reads to it, no rejoining."""
    leg.blocked = REMOVING
    if leg.role is not LegRole.STALE:
        leg.role = LegRole.STALE
        leg.pending = None
        leg.stale_since = membership.generation + 1
    membership.joining.discard(leg)
    membership.bump()
    log.info("%s: removal started; it takes no more writes", leg)


async def retire_legs(
    gone: list[MirrorLeg],
    membership: Membership,
    legs: list[MirrorLeg],
    placements: list[Placement],
) -> None:
    """`retire_leg` for each of `gone` (the last legs, after
    `begin_removal`), the last one first: a member table's rows are the
    legs' positions, so the list only ever shrinks at its end."""
    for leg in reversed(gone):
        await retire_leg(leg, membership, legs, placements)


async def retire_leg(
    leg: MirrorLeg, membership: Membership, legs: list[MirrorLeg], placements: list[Placement]
) -> None:
    """Steps 1 to 3 of the module doc, after `begin_removal`. `legs` is the
    mirror's leg list and `placements` its control-tree placements (the leg
    is dropped from both at step 3, being the last of each)."""
    name = membership.storage_name
    assert legs[-1] is leg and placements[-1].cookie == leg.index
    try:
        await membership.ensure_durable()
    except NodeError as exc:
        log.error("%s: its removal could not be recorded (%s); it stays a stale leg", leg, exc)
        return
    if leg.layout is not None and leg.online:
        try:
            await leg.write_header(membership.header(leg))
        except NodeError as exc:
            log.warning("%s: its own header could not be marked outdated: %s", leg, exc)
    await leg.wait_settled()
    legs.pop()
    placements.pop()
    membership.bump()
    try:
        await membership.ensure_durable()
    except NodeError as exc:
        log.error("storage %s: the membership without %s was not written: %s", name, leg, exc)
    if leg.online:
        try:
            await leg.node.flush()
        except NodeError as exc:
            log.warning("%s: final flush failed: %s", leg, exc)
    await leg.node.aclose()
    log.info("%s: removed at generation %d; node closed", leg, membership.generation)

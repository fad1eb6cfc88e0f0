"""`removing`: which removals of a mirror's legs are refused (one line)
before anything changes, and how the remaining legs are renumbered."""

from __future__ import annotations

import pytest

from dstfuse.errors import UserError
from dstfuse.mirror.legs import LegRole, MirrorLeg
from dstfuse.mirror.membership import Membership
from dstfuse.mirror.metadata import Renumbering
from dstfuse.mirror.options import MirrorOptions
from dstfuse.mirror.removing import REMOVING, begin_removal, refuse_unsafe_removal, renumber

from .test_mirror_nodes import MemoryNode


def legs(*roles: LegRole) -> list[MirrorLeg]:
    made = []
    for index, role in enumerate(roles):
        leg = MirrorLeg("vol0", index, MemoryNode(f"m{index}", 1 << 20), None)
        leg.role = role
        made.append(leg)
    return made


SYNC, STALE, RESYNCING = LegRole.IN_SYNC, LegRole.STALE, LegRole.RESYNCING


@pytest.mark.parametrize(
    ("roles", "gone"),
    [
        ((SYNC, SYNC, SYNC), [2]),
        ((SYNC, STALE, SYNC), [1, 2]),
        ((SYNC, RESYNCING), [1]),
        ((SYNC, SYNC, SYNC), [0]),
        ((STALE, SYNC, SYNC), [0, 1]),
    ],
)
def test_a_removal_that_keeps_an_up_to_date_leg_is_allowed(roles, gone):
    refuse_unsafe_removal("vol0", legs(*roles), gone)


def test_removing_the_last_up_to_date_leg_is_refused_in_one_line():
    with pytest.raises(UserError) as caught:
        refuse_unsafe_removal("vol0", legs(STALE, RESYNCING, SYNC), [2])
    assert str(caught.value) == (
        "storage vol0: cannot remove leg(s) 2: no remaining leg is up to date (up to date "
        "now: leg(s) 2); wait until another leg is in sync"
    )


def test_a_removal_is_refused_while_an_earlier_one_is_being_recorded():
    mirror = legs(SYNC, SYNC, STALE)
    mirror[2].blocked = REMOVING
    with pytest.raises(UserError, match="removal of leg\\(s\\) 2 is still being recorded"):
        refuse_unsafe_removal("vol0", mirror, [1])


def test_the_last_up_to_date_leg_cannot_go_from_the_middle_either():
    with pytest.raises(UserError, match="cannot remove leg\\(s\\) 1: no remaining leg"):
        refuse_unsafe_removal("vol0", legs(STALE, SYNC, RESYNCING), [1])


def test_renumbering_shifts_the_legs_after_the_removed_one_at_once():
    mirror = legs(SYNC, SYNC, SYNC, SYNC)
    membership = Membership("vol0", mirror, MirrorOptions.parse("vol0", {}), None)  # type: ignore[arg-type]
    membership.generation = 6
    gone = [mirror[0], mirror[2]]
    kept = [mirror[1], mirror[3]]
    begin_removal(gone, membership)
    assert membership.generation == 7 and membership.removing == 0b0101
    assert [leg.role for leg in gone] == [STALE, STALE] and gone[0].blocked == REMOVING
    placements: list = ["stale placements"]
    renumber(gone, membership, mirror, placements, lambda leg: ("placed", leg.index))
    assert mirror == kept and [leg.index for leg in kept] == [0, 1]
    assert placements == [("placed", 0), ("placed", 1)]
    assert membership.renumbered == Renumbering(0b0101, 8, 0)
    assert membership.generation == 8 and membership.removing == 0
    gone_again = [mirror[0]]
    begin_removal(gone_again, membership)
    renumber(gone_again, membership, mirror, placements, lambda leg: leg.index)
    assert membership.renumbered == Renumbering(0b1, 10, 8) and mirror[0].index == 0

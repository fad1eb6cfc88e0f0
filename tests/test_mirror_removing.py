"""`removing.refuse_unsafe_removal`: which removals of a mirror's last legs
are refused (one line) before anything changes."""

from __future__ import annotations

import pytest

from dstfuse.errors import UserError
from dstfuse.mirror.legs import LegRole, MirrorLeg
from dstfuse.mirror.removing import REMOVING, refuse_unsafe_removal

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
    ("roles", "count"),
    [((SYNC, SYNC, SYNC), 1), ((SYNC, STALE, SYNC), 2), ((SYNC, RESYNCING), 1)],
)
def test_a_removal_that_keeps_an_up_to_date_leg_is_allowed(roles, count):
    refuse_unsafe_removal("vol0", legs(*roles), count)


def test_removing_the_last_up_to_date_leg_is_refused_in_one_line():
    with pytest.raises(UserError) as caught:
        refuse_unsafe_removal("vol0", legs(STALE, RESYNCING, SYNC), 1)
    assert str(caught.value) == (
        "storage vol0: cannot remove leg(s) 2: no remaining leg is up to date (up to date "
        "now: leg(s) 2); wait until another leg is in sync"
    )


def test_a_removal_is_refused_while_an_earlier_one_is_being_recorded():
    mirror = legs(SYNC, SYNC, STALE)
    mirror[2].blocked = REMOVING
    with pytest.raises(UserError, match="removal of leg\\(s\\) 2 is still being recorded"):
        refuse_unsafe_removal("vol0", mirror, 1)

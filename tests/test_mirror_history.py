"""`plan_start`: what a mirror decides at mount from its legs' headers."""

from __future__ import annotations

import pytest

from dstfuse.errors import UserError
from dstfuse.mirror.history import (
    FULL,
    IN_SYNC,
    OFFLINE,
    PARTIAL,
    LegFinding,
    NewerLegMayBeMissing,
    plan_start,
)
from dstfuse.mirror.metadata import (
    FLAG_CLEAN,
    MEMBER_FULL_RESYNC,
    MEMBER_IN_SYNC,
    MemberRecord,
    MirrorHeader,
    Renumbering,
    leg_layout,
)
from dstfuse.mirror.numbering import in_numbering

MiB = 1 << 20
ID = b"i" * 16
OTHER = b"o" * 16
SYNC = MemberRecord(MEMBER_IN_SYNC)


def stale(since: int, full: bool = False) -> MemberRecord:
    return MemberRecord(MEMBER_FULL_RESYNC if full else 0, since, 0)


def header(index, generation, members, *, clean=True, storage_id=ID) -> MirrorHeader:
    return MirrorHeader(
        storage_id=storage_id,
        leg_index=index,
        generation=generation,
        leg_size=64 * MiB,
        data_size=leg_layout(64 * MiB, 4 * MiB).data_capacity,
        region_size=4 * MiB,
        members=tuple(members),
        flags=FLAG_CLEAN if clean else 0,
    )


def found(index, *args, **kwargs) -> LegFinding:
    return LegFinding(index, reachable=True, header=header(index, *args, **kwargs))


def test_clean_legs_of_one_generation_are_all_in_sync():
    plan = plan_start("vol0", [found(0, 5, [SYNC, SYNC]), found(1, 5, [SYNC, SYNC])])
    assert plan.roles == {0: IN_SYNC, 1: IN_SYNC} and not plan.unclean and plan.source == 0


def test_after_an_unclean_shutdown_the_others_resync_the_marked_regions():
    plan = plan_start(
        "vol0", [found(0, 5, [SYNC, SYNC], clean=False), found(1, 6, [SYNC, SYNC], clean=False)]
    )
    assert plan.source == 1  # the newest generation
    assert plan.roles == {0: PARTIAL, 1: IN_SYNC} and plan.unclean
    assert plan.bitmap_legs == [0, 1]


def test_a_leg_recorded_stale_resyncs_from_the_one_that_recorded_it():
    plan = plan_start("vol0", [found(0, 9, [SYNC, stale(7)]), found(1, 6, [SYNC, SYNC])])
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL}


def test_an_unfinished_full_resync_continues_as_full():
    plan = plan_start(
        "vol0", [found(0, 9, [SYNC, stale(8, full=True)]), found(1, 9, [SYNC, stale(8, True)])]
    )
    assert plan.roles == {0: IN_SYNC, 1: FULL}


def test_new_and_foreign_legs_get_a_full_resync():
    plan = plan_start(
        "vol0",
        [
            found(0, 3, [SYNC, SYNC, SYNC]),
            LegFinding(1, reachable=True, problem="no mirror metadata"),
            found(2, 3, [SYNC, SYNC, SYNC], storage_id=OTHER),
        ],
        primary=0,
    )
    assert plan.roles == {0: IN_SYNC, 1: FULL, 2: FULL}
    assert any("another storage" in note for note in plan.notes)


def test_legs_of_different_storages_need_a_primary():
    with pytest.raises(UserError, match="different storages.*primary"):
        plan_start("vol0", [found(0, 3, [SYNC, SYNC]), found(1, 3, [SYNC, SYNC], storage_id=OTHER)])


def test_split_brain_is_refused_and_primary_picks_the_winner():
    legs = [found(0, 8, [SYNC, stale(7)]), found(1, 9, [stale(8), SYNC])]
    with pytest.raises(UserError, match="split brain: legs 0 and 1.*generation 7.*generation 8"):
        plan_start("vol0", legs)
    plan = plan_start("vol0", legs, primary=0)
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL}


def test_an_old_claim_of_a_leg_the_newest_leg_left_behind_is_no_split_brain():
    """Found by the simulator (seed 3242838667): leg 1, left behind at
    generation 3 and last written at 2, still records leg 0 stale since 1;
    leg 0 was resynced from leg 2 since. Legs 0 and 2 (generation 8) hold
    everything leg 1 held: leg 2 is the source, leg 1 resyncs."""
    legs = [
        found(0, 8, [SYNC, stale(3), SYNC]),
        found(1, 2, [stale(1), SYNC, SYNC]),
        found(2, 8, [SYNC, stale(3), SYNC]),
    ]
    plan = plan_start("vol0", legs)
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL, 2: IN_SYNC}


def test_a_claim_is_superseded_only_by_a_newer_leg_the_claimant_records_in_sync():
    # leg 1 records leg 2 stale: it may hold writes leg 2 lacks (a real split)
    legs = [
        found(0, 8, [SYNC, stale(3), SYNC]),
        found(1, 4, [stale(1), SYNC, stale(4)]),
        found(2, 8, [SYNC, stale(3), SYNC]),
    ]
    with pytest.raises(UserError, match="split brain"):
        plan_start("vol0", legs)
    # leg 2 is not newer than leg 1: leg 1's claim stands
    legs = [
        found(0, 8, [SYNC, stale(3), SYNC]),
        found(1, 8, [stale(1), SYNC, SYNC]),
        found(2, 8, [SYNC, stale(3), SYNC]),
    ]
    with pytest.raises(UserError, match="split brain"):
        plan_start("vol0", legs)


def synced(at: int) -> MemberRecord:
    return MemberRecord(MEMBER_IN_SYNC, 0, at)


def test_a_claim_older_than_the_claimed_leg_catching_up_is_no_split_brain():
    """Found by the simulator (seed 3242838667, after the rule above): leg
    0 failed at first use and its header stayed at generation 1, where legs
    1 and 2 were still being filled; leg 2 caught up at generation 4 and
    went on to 7 without leg 0. Leg 2 is the source; leg 0 resyncs."""
    legs = [
        found(0, 1, [SYNC, stale(1, full=True), stale(1, full=True)], clean=False),
        found(1, 7, [stale(7), stale(7), synced(4)], clean=False),  # being copied
        found(2, 7, [stale(7), stale(7), synced(4)], clean=False),
    ]
    plan = plan_start("vol0", legs)
    assert plan.source == 2 and plan.roles[2] == IN_SYNC and plan.roles[0] != IN_SYNC


def test_a_leg_that_never_caught_up_after_the_claim_is_split_brain():
    # leg 1 was in sync since generation 4, leg 0 went on alone at 5, and
    # leg 1 was then mounted without leg 0 (-o force) at 6
    legs = [found(0, 5, [SYNC, stale(5)]), found(1, 6, [stale(6), synced(4)])]
    with pytest.raises(UserError, match="split brain"):
        plan_start("vol0", legs)


def test_a_leg_a_third_leg_went_on_without_is_outdated_not_split():
    """Leg 2 was written with leg 0 while leg 1 was away, then left behind
    by leg 0 (a crash in the middle of a write); leg 1 came back with leg 0
    and was written without leg 2. Legs 1 and 2 record each other stale,
    but leg 0 holds both histories: not a split brain (found by the
    simulator; the mount refused and offered primary=2, which drops the
    writes since)."""
    legs = [
        found(0, 6, [SYNC, SYNC, stale(5)], clean=False),
        found(1, 6, [SYNC, SYNC, stale(5)], clean=False),
        found(2, 4, [SYNC, stale(3), SYNC], clean=False),
    ]
    plan = plan_start("vol0", legs)
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL, 2: PARTIAL}
    # each written without the other and no leg holds both: a split brain
    split = [
        found(0, 6, [SYNC, stale(5), stale(3)], clean=False),
        found(1, 6, [stale(5), SYNC, stale(5)], clean=False),
        found(2, 4, [stale(3), stale(3), SYNC], clean=False),
    ]
    with pytest.raises(UserError, match="split brain"):
        plan_start("vol0", split)


def test_no_complete_leg_is_refused_naming_why():
    legs = [found(0, 4, [stale(3), stale(3, full=True)]), found(1, 4, [stale(3), stale(3, True)])]
    with pytest.raises(UserError, match="no reachable leg holds a complete copy"):
        plan_start("vol0", legs)


def test_primary_must_be_a_complete_leg_of_this_storage():
    legs = [found(0, 8, [SYNC, stale(7)]), found(1, 8, [SYNC, stale(7)])]
    with pytest.raises(UserError, match="incomplete"):
        plan_start("vol0", legs, primary=1)
    with pytest.raises(UserError, match="not a leg index"):
        plan_start("vol0", legs, primary=5)


def test_reordered_nodes_are_refused():
    legs = [found(0, 3, [SYNC, SYNC]), found(1, 3, [SYNC, SYNC])]
    swapped = [LegFinding(0, True, legs[1].header), LegFinding(1, True, legs[0].header)]
    with pytest.raises(UserError, match="order of its nodes"):
        plan_start("vol0", swapped)


def test_a_former_leg_not_up_to_date_at_another_position_is_copied_in_full():
    """Leg 2 was removed (its own row says not in sync) and added back as
    leg 3; a crash came before its header was rewritten. Not a reordered
    config: it is copied in full (found by the simulator)."""
    removed = header(2, 6, [SYNC, SYNC, stale(6)])
    plan = plan_start(
        "vol0",
        [
            found(0, 9, [SYNC, SYNC, SYNC], clean=False),
            found(1, 9, [SYNC, SYNC, SYNC], clean=False),
            found(2, 9, [SYNC, SYNC, SYNC], clean=False),
            LegFinding(3, True, removed),
        ],
    )
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL, 2: PARTIAL, 3: FULL}
    assert any("held leg 2 of this storage" in note for note in plan.notes)
    # up to date by its own record, it may be the newest copy: still refused
    complete = header(2, 6, [SYNC, SYNC, SYNC])
    with pytest.raises(UserError, match="order of its nodes"):
        plan_start("vol0", [found(0, 9, [SYNC, SYNC, SYNC]), found(1, 9, [SYNC, SYNC, SYNC]),
                            found(2, 9, [SYNC, SYNC, SYNC]), LegFinding(3, True, complete)])


def test_first_use_takes_leg0_as_the_source_unless_assume_clean():
    legs = [LegFinding(i, reachable=True) for i in range(3)]
    assert plan_start("vol0", legs).roles == {0: IN_SYNC, 1: FULL, 2: FULL}
    assert plan_start("vol0", legs, assume_clean=True).roles == {0: IN_SYNC, 1: IN_SYNC, 2: IN_SYNC}
    assert plan_start("vol0", legs).fresh


def test_unreachable_legs_are_offline_and_do_not_vote():
    plan = plan_start(
        "vol0", [LegFinding(0, reachable=False, problem="offline"), found(1, 4, [stale(4), SYNC])]
    )
    assert plan.source == 1 and plan.roles == {0: OFFLINE, 1: IN_SYNC}


@pytest.mark.parametrize(
    "findings, options, outcome",
    [
        # the missing leg is recorded outdated by the survivor: go on without it
        ([None, (1, 4, ["stale", "sync"])], {}, 1),
        # the survivor records the missing leg in sync: it may be newer
        ([None, (1, 4, ["sync", "sync"])], {}, "refused 0"),
        # ... even after a clean shutdown (another mount may have run without us)
        ([None, (1, 4, ["sync", "sync"], True)], {}, "refused 0"),
        # the user chooses: primary= or force
        ([None, (1, 4, ["sync", "sync"])], {"primary": 1}, 1),
        ([None, (1, 4, ["sync", "sync"])], {"force": True}, 1),
        # three legs: one missing leg recorded outdated, the other not
        ([None, (1, 6, ["stale", "sync", "sync"]), None], {}, "refused 2"),
        ([(0, 6, ["sync", "stale", "stale"]), None, None], {}, 0),
        # every leg reachable: nothing is missing, the newest wins
        ([(0, 5, ["sync", "stale"]), (1, 4, ["sync", "sync"])], {}, 0),
    ],
)
def test_the_mount_decision_over_disk_states(findings, options, outcome):
    legs = []
    for index, spec in enumerate(findings):
        if spec is None:
            legs.append(LegFinding(index, reachable=False, problem="offline"))
            continue
        leg, generation, rows, *clean = spec
        members = [SYNC if row == "sync" else stale(generation) for row in rows]
        legs.append(found(leg, generation, members, clean=bool(clean and clean[0])))
    if isinstance(outcome, str):
        missing = [int(part) for part in outcome.split()[1:]]
        with pytest.raises(NewerLegMayBeMissing) as refused:
            plan_start("vol0", legs, **options)
        assert refused.value.missing == missing
        assert "may hold newer data" in str(refused.value)
    else:
        assert plan_start("vol0", legs, **options).source == outcome


def test_a_leg_of_this_storage_the_source_has_no_row_for_is_copied_in_full():
    """A leg added online (or by a longer config) that already holds this
    storage's metadata from an earlier time: the source's table has no row
    for it, so nothing says which regions it missed (the bitmap was cleared
    while it was not a member). A crash before the add recorded it must not
    let its own old `in sync` row make it a partial resync."""
    plan = plan_start(
        "vol0",
        [
            found(0, 9, [SYNC, SYNC], clean=False),
            found(1, 9, [SYNC, SYNC], clean=False),
            found(2, 4, [SYNC, SYNC, SYNC], clean=False),
        ],
    )
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL, 2: FULL}


def test_an_unreachable_leg_the_source_has_no_row_for_is_copied_in_full_when_back():
    plan = plan_start(
        "vol0",
        [
            found(0, 9, [SYNC, SYNC]),
            found(1, 9, [SYNC, SYNC]),
            LegFinding(2, reachable=False, problem="offline"),
        ],
        force=True,
    )
    assert plan.roles[2] == OFFLINE and plan.unknown_history == {2}
    known = plan_start(
        "vol0",
        [found(0, 9, [SYNC, stale(8)]), LegFinding(1, reachable=False, problem="offline")],
    )
    assert known.unknown_history == set()


# -- legs removed from the middle: headers of two numberings (numbering.py) ----
def renumbered(index, generation, members, removed, at, previous=0, **kwargs) -> MirrorHeader:
    return header(index, generation, members, **kwargs).with_changes(
        renumbered=Renumbering(removed, at, previous)
    )


def removing(index, generation, members, mask, **kwargs) -> MirrorHeader:
    return header(index, generation, members, **kwargs).with_changes(removing=mask)


def at(position, made: MirrorHeader) -> LegFinding:
    return LegFinding(position, reachable=True, header=made)


#: Leg 1 of three removed: legs 0 and 2 recorded it stale (generation 7, the
#: removal begun), then the renumbering generation 8 was written to leg 0
#: only before the client was killed.
BEGUN_0 = removing(0, 7, [SYNC, stale(7), SYNC], 0b010, clean=False)
BEGUN_2 = removing(2, 7, [SYNC, stale(7), SYNC], 0b010, clean=False)
DONE_0 = renumbered(0, 8, [SYNC, SYNC], 0b010, 8, clean=False)
DONE_2 = renumbered(1, 8, [SYNC, SYNC], 0b010, 8, clean=False)


def test_a_leg_left_one_renumbering_behind_is_taken_as_its_new_position():
    plan = plan_start("vol0", [at(0, DONE_0), at(1, BEGUN_2)])
    assert plan.roles == {0: IN_SYNC, 1: PARTIAL} and plan.unclean
    assert plan.renumbered == Renumbering(0b010, 8, 0)
    assert plan.bitmap_legs == [0, 1]


def test_the_renumbered_legs_are_in_sync_after_a_clean_shutdown():
    legs = [
        at(0, renumbered(0, 9, [SYNC, SYNC], 0b001, 9, 4)),
        at(1, renumbered(1, 9, [SYNC, SYNC], 0b001, 9, 4)),
    ]
    plan = plan_start("vol0", legs)
    assert plan.roles == {0: IN_SYNC, 1: IN_SYNC} and plan.renumbered == Renumbering(1, 9, 4)


def test_a_removal_recorded_but_not_renumbered_is_completed_by_the_new_config():
    plan = plan_start("vol0", [at(0, BEGUN_0), at(1, BEGUN_2)])
    assert plan.roles == {0: IN_SYNC, 1: PARTIAL} and plan.unclean
    assert plan.renumbered == Renumbering(0b010, 8, 0)
    assert any("completed now" in note for note in plan.notes)


def test_the_old_config_keeps_a_removal_that_was_not_renumbered_as_a_stale_leg():
    removed = removing(1, 6, [SYNC, SYNC, SYNC], 0, clean=False)
    plan = plan_start("vol0", [at(0, BEGUN_0), at(1, removed.with_changes(
        members=(SYNC, stale(7), SYNC))), at(2, BEGUN_2)])
    assert plan.roles[1] == PARTIAL and plan.source in (0, 2)
    assert plan.renumbered is None


def test_the_old_config_after_a_renumbering_is_refused_in_one_line():
    removed = header(1, 7, [SYNC, stale(7), SYNC], clean=False)
    with pytest.raises(UserError) as caught:
        plan_start("vol0", [at(0, DONE_0), at(1, removed), at(2, DONE_2)])
    assert str(caught.value) == (
        "storage vol0: node(s) 1 of the config were removed from this mirror at generation 8 "
        "(dstfuse reload), which renumbered the legs after them; mount the config without them "
        "(a removed node can be added back at the end)"
    )


def test_a_removed_leg_added_back_at_the_end_is_copied_in_full():
    removed = header(1, 7, [SYNC, stale(7), SYNC], clean=False)
    plan = plan_start("vol0", [at(0, DONE_0), at(1, DONE_2), at(2, removed)])
    assert plan.roles == {0: IN_SYNC, 1: PARTIAL, 2: FULL}
    assert plan.source == 0


def test_a_removed_leg_is_never_the_source():
    # The removed leg's own header is the newest: it must still not count.
    removed = header(1, 9, [SYNC, SYNC, SYNC])
    plan = plan_start("vol0", [at(0, DONE_0), at(1, DONE_2), at(2, removed)])
    assert plan.source == 0 and plan.roles[2] == FULL


def test_without_a_removal_record_a_leg_gone_from_the_middle_is_a_reordering():
    legs = [at(0, header(0, 5, [SYNC, SYNC, SYNC])), at(1, header(2, 5, [SYNC, SYNC, SYNC]))]
    with pytest.raises(UserError, match="node 1 holds leg 2 .*only by dstfuse reload"):
        plan_start("vol0", legs)


def test_a_leg_two_renumberings_behind_recorded_in_sync_is_refused_unless_forced():
    old = header(2, 3, [SYNC, SYNC, SYNC, SYNC])  # numbering 0; removals at 5 and 8
    legs = [
        at(0, renumbered(0, 8, [SYNC, SYNC], 0b010, 8, 5)),
        at(1, old),
    ]
    with pytest.raises(UserError, match="leg 1: its metadata .* predates .* up to date"):
        plan_start("vol0", legs)
    plan = plan_start("vol0", legs, force=True)
    assert plan.roles == {0: IN_SYNC, 1: FULL}


def test_a_leg_two_renumberings_behind_recorded_stale_is_copied_in_full():
    old = header(2, 3, [SYNC, SYNC, SYNC, SYNC])
    legs = [at(0, renumbered(0, 8, [SYNC, stale(4)], 0b010, 8, 5)), at(1, old)]
    assert plan_start("vol0", legs).roles == {0: IN_SYNC, 1: FULL}


def test_renumbering_maps_indices_past_every_removed_leg():
    numbering = Renumbering(0b01010, 9)
    assert [numbering.new_index(i) for i in range(5)] == [0, None, 1, None, 2]
    translated = in_numbering(header(4, 8, [SYNC, stale(3), SYNC, stale(3), SYNC]), numbering)
    assert translated.header is not None and translated.header.leg_index == 2
    assert translated.header.members == (SYNC, SYNC, SYNC)
    assert in_numbering(header(3, 8, [SYNC] * 5), numbering).header is None
    # written at or after the renumbering in the old numbering (by a session
    # that went without the legs recording it): translated all the same
    later = in_numbering(header(4, 9, [SYNC] * 5), numbering).header
    assert later is not None and later.leg_index == 2 and later.members == (SYNC,) * 3


def test_a_forced_mount_that_never_saw_a_renumbering_meets_it_as_a_split_brain():
    """Seed 6065 of the simulator: leg 2 of three was removed (renumbering
    generation 6) while leg 0 was away, and leg 1 went on to generation 7
    recording leg 0 stale. A mount forced with leg 0 alone wrote generation
    6 in the old numbering recording the others stale. Both legs were
    written without each other: the next mount refuses, it does not copy
    leg 0 over in full (rolling back what the forced session wrote)."""
    forced = header(0, 6, [SYNC, stale(6), stale(6)], clean=False)
    went_on = renumbered(1, 7, [stale(7), SYNC], 0b100, 6, clean=False)
    removed = header(2, 5, [SYNC, SYNC, stale(5)], clean=False)
    legs = [at(0, forced), at(1, went_on), at(2, removed)]
    with pytest.raises(UserError, match="split brain: legs 0 and 1"):
        plan_start("vol0", legs)
    plan = plan_start("vol0", legs, primary=0)
    assert plan.source == 0 and plan.roles == {0: IN_SYNC, 1: PARTIAL, 2: FULL}


def test_the_renumbering_record_round_trips_through_the_header_bytes():
    made = renumbered(1, 8, [SYNC, SYNC], 0b100, 8, 5).with_changes(removing=0b1)
    back = MirrorHeader.unpack(made.pack())
    assert back.renumbered == Renumbering(0b100, 8, 5) and back.removing == 0b1
    plain = MirrorHeader.unpack(header(0, 2, [SYNC, SYNC]).pack())
    assert plain.renumbered is None and plain.removing == 0 and plain.numbering == 0


def test_the_mount_goes_past_the_generation_of_a_leg_it_cannot_translate():
    other_history = header(1, 20, [SYNC, SYNC])
    legs = [at(0, renumbered(0, 8, [SYNC, stale(4)], 0b010, 8, 5)), at(1, other_history)]
    plan = plan_start("vol0", legs)
    assert plan.roles == {0: IN_SYNC, 1: FULL} and plan.generation == 20

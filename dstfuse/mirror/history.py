"""What the legs' headers say at mount: which leg holds the newest data,
which legs need a resync, and whether the legs split.

`plan_start` is a pure function from what was found on each leg to a
`StartPlan`; it never does I/O, so every case (first use, clean and
unclean shutdown, a stale or foreign leg, split brain, `primary=`) is
tested as a table. The rules (docs/mirror-metadata.md, "Deciding at mount"):

- a leg's data is complete ("consistent") when its own member record says
  in sync; a leg another consistent leg records as stale missed writes,
  unless its own record says it became in sync (`synced_at`) at a
  generation after that leg's header was written (it caught up since);
- a consistent leg that records another leg in sync, which a later
  generation of that other leg records as stale, holds nothing the other
  lacks: its claims about the rest are superseded and do not vote;
- two consistent legs that each record the other as stale were both written
  without each other: split brain, refused unless `primary` names the leg
  whose data wins;
- otherwise the source is the consistent, unclaimed leg with the highest
  generation (lowest index on a tie), but only if its header proves it is
  up to date: every leg that is missing (unreachable, unreadable) must be
  recorded there as outdated. A missing leg it records in sync may have
  been written since (by a mount that could not reach the source), so the
  plan is refused (`NewerLegMayBeMissing`) unless `primary` or `force`
  says which data to keep; every other leg resyncs the regions
  marked in the union of the legs' bitmaps (the bitmap keeps every region
  written while any leg was stale), or everything when its history is
  unknown (no metadata, another storage's metadata, an unfinished full
  resync, or a leg the source's member table has no row for).

Before any of this, every header is put into the numbering of the config
(`_in_config_numbering`, numbering.py): after a leg was removed from the
middle, headers left one renumbering behind are translated, a removal
recorded but not yet renumbered is completed when the config no longer
lists its legs, and a config that still lists a removed leg before a
remaining one is refused (docs/mirror-metadata.md section 10).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .metadata import MirrorHeader, Renumbering
from .numbering import Translated, drop_legs, in_numbering, removed_legs

IN_SYNC = "in_sync"
PARTIAL = "partial"
FULL = "full"
OFFLINE = "offline"


@dataclass(frozen=True)
class LegFinding:
    """What start-up found on leg `index`: `header` is None when the leg is
    unreachable or has no usable metadata (`problem` says why)."""

    index: int
    reachable: bool
    header: MirrorHeader | None = None
    problem: str = ""


@dataclass
class StartPlan:
    storage_id: bytes | None  # None: first use, a new id is made
    source: int
    roles: dict[int, str]
    generation: int = 0
    region_size: int | None = None
    data_size: int | None = None
    unclean: bool = False
    #: legs whose bitmaps are read and united (same storage, reachable)
    bitmap_legs: list[int] = field(default_factory=list)
    #: the check arrays were kept by every session (else they are zeroed)
    checks_valid: bool = False
    #: the last renumbering the mount records in every header (section 10
    #: of docs/mirror-metadata.md); a removal found begun in the legs'
    #: headers and completed by this config has generation `generation + 1`,
    #: the one the mount writes
    renumbered: Renumbering | None = None
    #: unreachable legs the source's member table has no row for: when they
    #: come back their history is unknown (a full resync, whatever their
    #: own headers say)
    unknown_history: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        return self.storage_id is None


def _short(storage_id: bytes) -> str:
    return storage_id.hex()[:8]


class NewerLegMayBeMissing(UserError):
    """The reachable legs cannot prove that they hold the newest data: a
    missing leg may have been written without them. The mount waits for it
    (`mount_wait`), then refuses with this message."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


def _dominated(consistent: list[LegFinding]) -> set[int]:
    """Consistent legs whose data a newer consistent leg holds: leg b
    records leg c in sync, and c, written at a later generation, records b
    as stale (c went on without b). Everything b holds reached c, so b's
    claims about other legs are older than c's and superseded by them (a leg
    b saw as stale may have been resynced since). Their claims do not vote."""
    dominated = set()
    for leg in consistent:
        assert leg.header is not None
        for newer in consistent:
            assert newer.header is not None
            record = leg.header.member(newer.index)
            if (
                newer is not leg
                and newer.header.generation > leg.header.generation
                and record is not None
                and record.in_sync
                and _claims_stale(newer, leg)
            ):
                dominated.add(leg.index)
    return dominated


def _claims_stale(holder: LegFinding, other: LegFinding) -> bool:
    """`holder` records `other` as stale (a leg added after `holder` last
    wrote its table makes no claim), and `other` has not caught up since:
    a complete leg whose own row says it became in sync at a generation
    after `holder`'s header was written got every write `holder` had."""
    assert holder.header is not None
    record = holder.header.member(other.index)
    if record is None or record.in_sync:
        return False
    own = other.header.self_record if other.header is not None else None
    return not (own is not None and own.in_sync and own.synced_at > holder.header.generation)


def plan_start(
    storage_name: str,
    findings: list[LegFinding],
    *,
    primary: int | None = None,
    assume_clean: bool = False,
    force: bool = False,
) -> StartPlan:
    """Decide the start of a mirror from its legs' headers (see module doc).
    Raises NewerLegMayBeMissing when a missing leg may hold newer data
    (unless `primary` or `force`), UserError for split brain, legs of
    different storages, a reordered config, or a first use whose source leg
    is unreachable."""
    if primary is not None and not 0 <= primary < len(findings):
        raise UserError(
            f"storage {storage_name}: primary={primary} is not a leg index "
            f"(0 to {len(findings) - 1})"
        )
    known = [f for f in findings if f.header is not None]
    if not known:
        plan = _plan_first_use(storage_name, findings, primary, assume_clean)
        missing = [f.index for f in findings if not f.reachable]
        if missing and primary is None and not force:
            # A missing leg may hold this storage already (leg 0 was
            # replaced while it was away): creating one now would lose it.
            legs = ", ".join(map(str, missing))
            raise NewerLegMayBeMissing(
                f"storage {storage_name}: no reachable leg holds mirror metadata and leg(s) "
                f"{legs} unreachable may hold the storage's data; bring them back, or mount "
                f"with -o force to create the storage from leg {plan.source} without them",
                missing,
            )
        return plan

    storage_id = _choose_storage(storage_name, known, primary)
    members = [f for f in known if f.header is not None and f.header.storage_id == storage_id]
    # every mount goes past every generation it read (lease.py's epochs)
    newest_generation = max(f.header.generation for f in members)  # type: ignore[union-attr]
    findings, renumbered, translation_notes = _in_config_numbering(
        storage_name, findings, members, force=force
    )
    members = [f for f in findings if f.header is not None and f.header.storage_id == storage_id]
    consistent = [f for f in members if f.header is not None and f.header.self_record.in_sync]
    dominated = _dominated(consistent)
    voters = [f for f in consistent if f.index not in dominated]
    claimed = {
        other.index
        for other in members
        for holder in voters
        if holder is not other and _claims_stale(holder, other)
    }
    by_index = {f.index: f for f in findings}

    if primary is not None:
        source = by_index[primary]
        if source not in members:
            raise UserError(
                f"storage {storage_name}: primary={primary} names a leg that is unreachable "
                "or holds no metadata of this storage"
            )
        if source not in consistent:
            raise UserError(
                f"storage {storage_name}: leg {primary} is incomplete (its resync never "
                "finished) and cannot be the primary"
            )
    else:
        _refuse_split_brain(storage_name, voters)
        candidates = [f for f in voters if f.index not in claimed]
        if not consistent:
            raise UserError(
                f"storage {storage_name}: no reachable leg holds a complete copy (each records "
                "its own resync as unfinished); bring back the leg they were copied from"
            )
        if not candidates:
            raise UserError(
                f"storage {storage_name}: no leg is known to hold the newest data "
                f"(legs {', '.join(str(f.index) for f in consistent)} record each other as "
                "stale); mount with -o primary=<leg> to choose the leg to keep"
            )
        source = max(candidates, key=lambda f: (f.header.generation, -f.index))  # type: ignore[union-attr]
        if not force:
            _refuse_unproven_source(storage_name, findings, source)

    src = source.header
    assert src is not None
    unclean = not src.clean or any(
        not f.header.clean  # type: ignore[union-attr]
        for f in consistent
        if f.index not in claimed and f is not source
    )
    plan = StartPlan(
        storage_id=storage_id,
        source=source.index,
        roles={},
        generation=newest_generation,
        region_size=src.region_size,
        data_size=src.data_size,
        unclean=unclean,
        bitmap_legs=[f.index for f in members],
        checks_valid=all(f.header.checks_valid for f in members),  # type: ignore[union-attr]
        renumbered=renumbered,
        notes=translation_notes,
    )
    for finding in findings:
        plan.roles[finding.index] = _role(finding, source, members, consistent, claimed, primary)
        if not finding.reachable and src.member(finding.index) is None:
            plan.unknown_history.add(finding.index)
        if finding.header is None and finding.reachable:
            plan.notes.append(
                f"leg {finding.index}: {finding.problem or 'no metadata'}; full resync from "
                f"leg {source.index}"
            )
        elif finding.header is not None and finding not in members:
            plan.notes.append(
                f"leg {finding.index} holds another storage (id {_short(finding.header.storage_id)}"
                f", not {_short(storage_id)}); it is overwritten by a full resync"
            )
    if primary is not None:
        plan.notes.append(
            f"primary={primary}: leg {primary}'s data wins; the other legs resync from it"
        )
    return plan


def _in_config_numbering(
    storage_name: str, findings: list[LegFinding], members: list[LegFinding], *, force: bool
) -> tuple[list[LegFinding], Renumbering | None, list[str]]:
    """The findings with every member's header translated into the
    numbering of the config (numbering.py), the renumbering the mount
    records, and notes. The newest header's numbering is the current one;
    headers one renumbering behind are translated, others are no members.
    If the config is that numbering without the legs the newest header
    records as being removed (a removal whose renumbering was not written
    before a crash), the mount completes it. UserError when the config's
    positions match neither (reordered nodes, or a config that still lists
    legs removed from the middle), or when a member that cannot be
    translated is recorded up to date (its data may be needed)."""
    if not members:
        return findings, None, []
    # The newest numbering knows every removal the others may not; within
    # one history it is also the newest generation.
    newest = max(members, key=lambda f: (f.header.numbering, f.header.generation))  # type: ignore[union-attr]
    reference = newest.header
    assert reference is not None
    current = reference.renumbered
    translated = {f.index: in_numbering(f.header, current) for f in members}  # type: ignore[arg-type]
    renumbered = current
    if not _positions_match(translated) and reference.removing:
        # renumbered at the generation this mount writes
        mount_generation = max(f.header.generation for f in members) + 1  # type: ignore[union-attr]
        completed = Renumbering(
            reference.removing, mount_generation, previous=reference.numbering
        )
        attempt = {
            index: _drop(result, reference.removing, completed)
            for index, result in translated.items()
        }
        if _positions_match(attempt):
            translated, renumbered = attempt, completed
    if not _positions_match(translated):
        translated = {index: _former_leg(result, index) for index, result in translated.items()}
    if not _positions_match(translated):
        raise UserError(_order_refusal(storage_name, translated, current))
    notes = []
    # what the newest header (or, if it went, another member) records
    view = translated[newest.index].header or next(
        (r.header for r in translated.values() if r.header is not None), None
    )
    result = list(findings)
    for index, outcome in translated.items():
        finding = result[index]
        if outcome.header is None:
            row = view.member(index) if view is not None else None
            if row is not None and row.in_sync and not force and not outcome.removed:
                raise UserError(
                    f"storage {storage_name}: leg {index}: {outcome.problem}, yet the other "
                    "legs record it up to date; mount with -o force to copy it in full from "
                    "the others"
                )
            result[index] = LegFinding(index, finding.reachable, problem=outcome.problem)
        else:
            result[index] = LegFinding(index, finding.reachable, outcome.header, finding.problem)
    if renumbered is not current and renumbered is not None:
        legs = ", ".join(map(str, removed_legs(renumbered.removed)))
        notes.append(
            f"the removal of leg(s) {legs} (numbering before it) was begun by a reload and is "
            f"completed now: the config no longer lists them"
        )
    return result, renumbered, notes


def _former_leg(result: Translated, index: int) -> Translated:
    """A leg at position `index` whose header says it was another leg of
    this storage and is not up to date by its own record: a former leg added
    back at another position (a reload). It is no member; a full copy."""
    header = result.header
    if header is None or header.leg_index == index or header.self_record.in_sync:
        return result
    return Translated(
        None, f"held leg {header.leg_index} of this storage and is not up to date; copied in full"
    )


def _drop(result: Translated, removing: int, completed: Renumbering) -> Translated:
    if result.header is None:
        return result
    header = drop_legs(result.header, removing, completed)
    if header is None:
        return Translated(None, "it was being removed from the mirror by a reload", removed=True)
    return Translated(header)


def _positions_match(translated: dict[int, Translated]) -> bool:
    return all(
        result.header.leg_index == index
        for index, result in translated.items()
        if result.header is not None
    )


def _order_refusal(
    storage_name: str, translated: dict[int, Translated], current: Renumbering | None
) -> str:
    listed = sorted(
        index for index, result in translated.items() if result.removed
    )
    if listed and current is not None:
        return (
            f"storage {storage_name}: node(s) {', '.join(map(str, listed))} of the config were "
            f"removed from this mirror at generation {current.generation} (dstfuse reload), "
            "which renumbered the legs after them; mount the config without them (a removed "
            "node can be added back at the end)"
        )
    index, result = next(
        (index, result)
        for index, result in translated.items()
        if result.header is not None and result.header.leg_index != index
    )
    assert result.header is not None
    return (
        f"storage {storage_name}: node {index} holds leg {result.header.leg_index} of this "
        "mirror; the order of its nodes in the config changed (a leg leaves the middle of the "
        "list only by dstfuse reload, which records it): restore it"
    )


def _plan_first_use(
    storage_name: str, findings: list[LegFinding], primary: int | None, assume_clean: bool
) -> StartPlan:
    source = 0 if primary is None else primary
    if not findings[source].reachable:
        raise UserError(
            f"storage {storage_name}: no leg holds mirror metadata and leg {source}, the one "
            "that would be copied to the others, is unreachable; refusing to initialise"
        )
    roles = {}
    for finding in findings:
        if not finding.reachable:
            roles[finding.index] = OFFLINE
        elif finding.index == source or assume_clean:
            roles[finding.index] = IN_SYNC
        else:
            roles[finding.index] = FULL
    note = (
        "all legs taken as identical (assume_clean)"
        if assume_clean
        else f"leg {source} is the source; the others get a full resync"
    )
    return StartPlan(
        storage_id=None,
        source=source,
        roles=roles,
        checks_valid=True,
        notes=[f"first use: new storage; {note}"],
    )


def _choose_storage(storage_name: str, known: list[LegFinding], primary: int | None) -> bytes:
    ids: dict[bytes, list[int]] = {}
    for finding in known:
        assert finding.header is not None
        ids.setdefault(finding.header.storage_id, []).append(finding.index)
    if len(ids) == 1:
        return next(iter(ids))
    if primary is not None:
        for storage_id, legs in ids.items():
            if primary in legs:
                return storage_id
    listing = "; ".join(
        f"legs {', '.join(map(str, legs))}: id {_short(storage_id)}"
        for storage_id, legs in ids.items()
    )
    raise UserError(
        f"storage {storage_name}: the legs hold different storages ({listing}); mount with "
        "-o primary=<leg> to keep that leg's storage (the others are overwritten)"
    )


def _refuse_unproven_source(
    storage_name: str, findings: list[LegFinding], source: LegFinding
) -> None:
    """The source must record every missing leg as outdated: a missing leg
    it records in sync (or does not know) may have gone on without it."""
    assert source.header is not None
    unproven = [
        f.index
        for f in findings
        if f.header is None and not f.reachable
        and ((record := source.header.member(f.index)) is None or record.in_sync)
    ]
    if not unproven:
        return
    legs = ", ".join(map(str, unproven))
    many = len(unproven) > 1
    plural, verb, them = ("s", "are", "them") if many else ("", "is", "it")
    raise NewerLegMayBeMissing(
        f"storage {storage_name}: leg{plural} {legs} {verb} unreachable and may hold newer "
        f"data than leg {source.index} (which records {them} in sync at generation "
        f"{source.header.generation}); bring leg{plural} {legs} back, or mount with "
        f"-o primary={source.index} (or -o force) to go on with leg {source.index}'s data "
        f"and lose what only leg{plural} {legs} may hold",
        unproven,
    )


def _refuse_split_brain(storage_name: str, consistent: list[LegFinding]) -> None:
    for position, first in enumerate(consistent):
        for second in consistent[position + 1 :]:
            if _claims_stale(first, second) and _claims_stale(second, first):
                a, b = first.header, second.header
                assert a is not None and b is not None
                since_a = a.members[second.index].stale_since
                since_b = b.members[first.index].stale_since
                raise UserError(
                    f"storage {storage_name}: split brain: legs {first.index} and "
                    f"{second.index} were both written without each other (leg {first.index} "
                    f"since generation {since_a}, leg {second.index} since generation "
                    f"{since_b}); mount with -o primary={first.index} or "
                    f"-o primary={second.index} to keep that leg's data (the other's changes "
                    "are overwritten)"
                )


def _role(
    finding: LegFinding,
    source: LegFinding,
    members: list[LegFinding],
    consistent: list[LegFinding],
    claimed: set[int],
    primary: int | None,
) -> str:
    if not finding.reachable:
        return OFFLINE
    if finding is source:
        return IN_SYNC
    if finding not in members:
        return FULL
    header, src = finding.header, source.header
    assert header is not None and src is not None
    record = src.member(finding.index)
    if record is None:
        # The source never counted this leg a member (added online, or by a
        # longer config): which regions it missed is unknown.
        return FULL
    if header.self_record.full_resync or record.full_resync:
        return FULL
    if (
        primary is None
        and finding in consistent
        and finding.index not in claimed
        and header.generation == src.generation
        and header.clean
        and src.clean
    ):
        return IN_SYNC
    return PARTIAL

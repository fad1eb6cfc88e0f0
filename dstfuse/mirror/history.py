"""What the legs' headers say at mount: which leg holds the newest data,
which legs need a resync, and whether the legs split.

`plan_start` is a pure function from what was found on each leg to a
`StartPlan`; it never does I/O, so every case (first use, clean and
unclean shutdown, a stale or foreign leg, split brain, `primary=`) is
tested as a table. The rules (docs/mirror-metadata.md, "Deciding at mount"):

- a leg's data is complete ("consistent") when its own member record says
  in sync; a leg another consistent leg records as stale missed writes;
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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .metadata import MirrorHeader

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


def _claims_stale(holder: LegFinding, other: LegFinding) -> bool:
    """`holder` records `other` as stale (a leg added after `holder` last
    wrote its table makes no claim)."""
    assert holder.header is not None
    record = holder.header.member(other.index)
    return record is not None and not record.in_sync


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
    members = []
    for finding in known:
        assert finding.header is not None
        if finding.header.storage_id != storage_id:
            continue
        if finding.header.leg_index != finding.index:
            if not finding.header.self_record.in_sync:
                # A former leg, not up to date, added back at another
                # position (a reload): no member here, so a full copy.
                continue
            raise UserError(
                f"storage {storage_name}: node {finding.index} holds leg "
                f"{finding.header.leg_index} of this mirror; the order of its nodes in the "
                "config changed: restore it"
            )
        members.append(finding)
    consistent = [f for f in members if f.header is not None and f.header.self_record.in_sync]
    claimed = {
        other.index
        for other in members
        for holder in consistent
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
        _refuse_split_brain(storage_name, consistent)
        candidates = [f for f in consistent if f.index not in claimed]
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
        generation=max(f.header.generation for f in members),  # type: ignore[union-attr]
        region_size=src.region_size,
        data_size=src.data_size,
        unclean=unclean,
        bitmap_legs=[f.index for f in members],
        checks_valid=all(f.header.checks_valid for f in members),  # type: ignore[union-attr]
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
        elif finding.header is not None and finding.header.storage_id == storage_id:
            if finding not in members:
                plan.notes.append(
                    f"leg {finding.index} held leg {finding.header.leg_index} of this storage "
                    "and is not up to date; it is copied in full"
                )
        elif finding.header is not None:
            plan.notes.append(
                f"leg {finding.index} holds another storage (id {_short(finding.header.storage_id)}"
                f", not {_short(storage_id)}); it is overwritten by a full resync"
            )
    if primary is not None:
        plan.notes.append(
            f"primary={primary}: leg {primary}'s data wins; the other legs resync from it"
        )
    return plan


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


def _left_behind(leg: LegFinding, consistent: list[LegFinding]) -> bool:
    """`leg` recorded another consistent leg in sync, and that leg went on
    without it (a newer generation that records `leg` stale): every write
    `leg` took is on that leg too, so `leg` is outdated, not one side of a
    split brain, even if it and a third leg each record the other stale."""
    assert leg.header is not None
    for other in consistent:
        record = leg.header.member(other.index)
        if (
            other is not leg
            and record is not None
            and record.in_sync
            and other.header.generation > leg.header.generation  # type: ignore[union-attr]
            and _claims_stale(other, leg)
        ):
            return True
    return False


def _refuse_split_brain(storage_name: str, consistent: list[LegFinding]) -> None:
    for position, first in enumerate(consistent):
        for second in consistent[position + 1 :]:
            if (
                _claims_stale(first, second)
                and _claims_stale(second, first)
                and not _left_behind(first, consistent)
                and not _left_behind(second, consistent)
            ):
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

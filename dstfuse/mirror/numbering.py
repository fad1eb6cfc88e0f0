"""Which leg a header speaks of after legs were removed from the middle.

A header names its leg by position (`leg_index`) and describes the others
by position (the rows of its member table), in the *numbering* of the
moment it was written. Removing leg k renumbers the legs after it
(docs/mirror-metadata.md section 10): first a generation records the legs
being removed (`removing`, still in the old numbering), then the
renumbering generation G rewrites every remaining leg's header in the new
numbering with the record `Renumbering(removed, G, previous)`. A crash can
leave headers of both numberings; these pure functions say what each one
means in the numbering the mount (or the running mirror) uses. They never
do I/O.

Rules (`in_numbering`):
- a header whose last renumbering is the current one speaks the current
  numbering;
- a header one renumbering behind (its last renumbering is the current
  record's `previous`) is translated: the rows of the removed legs are
  dropped and its own index shifted down; if it is itself a removed leg it
  is no member (None). This holds for one written at or after G too: a
  session that never read a G header wrote it, so it went on without every
  leg that records G (`-o force` or `primary=`), and its claims must meet
  theirs (split brain) instead of being overwritten by a full copy;
- any other header (two or more renumberings behind) cannot be translated:
  it is no member either, and the leg is copied in full if it comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metadata import MirrorHeader, Renumbering, numbering_of


@dataclass(frozen=True)
class Translated:
    """A header in the wanted numbering, or None with `problem` saying why
    the leg is no member there; `removed`: because it is a removed leg
    (recorded stale before it went, so its data is never needed)."""

    header: MirrorHeader | None
    problem: str = ""
    removed: bool = False


def drop_legs(
    header: MirrorHeader, removed: int, renumbered: Renumbering | None
) -> MirrorHeader | None:
    """`header` (in the numbering before the legs of bit set `removed`
    went) in the numbering after it, recording `renumbered` as its last
    renumbering; None if the header's own leg is one of them."""
    index = Renumbering(removed, 0).new_index(header.leg_index)
    if index is None:
        return None
    members = tuple(
        row for position, row in enumerate(header.members) if not removed >> position & 1
    )
    return header.with_changes(leg_index=index, members=members, renumbered=renumbered, removing=0)


def in_numbering(header: MirrorHeader, current: Renumbering | None) -> Translated:
    """`header` in the numbering whose last renumbering is `current` (see
    the module doc)."""
    if header.numbering == numbering_of(current):
        return Translated(header)
    if current is not None and header.numbering == current.previous:
        translated = drop_legs(header, current.removed, current)
        if translated is None:
            return Translated(
                None,
                f"it was removed from the mirror at generation {current.generation}",
                removed=True,
            )
        return Translated(translated)
    return Translated(
        None,
        f"its metadata (generation {header.generation}) predates membership changes "
        "recorded on the other legs",
    )


def removed_legs(removed: int) -> list[int]:
    """The leg indices of a bit set."""
    return [index for index in range(removed.bit_length()) if removed >> index & 1]

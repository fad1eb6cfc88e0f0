"""The simulator's model of what the storage must hold: per data block, the
write ids a read may return now (`current`) and those a block may hold after
the volatile state is lost (`after_crash`).

Rules (one per outcome the mirror reports):
- an acknowledged write, trim or write-zeroes of a block: `current` is
  exactly it; `after_crash` gains it (it may or may not be durable yet);
- an acknowledged FUA write: `after_crash` is exactly it as well;
- a write that failed (EIO): the block may hold the old or the new bytes,
  in both sets;
- an acknowledged FLUSH: `after_crash` becomes `current` (all of it durable);
- a failed FLUSH or a power loss while volatile data was unflushed:
  `current` becomes `after_crash` (anything since the last good flush);
  `forget` does so for some blocks (a leg lost them while mounted);
- `adopt` after a mount the user forced (`-o force`, `primary=`): the user
  chose that leg's bytes, which become the model.

The model never looks at the legs; the harness compares them with it.

`LegConfig` is the other half of the model: which disks the config file
lists as the mirror's legs, in order (a leg's position is its identity),
the config before the last reload changed it (the user may put it back
before the next mount), and the disks a reload removed (with how many
writes had been acknowledged then: a removed disk that missed one must
never be a mount's source).
"""

from __future__ import annotations

from .disks import ZERO


class LegConfig:
    """The legs the config file names (disk numbers, in order); see the module doc."""

    def __init__(self, legs: list[int]) -> None:
        self.current: list[int] = list(legs)
        #: the config before the last reload that changed it (None: none yet)
        self.previous: list[int] | None = None
        #: disk -> acknowledged mutations when its removal began
        self.removed_at: dict[int, int] = {}

    def reloaded(self, legs: list[int]) -> None:
        """A reload applied `legs` (the file said so before the reload)."""
        self.previous, self.current = self.current, list(legs)

    def revert(self) -> list[int]:
        """The user puts the config before the last reload back (for the
        next mount); the one it replaces becomes the previous one."""
        assert self.previous is not None
        self.previous, self.current = self.current, self.previous
        return self.current

    def removal_began(self, disk: int, mutations: int) -> None:
        self.removed_at[disk] = mutations

    def behind(self, disk: int, mutations: int) -> bool:
        """The disk was removed and missed an acknowledged mutation since."""
        return disk in self.removed_at and mutations > self.removed_at[disk]

    def caught_up(self, disk: int) -> None:
        """The disk is a leg in sync again (re-added and copied, or chosen)."""
        self.removed_at.pop(disk, None)


class AckModel:
    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.current: list[frozenset[int]] = [frozenset({ZERO})] * blocks
        self.after_crash: list[frozenset[int]] = [frozenset({ZERO})] * blocks

    def acknowledged(self, first: int, count: int, write_id: int, *, fua: bool) -> None:
        for block in range(first, first + count):
            self.current[block] = frozenset({write_id})
            if fua:
                self.after_crash[block] = frozenset({write_id})
            else:
                self.after_crash[block] = self.after_crash[block] | {write_id}

    def failed(self, first: int, count: int, write_id: int) -> None:
        for block in range(first, first + count):
            self.current[block] = self.current[block] | {write_id}
            self.after_crash[block] = self.after_crash[block] | {write_id}

    def flushed(self) -> None:
        self.after_crash = list(self.current)

    def volatile_lost(self) -> None:
        self.current = [c | a for c, a in zip(self.current, self.after_crash, strict=True)]

    def forget(self, blocks: set[int]) -> None:
        """A leg lost these blocks' unflushed data and nobody knows yet:
        until a FLUSH reports it, reads may return what was durable."""
        for block in blocks:
            self.current[block] = self.current[block] | self.after_crash[block]

    def adopt(self, ids: list[int], durable_ids: list[int]) -> None:
        self.current = [frozenset({i}) for i in ids]
        self.after_crash = [frozenset({i, d}) for i, d in zip(ids, durable_ids, strict=True)]

    def allows(self, block: int, write_id: int) -> bool:
        return write_id in self.current[block]

    def durable_allows(self, block: int, write_id: int) -> bool:
        return write_id in self.after_crash[block]

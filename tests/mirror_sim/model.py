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
"""

from __future__ import annotations

from .disks import ZERO


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

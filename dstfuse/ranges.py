"""Ordering of overlapping writes.

`WriteOrder` makes writes to overlapping byte ranges take effect in the
order they were admitted: `admit` registers a range at once (no await before
registration, so call order is admission order) and then waits until every
earlier-admitted range that overlaps it has been released. Used by the client
(a write overlapping an unacknowledged one waits, so a resend can never
overwrite newer data) and by the export node (an original and its resend, or
a stale frame from a dead connection, can never land after newer data).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import trio


@dataclass(eq=False, slots=True)
class RangeTicket:
    """One admitted range; release it exactly once when the write is done.
    `earlier` holds the earlier-admitted overlapping ranges it waits for
    (None: none overlapped). Its event exists only once a later
    overlapping range waits for it."""

    offset: int
    end: int
    earlier: list[RangeTicket] | None = None
    released: bool = False
    _event: trio.Event | None = None

    async def wait_released(self) -> None:
        if self.released:
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class WriteOrder:
    """The admitted, unreleased ranges, sorted by offset. Every one of them
    is at most `_longest` bytes long (reset when none is left), so the
    ranges that can overlap [offset, end) start in (offset - _longest, end):
    finding them costs two bisections, not a look at every range."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._tickets: list[RangeTicket] = []  # in the order of _starts
        self._longest = 0

    def __len__(self) -> int:
        return len(self._tickets)

    def _overlapping(self, offset: int, end: int) -> list[RangeTicket]:
        starts = self._starts
        first = bisect.bisect_right(starts, offset - self._longest)
        last = bisect.bisect_left(starts, end, first)
        return [t for t in self._tickets[first:last] if offset < t.end]

    def overlaps(self, offset: int, length: int) -> bool:
        """True if an admitted, unreleased range overlaps [offset, +length)."""
        return bool(self._overlapping(offset, offset + max(length, 1)))

    def register(self, offset: int, length: int) -> RangeTicket:
        """Admit [offset, offset+length) now, without waiting: its turn has
        come when `ticket.earlier` is None, else once `wait_turn` returns."""
        end = offset + max(length, 1)
        ticket = RangeTicket(offset, end)
        if self._tickets:
            earlier = self._overlapping(offset, end)
            if earlier:
                ticket.earlier = earlier
        self._longest = max(self._longest, end - offset)
        at = bisect.bisect_right(self._starts, offset)
        self._starts.insert(at, offset)
        self._tickets.insert(at, ticket)
        return ticket

    async def wait_turn(self, ticket: RangeTicket) -> None:
        """Wait until every earlier overlapping range is released. If
        cancelled while waiting, the ticket is released."""
        try:
            for other in ticket.earlier or ():
                await other.wait_released()
        except BaseException:
            self.release(ticket)
            raise
        ticket.earlier = None

    async def admit(self, offset: int, length: int) -> RangeTicket:
        """Register [offset, offset+length) and wait for earlier overlapping
        ranges. If cancelled while waiting, the ticket is released. Without
        an earlier overlapping range it returns without a checkpoint."""
        ticket = self.register(offset, length)
        if ticket.earlier is not None:
            await self.wait_turn(ticket)
        return ticket

    def release(self, ticket: RangeTicket) -> None:
        if ticket.released:
            return
        ticket.released = True
        at = bisect.bisect_left(self._starts, ticket.offset)
        while self._tickets[at] is not ticket:
            at += 1
        del self._starts[at]
        del self._tickets[at]
        if not self._tickets:
            self._longest = 0
        if ticket._event is not None:
            ticket._event.set()

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

from dataclasses import dataclass

import trio


@dataclass(eq=False, slots=True)
class RangeTicket:
    """One admitted range; release it exactly once when the write is done.
    Its event exists only once a later overlapping range waits for it."""

    offset: int
    end: int
    released: bool = False
    _event: trio.Event | None = None

    async def wait_released(self) -> None:
        if self.released:
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class WriteOrder:
    def __init__(self) -> None:
        self._active: list[RangeTicket] = []

    def __len__(self) -> int:
        return len(self._active)

    def overlaps(self, offset: int, length: int) -> bool:
        """True if an admitted, unreleased range overlaps [offset, +length)."""
        end = offset + max(length, 1)
        return any(t.offset < end and offset < t.end for t in self._active)

    async def admit(self, offset: int, length: int) -> RangeTicket:
        """Register [offset, offset+length) and wait for earlier overlapping
        ranges. If cancelled while waiting, the ticket is released. Without
        an earlier overlapping range it returns without a checkpoint."""
        end = offset + max(length, 1)
        ticket = RangeTicket(offset, end)
        earlier = [t for t in self._active if t.offset < end and offset < t.end]
        self._active.append(ticket)
        if earlier:
            try:
                for other in earlier:
                    await other.wait_released()
            except BaseException:
                self.release(ticket)
                raise
        return ticket

    def release(self, ticket: RangeTicket) -> None:
        if not ticket.released:
            ticket.released = True
            self._active.remove(ticket)
            if ticket._event is not None:
                ticket._event.set()

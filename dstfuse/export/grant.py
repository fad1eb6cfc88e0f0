"""The write grant of one export: which client identity may write to it.

A client identity (HELLO's client id) that connects with write access
becomes the export's holder; while it holds the grant, any other identity
asking for write access is refused, naming the holder. The grant is kept
while at least one connection of the holder is established. When the
holder's last connection ends:
- closed by the client (a clean end of stream: it unmounted, or its process
  ended and the kernel closed the socket), the grant is released at once;
- lost (reset, silent, broken: the client may still be alive behind a
  broken network and about to reconnect), it is kept `grace` seconds more,
  so the holder's reconnects get it back; after that anyone may take it.
A node restart forgets it.

A claim with `take_over` displaces the holder at once; the caller ends the
displaced holder's connections, whose later reconnects are then refused as
any other identity's. A `shared` export has no holder: every identity may
write (for cluster filesystems that coordinate themselves). Read-only
connections never touch the grant.

This module decides only; it never logs, never touches sessions, and reads
the clock only through the `now` arguments (trio's clock in the node).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class WriteHolder:
    """The identity holding the grant, for refusals and logs: its name and
    address when it took the grant (`since`, wall-clock seconds)."""

    client_id: bytes
    client_name: str
    peer: str
    since: float = field(default_factory=time.time)
    connections: int = 0
    #: when its last connection closed (grant clock), None while connected
    released_at: float | None = None

    def __str__(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"client {self.client_name} ({self.peer}) since {since}"


@dataclass(frozen=True)
class Claim:
    """The answer to `WriteGrant.claim`: `granted`, or refused because
    `holder` holds the grant; `displaced` is the holder a take-over removed."""

    granted: bool
    holder: WriteHolder | None = None
    displaced: WriteHolder | None = None


class WriteGrant:
    """The grant of one export (see the module doc)."""

    def __init__(self, *, shared: bool = False, grace: float = 60.0) -> None:
        self.shared = shared
        self.grace = grace
        self._holder: WriteHolder | None = None

    def holder(self, now: float) -> WriteHolder | None:
        """The current holder; one whose grace ran out is forgotten here."""
        holder = self._holder
        if (
            holder is not None
            and holder.released_at is not None
            and now - holder.released_at >= self.grace
        ):
            self._holder = holder = None
        return holder

    def claim(
        self, client_id: bytes, client_name: str, peer: str, now: float, *, take_over: bool
    ) -> Claim:
        """Ask for write access for a connection of `client_id`. Granted: the
        connection counts as the holder's until `detach`."""
        if self.shared:
            return Claim(granted=True)
        holder = self.holder(now)
        displaced = None
        if holder is not None and holder.client_id != client_id:
            if not take_over:
                return Claim(granted=False, holder=holder)
            displaced, holder = holder, None
        if holder is None:
            holder = self._holder = WriteHolder(client_id, client_name, peer)
        holder.connections += 1
        holder.released_at = None
        return Claim(granted=True, displaced=displaced)

    def detach(self, client_id: bytes, now: float, *, closed_by_client: bool) -> None:
        """A granted connection of `client_id` ended. After the holder's last
        one the grant is released, at once if the client closed it, else
        after the grace period. Nothing for a displaced holder."""
        holder = self._holder
        if self.shared or holder is None or holder.client_id != client_id:
            return
        holder.connections -= 1
        if holder.connections <= 0:
            holder.connections = 0
            holder.released_at = now
            if closed_by_client:
                self._holder = None

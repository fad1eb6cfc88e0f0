"""Connection slots of the export server: handshakes and sessions apart.

A connection takes a handshake slot when it is accepted (only after the
ACL admitted its address: a refused peer takes nothing) and trades it for a
session slot once the handshake succeeded. The two caps are separate, so
peers that connect and never finish a handshake cannot keep an admitted
client from working, and a node full of sessions still completes the
handshakes it has room for (and closes the ones it has no session for).

This module counts only; the server decides what to do when a slot is
refused, and it never logs.
"""

from __future__ import annotations

from typing import Generic, TypeVar

_S = TypeVar("_S")


class ConnectionSlots(Generic[_S]):
    """At most `max_handshakes` connections handshaking and `max_sessions`
    established at once. Every connection that holds a slot is in
    `handshaking` or `established`, so shutdown can stop them all."""

    def __init__(self, *, max_handshakes: int, max_sessions: int) -> None:
        self.max_handshakes = max_handshakes
        self.max_sessions = max_sessions
        self.handshaking: set[_S] = set()
        self.established: set[_S] = set()

    def __len__(self) -> int:
        return len(self.handshaking) + len(self.established)

    def all(self) -> list[_S]:
        return [*self.handshaking, *self.established]

    def begin_handshake(self, connection: _S) -> bool:
        """Take a handshake slot for `connection`; False when none is free."""
        if len(self.handshaking) >= self.max_handshakes:
            return False
        self.handshaking.add(connection)
        return True

    def establish(self, connection: _S) -> bool:
        """Trade `connection`'s handshake slot for a session slot; False
        (and no slot held any more) when every session slot is taken."""
        self.handshaking.discard(connection)
        if len(self.established) >= self.max_sessions:
            return False
        self.established.add(connection)
        return True

    def release(self, connection: _S) -> None:
        """`connection` is over: free whatever slot it holds."""
        self.handshaking.discard(connection)
        self.established.discard(connection)

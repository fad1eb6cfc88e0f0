"""What a session of an accepted connection does the same way, whatever its
protocol (`ExportSession`: ours; `NbdExportSession`: NBD).

`AcceptedSession` owns the two cancel scopes a session is stopped by and
the handshake's deadline: the protocol's `_negotiate` runs inside
`_handshake_scope` and must end within `handshake_timeout` seconds.

Invariants:
- `stop` ends the handshake (if it is still going) and stops reading new
  requests; requests already started finish;
- a handshake that runs out of time is logged once and ends the
  connection (`_handshake` returns False).
"""

from __future__ import annotations

import abc
import logging

import trio


class AcceptedSession(abc.ABC):
    """Subclasses call `__init__` with their handshake timeout (seconds),
    name the connection in `__str__` and set `_log`."""

    #: The protocol module's logger: its lines keep their logger name.
    _log: logging.Logger

    def __init__(self, handshake_timeout: float) -> None:
        self._handshake_timeout = handshake_timeout
        self._handshake_scope = trio.CancelScope()
        self._reading_scope = trio.CancelScope()

    def stop(self) -> None:
        """Stop reading new requests (server shutdown, or a take-over of
        the write grant); started ones finish, then the connection closes."""
        self._handshake_scope.cancel()
        self._reading_scope.cancel()

    async def _handshake(self) -> bool:
        """True once the protocol's handshake (`_negotiate`) admitted the
        peer within the handshake timeout."""
        with trio.move_on_after(self._handshake_timeout) as deadline:
            with self._handshake_scope:
                return await self._negotiate()
        if deadline.cancelled_caught:
            self._log.warning(
                "%s: no handshake within %.1fs; closing the connection",
                self,
                self._handshake_timeout,
            )
        return False

    @abc.abstractmethod
    async def _negotiate(self) -> bool:
        """The protocol's handshake: True once the peer was admitted."""

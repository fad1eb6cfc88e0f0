"""Protocol errors, split as h11 does.

`LocalProtocolError`: our own code misused the connection (a bug here).
`RemoteProtocolError`: the peer sent something invalid; after it the
connection is in the ERROR state and must be closed.
`IntegrityError`: a frame failed its checksum/authentication (corrupted,
tampered, replayed or reordered). The connection is unusable afterwards:
the caller drops it and resends what was in flight.
`HandshakeFailed`: negotiation failed (version, mode, key, refusal);
`message` is one line for the user and `status` an errno.
"""

from __future__ import annotations

import errno


class ProtocolError(Exception):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class IntegrityError(RemoteProtocolError):
    pass


class HandshakeFailed(ProtocolError):
    def __init__(self, message: str, status: int = errno.EPROTO) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

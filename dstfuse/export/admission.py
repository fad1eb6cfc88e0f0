"""The accept-time ACL check, shared by the export server and the mount's
NBD listener (dstfuse/storage_server.py).

`AcceptGate` decides, for a connection just accepted, whether any of the
things behind the listener (exports, storages: anything with
`permission(ip)`) admits the peer's address, before the connection takes
a slot or a byte is read. Unix-socket peers always pass (the socket
file's permissions guard them). A refusal is logged at most once per
`REFUSAL_LOG_INTERVAL` per address, with how many were refused since, so
a peer that keeps reconnecting cannot flood the log. It never touches
sockets: what a refused connection is told is the caller's business.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import trio

from ..protocol import Permission
from .acl import IPAddress
from .session import Peer

log = logging.getLogger(__name__)

#: Addresses refused at accept are logged once per this many seconds each,
#: and about this many addresses are remembered for that (then forgotten).
REFUSAL_LOG_INTERVAL = 60.0
REFUSAL_LOG_ADDRESSES = 1024


class Guarded(Protocol):
    """What the gate asks of each thing behind a listener."""

    def permission(self, peer: IPAddress | None) -> Permission | None: ...


class AcceptGate:
    """Admits a peer when any of `guarded` does. `owner` names them in the
    log ("exports a, b"); `acl_name` in the refusal ("export a's ACL")."""

    def __init__(self, guarded: Sequence[Guarded], *, owner: str, acl_name: str) -> None:
        self._guarded = tuple(guarded)
        self.owner = owner
        self.acl_name = acl_name
        #: address -> (trio time of its last refusal logged, refusals since)
        self._refusals: dict[str, tuple[float, int]] = {}

    def refusal(self, peer: Peer) -> str | None:
        """None when `peer` may go on; else why not (already logged)."""
        if peer.ip is None:
            return None
        if any(item.permission(peer.ip) is not None for item in self._guarded):
            return None
        message = f"address {peer.ip} is not allowed by {self.acl_name}"
        self._log(peer, message)
        return message

    def _log(self, peer: Peer, message: str) -> None:
        key = str(peer.ip)
        now = trio.current_time()
        last, count = self._refusals.get(key, (-math.inf, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals[key] = (last, count + 1)
            return
        if len(self._refusals) >= REFUSAL_LOG_ADDRESSES:
            self._refusals.clear()
        self._refusals[key] = (now, 0)
        more = f" ({count} more refused since the last report)" if count else ""
        log.warning("%s: refused %s: %s%s", self.owner, peer, message, more)

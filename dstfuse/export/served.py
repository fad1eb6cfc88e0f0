"""One named export as the server serves it: its backend, ACL, write grant,
write order, the sessions of its clients, and the per-request checks.

Every request is checked here, on the node, whatever the client believes it
was granted (DST checked permissions only on the client). Statuses, in the
order the checks run:

==============================================  ========  =======================
situation                                       status    notes
==============================================  ========  =======================
WRITE/TRIM/WRITE_ZEROES on a grant without      EPERM     the file is not touched
WRITE (read-only export or `ro` ACL rule)
READ/CHECKSUM on a grant without READ           EPERM     (grants always hold READ)
READ or WRITE longer than `max_request`         EINVAL    a WRITE frame that long
                                                          never arrives: the protocol
                                                          closes the connection first
CHECKSUM longer than MAX_CHECKSUM_LENGTH        EINVAL
READ/CHECKSUM with offset + length > size       EINVAL    a read past the end
WRITE/TRIM/WRITE_ZEROES with offset+length      ENOSPC    a write past the end: no
> size                                                    room, as for a full disk
the disk call failed                            errno     from the OSError; EIO if
                                                          it carries none
an unexpected failure (a bug)                   EIO       logged with a traceback
==============================================  ========  =======================

FLUSH and PING ignore offset and length (they are echoed). FUA is honoured
on WRITE, TRIM and WRITE_ZEROES and ignored on the other commands. A
zero-length READ/WRITE/TRIM/WRITE_ZEROES succeeds without touching the disk.
A status is never 0 unless the request's effect is complete (and durable
when FUA asked for it).

Write ordering: WRITE, TRIM and WRITE_ZEROES of every connection of this
export go through one `WriteOrder`; the session admits each in the order its
frame arrived, so overlapping writes take effect in arrival order across
connections (an original and its resend on a newer connection, or a stale
frame from a dying one, never land after newer data).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from ..protocol import WRITE_COMMANDS, Command, Flag, Permission, Request
from ..ranges import WriteOrder
from .acl import ExportAcl, IPAddress
from .backend import Backend
from .grant import WriteGrant
from .instance import process_instance

if TYPE_CHECKING:
    from .session import ExportSession

log = logging.getLogger(__name__)

#: Largest range one CHECKSUM request may cover (it is read in chunks).
MAX_CHECKSUM_LENGTH = 256 << 20

# Plain ints and module constants: operators on enum flags and attribute
# lookups on enum classes run Python code, and these run once per request.
_MAY_READ = int(Permission.READ)
_MAY_WRITE = int(Permission.WRITE)
_FUA = int(Flag.FUA)
_READ_COMMANDS = frozenset({Command.READ, Command.CHECKSUM})
_UNCHECKED_COMMANDS = frozenset({Command.FLUSH, Command.PING})


class RequestRejected(Exception):
    """A request failed its checks; `status` is the errno to reply with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ServedExport:
    """Export `name` backed by `backend`, admitting peers by `acl`.

    `sessions` maps a client id to the connection that currently serves it
    (see `ExportSession` for the takeover rule). `instance` is sent in
    READY; its process nonce is fresh for every ServedExport, so for every
    node process. `grant` says which client identity may write
    (dstfuse/export/grant.py).
    """

    def __init__(
        self,
        name: str,
        backend: Backend,
        acl: ExportAcl | None = None,
        grant: WriteGrant | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.acl = acl if acl is not None else ExportAcl(read_only=backend.read_only)
        self.grant = grant if grant is not None else WriteGrant()
        self.write_order = WriteOrder()
        self.sessions: dict[bytes, ExportSession] = {}
        self.instance = process_instance(backend.identity, os.urandom(16))

    def __str__(self) -> str:
        return self.name

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def read_only(self) -> bool:
        return self.backend.read_only

    def permission(self, peer: IPAddress | None) -> Permission | None:
        """What `peer` (None: a unix-socket peer) may do, or None if refused.
        A backend opened read-only caps the grant at READ whatever the ACL."""
        granted = self.acl.permission(peer)
        if granted is not None and self.backend.read_only:
            granted &= Permission.READ
        return granted

    # -- client sessions ------------------------------------------------
    def claim(self, client_id: bytes, session: ExportSession) -> ExportSession | None:
        """Make `session` the one serving `client_id`; return the previous one."""
        previous = self.sessions.get(client_id)
        self.sessions[client_id] = session
        return previous

    def release(self, client_id: bytes, session: ExportSession) -> None:
        if self.sessions.get(client_id) is session:
            del self.sessions[client_id]

    # -- requests -------------------------------------------------------
    def check(self, request: Request, permission: Permission, max_request: int) -> None:
        """Raise RequestRejected if `request` may not run (see the table)."""
        command = request.command
        end = request.offset + request.length
        if command in WRITE_COMMANDS:
            if not int(permission) & _MAY_WRITE:
                raise RequestRejected(errno.EPERM, "this client may not write to the export")
            if command is Command.WRITE and request.length > max_request:
                raise RequestRejected(
                    errno.EINVAL, f"length {request.length} exceeds max_request {max_request}"
                )
            if end > self.size:
                raise RequestRejected(
                    errno.ENOSPC, f"range ends at {end}, past the end ({self.size} bytes)"
                )
        elif command in _READ_COMMANDS:
            if not int(permission) & _MAY_READ:
                raise RequestRejected(errno.EPERM, "this client may not read the export")
            limit = max_request if command is Command.READ else MAX_CHECKSUM_LENGTH
            if request.length > limit:
                raise RequestRejected(
                    errno.EINVAL, f"length {request.length} exceeds the limit {limit}"
                )
            if end > self.size:
                raise RequestRejected(
                    errno.EINVAL, f"range ends at {end}, past the end ({self.size} bytes)"
                )
        elif command not in _UNCHECKED_COMMANDS:
            raise RequestRejected(errno.EINVAL, f"{command.name} is not served")

    async def execute(self, request: Request) -> bytes:
        """Run a checked request on the backend; return the reply payload.
        Disk failures raise OSError with their errno."""
        backend = self.backend
        command = request.command
        fua = bool(int(request.flags) & _FUA)
        if command is Command.READ:
            return await backend.read(request.offset, request.length)
        if command is Command.WRITE:
            await backend.write(request.offset, request.data, fua=fua)
        elif command is Command.TRIM:
            await backend.trim(request.offset, request.length)
            if fua:
                await backend.flush()
        elif command is Command.WRITE_ZEROES:
            await backend.write_zeroes(request.offset, request.length, fua=fua)
        elif command is Command.FLUSH:
            await backend.flush()
        elif command is Command.CHECKSUM:
            return await backend.checksum(request.offset, request.length)
        elif command is not Command.PING:
            raise RequestRejected(errno.EINVAL, f"{command.name} is not served")
        return b""

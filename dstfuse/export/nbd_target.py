"""What an NBD session serves: `NbdTarget`, the narrow interface the NBD
session (dstfuse/export/nbd_session.py) needs from the thing behind an NBD
export name, and `ExportTarget`, the export node's files.

A target owns its access policy (ACL, write grant, multi-conn) and its
I/O; the session owns only the protocol. The mount daemon's storages are
the other target (dstfuse/storage_server.py). Disk and storage failures
reach the session as `OSError` or `DstError`, both with an errno.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from ..protocol import Permission
from ..ranges import WriteOrder
from .acl import IPAddress
from .served import ServedExport

if TYPE_CHECKING:
    from .nbd_session import NbdExportSession

Buffer = bytes | bytearray | memoryview


class NbdTarget(Protocol):
    """One NBD export name and the bytes behind it. `size` is fixed;
    `write_order` orders this target's WRITE/TRIM/WRITE_ZEROES by arrival
    across its connections; `can_fast_zero`: WRITE_ZEROES with FAST_ZERO
    is worth advertising."""

    name: str
    write_order: WriteOrder
    can_fast_zero: bool

    @property
    def size(self) -> int: ...

    def permission(self, peer: IPAddress | None) -> Permission | None:
        """What `peer` (None: a unix-socket peer) may do; None: refused."""
        ...

    def writer_free(self) -> bool:
        """A writable connection would be granted write access now."""
        ...

    def admit_writer(self, session: NbdExportSession) -> str | None:
        """Write access for `session` (which the ACL lets write): None when
        granted, else who holds it (the session is served read-only)."""
        ...

    def release_writer(self, session: NbdExportSession) -> None:
        """`session` is over: whatever `admit_writer` gave it ends (once)."""
        ...

    def multi_conn(self, writable: bool) -> bool:
        """CAN_MULTI_CONN for a connection (see the implementations)."""
        ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: Buffer, *, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, *, fua: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, fast: bool) -> None:
        """With `fast`: ENOTSUP, nothing changed, unless zeroing is cheap."""
        ...

    async def allocation(self, offset: int, length: int, *, limit: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs from `offset` on, at most `limit`."""
        ...


class ExportTarget:
    """A `ServedExport` (its backend, ACL, write order and write grant)
    as an NBD target.

    The write grant (dstfuse/export/grant.py): NBD has no client identity,
    so an NBD client's identity is its connection (`session.client_id`).
    A writable connection claims the grant like a dstfuse client; while
    someone else holds it the connection is read-only. The grant ends with
    the connection, at once however it ended: nothing can reconnect as the
    same identity, so a grace period would only lock others out. The
    session is registered in the export's sessions, so that a dstfuse
    client's take-over ends it like a dstfuse holder.

    CAN_MULTI_CONN on read-only connections and on shared exports: every
    connection of the export runs in this process on the one descriptor of
    the backend, so a completed write is in the page cache that every
    connection reads, and a FLUSH (fdatasync of that descriptor) on any
    connection makes every completed write durable, whichever connection
    wrote it. A writable connection of a non-shared export holds the grant
    alone: a second connection of its client would be read-only, so it is
    not offered multi-conn."""

    can_fast_zero = True

    def __init__(self, export: ServedExport) -> None:
        self.export = export
        self.name = export.name
        self.write_order = export.write_order
        self._granted: set[bytes] = set()

    @property
    def size(self) -> int:
        return self.export.size

    def permission(self, peer: IPAddress | None) -> Permission | None:
        return self.export.permission(peer)

    def writer_free(self) -> bool:
        grant = self.export.grant
        return grant.shared or grant.holder(trio.current_time()) is None

    def admit_writer(self, session: NbdExportSession) -> str | None:
        export = self.export
        claim = export.grant.claim(
            session.client_id, session.client_name, str(session.peer), trio.current_time(),
            take_over=False,
        )
        if not claim.granted:
            return str(claim.holder)
        if not export.grant.shared:
            self._granted.add(session.client_id)
            export.claim(session.client_id, session)  # type: ignore[arg-type]
        return None

    def release_writer(self, session: NbdExportSession) -> None:
        self.export.release(session.client_id, session)  # type: ignore[arg-type]
        if session.client_id in self._granted:
            self._granted.discard(session.client_id)
            self.export.grant.detach(
                session.client_id, trio.current_time(), closed_by_client=True
            )

    def multi_conn(self, writable: bool) -> bool:
        return not writable or self.export.grant.shared

    async def read(self, offset: int, length: int) -> bytes:
        return await self.export.backend.read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool) -> None:
        await self.export.backend.write(offset, data, fua=fua)

    async def flush(self) -> None:
        await self.export.backend.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self.export.backend.trim(offset, length)
        if fua:
            await self.export.backend.flush()

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, fast: bool) -> None:
        await self.export.backend.write_zeroes(offset, length, fua=fua, fast=fast)

    async def allocation(self, offset: int, length: int, *, limit: int) -> list[tuple[int, bool]]:
        return await self.export.backend.allocation(offset, length, limit=limit)


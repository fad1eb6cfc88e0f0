"""A mount's storages over NBD (`nbd_listen:` in storage.yaml).

`StorageNbdServer` serves each top-level storage of a mount by its name
(the default export "" is the only storage, when there is one) with the
same NBD session as the export node (dstfuse/export/nbd_session.py), so
that a VM or qemu-img uses a storage without FUSE and a loop device. The
I/O goes through `Storage`, i.e. the storage's algorithm, as FUSE's does.

Access, as on the export node and with its code: `nbd_allow:` rules
(`ExportAcl`, checked at accept by `AcceptGate`; without rules only
loopback TCP peers get in), capped by the storage's writability, so an
`ro` rule gives READ_ONLY and EPERM on writes; unix-socket peers may do
what the storage allows (the socket file's permissions guard them). With
`nbd_tls:` (a server-side SSLContext from dstfuse/export/nbd_tls.py) every
client must STARTTLS first (FORCEDTLS, ERR_TLS_REQD). Writes: the
mount itself is the storage's one writer toward its nodes; its FUSE file
and its NBD clients are openers of that one device, like two programs
that open the same disk, so there is no write grant between them.
`StorageTarget.multi_conn`: every connection goes through this one
`Storage`, and a FLUSH flushes every node of it, which covers every write
any connection got a reply for.

Shutdown (`shutdown()`): stop accepting, stop every session's reader, give
started requests `drain_timeout` to finish, remove our unix socket files;
the mount daemon does this before its final flush, so that flush covers
every write an NBD client was told was done.
"""

from __future__ import annotations

import errno
import functools
import logging
import ssl
from collections.abc import Mapping, Sequence

import trio

from . import congestion
from .address import Address
from .export.acl import AclRuleLike, ExportAcl, IPAddress
from .export.admission import AcceptGate
from .export.listeners import BoundListener, ListenAddress, open_listeners
from .export.nbd_session import NbdExportSession
from .export.server import peer_of
from .export.session import SessionLimits
from .export.slots import ConnectionSlots
from .nodes.base import ReadData
from .protocol import Permission
from .ranges import WriteOrder
from .storage import Storage

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class StorageTarget:
    """A storage as an NBD target (see the module doc); `allow` are the
    mount's `nbd_allow:` rules."""

    can_fast_zero = False

    def __init__(self, name: str, storage: Storage, allow: Sequence[AclRuleLike] = ()) -> None:
        self.name = name
        self.storage = storage
        self.write_order = WriteOrder()
        self._acl = ExportAcl(allow, read_only=not storage.writable)

    @property
    def size(self) -> int:
        return self.storage.size

    def permission(self, peer: IPAddress | None) -> Permission | None:
        return self._acl.permission(peer)

    def writer_free(self) -> bool:
        return True

    def admit_writer(self, session: NbdExportSession) -> str | None:
        return None

    def release_writer(self, session: NbdExportSession) -> None:
        pass

    def multi_conn(self, writable: bool) -> bool:
        return True

    async def read(self, offset: int, length: int) -> ReadData:
        return await self.storage.read(offset, length)

    async def write(self, offset: int, data: Buffer, *, fua: bool) -> None:
        await self.storage.write(offset, memoryview(data), fua=fua)

    async def flush(self) -> None:
        await self.storage.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self.storage.trim(offset, length)
        if fua:
            await self.storage.flush()

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, fast: bool) -> None:
        if fast:  # not advertised; a client that sends it anyway
            raise OSError(errno.ENOTSUP, f"storage {self.name}: no fast zeroing")
        await self.storage.write_zeroes(offset, length, fua=fua)

    async def allocation(self, offset: int, length: int, *, limit: int) -> list[tuple[int, bool]]:
        # The nodes do not tell holes apart: everything is data (always true).
        return [(length, False)]


class StorageNbdServer:
    """Serves `storages` (name -> Storage) over NBD on every address in
    `listen` until `shutdown()`, to the TCP peers `allow` admits (empty:
    loopback only), over TLS only when `tls` is given."""

    def __init__(
        self,
        storages: Mapping[str, Storage],
        listen: Sequence[ListenAddress],
        *,
        allow: Sequence[AclRuleLike] = (),
        tls: ssl.SSLContext | None = None,
        limits: SessionLimits | None = None,
        max_connections: int = 64,
        max_handshakes: int = 32,
        drain_timeout: float = 30.0,
    ) -> None:
        self.targets = [
            StorageTarget(name, storage, allow) for name, storage in storages.items()
        ]
        self.listen = tuple(listen)
        self.tls = tls
        self._gate = AcceptGate(
            self.targets, owner=f"storages {self._names()}",
            acl_name=f"the mount's nbd_allow ({ExportAcl(allow)})",
        )
        self.limits = limits or SessionLimits()
        self.drain_timeout = drain_timeout
        self.addresses: list[Address] = []
        self._slots = ConnectionSlots[NbdExportSession](
            max_handshakes=max_handshakes, max_sessions=max_connections
        )
        self._shutdown = trio.Event()

    def shutdown(self) -> None:
        self._shutdown.set()

    def _names(self) -> str:
        return ", ".join(target.name for target in self.targets)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every address (UserError if one cannot be), report them
        through `task_status.started`, serve until `shutdown()`."""
        bound: list[BoundListener] = []
        try:
            for address in self.listen:
                bound.extend(await open_listeners(address))
            self.addresses = [listener.address for listener in bound]
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    for listener in bound:
                        accepting.start_soon(functools.partial(
                            trio.serve_listeners,
                            functools.partial(self._handle, listener.address),
                            [listener.listener],
                            handler_nursery=handlers,
                        ))
                    for address in self.addresses:
                        log.info("storages %s: listening for NBD on %s", self._names(), address)
                    task_status.started(list(self.addresses))
                    await self._shutdown.wait()
                    accepting.cancel_scope.cancel()
                for session in self._slots.all():
                    session.stop()
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
        finally:
            for listener in bound:
                listener.close()

    async def _handle(self, local: Address, stream: trio.SocketStream) -> None:
        peer = peer_of(stream, local)
        if peer is None or self._shutdown.is_set():
            await trio.aclose_forcefully(stream)
            return
        if self._gate.refusal(peer) is not None:
            await trio.aclose_forcefully(stream)
            return
        session = NbdExportSession(stream, peer, self.targets, limits=self.limits,
                                   slots=self._slots, tls=self.tls)
        if not self._slots.begin_handshake(session):
            log.warning("storages %s: closing NBD connection from %s: too many handshakes",
                        self._names(), peer)
            await trio.aclose_forcefully(stream)
            return
        try:
            if local.kind == "tcp":
                congestion.apply(stream.socket)
            await session.run()
        finally:
            self._slots.release(session)

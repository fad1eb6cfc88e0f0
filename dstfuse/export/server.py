"""`ExportServer`: serve named exports on every listen address, to dstfuse
clients and (on the `nbd_listen` addresses) to NBD clients.

The server owns the listeners, the exports' backends (it closes them), the
connection caps, and shutdown. An accepted connection whose address no
export's ACL admits (`AcceptGate`, dstfuse/export/admission.py) is
refused at once (a REFUSED frame if the socket takes
it without waiting, then closed), before it takes any slot; the others take
a handshake slot and become an `ExportSession` (dstfuse/export/session.py),
which does the handshake, trades it for a session slot (`ConnectionSlots`:
the two caps are separate) and serves requests; the per-request checks live
in `ServedExport`. Connections on an NBD address become an
`NbdExportSession` (dstfuse/export/nbd_session.py) instead, after the same
ACL check (refused: closed at once, NBD has no refusal message before the
handshake) and under the same two caps.

Shutdown (`shutdown()`, or cancelling `serve`): stop accepting, stop every
session's reader, give requests already started up to `drain_timeout` to
finish, fdatasync every writable export, close the backends and remove our
unix socket files. It never leaves a unix socket file it created behind, and
never answers a request it has not checked.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .. import congestion
from ..address import Address
from ..errors import UserError
from ..protocol import Connection, Role, mode_of_cipher
from .acl import ExportAcl, peer_ip
from .admission import AcceptGate
from .backend import Backend
from .grant import WriteGrant
from .listeners import BoundListener, ListenAddress, open_listeners
from .lock import BackingLocked
from .nbd_session import NbdExportSession
from .nbd_target import ExportTarget
from .served import ServedExport
from .session import ExportSession, Peer, SessionLimits
from .slots import ConnectionSlots

if TYPE_CHECKING:
    from ..config import ExportConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST = 4 << 20
# TCP keepalive: a client that vanished without a FIN is noticed in minutes,
# not hours, so its session and connection slot are freed.
_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}


class ExportServer:
    """Serves `exports` on every address in `listen`.

    `listen` holds `Address`es, or (host, port) pairs where port 0 asks for
    an ephemeral port (tests). `key` is the pre-shared key (None: checksums
    only). `nbd_listen` are the addresses served over NBD; with `nbd_tls`
    (a server-side SSLContext) NBD clients must use TLS. The server takes
    ownership of the exports' backends.
    """

    def __init__(
        self,
        exports: Sequence[ServedExport],
        listen: Sequence[ListenAddress],
        *,
        key: bytes | None = None,
        max_connections: int = 256,
        max_handshakes: int = 128,
        handshake_timeout: float = 10.0,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_in_flight: int = 64,
        max_buffered: int = 16 << 20,
        drain_timeout: float = 10.0,
        node_name: str | None = None,
        ciphers: Sequence[str] = (),
        nbd_listen: Sequence[ListenAddress] = (),
        nbd_tls: ssl.SSLContext | None = None,
        tcp_congestion: str | None = None,
    ) -> None:
        if not exports:
            raise ValueError("an export server needs at least one export")
        names = [export.name for export in exports]
        if len(set(names)) != len(names):
            raise ValueError(f"export names must be unique: {', '.join(names)}")
        if not listen and not nbd_listen:
            raise ValueError("an export server needs at least one listen address")
        self.exports = tuple(exports)
        self.listen = tuple(listen)
        self.nbd_listen = tuple(nbd_listen)
        self.nbd_tls = nbd_tls
        #: congestion control of accepted TCP connections (None: the host's)
        self.tcp_congestion = tcp_congestion
        self._nbd_targets = [ExportTarget(export) for export in self.exports]
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.drain_timeout = drain_timeout
        self.limits = SessionLimits(
            max_request=max_request,
            handshake_timeout=handshake_timeout,
            max_in_flight=max_in_flight,
            max_buffered=max_buffered,
            node_name=node_name or socket.gethostname(),
        )
        self.addresses: list[Address] = []
        self.nbd_addresses: list[Address] = []
        self._key = key
        # Config cipher names -> protocol modes; empty: every keyed mode.
        self._modes = [mode_of_cipher(cipher) for cipher in ciphers]
        self._slots = ConnectionSlots[ExportSession | NbdExportSession](
            max_handshakes=max_handshakes, max_sessions=max_connections
        )
        self._gate = AcceptGate(self.exports, owner=f"exports {self._names()}",
                                acl_name=self._acl_name())
        self._shutdown = trio.Event()

    @classmethod
    def from_config(
        cls,
        config: ExportConfig,
        *,
        key: bytes | None = None,
        nbd_tls: ssl.SSLContext | None = None,
    ) -> ExportServer:
        """Open and lock every export's file or device and build the server
        `config` describes (`nbd_tls`: the context built from its
        `nbd_tls:`). UserError if one cannot be opened, is served by
        another process already (its OFD lock, see dstfuse/export/lock.py)
        or is empty."""
        served: list[ServedExport] = []
        try:
            for spec in config.exports:
                backend = _open_backend(spec.name, spec.path, read_only=spec.read_only)
                acl = ExportAcl(spec.allow, read_only=spec.read_only)
                grant = WriteGrant(shared=spec.shared, grace=config.grant_grace)
                served.append(ServedExport(spec.name, backend, acl, grant))
        except BaseException:
            for export in served:
                export.backend.close()
            raise
        return cls(
            served,
            config.listen,
            key=key,
            max_connections=config.max_connections,
            max_handshakes=config.max_handshakes,
            handshake_timeout=config.handshake_timeout,
            max_request=config.max_request,
            ciphers=config.ciphers,
            nbd_listen=config.nbd_listen,
            nbd_tls=nbd_tls,
            tcp_congestion=config.tcp_congestion,
        )

    @property
    def connections(self) -> int:
        """Connections open now, handshaking ones included."""
        return len(self._slots)

    @property
    def is_shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Ask `serve` to stop gracefully and return."""
        self._shutdown.set()

    # -- serving --------------------------------------------------------
    async def serve(
        self, *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listen address, report the bound addresses through
        `task_status.started`, and serve until `shutdown()` or cancellation.
        Binding failures raise UserError (the backends are closed then too)."""
        bound: list[BoundListener] = []
        nbd_bound: list[BoundListener] = []
        served = False
        congestion.install(self.tcp_congestion)
        try:
            for address in self.listen:
                bound.extend(await open_listeners(address))
            for address in self.nbd_listen:
                nbd_bound.extend(await open_listeners(address))
            self.addresses = [listener.address for listener in bound]
            self.nbd_addresses = [listener.address for listener in nbd_bound]
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    for listener in bound + nbd_bound:
                        handle = self._handle_nbd if listener in nbd_bound else self._handle
                        handler = functools.partial(handle, listener.address)
                        accepting.start_soon(
                            functools.partial(
                                trio.serve_listeners,
                                handler,
                                [listener.listener],
                                handler_nursery=handlers,
                            )
                        )
                    for address in self.addresses:
                        log.debug("exports %s: listening on %s", self._names(), address)
                    for address in self.nbd_addresses:
                        log.debug("exports %s: listening for NBD on %s", self._names(), address)
                    task_status.started(list(self.addresses))
                    served = True
                    await self._shutdown.wait()
                    accepting.cancel_scope.cancel()
                self._stop_sessions()
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
        finally:
            for listener in bound + nbd_bound:
                listener.close()
            if await self._close_exports():
                level = logging.INFO if served else logging.DEBUG
                log.log(level, "exports %s: flushed and closed", self._names())
            else:
                log.error("exports %s: closed, but the final flush failed", self._names())

    def _stop_sessions(self) -> None:
        sessions = self._slots.all()
        if sessions:
            log.info(
                "exports %s: stopping %d connection(s); waiting up to %.0fs for their requests",
                self._names(), len(sessions), self.drain_timeout,
            )
        for session in sessions:
            session.stop()

    async def _close_exports(self) -> bool:
        """fdatasync every writable export and close every backend; False if
        a flush failed (logged). Shielded: this runs on cancellation too. Not
        time-bounded: a disk call cannot be abandoned while it uses the
        descriptor, so a hung disk holds up exit."""
        flushed = True
        with trio.CancelScope(shield=True):
            for export in self.exports:
                if export.read_only:
                    continue
                try:
                    await export.backend.flush()
                except OSError as exc:
                    flushed = False
                    log.error(
                        "export %s: final flush of %s failed: %s",
                        export.name, export.backend.path, exc.strerror or exc,
                    )
            for export in self.exports:
                await export.backend.aclose()
        return flushed

    def _names(self) -> str:
        return ", ".join(export.name for export in self.exports)

    async def _handle(self, local: Address, stream: trio.SocketStream) -> None:
        """A dstfuse connection: an `ExportSession`; a peer no export admits
        gets a REFUSED frame."""
        await self._accept(
            local,
            stream,
            "connection",
            lambda peer: ExportSession(
                stream,
                peer,
                self.exports,
                key=self._key,
                modes=self._modes,
                limits=self.limits,
                slots=self._slots,
            ),
            self._refuse_address,
        )

    async def _handle_nbd(self, local: Address, stream: trio.SocketStream) -> None:
        """An NBD connection: an `NbdExportSession`; a peer no export admits
        is closed (NBD has nothing to refuse with before the handshake)."""
        await self._accept(
            local,
            stream,
            "NBD connection",
            lambda peer: NbdExportSession(
                stream, peer, self._nbd_targets, limits=self.limits, slots=self._slots,
                tls=self.nbd_tls,
            ),
            _close_refused,
        )

    async def _accept(
        self,
        local: Address,
        stream: trio.SocketStream,
        what: str,
        open_session: Callable[[Peer], ExportSession | NbdExportSession],
        refuse: Callable[[trio.SocketStream, str], Awaitable[None]],
    ) -> None:
        """Every accepted connection, whatever its protocol (`what` names it
        in log lines): the ACL check at accept (`refuse` with the gate's
        reason), a handshake slot (`max_handshakes`), TCP keepalive, then
        the session `open_session` makes for the peer, to its end."""
        peer = peer_of(stream, local)
        if peer is None or self._shutdown.is_set():
            await trio.aclose_forcefully(stream)
            return
        refusal = self._gate.refusal(peer)
        if refusal is not None:
            await refuse(stream, refusal)
            return
        session = open_session(peer)
        if not self._slots.begin_handshake(session):
            # Closed without a REFUSED frame: the cap is temporary, and a
            # client treats a refusal as final but a dropped connection as
            # something to retry.
            log.warning(
                "exports %s: closing %s from %s: %d handshakes in progress "
                "(max_handshakes)",
                self._names(), what, peer, self.max_handshakes,
            )
            await trio.aclose_forcefully(stream)
            return
        try:
            if local.kind == "tcp":
                _set_keepalive(stream)
                congestion.apply(stream.socket)
            log.debug("exports %s: %s from %s on %s", self._names(), what, peer, local)
            await session.run()
        finally:
            self._slots.release(session)

    def _acl_name(self) -> str:
        if len(self.exports) == 1:
            return f"export {self.exports[0].name}'s ACL"
        return "the ACL of any export on this node"

    async def _refuse_address(self, stream: trio.SocketStream, message: str) -> None:
        """Refuse a peer no export admits (`message`: the gate's reason,
        already logged), holding nothing: one non-blocking write of a
        REFUSED frame (the client shows its message; whatever the socket
        does not take at once is dropped), then close."""
        try:
            os.write(stream.socket.fileno(), Connection(Role.SERVER).refuse(errno.EACCES, message))
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # full or gone: the peer sees a closed connection instead
        await trio.aclose_forcefully(stream)


def _open_backend(name: str, path: Path, *, read_only: bool) -> Backend:
    """The backend of export `name`, opened and locked; UserError with one
    line when it cannot be opened, another process serves it, or it is empty."""
    try:
        backend = Backend(path, read_only=read_only)
    except OSError as exc:
        raise UserError(f"cannot open export {name}: {path}: {exc.strerror or exc}") from None
    try:
        backend.lock()
        if backend.size == 0:
            raise UserError(
                f"cannot serve export {name}: {path} is empty (0 bytes); "
                "give it a size first (e.g. truncate -s 10G)"
            )
    except BackingLocked:
        backend.close()
        raise UserError(
            f"cannot serve export {name}: {path} is locked by another process "
            "(another dstfuse export serves it?)"
        ) from None
    except OSError as exc:
        backend.close()
        raise UserError(f"cannot lock export {name}: {path}: {exc.strerror or exc}") from None
    except BaseException:
        backend.close()
        raise
    return backend


def peer_of(stream: trio.SocketStream, local: Address) -> Peer | None:
    """Who is on the other end of an accepted `stream` (None: already gone)."""
    if local.kind == "unix":
        return Peer(f"unix:{local.path}", None)
    try:
        name = stream.socket.getpeername()
    except OSError:
        return None  # already gone
    host, port = name[0], name[1]
    ip = peer_ip(host)
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return Peer(text, ip)


async def _close_refused(stream: trio.SocketStream, message: str) -> None:
    """Refuse an NBD peer no export admits (`message`: the gate's reason,
    already logged): closed, since NBD cannot refuse before the handshake."""
    await trio.aclose_forcefully(stream)


def _set_keepalive(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE.items():
            if hasattr(socket, option):
                stream.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError as exc:
        log.debug("cannot set TCP keepalive: %s", exc)


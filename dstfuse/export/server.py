"""`ExportServer`: serve named exports on every listen address.

The server owns the listeners, the exports' backends (it closes them), the
connection cap, and shutdown. Each accepted connection becomes an
`ExportSession` (dstfuse/export/session.py), which does the handshake and
serves requests; the per-request checks live in `ServedExport`.

Shutdown (`shutdown()`, or cancelling `serve`): stop accepting, stop every
session's reader, give requests already started up to `drain_timeout` to
finish, fdatasync every writable export, close the backends and remove our
unix socket files. It never leaves a unix socket file it created behind, and
never answers a request it has not checked.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ..address import Address
from ..errors import UserError
from ..protocol import mode_of_cipher
from .acl import ExportAcl, peer_ip
from .backend import Backend
from .listeners import BoundListener, ListenAddress, open_listeners
from .served import ServedExport
from .session import ExportSession, Peer, SessionLimits

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
    only). The server takes ownership of the exports' backends.
    """

    def __init__(
        self,
        exports: Sequence[ServedExport],
        listen: Sequence[ListenAddress],
        *,
        key: bytes | None = None,
        max_connections: int = 256,
        handshake_timeout: float = 10.0,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_in_flight: int = 64,
        max_buffered: int = 16 << 20,
        drain_timeout: float = 10.0,
        node_name: str | None = None,
        ciphers: Sequence[str] = (),
    ) -> None:
        if not exports:
            raise ValueError("an export server needs at least one export")
        names = [export.name for export in exports]
        if len(set(names)) != len(names):
            raise ValueError(f"export names must be unique: {', '.join(names)}")
        if not listen:
            raise ValueError("an export server needs at least one listen address")
        self.exports = tuple(exports)
        self.listen = tuple(listen)
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.limits = SessionLimits(
            max_request=max_request,
            handshake_timeout=handshake_timeout,
            max_in_flight=max_in_flight,
            max_buffered=max_buffered,
            node_name=node_name or socket.gethostname(),
        )
        self.addresses: list[Address] = []
        self._key = key
        # Config cipher names -> protocol modes; empty: every keyed mode.
        self._modes = [mode_of_cipher(cipher) for cipher in ciphers]
        self._sessions: set[ExportSession] = set()
        self._shutdown = trio.Event()

    @classmethod
    def from_config(cls, config: ExportConfig, *, key: bytes | None = None) -> ExportServer:
        """Open every export's file or device (UserError if one cannot be
        opened) and build the server `config` describes."""
        served: list[ServedExport] = []
        try:
            for spec in config.exports:
                try:
                    backend = Backend(spec.path, read_only=spec.read_only)
                except OSError as exc:
                    raise UserError(
                        f"cannot open export {spec.name}: {spec.path}: {exc.strerror or exc}"
                    ) from None
                acl = ExportAcl(spec.allow, read_only=spec.read_only)
                served.append(ServedExport(spec.name, backend, acl))
        except BaseException:
            for export in served:
                export.backend.close()
            raise
        return cls(
            served,
            config.listen,
            key=key,
            max_connections=config.max_connections,
            handshake_timeout=config.handshake_timeout,
            max_request=config.max_request,
            ciphers=config.ciphers,
        )

    @property
    def connections(self) -> int:
        """Connections open now, handshaking ones included."""
        return len(self._sessions)

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
        served = False
        try:
            for address in self.listen:
                bound.extend(await open_listeners(address))
            self.addresses = [listener.address for listener in bound]
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    for listener in bound:
                        handler = functools.partial(self._handle, listener.address)
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
                    task_status.started(list(self.addresses))
                    served = True
                    await self._shutdown.wait()
                    accepting.cancel_scope.cancel()
                self._stop_sessions()
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
        finally:
            for listener in bound:
                listener.close()
            if await self._close_exports():
                level = logging.INFO if served else logging.DEBUG
                log.log(level, "exports %s: flushed and closed", self._names())
            else:
                log.error("exports %s: closed, but the final flush failed", self._names())

    def _stop_sessions(self) -> None:
        if self._sessions:
            log.info(
                "exports %s: stopping %d connection(s); waiting up to %.0fs for their requests",
                self._names(), len(self._sessions), self.drain_timeout,
            )
        for session in list(self._sessions):
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
        peer = _peer(stream, local)
        if peer is None:
            await trio.aclose_forcefully(stream)
            return
        if self._shutdown.is_set():
            await trio.aclose_forcefully(stream)
            return
        if len(self._sessions) >= self.max_connections:
            # Closed without a REFUSED frame: the cap is temporary, and a
            # client treats a refusal as final but a dropped connection as
            # something to retry.
            log.warning(
                "exports %s: closing connection from %s: %d connections open (max_connections)",
                self._names(), peer, len(self._sessions),
            )
            await trio.aclose_forcefully(stream)
            return
        if local.kind == "tcp":
            _set_keepalive(stream)
        session = ExportSession(
            stream, peer, self.exports, key=self._key, modes=self._modes, limits=self.limits
        )
        self._sessions.add(session)
        try:
            log.debug("exports %s: connection from %s on %s", self._names(), peer, local)
            await session.run()
        finally:
            self._sessions.discard(session)


def _peer(stream: trio.SocketStream, local: Address) -> Peer | None:
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


def _set_keepalive(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE.items():
            if hasattr(socket, option):
                stream.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError as exc:
        log.debug("cannot set TCP keepalive: %s", exc)


"""One NBD client connection: handshake, then requests.

An `NbdExportSession` drives the sans-IO NBD codec
(dstfuse/protocol/nbd/server.py) over one accepted stream, serving
`NbdTarget`s by name (dstfuse/export/nbd_target.py): the export node's
files, through the same backend, ACL, write order, write grant and
connection slots as its dstfuse sessions, or a mount's storages
(dstfuse/storage_server.py).

Admission, in this order: the server's ACL check at accept (an address no
target admits is closed before it takes anything), a handshake slot, the
option haggling under `handshake_timeout` (with TLS required, only
STARTTLS gets anywhere before the TLS handshake), then at NBD_OPT_GO or
EXPORT_NAME: the target's ACL for this address (refused: ERR_POLICY), a
session slot (none free: the connection is closed, as for dstfuse
clients), and for a connection the ACL lets write, write access from the
target (`admit_writer`: for an export, its write grant). A connection
denied write access is served read-only (the READ_ONLY flag: every write
gets EPERM) and the log names the holder. NBD has no client identity: a
connection's identity is the connection (`client_id`).

CAN_MULTI_CONN is the target's to decide (`multi_conn`): it is offered
only where FLUSH on one connection covers the writes completed on all.

Requests: each checked request runs in its own task (at most
`max_in_flight` and about `max_buffered` bytes per connection: the reader
stops reading while full); WRITE, TRIM and WRITE_ZEROES are admitted to
the target's `WriteOrder` before the next request is read, so overlapping
writes take effect in arrival order (for an export, across NBD and
dstfuse connections: it is the export's). Replies go out under one lock,
each whole. FUA is passed to the target with WRITE, TRIM and
WRITE_ZEROES, which make the write durable before they return;
WRITE_ZEROES with FAST_ZERO fails with ENOTSUP (nothing changed) when
zeroing would mean writing zeroes; BLOCK_STATUS reports the target's holes
as HOLE|ZERO.

It never allocates from a length the peer sent before the codec bounded
it, and never logs data.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ..errors import DstError
from ..protocol import Permission, RemoteProtocolError
from ..protocol.nbd.constants import AllocationFlag, Command, CommandFlag, OptionReply
from ..protocol.nbd.constants import TransmissionFlag as TF
from ..protocol.nbd.server import NEED_DATA, NbdServerConnection
from ..protocol.nbd.server_events import (
    ConnectionClosed,
    Disconnected,
    ExportInfo,
    ExportNameRequested,
    HandshakeEnded,
    InfoRequested,
    ListRequested,
    MetaContextRequested,
    NbdRejected,
    NbdRequest,
    OptionAnswered,
    ServerEvent,
    TlsRequested,
)
from .accepted import AcceptedSession
from .nbd_target import NbdTarget
from .session import Peer, RequestAllowance, SessionLimits
from .slots import ConnectionSlots

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 18
#: What clients are told to use, and the smallest unit we accept (any byte
#: range works on a file or block device without O_DIRECT).
PREFERRED_BLOCK = 4096
MINIMUM_BLOCK = 1
#: Replies up to this size are joined into one write; larger READ data is
#: sent after its header without being copied.
_JOIN_MAX = 64 << 10
#: Most extents one BLOCK_STATUS reply carries (the spec lets a server
#: describe less than the whole range).
_MAX_EXTENTS = 1024
_HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
_WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_FUA = int(CommandFlag.FUA)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_ADVERTISED = TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES


@dataclass(frozen=True)
class _Refusal:
    """Why an option naming an export is refused: the NBD reply type and
    the message for the user."""

    reply: OptionReply
    message: str


class NbdExportSession(AcceptedSession):
    """One accepted NBD connection serving one of `targets`.

    `tls`: the server's TLS context; with it, TLS is required (FORCEDTLS:
    every option but STARTTLS is refused until the TLS handshake is done).
    `slots`: the server's caps; this session holds a handshake slot there.
    """

    _log = log

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: Peer,
        targets: Sequence[NbdTarget],
        *,
        limits: SessionLimits,
        slots: ConnectionSlots | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(limits.handshake_timeout)
        self.stream: trio.abc.Stream = stream
        self.peer = peer
        self.export: NbdTarget | None = None
        #: NBD has no client identity: the connection is one (see the module doc).
        self.client_id = b"nbd:" + os.urandom(12)
        self.client_name = "nbd"
        self.writable = False
        self._targets = targets
        self._limits = limits
        self._slots = slots
        self._tls = tls
        self._codec = NbdServerConnection(
            tls_required=tls is not None, max_payload=max(limits.max_request, 512)
        )
        self._send_lock = trio.StrictFIFOLock()
        self._send_broken = False
        self._allowance = RequestAllowance(limits.max_in_flight, limits.max_buffered)
        self._done = trio.Event()

    def __str__(self) -> str:
        export = self.export.name if self.export is not None else "?"
        return f"export {export}: NBD peer {self.peer}"

    # -- lifecycle ------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the peer leaves, an error or `stop`;
        the stream is closed on return, after every request finished."""
        try:
            if await self._handshake():
                await self._serve()
        except Exception:
            log.exception("%s: closing the connection after an unexpected error", self)
        finally:
            try:
                await trio.aclose_forcefully(self.stream)
            finally:
                self._done.set()
                if self.export is not None:
                    self.export.release_writer(self)
                if self._slots is not None:
                    self._slots.release(self)

    async def wait_drained(self) -> None:
        """Return once this connection is closed and its requests are done."""
        await self._done.wait()

    # -- transport ------------------------------------------------------
    async def _receive(self) -> bytes | bytearray | None:
        """The next bytes (b"" once the peer closed), None when lost (logged)."""
        try:
            return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: connection lost: %s", self, exc.__cause__ or exc)
            return None

    async def _send(self, *parts: bytes | bytearray | memoryview) -> bool:
        """Send `parts` together, after anything sent before; False once
        the connection is broken (logged once)."""
        if self._send_broken:
            return False
        async with self._send_lock:
            try:
                if len(parts) > 1 and sum(map(len, parts)) <= _JOIN_MAX:
                    parts = (b"".join(parts),)
                for part in parts:
                    await self.stream.send_all(part)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%s: cannot send (%s); closing the connection", self, exc.__cause__ or exc)
            except BaseException:
                # Cancelled mid-reply: the stream may hold half a message now.
                self._send_broken = True
                raise
        self._send_broken = True
        self._reading_scope.cancel()
        return False

    async def _next_event(self) -> ServerEvent | None:
        """The next codec event; None when the connection is over (logged)."""
        codec = self._codec
        while True:
            try:
                event = codec.next_event()
            except RemoteProtocolError as exc:
                log.warning("%s: closing the connection: %s", self, exc)
                return None
            if event is not NEED_DATA:
                return event
            data = await self._receive()
            if data is None:
                return None
            codec.receive_data(data)

    # -- handshake ------------------------------------------------------
    async def _negotiate(self) -> bool:
        """True once the client chose an export and was admitted to it."""
        codec = self._codec
        if not await self._send(codec.greeting()):
            return False
        while True:
            event = await self._next_event()
            if event is None:
                return False
            if isinstance(event, OptionAnswered):
                if not await self._send(event.data):
                    return False
            elif isinstance(event, TlsRequested):
                if not (await self._send(event.data) and await self._start_tls()):
                    return False
            elif isinstance(event, HandshakeEnded):
                log.info("%s: %s", self, event.reason)
                if event.data:
                    await self._send(event.data)
                return False
            elif isinstance(event, ListRequested):
                usable = [(e.name, "") for e in self._targets if e.permission(self.peer.ip)]
                if not await self._send(codec.answer_list(usable)):
                    return False
            elif isinstance(event, MetaContextRequested):
                export = self._choose(event.name)
                if isinstance(export, _Refusal):
                    reply = codec.refuse_option(export.reply, export.message)
                else:
                    reply = codec.answer_meta_context()
                if not await self._send(reply):
                    return False
            elif isinstance(event, InfoRequested):
                reply, admitted = self._on_info(event)
                if not await self._send(reply) or admitted is None:
                    return False
                if admitted:
                    return True
            elif isinstance(event, ExportNameRequested):
                info = self._admit(event.name)
                if isinstance(info, _Refusal):
                    log.warning("%s: refused: %s", self, info.message)
                    codec.refuse_export_name()
                    return False
                if info is None:
                    return False
                return await self._send(codec.answer_export_name(info))
            elif isinstance(event, ConnectionClosed):
                log.info("%s: closed during the handshake", self)
                return False
            else:
                log.warning("%s: unexpected %s during the handshake", self, type(event).__name__)
                return False

    def _on_info(self, event: InfoRequested) -> tuple[bytes, bool | None]:
        """The reply to INFO/GO, and whether transmission starts (None: the
        connection is to be closed after the reply)."""
        codec = self._codec
        if not event.go:
            export = self._choose(event.name)
            if isinstance(export, _Refusal):
                return codec.refuse_option(export.reply, export.message), False
            permission = export.permission(self.peer.ip)
            if permission is None:
                refusal = self._not_allowed(export)
                return codec.refuse_option(refusal.reply, refusal.message), False
            writable = bool(permission & Permission.WRITE) and export.writer_free()
            info = self._info(export, writable)
            return codec.answer_info(info, canonical_name=export.name), False
        admitted = self._admit(event.name)
        if isinstance(admitted, _Refusal):
            log.warning("%s: refused: %s", self, admitted.message)
            return codec.refuse_option(admitted.reply, admitted.message), False
        info = admitted
        if info is None:
            return b"", None
        assert self.export is not None
        return codec.answer_info(info, canonical_name=self.export.name), True

    def _choose(self, name: str) -> NbdTarget | _Refusal:
        """The export `name` names ("" = the only one), or why there is none."""
        for export in self._targets:
            if export.name == name:
                return export
        if not name and len(self._targets) == 1:
            return self._targets[0]
        listed = ", ".join(e.name for e in self._targets if e.permission(self.peer.ip))
        if name:
            message = f"no export {name!r} on this node (exports: {listed or 'none for you'})"
        else:
            message = f"no default export: this node serves several ({listed or 'none for you'})"
        return _Refusal(OptionReply.ERR_UNKNOWN, message)

    def _not_allowed(self, export: NbdTarget) -> _Refusal:
        address = self.peer.ip if self.peer.ip is not None else self.peer.text
        message = f"address {address} is not allowed by export {export.name}'s ACL"
        return _Refusal(OptionReply.ERR_POLICY, message)

    def _admit(self, name: str) -> ExportInfo | _Refusal | None:
        """GO / EXPORT_NAME: choose the export, check its ACL, take a session
        slot and, for a writer, the write grant. The export's ExportInfo;
        a message when refused; None when no session slot is free."""
        export = self._choose(name)
        if isinstance(export, _Refusal):
            return export
        permission = export.permission(self.peer.ip)
        if permission is None:
            return self._not_allowed(export)
        if self._slots is not None and not self._slots.establish(self):
            log.warning(
                "%s: closing the connection: %d sessions open (max_connections)",
                self, self._slots.max_sessions,
            )
            return None
        self.export = export
        writable = bool(permission & Permission.WRITE)
        if writable:
            holder = export.admit_writer(self)
            if holder is not None:
                writable = False
                log.warning("%s: served read-only: the export is written by %s", self, holder)
        self.writable = writable
        return self._info(export, writable)

    def _info(self, export: NbdTarget, writable: bool) -> ExportInfo:
        flags = _ADVERTISED
        if export.can_fast_zero:
            flags |= TF.SEND_FAST_ZERO
        if not writable:
            flags |= TF.READ_ONLY
        if export.multi_conn(writable):
            flags |= TF.CAN_MULTI_CONN
        return ExportInfo(
            size=export.size,
            flags=flags,
            minimum_block=MINIMUM_BLOCK,
            preferred_block=PREFERRED_BLOCK,
            maximum_block=self._codec.max_payload,
        )

    async def _start_tls(self) -> bool:
        """Run the TLS handshake (client certificates checked by the
        context); False when it fails (logged)."""
        assert self._tls is not None
        stream = trio.SSLStream(self.stream, self._tls, server_side=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("%s: TLS handshake failed: %s", self, exc.__cause__ or exc)
            return False
        self.stream = stream
        try:
            self._codec.tls_started()
        except RemoteProtocolError as exc:
            log.warning("%s: closing the connection: %s", self, exc)
            return False
        return True

    # -- transmission ---------------------------------------------------
    async def _serve(self) -> None:
        log.info("%s: connected over NBD (%s)", self, "rw" if self.writable else "ro")
        async with trio.open_nursery() as requests:
            with self._reading_scope:
                await self._read_requests(requests)

    async def _read_requests(self, requests: trio.Nursery) -> None:
        codec = self._codec
        allowance = self._allowance
        while True:
            event = await self._next_event()
            if event is None:
                return
            if isinstance(event, NbdRequest):
                command = event.command
                cost = event.length if command in (Command.READ, Command.WRITE) else 0
                await allowance.wait_take(cost)
                if command in _WRITE_COMMANDS:
                    await requests.start(self._serve_request, event, cost)
                else:
                    requests.start_soon(self._serve_request, event, cost)
            elif isinstance(event, NbdRejected):
                log.warning(
                    "%s: cookie %d: command %d [%d, +%d) refused (%s): %s",
                    self, event.cookie, event.command, event.offset, event.length,
                    errno.errorcode.get(event.error, event.error), event.reason,
                )
                if not await self._send(codec.reply_error(event, event.error, event.reason)):
                    return
            elif isinstance(event, (Disconnected, ConnectionClosed)):
                log.info("%s: client closed the connection", self)
                return
            else:
                log.warning("%s: unexpected %s; closing the connection", self, type(event).__name__)
                return

    async def _serve_request(
        self,
        request: NbdRequest,
        cost: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        export = self.export
        assert export is not None
        ticket = None
        try:
            task_status.started()
            if request.command in _WRITE_COMMANDS:
                # No checkpoint since started(): admit registers the range
                # before its first await, so before the reader looks at
                # the next request.
                ticket = await export.write_order.admit(request.offset, request.length)
            parts = await self._execute(export, request)
            await self._send(*parts)
        finally:
            if ticket is not None:
                export.write_order.release(ticket)
            self._allowance.give_back(1, cost)

    async def _execute(self, target: NbdTarget, request: NbdRequest) -> list:
        """Run `request` on the target; the reply's parts. Disk and storage
        errors are logged here and become error replies with their errno."""
        codec = self._codec
        command = request.command
        offset, length = request.offset, request.length
        fua = bool(request.flags & _FUA)
        try:
            if command is Command.READ:
                return codec.reply_read(request, await target.read(offset, length))
            if command is Command.BLOCK_STATUS:
                runs = await target.allocation(offset, length, limit=_MAX_EXTENTS)
                extents = [(size, _HOLE if hole else 0) for size, hole in runs]
                return [codec.reply_block_status(request, extents)]
            if command is Command.WRITE:
                await target.write(offset, request.data, fua=fua)
            elif command is Command.FLUSH:
                await target.flush()
            elif command is Command.TRIM:
                await target.trim(offset, length, fua=fua)
            elif command is Command.WRITE_ZEROES:
                fast = bool(request.flags & _FAST_ZERO)
                await target.write_zeroes(offset, length, fua=fua, fast=fast)
            else:  # the codec only passes what we advertise
                return [codec.reply_error(request, errno.EINVAL, f"{command.name} not served")]
        except (OSError, DstError) as exc:
            status = exc.errno or errno.EIO
            if command is Command.WRITE_ZEROES and status == errno.ENOTSUP:
                log.debug("%s: cookie %d: no fast zeroing here", self, request.cookie)
            else:
                log.error(
                    "%s: cookie %d: %s [%d, +%d) failed: %s",
                    self, request.cookie, command.name, offset, length, exc,
                )
            return [codec.reply_error(request, status, os.strerror(status))]
        return [codec.reply_ok(request)]

"""One client connection to the export server: handshake, then requests.

An `ExportSession` owns one accepted stream and its protocol `Connection`.
It runs the handshake under a deadline (ACL and export checks happen on
HELLO, the key check inside the protocol), then one reader task that turns
frames into request tasks, and replies from those tasks as they complete.

Invariants:
- every request is checked before it touches the disk, by
  `ServedExport.check` or, in the reader's inline path, by a cheaper test
  that only accepts what `check` accepts (everything else goes through
  `check`); a refused or failed request gets its errno, never success;
- writes are admitted to the export's `WriteOrder` before the reader looks
  at the next frame (they are started with `nursery.start`), so arrival
  order is admission order; other requests start without that handoff.
  A small READ the page cache holds, or a small WRITE overlapping nothing
  in progress, is served by the reader itself without waiting: it takes
  effect before the next frame is looked at, which keeps that order too;
- at most `max_in_flight` requests and about `max_buffered` bytes of
  request/reply data are held per connection, replies not yet on the wire
  included: while full, the reader stops reading the socket (back-pressure);
- one writer at a time, and frames go on the wire in the order they were
  sealed (each takes the next sequence number). Handshake frames and READY
  are sent before any reply exists. After that, replies go out through the
  shared socket fast path (`dstfuse.transport`): either through its sender
  task, which seals what is queued in queue order and coalesces replies
  that complete together into one write, or - only while the sender has
  nothing queued and is not sending - straight from the task that produced
  them: sealed and written to the socket at once without blocking (the
  reader does this once per batch of frames it received together, so their
  replies go out in one write). Whatever the socket does not take is queued
  for the sender, first in line. This saves the sender's wakeup and a pass
  of the run loop per request;
- the reader reads the socket's descriptor itself (the transport): it
  waits only when the socket was empty, and yields at least every few
  reads, so a peer that keeps sending cannot starve the other tasks and
  connections (see dstfuse.transport). The transport forgets
  the descriptor before the stream closes, so nothing ever reads or writes
  a stale descriptor number;
- takeover: when a connection with the same client id completes its
  handshake on the same export, this session stops reading, its started
  requests finish their disk work, it closes, and only then does the new
  session send READY. So no stale frame of an old connection can be applied
  after data the client sent on the new one. A request being dispatched at
  the very moment the reader stops may be dropped without a reply before it
  touches the disk (the client resends it). A session drops its reference
  to the one it retired as soon as that one is drained, so however often a
  client reconnects, only sessions still draining are kept;
- admission, in this order: a handshake slot (taken by the server at
  accept, after the ACL admitted the address), the handshake (export, ACL,
  key), a session slot (`ConnectionSlots`), then for a read-write
  connection the export's write grant (`WriteGrant`: EBUSY naming the
  holder, or a take-over that ends the holder's connection first), and
  only then READY. HELLO's READ_ONLY and PROBE flags cap the connection at
  READ, so it never needs the grant;
- a protocol or integrity error closes this connection only.

It never allocates from a length the peer sent before the protocol's
`max_payload` check, and never logs data or key material.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ..protocol import (
    NEED_DATA,
    WRITE_COMMANDS,
    Command,
    Confirmed,
    Connection,
    ConnectionClosed,
    Event,
    Flag,
    HandshakeFailed,
    HelloFlag,
    HelloReceived,
    Permission,
    Ready,
    Refused,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
)
from ..protocol.constants import ALL_FEATURES
from ..protocol.sealing import Buffer
from ..transport import BATCH_BYTES, BATCH_ITEMS, RECEIVE_SIZE, STREAM_ERRORS, FrameTransport
from .accepted import AcceptedSession
from .acl import IPAddress
from .backend import INLINE_MAX, READ_INLINE_MAX
from .grant import WriteHolder
from .served import RequestRejected, ServedExport
from .slots import ConnectionSlots

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
#: How long a refusal may take to reach the peer before the socket is closed.
_REFUSE_LINGER = 1.0
_CLIENT_NAME_LIMIT = 100

# Looked up once: attribute access on an enum class costs more than the test.
_READ = Command.READ
_WRITE = Command.WRITE
_FUA = int(Flag.FUA)

#: A reply on its way out, with the bytes of request/reply data and the
#: number of requests it holds on the allowance until it is on the wire.
_Outgoing = tuple[Reply, int, int]


@dataclass(frozen=True)
class Peer:
    """Who is on the other end: `text` for logs, `ip` for the ACL (None for
    a unix-socket peer)."""

    text: str
    ip: IPAddress | None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class SessionLimits:
    """Per-connection limits, fixed by the server for every session."""

    max_request: int = 4 << 20
    handshake_timeout: float = 10.0
    max_in_flight: int = 64
    max_buffered: int = 16 << 20
    node_name: str = "dstfuse"


class RequestAllowance:
    """Requests and bytes of request/reply data a connection holds, from
    the frame's arrival until its reply is on the wire. One request is
    always admitted when no bytes are held, so a byte limit below
    `max_request` cannot stall a connection. Only the reader takes."""

    def __init__(self, requests: int, limit: int) -> None:
        self.requests_left = requests
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    def take(self, cost: int) -> bool:
        """Hold one request and `cost` bytes if both fit now; never waits."""
        if self.requests_left and (not self.used or self.used + cost <= self.limit):
            self.requests_left -= 1
            self.used += cost
            return True
        return False

    async def wait_take(self, cost: int) -> None:
        while not self.take(cost):
            await self._lot.park()

    def give_back(self, requests: int, cost: int) -> None:
        self.requests_left += requests
        self.used -= cost
        if self._lot:
            self._lot.unpark_all()


class ExportSession(AcceptedSession):
    """One accepted connection serving one of `exports` (chosen by HELLO)."""

    _log = log

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        peer: Peer,
        exports: Sequence[ServedExport],
        *,
        key: bytes | None,
        modes: Sequence[str] = (),
        limits: SessionLimits,
        slots: ConnectionSlots[ExportSession] | None = None,
    ) -> None:
        """`slots`: the server's connection caps; this session already holds
        a handshake slot there and trades it for a session slot after the
        handshake (None: no caps, for tests)."""
        super().__init__(limits.handshake_timeout)
        self.stream = stream
        self.peer = peer
        self.export: ServedExport | None = None
        self.client_name = "?"
        self.client_id = b""
        self.permission = Permission.NONE
        #: what READY reports: `permission`, or for a probe the ACL's grant
        self._ready_permission = Permission.NONE
        self._hello_flags = HelloFlag.NONE
        self._granted = False  # this connection counts as the write grant's holder
        self._slots = slots
        self._exports = exports
        self._limits = limits
        self._conn = Connection(
            Role.SERVER, key=key, modes=list(modes) or None, max_payload=limits.max_request
        )
        self._transport: FrameTransport[_Outgoing] = FrameTransport(
            stream,
            seal=self._seal,
            weight=_payload_size,
            on_written=self._on_written,
            coalesce=self._replies_may_follow,
        )
        self._send_broken = False  # a handshake frame could not be sent
        self._allowance = RequestAllowance(limits.max_in_flight, limits.max_buffered)
        # Set once the export is chosen: what the inline path's quick test needs.
        self._size = 0
        self._may_read = False
        self._may_write = False
        self._working = 0
        self._work_done = trio.Event()
        self._work_done.set()
        self._reader_done = trio.Event()
        self._predecessor: ExportSession | None = None

    def __str__(self) -> str:
        export = self.export.name if self.export is not None else "?"
        return f"export {export}: peer {self.peer} (client {self.client_name})"

    # -- lifecycle ------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the peer leaves, an error, `stop` or
        `retire`; the stream is closed on return."""
        try:
            if await self._handshake() and self._establish() and await self._take_grant():
                await self._serve()
        except Exception:
            log.exception("%s: closing the connection after an unexpected error", self)
        finally:
            self._reader_done.set()
            try:
                await self._transport.aclose()
                await self.wait_drained()
            finally:
                self._predecessor = None  # drained (or cancelled): free the chain
                # Released only now: a newer connection of this client that
                # arrives meanwhile finds this session, and so waits for
                # everything this one was still waiting for.
                if self.export is not None and self.client_id:
                    self.export.release(self.client_id, self)
                self._detach_grant(closed_by_client=False)
                if self._slots is not None:
                    self._slots.release(self)

    async def retire(self) -> None:
        """Takeover by a newer connection of the same client: stop reading,
        wait until the requests already started have done their disk work,
        then close the stream (unblocking replies nobody reads)."""
        self._reading_scope.cancel()
        await self._reader_done.wait()
        await self._work_done.wait()
        await self._transport.aclose()
        await self.wait_drained()
        # Drained, and so is everything before it: nothing is left to wait
        # for, so the chain of superseded sessions ends here (it is freed).
        self._predecessor = None

    async def wait_drained(self) -> None:
        """Return once this session, and every session it took over from,
        has stopped reading and finished the disk work it started. A loop,
        not a recursion: the chain is as long as the client's reconnects
        that are not drained yet, which a busy client can make long."""
        session: ExportSession | None = self
        while session is not None:
            await session._reader_done.wait()
            await session._work_done.wait()
            session = session._predecessor

    # -- receiving ------------------------------------------------------
    async def _receive(self) -> bool:
        """Read the next bytes from the peer into the connection (its end of
        stream too); False when the connection is lost (logged here)."""
        try:
            await self._transport.receive(self._conn)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: connection lost: %s", self, exc.__cause__ or exc)
        except OSError as exc:
            log.info("%s: connection lost: %s", self, exc)
        return False

    async def _next_event(self) -> Event | None:
        """The next protocol event; None when the connection is over (the
        reason is logged here)."""
        while True:
            try:
                event = self._conn.next_event()
            except HandshakeFailed as exc:
                log.warning("%s: handshake failed: %s", self, exc.message)
                await self._refuse(exc.status, exc.message)
                return None
            except RemoteProtocolError as exc:
                log.warning("%s: closing the connection: %s", self, exc)
                return None
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            if not await self._receive():
                return None

    # -- handshake ------------------------------------------------------
    async def _negotiate(self) -> bool:
        """True once the peer was admitted and proved its key (Confirmed)."""
        while True:
            event = await self._next_event()
            if event is None:
                return False
            if isinstance(event, HelloReceived):
                if not await self._on_hello(event):
                    return False
            elif isinstance(event, Confirmed):
                return True
            elif isinstance(event, Refused):
                log.warning(
                    "%s: the client refused the handshake: %s (%s)",
                    self,
                    event.message,
                    os.strerror(event.status) if event.status else "no errno",
                )
                return False
            elif isinstance(event, ConnectionClosed):
                log.info("%s: closed during the handshake", self)
                return False
            else:
                log.warning("%s: unexpected %s during the handshake", self, type(event).__name__)
                return False

    async def _on_hello(self, hello: HelloReceived) -> bool:
        # The name only goes to logs: keep it short and on one line.
        name = hello.client_name[:_CLIENT_NAME_LIMIT]
        self.client_name = "".join(c if c.isprintable() else "?" for c in name) or "?"
        self.client_id = hello.client_id
        export = self._choose_export(hello.export)
        if isinstance(export, tuple):
            status, message = export
            log.warning("%s: refused: %s", self, message)
            await self._refuse(status, message)
            return False
        permission = export.permission(self.peer.ip)
        self._hello_flags = hello.flags
        if permission is None:
            address = self.peer.ip if self.peer.ip is not None else self.peer.text
            message = f"address {address} is not allowed by export {export.name}'s ACL"
            log.warning("%s: refused: %s", self, message)
            await self._refuse(errno.EACCES, message)
            return False
        self.export = export
        self.permission = permission
        self._ready_permission = permission
        if hello.flags & (HelloFlag.READ_ONLY | HelloFlag.PROBE):
            self.permission = permission & Permission.READ
            if not hello.flags & HelloFlag.PROBE:
                self._ready_permission = self.permission
        try:
            frame = self._conn.challenge(node_name=self._limits.node_name)
        except HandshakeFailed as exc:
            log.warning("%s: handshake failed: %s", self, exc.message)
            await self._refuse(exc.status, exc.message)
            return False
        return await self._send_frame(frame)

    def _choose_export(self, name: str | None) -> ServedExport | tuple[int, str]:
        """The export HELLO asked for, or (errno, message) to refuse with.
        Refusals list only the exports this peer's address may use."""
        by_name = {export.name: export for export in self._exports}
        if name and name in by_name:
            return by_name[name]
        if not name and len(self._exports) == 1:
            return self._exports[0]
        usable = [e.name for e in self._exports if e.permission(self.peer.ip) is not None]
        listed = ", ".join(usable) if usable else "none that admit your address"
        if name:
            return errno.ENOENT, f"no export {name!r} on this node (exports: {listed})"
        return (
            errno.ENOENT,
            f"this node serves several exports ({listed}); name one with 'export:'",
        )

    async def _refuse(self, status: int, message: str) -> None:
        """Send REFUSED (best effort), then let it reach the peer before the
        socket closes: closing with unread input would reset the connection
        and could destroy the frame."""
        try:
            frame = self._conn.refuse(status, message)
        except Exception:  # noqa: BLE001 - the connection is already over
            return
        with trio.move_on_after(_REFUSE_LINGER):
            try:
                await self.stream.send_all(frame)
                await self.stream.send_eof()
                while await self.stream.receive_some(RECEIVE_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- admission ------------------------------------------------------
    def _establish(self) -> bool:
        """Trade the handshake slot for a session slot. When none is free the
        connection is closed without a REFUSED frame: the cap is temporary,
        and a client treats a refusal as final but a dropped connection as
        something to retry."""
        if self._slots is None or self._slots.establish(self):
            return True
        log.warning(
            "%s: closing the connection: %d sessions open (max_connections)",
            self, self._slots.max_sessions,
        )
        return False

    async def _take_grant(self) -> bool:
        """A read-write connection claims the export's write grant (see
        dstfuse/export/grant.py): refused with EBUSY, naming the holder,
        while another client identity holds it; with TAKE_OVER the holder's
        connections are ended (and drained) first. Runs after the key
        check: an unproven peer can neither learn the holder nor take over."""
        export = self.export
        assert export is not None
        if not self.permission & Permission.WRITE:
            return True
        take_over = bool(self._hello_flags & HelloFlag.TAKE_OVER)
        claim = export.grant.claim(
            self.client_id, self.client_name, str(self.peer), trio.current_time(),
            take_over=take_over,
        )
        self._granted = claim.granted
        if not claim.granted:
            assert claim.holder is not None
            return await self._refuse_writer(claim.holder)
        displaced = claim.displaced
        if displaced is not None:
            log.warning(
                "%s: takes over the write grant from %s; ending its connection",
                self, displaced,
            )
            previous = export.sessions.get(displaced.client_id)
            if previous is not None:
                previous.stop()
                await previous.wait_drained()
        return True

    def _detach_grant(self, *, closed_by_client: bool) -> None:
        """This connection no longer counts as the grant holder's (once)."""
        if self._granted:
            self._granted = False
            assert self.export is not None
            self.export.grant.detach(
                self.client_id, trio.current_time(), closed_by_client=closed_by_client
            )

    async def _refuse_writer(self, holder: WriteHolder) -> bool:
        """Refuse write access with EBUSY, naming the grant's holder; False."""
        assert self.export is not None
        message = (
            f"export {self.export.name} is written by {holder}; one client may write "
            "to it at a time (mount read-only with -o ro, or mark the export shared)"
        )
        log.warning("%s: refused: %s", self, message)
        await self._refuse(errno.EBUSY, message)
        return False

    # -- open connection ------------------------------------------------
    async def _serve(self) -> None:
        export = self.export
        assert export is not None
        self._size = export.size
        self._may_read = bool(self.permission & Permission.READ)
        self._may_write = bool(self.permission & Permission.WRITE)
        previous = export.claim(self.client_id, self)
        async with trio.open_nursery() as sending:
            sending.start_soon(self._send_replies)
            try:
                async with trio.open_nursery() as requests:
                    with self._reading_scope:
                        if previous is not None:
                            self._predecessor = previous
                            log.info(
                                "%s: client reconnected; retiring its connection from %s first",
                                self,
                                previous.peer,
                            )
                            await previous.retire()
                            self._predecessor = None  # drained: release it
                        ready = Ready(
                            size=export.size,
                            permissions=self._ready_permission,
                            block_size=BLOCK_SIZE,
                            max_request=self._limits.max_request,
                            features=ALL_FEATURES,
                            export=export.name,
                            instance=export.instance,
                        )
                        # Sent directly: no reply can be queued before it.
                        if not await self._send_frame(self._conn.ready(ready)):
                            return
                        log.info(
                            "%s: connected (%s)",
                            self,
                            "rw" if self.permission & Permission.WRITE else "ro",
                        )
                        await self._read_requests(requests)
                    self._reader_done.set()
            finally:
                self._transport.close()  # the sender sends what is queued, then ends

    async def _read_requests(self, requests: trio.Nursery) -> None:
        """Turn frames into requests until the connection ends. Replies the
        reader serves itself wait in `held` until the frames received
        together are all dispatched, then go out together (`_put_out`);
        they are put out before every await, so the reader never waits
        while holding them (they hold allowance it may be waiting for)."""
        conn = self._conn
        allowance = self._allowance
        max_request = self._limits.max_request
        held: list[_Outgoing] = []
        held_bytes = 0
        try:
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    log.warning("%s: closing the connection: %s", self, exc)
                    return
                if event is NEED_DATA:
                    if held:
                        self._put_out(held)
                        held = []
                        held_bytes = 0
                    if not await self._receive():
                        return
                    continue
                if not isinstance(event, Request):
                    if isinstance(event, ConnectionClosed):
                        log.info("%s: client closed the connection", self)
                        # At once: a client that unmounts and mounts again
                        # (a new identity) must not find its own old grant.
                        self._detach_grant(closed_by_client=True)
                    else:
                        log.warning(
                            "%s: unexpected %s; closing the connection", self, type(event).__name__
                        )
                    return
                command = event.command
                if command is _WRITE:
                    cost = len(event.data)
                elif command is _READ and event.length <= max_request:
                    cost = event.length
                else:
                    cost = 0
                # Only wait (a checkpoint) when the connection is at its limit, so
                # frames that arrived together are dispatched in one go.
                if not allowance.take(cost):
                    if held:
                        self._put_out(held)
                        held = []
                        held_bytes = 0
                    await allowance.wait_take(cost)
                reply = self._serve_at_once(event)
                if reply is not None:
                    # Allowance is given back once the reply is on the wire.
                    held.append((reply, cost, 1))
                    held_bytes += len(reply.data)
                    if held_bytes >= BATCH_BYTES or len(held) >= BATCH_ITEMS:
                        self._put_out(held)
                        held = []
                        held_bytes = 0
                    continue
                # From here the request task owns the allowance and its
                # count in `_working` (counted now, before it runs, so a
                # retiring session never misses a request it has dispatched).
                self._working += 1
                if self._working == 1:
                    self._work_done = trio.Event()
                if command in WRITE_COMMANDS:
                    if held:
                        self._put_out(held)
                        held = []
                        held_bytes = 0
                    # start(): admitted to the export's WriteOrder before the
                    # next frame is looked at (see _serve_request).
                    await requests.start(self._serve_request, event, cost)
                else:
                    requests.start_soon(self._serve_request, event, cost)
        finally:
            if held:
                self._put_out(held)

    async def _serve_request(
        self,
        request: Request,
        cost: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        export = self.export
        assert export is not None
        reply: Reply | None = None
        try:
            status = self._check(export, request)
            # No checkpoint before here: WriteOrder.admit registers the range
            # before its first await, so it is admitted before the reader
            # looks at the next frame.
            task_status.started()
            data = b""
            if status == 0:
                status, data = await self._execute(export, request)
            reply = Reply(
                request.command, request.handle, status, request.offset, request.length, data
            )
        finally:
            self._working -= 1
            if self._working == 0:
                self._work_done.set()
            if reply is None:  # cancelled (shutdown): nothing to send
                self._allowance.give_back(1, cost)
        if self._working:
            # Other requests are still running: the sender may coalesce
            # this reply with theirs into one write.
            self._transport.queue([(reply, cost, 1)])
        else:
            self._transport.put([(reply, cost, 1)])

    def _serve_at_once(self, request: Request) -> Reply | None:
        """Serve a small READ or WRITE here in the reader when it needs no
        waiting: a READ the page cache holds wholly, a WRITE without FUA
        that overlaps no write in progress (so admission order holds). This
        saves a task and a thread handoff per request (see Backend). None:
        the request needs its own task.

        The quick test accepts only requests `ServedExport.check` accepts
        (granted, within `max_request` and the export's size); any other
        READ or WRITE is checked by `check` for its errno."""
        export = self.export
        assert export is not None
        command = request.command
        offset = request.offset
        length = request.length
        if command is _READ:
            if length > READ_INLINE_MAX:
                return None
            checked = (
                self._may_read
                and length <= self._limits.max_request
                and offset + length <= self._size
            )
        elif command is _WRITE:
            if length > INLINE_MAX or int(request.flags) & _FUA:
                return None
            write_order = export.write_order
            if write_order and write_order.overlaps(offset, length):
                return None
            checked = (
                self._may_write
                and length <= self._limits.max_request
                and offset + length <= self._size
            )
        else:
            return None
        status = 0 if checked else self._check(export, request)
        data: bytes | bytearray = b""
        if status == 0:
            try:
                if command is _READ:
                    cached = export.backend.read_cached(offset, length)
                    if cached is None:
                        return None
                    data = cached
                elif not export.backend.write_cached(offset, request.data):
                    return None
            except OSError as exc:
                status = self._disk_error(request, exc)
        return Reply(command, request.handle, status, offset, length, data)

    def _disk_error(self, request: Request, exc: OSError) -> int:
        """Log a failed disk call once, naming the request; its errno."""
        status = exc.errno or errno.EIO
        log.error(
            "%s: handle %d: %s [%d, +%d) failed on the disk: %s",
            self,
            request.handle,
            request.command.name,
            request.offset,
            request.length,
            os.strerror(status),
        )
        return status

    def _check(self, export: ServedExport, request: Request) -> int:
        """0 if the request may run, else the errno to reply with (logged)."""
        try:
            export.check(request, self.permission, self._limits.max_request)
            return 0
        except RequestRejected as exc:
            log.warning(
                "%s: handle %d: %s [%d, +%d) refused (%s): %s",
                self,
                request.handle,
                request.command.name,
                request.offset,
                request.length,
                errno.errorcode.get(exc.status, exc.status),
                exc.reason,
            )
            return exc.status
        except Exception:
            log.exception("%s: handle %d: checking the request failed", self, request.handle)
            return errno.EIO

    async def _execute(self, export: ServedExport, request: Request) -> tuple[int, bytes]:
        ticket = None
        try:
            if request.command in WRITE_COMMANDS:
                ticket = await export.write_order.admit(request.offset, request.length)
            return 0, await export.execute(request)
        except OSError as exc:
            return self._disk_error(request, exc), b""
        except RequestRejected as exc:
            log.warning("%s: handle %d: %s", self, request.handle, exc.reason)
            return exc.status, b""
        except Exception:
            log.exception(
                "%s: handle %d: %s failed unexpectedly", self, request.handle, request.command.name
            )
            return errno.EIO, b""
        finally:
            if ticket is not None:
                export.write_order.release(ticket)

    # -- sending --------------------------------------------------------
    # One writer at a time: handshake frames and READY are sent (by
    # `_send_frame`) before any reply exists; afterwards only the transport
    # writes (see the module doc).
    def _put_out(self, replies: list[_Outgoing]) -> None:
        """Send `replies` (in this order) after everything put out before:
        at once, in one write, when the transport is idle."""
        self._transport.put(replies)

    def _seal(self, item: _Outgoing) -> list[Buffer] | None:
        """The frame of a reply, sealed now (in wire order: sequence numbers
        must match it); None once the connection is over: after a protocol
        error from the peer it is in ERROR and the stream is being dropped,
        so replies to it are discarded (the client resends what it misses)."""
        if self._conn.state is not State.OPEN:
            return None
        return self._conn.send_parts(item[0])

    def _on_written(self, items: list[_Outgoing]) -> None:
        """Replies on the wire (or discarded) hold no allowance any more."""
        if len(items) == 1:
            _, cost, requests = items[0]
            self._allowance.give_back(requests, cost)
        else:
            self._allowance.give_back(sum(i[2] for i in items), sum(i[1] for i in items))

    def _replies_may_follow(self) -> bool:
        """Requests still running may complete in the sender's step: it lets
        them queue their replies first, so they go out in the same write.
        Nothing else can (the reader puts its replies out together), so
        with none running that pass is saved."""
        return self._working > 0

    async def _send_replies(self) -> None:
        """The transport's sender, until the transport is closed and empty;
        a failed write ends the reading too."""
        try:
            await self._transport.run_sender()
        except STREAM_ERRORS as exc:
            log.info("%s: cannot send (%s); closing the connection", self, exc.__cause__ or exc)
            self._reading_scope.cancel()

    async def _send_frame(self, frame: bytes | memoryview) -> bool:
        """Send a handshake frame or READY (nothing else is being sent then);
        False, logged, when the connection is lost."""
        if self._send_broken:
            return False
        try:
            await self.stream.send_all(frame)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._send_broken = True
            log.info("%s: cannot send (%s); closing the connection", self, exc.__cause__ or exc)
            self._reading_scope.cancel()
            return False
        except BaseException:
            # Cancelled mid-frame: the stream may hold half a frame now.
            self._send_broken = True
            raise


def _payload_size(item: _Outgoing) -> int:
    """Payload bytes of a queued reply, for the sender's batches."""
    return len(item[0].data)

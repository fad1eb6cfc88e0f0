"""One negotiated connection from a client to an export node.

A `Session` owns a transport stream and its protocol `Connection`. It
connects, runs the handshake, and then runs three tasks until the stream
breaks: a sender, a receiver that hands replies to the transaction table,
and a keepalive that pings when idle and declares the peer dead after three
silent intervals.

Frames leave in the order they are sealed, through the shared socket
fast path (`dstfuse.transport`): `transmit` seals a frame and, when
nothing is queued or being sent, writes it to the socket at once without
blocking (a write never waits, so a cancelled caller can never leave half
a frame on the wire); whatever the socket does not take, and every frame
transmitted while the sender holds something, goes to the sender task,
which seals and sends all it finds queued in one scatter-gather write.

A session never retries: when anything fails it ends, and the `RemoteNode`
that owns it decides what to do (reconnect, resend). It must never complete
a transaction except from a reply with a valid check.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from .. import congestion
from ..address import Address
from ..errors import NodeRefused, NodeUnavailable
from ..protocol import (
    NEED_DATA,
    Challenged,
    Command,
    Connection,
    ConnectionClosed,
    HandshakeFailed,
    HelloFlag,
    ProtocolError,
    Ready,
    Refused,
    Reply,
    Request,
    Role,
    State,
)
from ..protocol.sealing import Buffer
from ..transport import DEFER_BYTES, RECEIVE_SIZE, STREAM_ERRORS, FrameTransport
from .transactions import Transaction

log = logging.getLogger(__name__)

#: Keepalive pings use handles from this space, disjoint from transactions'.
PING_HANDLE_BASE = 1 << 63


Connector = Callable[[Address], Awaitable[trio.abc.Stream]]


async def open_stream(address: Address) -> trio.abc.Stream:
    """The default connector: TCP (IPv4/IPv6, TCP_NODELAY, the run's
    `tcp_congestion`) or a unix socket."""
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    stream = await trio.open_tcp_stream(address.host, address.port)
    congestion.apply(stream.socket)
    return stream



async def _send_in_handshake(node_name: str, stream: trio.abc.Stream, data: bytes) -> None:
    """A node that drops the connection while we greet it (it is dying or
    restarting, or refused us at accept) is unreachable for now, not a bug."""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, OSError) as exc:
        raise NodeUnavailable(node_name, f"connection lost in handshake: {exc}") from None

class Session:
    """A live, negotiated connection. `ready` holds what the node granted."""

    def __init__(
        self,
        node_name: str,
        stream: trio.abc.Stream,
        connection: Connection,
        ready: Ready,
        number: int,
    ) -> None:
        self.node_name = node_name
        self.number = number
        self.ready = ready
        self._stream = stream
        self._conn = connection
        self._transport: FrameTransport[Transaction | int] = FrameTransport(
            stream, seal=self._frame, weight=_payload_size
        )
        self._last_heard = trio.current_time()
        self._pings = 0  # keepalive pings sent, also their handle suffix

    # -- establishing ---------------------------------------------------
    @classmethod
    async def establish(
        cls,
        node_name: str,
        address: Address,
        *,
        export: str | None,
        key: bytes | None,
        modes: list[str],
        client_id: bytes,
        client_name: str,
        number: int,
        connector: Connector = open_stream,
        hello_flags: HelloFlag = HelloFlag.NONE,
    ) -> Session:
        """Connect and negotiate, asking what `hello_flags` say (read-only,
        take over the write grant, ...). Raises NodeUnavailable when the node
        cannot be reached or drops us, NodeRefused when it says no (ACL,
        export, key, another client writes: errno EBUSY) or the negotiation
        fails. The caller bounds the time."""
        try:
            stream = await connector(address)
        except OSError as exc:
            raise NodeUnavailable(node_name, f"cannot connect: {connect_failure(exc)}") from None
        try:
            conn = Connection(Role.CLIENT, key=key, modes=modes)
            hello = conn.hello(
                export=export, client_id=client_id, client_name=client_name, flags=hello_flags
            )
            await _send_in_handshake(node_name, stream, hello)
            ready = await cls._handshake(node_name, stream, conn)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(node_name, stream, conn, ready, number)

    @staticmethod
    async def _handshake(node_name: str, stream: trio.abc.Stream, conn: Connection) -> Ready:
        while True:
            try:
                event = conn.next_event()
            except HandshakeFailed as exc:
                await _tell_peer(stream, conn, exc)
                raise NodeRefused(node_name, exc.message, errno=errno.EACCES) from None
            except ProtocolError as exc:
                raise NodeUnavailable(node_name, f"bad handshake from node: {exc}") from None
            if event is NEED_DATA:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise NodeUnavailable(
                        node_name, f"connection lost in handshake: {exc}"
                    ) from None
                conn.receive_data(data)
            elif isinstance(event, Challenged):
                await _send_in_handshake(node_name, stream, conn.confirm())
            elif isinstance(event, Ready):
                return event
            elif isinstance(event, Refused):
                raise NodeRefused(
                    node_name,
                    f"refused by the node: {event.message}",
                    errno=event.status or errno.EACCES,
                )
            elif isinstance(event, ConnectionClosed):
                raise NodeUnavailable(node_name, "node closed the connection during the handshake")
            else:
                raise NodeUnavailable(node_name, f"unexpected {type(event).__name__} in handshake")

    @property
    def mode(self) -> str:
        """The negotiated integrity/cipher mode."""
        return self._conn.mode or "?"

    async def close(self) -> None:
        # The transport forgets the descriptor first: once closed its number
        # may be reused by another connection, which must never see our frames.
        await self._transport.aclose()

    # -- running --------------------------------------------------------
    def transmit(self, item: Transaction | int) -> None:
        """Send a transaction (or a ping handle), in order after everything
        transmitted before: at the end of this pass of the run loop, in one
        write with the frames of the other small requests that ran in it
        (`FrameTransport.defer`), without a task switch; what the socket
        does not take goes to the sender task, first in line. On a session
        that has ended this does nothing: whatever is still in flight is
        resent by the next session. A large request (a READ or WRITE of
        DEFER_BYTES or more) is written at once: batching saves it nothing
        worth its wait."""
        if type(item) is not int and item.length >= DEFER_BYTES:
            self._transport.put([item])
        else:
            self._transport.defer(item)

    def _frame(self, item: Transaction | int) -> list[Buffer] | None:
        """Seal the frame for `item` (the next sequence number: frames must
        go out in the order they are sealed); None if it needs no sending."""
        if self._conn.state is not State.OPEN:
            return None  # the receiver saw the end; it ends the session
        if isinstance(item, int):
            return self._conn.send_parts(Request(Command.PING, item))
        if item.done:
            return None
        item.sends += 1
        return self._conn.send_parts(item.request())

    async def run(
        self,
        on_reply: Callable[[Reply], None],
        *,
        keepalive: float,
    ) -> str:
        """Serve until the stream breaks; return why it ended (for logs)."""
        reason = "cancelled"

        def finish(why: str) -> None:
            nonlocal reason
            reason = why
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, finish)
                nursery.start_soon(self._receive_loop, on_reply, finish)
                nursery.start_soon(self._keepalive_loop, keepalive, finish)
        finally:
            await self.close()
        return reason

    async def _send_loop(self, finish: Callable[[str], None]) -> None:
        """Send what `transmit` could not, batched, in queue order."""
        try:
            await self._transport.run_sender()
        except STREAM_ERRORS as exc:
            finish(f"send failed: {exc}")

    async def _receive_loop(
        self, on_reply: Callable[[Reply], None], finish: Callable[[str], None]
    ) -> None:
        conn = self._conn
        transport = self._transport
        while True:
            try:
                await transport.receive(conn)
            except STREAM_ERRORS as exc:
                finish(f"receive failed: {exc}")
                return
            self._last_heard = trio.current_time()
            while True:
                try:
                    event = conn.next_event()
                except ProtocolError as exc:
                    # A frame that fails its check is never used: the whole
                    # connection is dropped and everything in flight resent.
                    finish(f"protocol error from node: {exc}")
                    return
                if event is NEED_DATA:
                    break
                if isinstance(event, Reply):
                    if event.command is not Command.PING:
                        on_reply(event)
                elif isinstance(event, ConnectionClosed):
                    finish("node closed the connection")
                    return
                else:
                    finish(f"unexpected {type(event).__name__} from node")
                    return

    async def _keepalive_loop(self, interval: float, finish: Callable[[str], None]) -> None:
        """Ping whenever nothing was heard for an interval; a peer that stays
        silent for three intervals (pings unanswered) is declared dead."""
        while True:
            await trio.sleep(interval)
            silent = trio.current_time() - self._last_heard
            if silent >= 3 * interval:
                finish(f"node silent for {silent:.1f}s")
                return
            if silent >= interval:
                self._pings += 1
                self.transmit(PING_HANDLE_BASE + self._pings)


#: What a failed connect says, by errno; other errors say their strerror.
_CONNECT_FAILURES = {
    errno.ECONNREFUSED: "connection refused (nothing listens there)",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.ENOENT: "no such socket",
}


def connect_failure(exc: OSError) -> str:
    """Why a connect failed, in words a user acts on: trio's "all attempts
    to connect to HOST:PORT failed" hides the errors of each attempt in
    its cause; name those, each distinct one once."""
    attempts = exc.__cause__.exceptions if isinstance(exc.__cause__, ExceptionGroup) else (exc,)
    reasons: list[str] = []
    for attempt in attempts:
        if isinstance(attempt, socket.gaierror):
            reason = f"unknown host ({attempt.strerror})"
        elif isinstance(attempt, OSError):
            reason = _CONNECT_FAILURES.get(attempt.errno or 0) or attempt.strerror or str(attempt)
        else:
            reason = str(attempt)
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons)


def _payload_size(item: Transaction | int) -> int:
    """Bytes of payload a queued item sends, for the sender's batches."""
    return 0 if isinstance(item, int) else len(item.data)


async def _tell_peer(stream: trio.abc.Stream, conn: Connection, exc: HandshakeFailed) -> None:
    """Best effort: let the node log why we gave up on the handshake."""
    with trio.move_on_after(1):
        try:
            await stream.send_all(conn.refuse(exc.status, exc.message))
        except Exception:  # noqa: BLE001 - the refusal is advisory only
            pass

"""One negotiated connection from an `nbd:` node to an NBD server.

`NbdConnection` owns a transport stream (TCP, unix socket, TLS over
either) and its sans-IO `NbdClient`. It connects, runs the handshake
(STARTTLS first for nbds://), and then runs a sender and a receiver until
the stream breaks. A dead peer is found by the transport: TCP keepalive
probes every `keepalive` seconds (three unanswered ones end the
connection) and TCP_USER_TIMEOUT for data the peer never acknowledges,
since NBD has no request that could serve as a ping.

A connection never retries and never completes a transaction except from
a reply the codec parsed whole; the `NbdNode` that owns it decides what to
do when it ends (reconnect, replay, resend). `transmit` never blocks, so
a cancelled caller can never leave half a request on the wire: it encodes
the request at once and queues the bytes for the sender task.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from .. import congestion
from ..address import Address
from ..config import TlsFiles
from ..errors import NodeRefused, NodeUnavailable
from ..protocol import (
    Command,
    Flag,
    HandshakeFailed,
    LocalProtocolError,
    ProtocolError,
    Reply,
)
from ..protocol.nbd.client import (
    NEED_DATA,
    ConnectionClosed,
    NbdClient,
    NbdReply,
    Ready,
    StartTls,
)
from ..protocol.nbd.constants import Command as NbdCommand
from ..protocol.nbd.constants import CommandFlag
from ..protocol.nbd.uri import NbdUri
from .session import connect_failure
from .transactions import Transaction

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 18

#: Our commands as the NBD commands that carry them, and back.
NBD_COMMAND = {
    Command.READ: NbdCommand.READ,
    Command.WRITE: NbdCommand.WRITE,
    Command.FLUSH: NbdCommand.FLUSH,
    Command.WRITE_ZEROES: NbdCommand.WRITE_ZEROES,
}
_OUR_COMMAND = {nbd: ours for ours, nbd in NBD_COMMAND.items()}

Connector = Callable[[Address, float], Awaitable[trio.abc.Stream]]


async def open_nbd_stream(address: Address, keepalive: float) -> trio.abc.Stream:
    """The default connector: a unix socket, or TCP with TCP_NODELAY, the
    run's `tcp_congestion` and the dead-peer timers (keepalive probes, user
    timeout) set from `keepalive`."""
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    stream = await trio.open_tcp_stream(address.host, address.port)
    sock = stream.socket
    congestion.apply(sock)
    interval = max(1, round(keepalive))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", interval),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 3 * interval * 1000),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return stream


def tls_context(files: TlsFiles | None, *, check_hostname: bool) -> ssl.SSLContext:
    """The client's TLS context: the server's certificate verified against
    `files.ca` (else the system's trust store), its host name checked when
    `check_hostname` (a unix socket has no host name to check), and a client
    certificate when `files` names one. Raises OSError/ssl.SSLError for
    files that cannot be read."""
    context = ssl.create_default_context(cafile=str(files.ca) if files and files.ca else None)
    context.check_hostname = check_hostname
    if files is not None and files.cert is not None:
        context.load_cert_chain(str(files.cert), str(files.key) if files.key else None)
    return context


class NbdConnection:
    """A live connection in transmission; `ready` holds what the server
    offered."""

    def __init__(self, name: str, stream: trio.abc.Stream, client: NbdClient, ready: Ready) -> None:
        self.name = name
        self.ready = ready
        self._stream = stream
        self._client = client
        # Bounded by the transactions in flight: each is encoded at most
        # once per connection (see NbdNode), and the table bounds them.
        self._outbox: list[bytes] = []
        self._wake = trio.Event()
        self._closed = False
        self._cancel = trio.CancelScope()
        self.reason = "cancelled"

    # -- establishing ---------------------------------------------------
    @classmethod
    async def establish(
        cls,
        name: str,
        uri: NbdUri,
        *,
        tls: ssl.SSLContext | None,
        keepalive: float,
        max_payload: int,
        connector: Connector = open_nbd_stream,
    ) -> NbdConnection:
        """Connect and negotiate. Raises NodeUnavailable when the server
        cannot be reached or drops us, NodeRefused when it says no (no such
        export, policy, TLS required or refused, a certificate that does
        not verify). The caller bounds the time."""
        try:
            stream = await connector(uri.address, keepalive)
        except OSError as exc:
            raise NodeUnavailable(name, f"cannot connect: {connect_failure(exc)}") from None
        client = NbdClient(uri.export, tls=uri.tls, max_payload=max_payload)
        try:
            stream, ready = await _handshake(name, stream, client, uri, tls)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(name, stream, client, ready)

    # -- running --------------------------------------------------------
    def transmit(self, txn: Transaction) -> None:
        """Queue `txn`'s request, in order after everything transmitted
        before; on a connection that has ended this does nothing (the next
        one sends what is still in flight). A request the export cannot
        take any more (it came back read-only, or with another minimum
        block size) is finished at once with the errno it would get."""
        if self._closed or txn.done:
            return
        flags = CommandFlag.FUA if txn.flags & Flag.FUA else CommandFlag(0)
        try:
            frame = self._client.request(
                NBD_COMMAND[txn.command], txn.handle, txn.offset, txn.length, flags, txn.data
            )
        except LocalProtocolError as exc:
            status = errno.EROFS if "read-only" in str(exc) else errno.EINVAL
            log.error("%s: cannot send %s any more: %s", self.name, txn, exc)
            txn.finish(Reply(txn.command, txn.handle, status, txn.offset, txn.length))
            return
        txn.sends += 1
        self._outbox.append(frame)
        self._wake.set()

    async def run(self, on_reply: Callable[[Reply], None]) -> str:
        """Serve until the stream breaks or `abort`; return why it ended."""
        with self._cancel:
            try:
                async with trio.open_nursery() as nursery:

                    def finish(why: str) -> None:
                        self.reason = why
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(self._send_loop, finish)
                    nursery.start_soon(self._receive_loop, on_reply, finish)
            finally:
                await self.close()
        return self.reason

    def abort(self, why: str) -> None:
        """End the connection from outside (the node gave up on it)."""
        self.reason = why
        self._cancel.cancel()

    async def close(self) -> None:
        self._closed = True
        self._outbox.clear()
        await trio.aclose_forcefully(self._stream)

    async def _send_loop(self, finish: Callable[[str], None]) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            data, self._outbox = b"".join(self._outbox), []
            if not data:
                continue
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                finish(f"send failed: {exc}")
                return

    async def _receive_loop(
        self, on_reply: Callable[[Reply], None], finish: Callable[[str], None]
    ) -> None:
        client = self._client
        while True:
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                finish(f"receive failed: {exc}")
                return
            client.receive_data(data)
            while True:
                try:
                    event = client.next_event()
                except ProtocolError as exc:
                    # Nothing of a malformed reply is used: the connection
                    # is dropped and everything in flight resent.
                    finish(f"protocol error from the server: {exc}")
                    return
                if event is NEED_DATA:
                    break
                if isinstance(event, NbdReply):
                    on_reply(_as_reply(event))
                elif isinstance(event, ConnectionClosed):
                    finish("the server closed the connection")
                    return
                else:
                    finish(f"unexpected {type(event).__name__} from the server")
                    return


def _as_reply(event: NbdReply) -> Reply:
    """Our Reply for the transaction table (the cookie is its handle)."""
    return Reply(_OUR_COMMAND[event.command], event.cookie, event.error, data=event.data)


async def _handshake(
    name: str,
    stream: trio.abc.Stream,
    client: NbdClient,
    uri: NbdUri,
    tls: ssl.SSLContext | None,
) -> tuple[trio.abc.Stream, Ready]:
    """Run the option haggling; the stream returned is the TLS one after
    STARTTLS."""
    secured = False
    while True:
        try:
            event = client.next_event()
        except HandshakeFailed as exc:
            if exc.status == errno.ESHUTDOWN:
                raise NodeUnavailable(name, exc.message) from None
            raise NodeRefused(name, exc.message, errno=exc.status) from None
        except ProtocolError as exc:
            raise NodeUnavailable(name, f"bad handshake from the server: {exc}") from None
        if event is NEED_DATA:
            try:
                outgoing = client.data_to_send()
                if outgoing:
                    await stream.send_all(outgoing)
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                hint = ""
                if secured:
                    # TLS 1.3 servers refuse a client certificate only after
                    # the handshake, by closing the connection.
                    hint = " (after TLS started: does the server want a client certificate? "
                    hint += "set tls_cert and tls_key)"
                raise NodeUnavailable(name, f"connection lost in handshake: {exc}{hint}") from None
            client.receive_data(data)
        elif isinstance(event, StartTls):
            stream = await _start_tls(name, stream, uri, tls)
            secured = True
            client.tls_started()
        elif isinstance(event, Ready):
            await _send(name, stream, client.data_to_send())
            return stream, event
        else:
            raise NodeUnavailable(name, "the server closed the connection during the handshake")


async def _send(name: str, stream: trio.abc.Stream, data: bytes) -> None:
    if not data:
        return
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, OSError) as exc:
        raise NodeUnavailable(name, f"connection lost in handshake: {exc}") from None


async def _start_tls(
    name: str, stream: trio.abc.Stream, uri: NbdUri, tls: ssl.SSLContext | None
) -> trio.abc.Stream:
    assert tls is not None, "an nbds:// node always has a TLS context"
    host = uri.address.host if uri.address.kind == "tcp" else None
    wrapped = trio.SSLStream(stream, tls, server_hostname=host)
    try:
        await wrapped.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise NodeRefused(
                name, f"TLS: the server's certificate does not verify: {cause.verify_message}"
            ) from None
        raise NodeRefused(name, f"TLS handshake failed: {cause or exc}") from None
    return wrapped

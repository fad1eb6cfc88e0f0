"""A raw protocol client for tests: `dstfuse.protocol.Connection` over a trio socket.

It does exactly what it is told, with no client-side checks: it sends
requests the grant forbids, ranges past the end, lengths past the limit and
arbitrary bytes, so tests can prove that the export node enforces every
rule itself. It never retries, resends or reconnects (that is RemoteNode's
job). Not for production use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

from dstfuse.address import Address
from dstfuse.protocol import (
    CLIENT_ID_SIZE,
    NEED_DATA,
    Challenged,
    Command,
    Connection,
    ConnectionClosed,
    Event,
    Flag,
    HandshakeFailed,
    HelloFlag,
    Ready,
    Refused,
    Reply,
    Request,
    Role,
    offered_modes,
)

RECEIVE_SIZE = 1 << 18
DEFAULT_TIMEOUT = 10.0


class RawRefused(Exception):
    """The handshake ended with a refusal: from the node (`by_node`) or from
    us when our side of the protocol failed it (wrong key)."""

    def __init__(self, status: int, message: str, *, by_node: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.by_node = by_node


async def open_stream(address: Address | tuple[str, int] | str) -> trio.SocketStream:
    """Connect to `address`: an Address, (host, port), or a unix socket path."""
    if isinstance(address, str):
        return await trio.open_unix_socket(address)
    if isinstance(address, tuple):
        return await trio.open_tcp_stream(*address)
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.host, address.port)


class RawClient:
    """One client connection. `modes` defaults to what a real client with
    (or without) `key` offers; `max_payload` bounds what it accepts."""

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        key: bytes | None = None,
        cipher: str = "aes-256-gcm",
        modes: Sequence[str] | None = None,
        max_payload: int = 256 << 20,
    ) -> None:
        self.stream = stream
        offered = list(modes) if modes is not None else offered_modes(key is not None, cipher)
        self.conn = Connection(Role.CLIENT, key=key, modes=offered, max_payload=max_payload)
        self.ready: Ready | None = None
        self.challenge: Challenged | None = None
        self._next_handle = 1
        self._replies: dict[int, Reply] = {}
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self.closed_by_peer = False

    # -- opening --------------------------------------------------------
    @classmethod
    async def open(
        cls, address: Address | tuple[str, int] | str, **options: object
    ) -> RawClient:
        """Connect without a handshake."""
        return cls(await open_stream(address), **options)  # type: ignore[arg-type]

    @classmethod
    async def connect(
        cls,
        address: Address | tuple[str, int] | str,
        *,
        export: str | None = None,
        client_id: bytes | None = None,
        client_name: str = "rawclient",
        flags: HelloFlag = HelloFlag.NONE,
        **options: object,
    ) -> RawClient:
        """Connect and complete the handshake (RawRefused if refused)."""
        client = await cls.open(address, **options)
        try:
            await client.handshake(
                export=export, client_id=client_id, client_name=client_name, flags=flags
            )
        except BaseException:
            await client.aclose()
            raise
        return client

    async def handshake(
        self,
        *,
        export: str | None = None,
        client_id: bytes | None = None,
        client_name: str = "rawclient",
        timeout: float = DEFAULT_TIMEOUT,
        flags: HelloFlag = HelloFlag.NONE,
    ) -> Ready:
        with trio.fail_after(timeout):
            hello = self.conn.hello(
                export=export,
                client_id=client_id or os.urandom(CLIENT_ID_SIZE),
                client_name=client_name,
                flags=flags,
            )
            await self.send_bytes(hello)
            while True:
                try:
                    event = await self._receive_event()
                except HandshakeFailed as exc:
                    # Tell the node why, as a real client does.
                    await self.send_bytes(self.conn.refuse(exc.status, exc.message))
                    raise RawRefused(exc.status, exc.message, by_node=False) from None
                if isinstance(event, Challenged):
                    self.challenge = event
                    await self.send_bytes(self.conn.confirm())
                elif isinstance(event, Ready):
                    self.ready = event
                    return event
                elif isinstance(event, Refused):
                    raise RawRefused(event.status, event.message, by_node=True)
                elif isinstance(event, ConnectionClosed):
                    raise RawRefused(0, "connection closed during the handshake", by_node=True)
                else:
                    raise AssertionError(f"unexpected {event!r} during the handshake")

    # -- sending --------------------------------------------------------
    async def send_bytes(self, data: bytes) -> None:
        """Anything at all, e.g. garbage or a hand-made frame."""
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_frame(
        self,
        command: int,
        *,
        flags: int = 0,
        handle: int = 0,
        offset: int = 0,
        length: int = 0,
        status: int = 0,
        payload: bytes = b"",
    ) -> None:
        """A correctly sealed frame with any header fields at all (a WRITE
        whose length disagrees with its payload, a client "reply", ...).
        Uses the protocol's private framing on purpose: no event class
        would let these be built."""
        async with self._send_lock:
            frame = self.conn._frame(
                command, flags=flags, handle=handle, offset=offset, length=length,
                status=status, payload=payload,
            )
            await self.stream.send_all(frame)

    async def send(
        self,
        command: Command,
        offset: int = 0,
        length: int | None = None,
        data: bytes = b"",
        flags: Flag = Flag.NONE,
        handle: int | None = None,
    ) -> int:
        """Send one request (no checks besides the frame's own); returns its handle."""
        if handle is None:
            handle = self._next_handle
            self._next_handle += 1
        if length is None:
            length = len(data)
        request = Request(command, handle, offset, length, flags, data)
        async with self._send_lock:
            await self.stream.send_all(self.conn.send(request))
        return handle

    # -- receiving ------------------------------------------------------
    async def _receive_event(self) -> Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    self.closed_by_peer = True
                return event  # type: ignore[return-value]
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError:
                data = b""  # reset by the peer: as good as closed
            self.conn.receive_data(data)

    async def next_event(self, timeout: float = DEFAULT_TIMEOUT) -> Event:
        with trio.fail_after(timeout):
            async with self._receive_lock:
                return await self._receive_event()

    async def reply(self, handle: int, timeout: float = DEFAULT_TIMEOUT) -> Reply:
        """The reply to `handle`; replies to other handles are kept for their
        callers. Raises ConnectionError if the connection closes first."""
        with trio.fail_after(timeout):
            while handle not in self._replies:
                async with self._receive_lock:
                    if handle in self._replies:
                        break
                    event = await self._receive_event()
                    if isinstance(event, Reply):
                        self._replies[event.handle] = event
                    elif isinstance(event, ConnectionClosed):
                        raise ConnectionError("the node closed the connection")
                    else:
                        raise AssertionError(f"unexpected {event!r}")
            return self._replies.pop(handle)

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Read (and drop) everything until the node closes; False on timeout."""
        with trio.move_on_after(timeout):
            async with self._receive_lock:
                while True:
                    try:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        self.closed_by_peer = True
                        return True
        return False

    # -- requests -------------------------------------------------------
    async def request(
        self,
        command: Command,
        offset: int = 0,
        length: int | None = None,
        data: bytes = b"",
        flags: Flag = Flag.NONE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Reply:
        handle = await self.send(command, offset, length, data, flags)
        return await self.reply(handle, timeout)

    async def read(self, offset: int, length: int) -> Reply:
        return await self.request(Command.READ, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> Reply:
        return await self.request(Command.WRITE, offset, data=data, flags=_fua(fua))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> Reply:
        return await self.request(Command.TRIM, offset, length, flags=_fua(fua))

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> Reply:
        return await self.request(Command.WRITE_ZEROES, offset, length, flags=_fua(fua))

    async def flush(self) -> Reply:
        return await self.request(Command.FLUSH)

    async def ping(self) -> Reply:
        return await self.request(Command.PING)

    async def checksum(self, offset: int, length: int) -> Reply:
        return await self.request(Command.CHECKSUM, offset, length)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _fua(fua: bool) -> Flag:
    return Flag.FUA if fua else Flag.NONE

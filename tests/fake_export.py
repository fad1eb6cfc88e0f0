"""An in-memory export node speaking the real protocol, for unit tests of
the client's transaction layer (only tests use it; the real node is
dstfuse.export). A `policy` decides what happens to each request, so tests
can drop replies, cut connections mid-frame, corrupt frames or go silent.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.testing
import xxhash

from dstfuse.address import Address
from dstfuse.protocol import (
    NEED_DATA,
    Command,
    Confirmed,
    Connection,
    ConnectionClosed,
    Feature,
    HandshakeFailed,
    HelloReceived,
    NodeInstance,
    Permission,
    ProtocolError,
    Ready,
    Refused,
    Reply,
    Request,
    Role,
)

ANSWER, DROP, CUT, CUT_MID_FRAME, CORRUPT, SILENCE, WRONG_HANDLE, LATE = (
    "answer",
    "drop",
    "cut",
    "cut-mid-frame",
    "corrupt",
    "silence",
    "wrong-handle",  # answer, but with another handle than the request's
    "late",  # execute now, answer a second later
)
#: How far WRONG_HANDLE moves the handle.
WRONG_HANDLE_OFFSET = 1000


@dataclass
class FakeExport:
    size: int = 1 << 20
    key: bytes | None = None
    max_request: int = 1 << 16
    writable: bool = True
    #: (request, connection number) -> one of ANSWER, DROP, CUT, ...
    policy: Callable[[Request, int], str] = lambda request, number: ANSWER
    data: bytearray = field(init=False)
    received: list[tuple[int, Request]] = field(default_factory=list)
    connections: int = 0
    refusals: list[str] = field(default_factory=list)
    #: When set, requests wait for it before being answered.
    gate: trio.Event | None = None
    in_progress: int = 0
    max_in_progress: int = 0
    #: Sent in READY; `reboot` replaces it.
    instance: NodeInstance | None = field(
        default_factory=lambda: NodeInstance(bytes(16), 1, 1, bytes(16))
    )
    #: The data as of the last FLUSH: what survives a reboot.
    flushed: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.flushed = bytearray(self.size)

    def reboot(self, boot: int) -> None:
        """The host lost power: only flushed data is left, and the node
        comes back on boot number `boot` (a new instance). The caller cuts
        the connection (a policy returning CUT)."""
        self.data = bytearray(self.flushed)
        assert self.instance is not None
        self.instance = NodeInstance(
            bytes([boot]) * 16, self.instance.device, self.instance.inode, bytes([boot]) * 16
        )

    def connector(self, nursery: trio.Nursery):
        async def connect(address: Address) -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(self.serve, server)
            return client

        return connect

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        number = self.connections
        conn = Connection(Role.SERVER, key=self.key, max_payload=self.max_request)
        send_lock = trio.Lock()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        event = conn.next_event()
                    except HandshakeFailed as exc:
                        await stream.send_all(conn.refuse(exc.status, exc.message))
                        return
                    except ProtocolError:
                        return
                    if event is NEED_DATA:
                        data = await stream.receive_some(1 << 16)
                        conn.receive_data(data)
                    elif isinstance(event, HelloReceived):
                        try:
                            await stream.send_all(conn.challenge(node_name="fake"))
                        except HandshakeFailed as exc:
                            await stream.send_all(conn.refuse(exc.status, exc.message))
                            return
                    elif isinstance(event, Confirmed):
                        perms = Permission.READ | (Permission.WRITE if self.writable else 0)
                        ready = Ready(
                            size=self.size,
                            permissions=perms,
                            max_request=self.max_request,
                            features=Feature.FLUSH
                            | Feature.FUA
                            | Feature.TRIM
                            | Feature.WRITE_ZEROES
                            | Feature.CHECKSUM,
                            export="fake",
                            instance=self.instance,
                        )
                        await stream.send_all(conn.ready(ready))
                    elif isinstance(event, Refused):
                        self.refusals.append(event.message)
                        return
                    elif isinstance(event, ConnectionClosed):
                        return
                    else:
                        assert isinstance(event, Request)
                        self.received.append((number, event))
                        action = self.policy(event, number)
                        if action == SILENCE:
                            await trio.sleep_forever()
                        if action == CUT:
                            return
                        if action == DROP:
                            continue
                        reply = self._execute(event)
                        nursery.start_soon(
                            self._reply_later, stream, send_lock, conn, reply, action
                        )
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _reply_later(
        self, stream: trio.abc.Stream, lock: trio.Lock, conn: Connection, reply: Reply, action: str
    ) -> None:
        """Send `reply` (after the gate, if any). Frames are sealed under the
        lock, in the order they go out, as their sequence numbers require."""
        self.in_progress += 1
        self.max_in_progress = max(self.max_in_progress, self.in_progress)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if action == LATE:
                await trio.sleep(1)
            async with lock:
                if action == WRONG_HANDLE:
                    reply = Reply(
                        reply.command, reply.handle + WRONG_HANDLE_OFFSET, reply.status,
                        reply.offset, reply.length, reply.data,
                    )
                frame = conn.send(reply)
                if action == CUT_MID_FRAME:
                    await stream.send_all(frame[: len(frame) // 2])
                    await stream.aclose()
                    return
                if action == CORRUPT:
                    frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
                await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.in_progress -= 1

    def _execute(self, request: Request) -> Reply:
        start, end = request.offset, request.offset + request.length
        command = request.command
        if end > self.size:
            return Reply(command, request.handle, errno.EINVAL, request.offset, request.length)
        payload = b""
        if command is Command.FLUSH:
            self.flushed[:] = self.data
        if command is Command.READ:
            payload = bytes(self.data[start:end])
        elif command is Command.WRITE:
            self.data[start:end] = request.data
        elif command in (Command.TRIM, Command.WRITE_ZEROES):
            self.data[start:end] = bytes(request.length)
        elif command is Command.CHECKSUM:
            payload = xxhash.xxh3_128_digest(bytes(self.data[start:end]))
        return Reply(command, request.handle, 0, request.offset, request.length, payload)

"""`ExportSession` on its own, over a socketpair (or an in-memory stream):
how replies reach the wire. Replies the reader serves itself go straight to
the socket, those of frames received together in one write; what the
socket does not take, and everything while the sender task holds replies,
goes through the sender, in the order the frames were sealed (the raw
client's protocol checks every frame's sequence number, so a reply out of
order fails the test)."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest
import trio
import trio.testing

from dstfuse import transport as transport_module
from dstfuse.export import Backend, ExportAcl, ServedExport
from dstfuse.export.session import ExportSession, Peer, SessionLimits
from dstfuse.protocol import Command, HelloFlag, Permission, Request

from .rawclient import RawClient

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


class SessionUnderTest:
    """A session serving `image` to a raw client over `transport`."""

    def __init__(self, session: ExportSession, client: RawClient, served: ServedExport):
        self.session = session
        self.client = client
        self.served = served

    @property
    def sender_writes(self) -> int:
        """Writes by the transport's sender task (after READY)."""
        return self.session._transport.sender_writes


@contextlib.asynccontextmanager
async def open_session(
    image, *, transport="socket", limits=None, backend=None, acl=None, flags=HelloFlag.NONE
):
    served = ServedExport("disk1", backend or Backend(image), acl)
    if transport == "socket":
        left, right = trio.socket.socketpair()
        client_stream, server_stream = trio.SocketStream(left), trio.SocketStream(right)
    else:
        client_stream, server_stream = trio.testing.memory_stream_pair()
    session = ExportSession(
        server_stream, Peer("test", None), [served], key=None, limits=limits or SessionLimits()
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            client = RawClient(client_stream)
            try:
                await client.handshake(client_name="session-test", flags=flags)
                yield SessionUnderTest(session, client, served)
            finally:
                await client.aclose()
            with trio.fail_after(5):
                await session.wait_drained()
    finally:
        await served.backend.aclose()


async def send_together(client: RawClient, requests: list[Request]) -> None:
    """Frames for `requests`, sealed in order and sent in one write, so the
    node receives them together."""
    await client.send_bytes(b"".join(client.conn.send(request) for request in requests))


async def settled(session: ExportSession) -> None:
    """Wait until the sender is idle; then nothing may be held any more."""
    with trio.fail_after(5):
        while not session._transport.idle:
            await trio.sleep(0.01)
    assert session._allowance.used == 0
    assert session._allowance.requests_left == SessionLimits().max_in_flight


class ShortWrites:
    """Stands in for `os` in the transport module: the next `times` direct
    writes take at most `limit` bytes (a socket with little room left), or
    raise EAGAIN when `limit` is 0 (a full one)."""

    def __init__(self, limit: int, times: int = 1) -> None:
        self.limit = limit
        self.times = times
        self.calls: list[tuple[int, int]] = []  # (bytes offered, bytes taken)

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        return self._write(fd, bytes(data))

    def writev(self, fd, buffers):
        return self._write(fd, b"".join(buffers))

    def _write(self, fd, data: bytes) -> int:
        offered = len(data)
        if self.times > 0:
            self.times -= 1
            if self.limit == 0:
                self.calls.append((offered, 0))
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            data = data[: self.limit]
        taken = os.write(fd, data)
        self.calls.append((offered, taken))
        return taken


# -- the direct path ---------------------------------------------------------


async def test_replies_to_frames_received_together_go_out_in_one_direct_write(
    image, monkeypatch
):
    content = image.read_bytes()
    writes = ShortWrites(limit=0, times=0)  # counts only
    monkeypatch.setattr(transport_module, "os", writes)
    async with open_session(image) as t:
        requests = [Request(Command.READ, 100 + i, i * 8 * KiB, 4 * KiB) for i in range(16)]
        await send_together(t.client, requests)
        for i, request in enumerate(requests):
            reply = await t.client.reply(request.handle)
            assert reply.status == 0
            assert bytes(reply.data) == content[i * 8 * KiB : i * 8 * KiB + 4 * KiB]
        # One write for the sixteen replies, not sixteen; the sender was idle.
        assert len(writes.calls) == 1 and writes.calls[0][0] > 16 * 4 * KiB
        assert t.sender_writes == 0
        # Small writes are served inline too, and so replied to directly.
        data = os.urandom(4 * KiB)
        assert (await t.client.write(MiB, data)).status == 0
        assert bytes((await t.client.read(MiB, 4 * KiB)).data) == data
        assert len(writes.calls) == 3 and t.sender_writes == 0
    assert image.read_bytes()[MiB : MiB + 4 * KiB] == data


async def test_session_over_a_stream_without_a_socket(image):
    """In-memory streams (no descriptor) go through receive_some and the
    sender's send_all."""
    async with open_session(image, transport="memory") as t:
        data = os.urandom(8 * KiB)
        requests = [
            Request(Command.WRITE, 1, 0, len(data), data=data),
            Request(Command.READ, 2, 0, len(data)),
            Request(Command.FLUSH, 3),
            Request(Command.READ, 4, 4 * KiB, 4 * KiB),
        ]
        await send_together(t.client, requests)
        replies = [await t.client.reply(request.handle) for request in requests]
        assert [reply.status for reply in replies] == [0, 0, 0, 0]
        assert bytes(replies[1].data) == data and bytes(replies[3].data) == data[4 * KiB :]
        assert t.sender_writes >= 1


# -- what the socket does not take goes to the sender, in order ----------------


@pytest.mark.parametrize("limit", [0, 1, 1000, 40 + 64 * KiB + 16 + 5])
async def test_a_short_direct_write_leaves_the_rest_to_the_sender_in_order(
    image, monkeypatch, limit
):
    """Eight 64 KiB reads received together: the reader puts the first four
    replies out (256 KiB, a full batch), the socket takes `limit` bytes of
    them (0: EAGAIN), and the sender must send the rest before the last
    four, which the reader queues behind it."""
    content = image.read_bytes()
    writes = ShortWrites(limit=limit)
    monkeypatch.setattr(transport_module, "os", writes)
    async with open_session(image) as t:
        requests = [Request(Command.READ, 10 + i, i * 64 * KiB, 64 * KiB) for i in range(8)]
        await send_together(t.client, requests)
        for i, request in enumerate(requests):
            reply = await t.client.reply(request.handle)
            assert reply.status == 0
            assert bytes(reply.data) == content[i * 64 * KiB : (i + 1) * 64 * KiB]
        # The first (short) write was the reader's, and the only direct one.
        assert t.session._transport.direct_writes == 1 and writes.calls[0][1] == limit
        assert writes.calls[0][0] > 4 * 64 * KiB
        assert t.sender_writes >= 1
        # Once the sender is done, replies go out directly again.
        before = t.sender_writes
        assert (await t.client.ping()).status == 0
        assert bytes((await t.client.read(0, 4 * KiB)).data) == content[: 4 * KiB]
        assert t.sender_writes == before  # PING's task was the only one: direct too
        assert t.session._transport.direct_writes == 3


async def test_no_direct_write_while_the_sender_holds_sealed_replies(image, monkeypatch):
    """The sender has taken everything queued (nothing is left in the
    queue) but is still writing it: a reply the reader produces meanwhile
    must wait for it, or it would overtake frames sealed before it."""
    content = image.read_bytes()
    monkeypatch.setattr(transport_module, "os", ShortWrites(limit=0))  # first write: EAGAIN
    async with open_session(image) as t:
        session = t.session
        transport = session._transport
        send = transport._send
        gate = trio.Event()

        async def slow_send(parts):
            await gate.wait()
            return await send(parts)

        transport._send = slow_send  # type: ignore[method-assign]
        first = await t.client.send(Command.READ, 0, 4 * KiB)
        with trio.fail_after(5):
            while not transport._sending:
                await trio.sleep(0.01)
        assert not transport._queue
        second = await t.client.send(Command.READ, 4 * KiB, 4 * KiB)
        with trio.fail_after(5):
            while not transport._queue:  # the reader queued it behind
                await trio.sleep(0.01)
        gate.set()
        assert bytes((await t.client.reply(second)).data) == content[4 * KiB : 8 * KiB]
        assert bytes((await t.client.reply(first)).data) == content[: 4 * KiB]
        await settled(session)


async def test_a_full_socket_holds_replies_back_in_order(image):
    """Real back-pressure, no stand-ins: the client sends 4 MiB worth of
    reads and writes without reading, so the socket fills and the rest
    waits in the sender; then everything arrives, intact and in order."""
    content = bytearray(image.read_bytes())
    async with open_session(image) as t:
        requests: list[Request] = []
        for i in range(64):
            requests.append(Request(Command.READ, 1000 + i, i * 64 * KiB, 64 * KiB))
        await send_together(t.client, requests)
        await trio.sleep(0.2)
        assert not t.session._transport.idle  # the socket is full
        more: list[Request] = []
        for i in range(16):
            data = bytes([i]) * 4 * KiB
            more.append(Request(Command.WRITE, 2000 + i, 5 * MiB + i * 4 * KiB, 4 * KiB, data=data))
            content[5 * MiB + i * 4 * KiB : 5 * MiB + (i + 1) * 4 * KiB] = data
            more.append(Request(Command.READ, 3000 + i, 5 * MiB + i * 4 * KiB, 4 * KiB))
        more.append(Request(Command.FLUSH, 4000))
        await send_together(t.client, more)
        for request in requests + more:
            reply = await t.client.reply(request.handle)
            assert reply.status == 0, request
            if request.command is Command.READ:
                start = request.offset
                assert bytes(reply.data) == bytes(content[start : start + request.length])
        assert t.sender_writes >= 1
        await settled(t.session)
    assert image.read_bytes() == bytes(content)


class ShortBigWrites:
    """Stands in for `os` in the transport module: a direct write of more than
    `threshold` bytes takes only `limit` of them (a socket that just filled
    up); smaller ones go through whole."""

    def __init__(self, threshold: int, limit: int) -> None:
        self.threshold = threshold
        self.limit = limit
        self.short = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        return self._write(fd, bytes(data))

    def writev(self, fd, buffers):
        return self._write(fd, b"".join(buffers))

    def _write(self, fd, data: bytes) -> int:
        if len(data) > self.threshold:
            self.short += 1
            data = data[: self.limit]
        return os.write(fd, data)


class GatedFlushes(Backend):
    """FLUSH waits for `gate`: a request task that stays running."""

    gate: trio.Event

    async def flush(self) -> None:
        await self.gate.wait()
        await super().flush()


async def test_a_tail_queued_behind_a_full_socket_is_never_overtaken_by_a_direct_reply(
    image, monkeypatch
):
    """The reader's replies fill the socket: the unsent tail of a frame
    goes to the sender. While the sender holds it - also while it lets a
    running request (a FLUSH) queue its reply first - a reply the reader
    produces for a frame received later must queue behind it: written
    directly, it would land inside the half-sent frame. Many rounds, since
    which task trio runs first varies."""
    content = image.read_bytes()
    writes = ShortBigWrites(threshold=128 * KiB, limit=1000)
    monkeypatch.setattr(transport_module, "os", writes)
    backend = GatedFlushes(image)
    handle = 1
    async with open_session(image, backend=backend) as t:
        for round_ in range(40):
            backend.gate = trio.Event()
            flush = Request(Command.FLUSH, handle)
            reads = [
                Request(Command.READ, handle + 1 + i, i * 64 * KiB, 64 * KiB) for i in range(4)
            ]
            handle += 5
            await send_together(t.client, [flush, *reads])
            later = []
            for step in range(3):
                later.append(await t.client.send(Command.READ, MiB + step * 4 * KiB, 4 * KiB))
                await trio.sleep(0)
            backend.gate.set()
            for request in reads:
                reply = await t.client.reply(request.handle)
                assert reply.status == 0, round_
                start = request.offset
                assert bytes(reply.data) == content[start : start + 64 * KiB]
            for step, later_handle in enumerate(later):
                reply = await t.client.reply(later_handle)
                start = MiB + step * 4 * KiB
                assert reply.status == 0 and bytes(reply.data) == content[start : start + 4 * KiB]
            assert (await t.client.reply(flush.handle)).status == 0
        await settled(t.session)
    assert writes.short >= 40


async def test_replies_of_request_tasks_and_of_the_reader_interleave_in_order(image):
    """FLUSH runs in a request task (a thread); READs and WRITEs next to it
    are served by the reader. Whoever writes, frames go out in the order
    they were sealed (the client checks every sequence number)."""
    content = bytearray(image.read_bytes())
    async with open_session(image) as t:
        handle = 1
        for round_ in range(20):
            batch: list[Request] = []
            for i in range(8):
                offset = (round_ * 8 + i) * 4 * KiB
                if i % 3 == 0:
                    batch.append(Request(Command.FLUSH, handle))
                elif i % 3 == 1:
                    data = os.urandom(4 * KiB)
                    content[offset : offset + len(data)] = data
                    batch.append(Request(Command.WRITE, handle, offset, len(data), data=data))
                else:
                    batch.append(Request(Command.READ, handle, offset - 4 * KiB, 8 * KiB))
                handle += 1
            await send_together(t.client, batch)
            for request in batch:
                reply = await t.client.reply(request.handle)
                assert reply.status == 0
                if request.command is Command.READ:
                    start = request.offset
                    assert bytes(reply.data) == bytes(content[start : start + 8 * KiB])
        await settled(t.session)


async def test_refused_requests_in_the_inline_path_get_their_errno(image, caplog):
    """The reader's quick test passes only what ServedExport.check passes;
    everything else still gets check's errno (and its log line)."""
    limits = SessionLimits(max_request=64 * KiB)
    async with open_session(image, limits=limits) as t:
        requests = [
            Request(Command.READ, 1, SIZE - 4 * KiB, 4 * KiB),  # ends at the end: fine
            Request(Command.READ, 2, SIZE - 4 * KiB, 8 * KiB),  # past the end
            Request(Command.READ, 3, 0, 64 * KiB + 1),  # longer than max_request
            Request(Command.WRITE, 4, SIZE - 2, 4, data=b"abcd"),  # past the end
            Request(Command.WRITE, 5, SIZE - 4, 4, data=b"abcd"),  # ends at the end: fine
        ]
        await send_together(t.client, requests)
        statuses = [(await t.client.reply(r.handle)).status for r in requests]
        assert statuses == [0, errno.EINVAL, errno.EINVAL, errno.ENOSPC, 0]
    assert image.read_bytes()[-4:] == b"abcd"
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and all("session-test" in m for m in refused)


@pytest.mark.parametrize(
    ("acl", "flags"),
    [(ExportAcl(read_only=True), HelloFlag.NONE), (None, HelloFlag.READ_ONLY)],
    ids=["read-only-export", "read-only-request"],
)
async def test_a_small_write_on_a_read_only_grant_is_refused_in_the_inline_path(
    image, acl, flags
):
    """A plain WRITE (no FUA, small enough for the reader to serve itself)
    on a grant without WRITE: the backend is open read-write, so only the
    session's checks stand between the request and the file."""
    before = image.read_bytes()
    async with open_session(image, acl=acl, flags=flags) as t:
        assert t.client.ready.permissions == Permission.READ
        requests = [
            Request(Command.WRITE, 1, 0, 4 * KiB, data=b"w" * 4 * KiB),
            Request(Command.WRITE, 2, MiB, 512, data=b"x" * 512),
            Request(Command.READ, 3, 0, 4 * KiB),
        ]
        await send_together(t.client, requests)
        replies = [await t.client.reply(r.handle) for r in requests]
        assert [reply.status for reply in replies] == [errno.EPERM, errno.EPERM, 0]
        assert bytes(replies[2].data) == before[: 4 * KiB]
        assert (await t.client.write(8 * KiB, b"y" * 4 * KiB)).status == errno.EPERM
    assert image.read_bytes() == before

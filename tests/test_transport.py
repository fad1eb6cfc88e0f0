"""`FrameTransport`, the socket fast path both sessions share, over real
socket pairs: partial writes, a full socket (EAGAIN), wire order between
direct writes and the sender, a peer that stops reading, a connection cut
mid-frame, deep queues, and reading (large frames in place, one yield per
call, cancellation)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from dstfuse import transport as transport_module
from dstfuse.protocol import Command, Connection, RemoteProtocolError, Request
from dstfuse.protocol.connection import NEED_DATA
from dstfuse.protocol.testing import open_pair
from dstfuse.transport import IOV_MAX, READS_PER_YIELD, FrameTransport, unsent

KiB = 1 << 10
MiB = 1 << 20


class Frames:
    """Items are bytes; each is sealed as three parts (like header, payload
    and tag), so every write is a scatter-gather one. Records what was
    sealed and what `on_written` was told, in order."""

    def __init__(self) -> None:
        self.sealed: list[bytes] = []
        self.written: list[bytes] = []

    def seal(self, item: bytes) -> list[memoryview]:
        self.sealed.append(item)
        view = memoryview(item)
        third = len(item) // 3
        return [view[:third], view[third : 2 * third], view[2 * third :]]

    def on_written(self, items: list[bytes]) -> None:
        self.written.extend(items)


def frame(number: int, size: int) -> bytes:
    """`size` bytes that say which frame they belong to and where."""
    head = b"<%08d>" % number
    return (head * (size // len(head) + 1))[:size]


@pytest.fixture
async def pair():
    """(transport over our end, the peer's blocking stdlib socket, recorder);
    a small send buffer, so the socket fills quickly."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
    ours.setblocking(False)
    frames = Frames()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    transport = FrameTransport(stream, seal=frames.seal, weight=len, on_written=frames.on_written)
    try:
        yield transport, theirs, frames
    finally:
        await transport.aclose()
        theirs.close()


def read_available(peer: socket.socket) -> bytes:
    """Everything the peer can read right now, without waiting."""
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def read_exactly(peer: socket.socket, size: int) -> bytes:
    """`size` bytes from the peer, letting the transport's tasks run."""
    data = bytearray()
    with trio.fail_after(10):
        while len(data) < size:
            data += read_available(peer)
            await trio.sleep(0.001)
    return bytes(data)


def test_unsent_is_the_tail_of_the_parts_as_views():
    parts = [b"aaaa", memoryview(b"bbb"), bytearray(b"cc")]
    assert [bytes(p) for p in unsent(parts, 0)] == [b"aaaa", b"bbb", b"cc"]
    assert [bytes(p) for p in unsent(parts, 3)] == [b"a", b"bbb", b"cc"]
    assert [bytes(p) for p in unsent(parts, 4)] == [b"bbb", b"cc"]
    assert [bytes(p) for p in unsent(parts, 8)] == [b"c"]
    assert unsent(parts, 9) == []
    assert isinstance(unsent([b"abcdef"], 2)[0], memoryview)


async def test_a_direct_write_the_socket_takes_wholly_needs_no_sender(pair):
    transport, peer, frames = pair
    transport.put([frame(1, 1000), frame(2, 2000)])
    assert frames.written == [frame(1, 1000), frame(2, 2000)]  # on the wire already
    assert transport.direct_writes == 1 and transport.idle
    assert await read_exactly(peer, 3000) == frame(1, 1000) + frame(2, 2000)


async def test_a_partial_write_leaves_the_tail_to_the_sender(pair):
    transport, peer, frames = pair
    big = frame(1, MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        transport.put([big])
        assert transport.direct_writes == 1
        assert not frames.written and not transport.idle  # the socket took only part
        assert await read_exactly(peer, MiB) == big
        with trio.fail_after(5):
            while frames.written != [big]:
                await trio.sleep(0.001)
        transport.close()
    assert transport.sender_writes >= 1 and transport.idle


async def test_a_full_socket_eagain_queues_everything_in_order(pair):
    transport, peer, frames = pair
    filler = b"f" * (1 << 20)
    sent = 0
    while True:  # fill the socket to EAGAIN
        try:
            sent += os.write(transport.stream.socket.fileno(), filler)
        except BlockingIOError:
            break
    items = [frame(i, 10 * KiB) for i in range(20)]
    transport.put(items[:10])
    assert not frames.written  # nothing taken: all queued
    transport.put(items[10:])  # behind them, not directly
    assert transport.direct_writes == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        data = await read_exactly(peer, sent + 200 * KiB)
        transport.close()
    assert data[sent:] == b"".join(items)
    assert frames.written == items


async def test_a_frame_put_while_a_tail_is_queued_is_never_written_before_it(pair):
    """The socket has room again but the tail of an earlier frame is still
    queued (the sender has not run): a later frame must queue behind it,
    or it would land inside the half-sent frame."""
    transport, peer, frames = pair
    first, second = frame(1, 256 * KiB), frame(2, 4 * KiB)
    transport.put([first])
    head = read_available(peer)  # room again: the socket could take `second`
    assert 0 < len(head) < len(first)
    transport.put([second])
    assert transport.direct_writes == 1  # the second was not written directly
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        rest = await read_exactly(peer, len(first) + len(second) - len(head))
        transport.close()
    assert head + rest == first + second


async def test_a_frame_put_while_the_sender_writes_is_never_written_before_its_batch(pair):
    """The sender took the whole queue and waits for room (queue empty,
    batch not on the wire): a frame put now must wait for that batch."""
    transport, peer, frames = pair
    first, second = frame(1, 256 * KiB), frame(2, 4 * KiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        transport.put([first])
        await trio.testing.wait_all_tasks_blocked()
        assert not transport._queue and not transport.idle  # the sender holds the tail
        head = read_available(peer)  # room, but the sender has not run yet
        transport.put([second])
        rest = await read_exactly(peer, len(first) + len(second) - len(head))
        transport.close()
    assert head + rest == first + second
    assert frames.written == [first, second]


async def test_a_peer_that_stops_reading_never_blocks_put_and_a_cut_breaks_the_sender(pair):
    """Puts return at once however much is queued; when the peer goes away
    the sender raises, and every item is discarded exactly once."""
    transport, peer, frames = pair
    items = [frame(i, 64 * KiB) for i in range(200)]  # 12.5 MiB, far more than the socket
    failure = None

    async def sender() -> None:
        nonlocal failure
        try:
            await transport.run_sender()
        except (trio.BrokenResourceError, OSError) as exc:
            failure = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        with trio.fail_after(5):
            for item in items:
                transport.put([item])  # never waits
                await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        assert len(frames.written) < len(items)  # the socket is full
        peer.close()  # cut
    assert failure is not None and transport.broken
    assert sorted(frames.written) == sorted(items)  # each once: written or discarded
    transport.put([b"late"])
    transport.queue([b"later"])
    assert frames.written[-2:] == [b"late", b"later"]


async def test_deep_queues_keep_order_and_stay_within_iov_max(pair):
    """Thousands of small frames queued behind a stalled peer go out in
    batches (never more buffers per writev than IOV_MAX), all in order;
    a direct write of more buffers than that is cut at IOV_MAX."""
    transport, peer, frames = pair
    items = [frame(i, 300) for i in range(5000)]
    transport.put(items[:600])  # 1800 buffers in one direct write
    for item in items[600:]:
        transport.put([item])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        data = await read_exactly(peer, 300 * len(items))
        transport.close()
    assert data == b"".join(items)
    assert frames.written == items
    assert frames.sealed == items  # each sealed once, in order
    assert 600 * 3 > IOV_MAX


async def test_aclose_forgets_the_descriptor_and_wakes_a_waiting_sender(pair):
    transport, peer, frames = pair
    failure = None

    async def sender() -> None:
        nonlocal failure
        try:
            await transport.run_sender()
        except trio.ClosedResourceError as exc:
            failure = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        transport.put([frame(1, MiB)])
        await trio.testing.wait_all_tasks_blocked()
        await transport.aclose()
    assert failure is not None
    assert frames.written == [frame(1, MiB)]  # discarded
    transport.put([b"after"])  # nothing is written to a closed descriptor
    assert frames.written[-1] == b"after"


# -- reading -------------------------------------------------------------------


@pytest.fixture
async def reading():
    """(transport over our end, the peer's trio stream, a client/server
    Connection pair: the peer writes what the client seals)."""
    ours, theirs = trio.socket.socketpair()
    client, server = open_pair(max_payload=4 * MiB)
    transport = FrameTransport(
        trio.SocketStream(ours), seal=lambda item: None, weight=lambda item: 0
    )
    peer = trio.SocketStream(theirs)
    try:
        yield transport, peer, client, server
    finally:
        await peer.aclose()
        await transport.aclose()


async def next_request(transport: FrameTransport, conn: Connection) -> Request:
    with trio.fail_after(5):
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Request)
                return event
            assert await transport.receive(conn)


async def test_a_large_frame_is_read_in_place_and_small_ones_as_chunks(reading):
    transport, peer, client, server = reading
    big = frame(1, 3 * MiB)
    small = [
        Request(Command.WRITE, 10 + i, i * 4 * KiB, 4 * KiB, data=frame(i, 4 * KiB))
        for i in range(8)
    ]
    frames = [client.send(Request(Command.WRITE, 1, 0, len(big), data=big))]
    frames += [client.send(request) for request in small]

    async def write() -> None:
        for data in frames:
            await peer.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        request = await next_request(transport, server)
        assert request.handle == 1 and bytes(request.data) == big
        assert isinstance(request.data, memoryview)  # a view of the frame's own buffer
        for expected in small:
            got = await next_request(transport, server)
            assert got.handle == expected.handle and bytes(got.data) == expected.data


async def test_a_connection_cut_in_the_middle_of_a_large_frame_is_an_error(reading):
    transport, peer, client, server = reading
    data = client.send(Request(Command.WRITE, 1, 0, MiB, data=frame(1, MiB)))


    async def write_part_then_cut() -> None:
        await peer.send_all(data[: 300 * KiB])
        await peer.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_part_then_cut)
            with pytest.raises(RemoteProtocolError, match="middle of a frame"):
                while server.next_event() is NEED_DATA:
                    await transport.receive(server)
    assert server.buffered == 300 * KiB


async def test_reading_waits_only_when_the_socket_was_empty_and_honours_cancellation(reading):
    """After a read that found the socket empty, `receive` waits (one
    pass); reads that keep finding data go on without a pass but yield
    every READS_PER_YIELD reads, so a peer that keeps sending cannot starve
    the other tasks; a cancelled reader reads nothing."""
    transport, peer, client, server = reading
    ping = [client.send(Request(Command.PING, i)) for i in range(3)]
    await peer.send_all(ping[0])
    assert await transport.receive(server)  # a short read: the socket is empty now
    assert server.next_event().handle == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.receive, server)  # nothing waiting: waits
        await trio.testing.wait_all_tasks_blocked()
        assert server.next_event() is NEED_DATA
        await peer.send_all(ping[1])
    assert server.next_event().handle == 1
    await peer.send_all(ping[2])
    with trio.CancelScope() as scope:
        scope.cancel()
        await transport.receive(server)
    assert scope.cancelled_caught
    assert server.next_event() is NEED_DATA  # nothing was read
    assert await transport.receive(server)  # still there
    assert server.next_event().handle == 2
    await peer.aclose()
    assert not await transport.receive(server)


async def test_a_peer_that_keeps_sending_cannot_starve_other_tasks(reading, monkeypatch):
    """Reads of 4 KiB (smaller than what the socket holds), so every one
    finds more data waiting: the other task still runs at least every
    READS_PER_YIELD reads."""
    monkeypatch.setattr(transport_module, "RECEIVE_SIZE", 4 * KiB)
    transport, peer, client, server = reading
    data = b"".join(
        client.send(Request(Command.WRITE, i, 0, 16 * KiB, data=frame(i, 16 * KiB)))
        for i in range(64)
    )
    reads = 0
    others_ran = []

    async def other() -> None:
        while True:
            others_ran.append(reads)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.send_all, data)
        await trio.testing.wait_all_tasks_blocked()  # the socket is full
        nursery.start_soon(other)
        await trio.sleep(0)
        others_ran.clear()
        with trio.fail_after(10):
            for _ in range(4 * READS_PER_YIELD):  # data keeps waiting throughout
                await transport.receive(server)
                reads += 1
                while server.next_event() is not NEED_DATA:
                    pass
        nursery.cancel_scope.cancel()
    # The reader yielded every READS_PER_YIELD reads; the other task ran
    # in each run-loop batch, before or after the reader's turn.
    points = sorted({0, *others_ran, reads})
    assert max(b - a for a, b in zip(points, points[1:], strict=False)) <= 2 * READS_PER_YIELD


async def test_a_slow_peer_gets_every_sealed_frame_whole_and_in_sequence():
    """Real protocol frames (each one's check covers its sequence number,
    so a frame out of order or cut into fails to open) put from a task
    that keeps going while the peer reads 16 KiB at a time: direct
    writes, partial writes and the sender all take turns."""
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    client, server = open_pair(max_payload=MiB)
    transport: FrameTransport[Request] = FrameTransport(
        trio.SocketStream(ours), seal=client.send_parts, weight=lambda r: len(r.data)
    )
    sizes = [4 * KiB, 300 * KiB, 512, 64 * KiB, 0]
    requests = [
        Request(Command.WRITE, i, 0, size, data=frame(i, size)) if size
        else Request(Command.PING, i)
        for i, size in enumerate(sizes * 12)
    ]
    received: list[Request] = []

    async def slow_peer() -> None:
        while len(received) < len(requests):
            data = await theirs.recv(16 * KiB)
            assert data
            server.receive_data(data)
            while (event := server.next_event()) is not NEED_DATA:
                received.append(event)
            await trio.sleep(0.0002)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.run_sender)
                nursery.start_soon(slow_peer)
                for index, request in enumerate(requests):
                    transport.put([request])
                    if index % 3 == 0:
                        await trio.sleep(0.0005)
                while len(received) < len(requests):
                    await trio.sleep(0.01)
                transport.close()
    finally:
        await transport.aclose()
        theirs.close()
    assert [r.handle for r in received] == [r.handle for r in requests]
    assert all(bytes(r.data) == bytes(q.data) for r, q in zip(received, requests, strict=True))
    assert transport.direct_writes > 1 and transport.sender_writes > 1


# -- deferred items: put at the end of the run loop's pass ---------------------


async def test_deferred_frames_go_out_together_at_the_end_of_the_pass(pair):
    transport, peer, frames = pair
    items = [frame(i, 1000) for i in range(3)]
    for item in items:
        transport.defer(item)
    assert not frames.written and transport.direct_writes == 0  # not yet
    await trio.lowlevel.checkpoint()  # the run loop passes by its I/O wait
    assert frames.written == items and transport.direct_writes == 1  # one write
    assert await read_exactly(peer, 3000) == b"".join(items)


async def test_a_frame_put_after_deferred_ones_goes_behind_them(pair):
    transport, peer, frames = pair
    first, second, third = frame(1, 500), frame(2, 500), frame(3, 500)
    transport.defer(first)
    transport.put([second])  # before the pass ends: behind `first`, same write
    assert frames.written == [first, second] and transport.direct_writes == 1
    transport.defer(third)
    transport.queue([frame(4, 500)])  # queued behind the deferred one
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        data = await read_exactly(peer, 2000)
        transport.close()
    assert data == first + second + third + frame(4, 500)
    assert frames.written == [first, second, third, frame(4, 500)]


async def test_a_full_batch_or_a_large_frame_is_put_at_once(pair):
    transport, peer, frames = pair
    batch = [frame(i, 100) for i in range(transport_module.DEFER_ITEMS)]
    for item in batch:
        transport.defer(item)
    assert frames.written == batch  # the last one filled the batch
    large = frame(99, transport_module.DEFER_BYTES)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run_sender)
        transport.defer(large)
        assert transport.direct_writes == 2  # written (in part) right away
        await read_exactly(peer, 100 * len(batch) + len(large))
        transport.close()


async def test_a_deferred_frame_the_socket_cannot_take_wakes_the_sender_at_once(pair):
    """The end-of-pass write leaves a tail for the sender while the run
    loop is about to sleep: the sender must run at once, not when some
    other event happens to wake the loop (here none would: the only timer
    is the test's own 10 s limit, and the peer reads in a plain thread)."""
    import threading

    transport, peer, frames = pair
    items = [frame(i, 60 * KiB) for i in range(6)]  # each deferred, together > the socket
    total = sum(map(len, items))
    received = bytearray()

    def read_all() -> None:
        while len(received) < total:
            chunk = peer.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    done = trio.Event()
    recorded = frames.on_written

    def on_written(batch: list[bytes]) -> None:
        recorded(batch)
        if len(frames.written) == len(items):
            done.set()

    transport._on_written = on_written
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.run_sender)
            await trio.testing.wait_all_tasks_blocked()
            for item in items:
                transport.defer(item)
            with trio.fail_after(10):
                await done.wait()
            transport.close()
    finally:
        reader.join(10)
    assert bytes(received) == b"".join(items)


async def test_a_deferred_frame_that_cannot_be_sealed_ends_the_connection(pair, caplog):
    """Sealing happens in the run loop's hook, outside any task: a failure
    there must end the connection (the session resends on the next one),
    never silently drop the hook and with it every later frame."""
    transport, peer, frames = pair

    def broken_seal(item: bytes) -> list[memoryview]:
        raise ValueError("cannot seal")

    transport._seal = broken_seal
    with pytest.RaisesGroup(trio.BrokenResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.run_sender)
            await trio.testing.wait_all_tasks_blocked()
            transport.defer(frame(1, 100))
            with trio.fail_after(10):
                await trio.sleep_forever()
    assert transport.broken
    assert frames.written == [frame(1, 100)]  # discarded, and said so
    assert "frames could not be sealed (ValueError: cannot seal)" in caplog.text


async def test_a_read_puts_the_deferred_frames_first(pair):
    """A reader that keeps reading (a large reply in several reads, no
    pass ending in between) must not hold back requests deferred behind it."""
    transport, peer, frames = pair
    client, _ = open_pair(max_payload=4 * MiB)
    transport.defer(frame(1, 100))
    peer.sendall(b"x")  # something to read at once
    await transport.receive(client)
    assert frames.written == [frame(1, 100)]
    assert read_available(peer) == frame(1, 100)

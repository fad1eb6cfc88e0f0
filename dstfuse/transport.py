"""The socket fast path under a protocol session, shared by both ends.

A `FrameTransport` owns the writing and reading of one connected stream
for a session (the client's `nodes.session.Session`, the node's
`export.session.ExportSession`); the session keeps the protocol, the
requests and what a broken connection means.

Writing: `put` writes frames straight to the socket without blocking when
nothing is queued or being sent (one scatter-gather write for all the
frames it is given: header, payload and tag of each, never joined), and
queues whatever the socket does not take for the sender task (`run_sender`)
first in line; `queue` always leaves frames to the sender, which seals and
writes everything queued by the time it runs in one writev, waiting only
while the socket is full (EAGAIN). Items are sealed by the session's `seal`
callback at the moment they go out, so that sequence numbers follow the
wire order; `on_written` learns which items are done with (on the wire,
skipped or discarded), once each. `defer` (the client's requests) puts an
item at the end of the run loop's pass instead, with every other item
deferred in that pass, up to DEFER_ITEMS: the frames of all the requests
that ran in one pass reach the peer in one write (and the peer reads them
in one), without a task switch (`_EndOfPass`, a trio instrument).

Reading: `receive` reads the descriptor itself. After a read that left the
socket empty it waits until readable, then reads (one pass of the run loop
where trio's `receive_some` takes two); after a read that filled its
buffer it reads again at once, without a pass, but yields every
READS_PER_YIELD such reads anyway, so a peer that keeps sending cannot
starve the other tasks and connections. A cancelled reader reads nothing.
A frame with a large part
missing is read straight into its own buffer, sized from its header
(`Connection.receive_buffer`), not joined from chunks. Every read pokes
the run's busy-poller (busypoll.py; the mount daemon has one).

Invariants:
- frames reach the wire whole and in the order they were sealed: a direct
  write happens only while nothing is queued and the sender holds nothing,
  so it can never overtake (or land inside) a frame queued before it;
- a write never blocks and never waits in `put`: a cancelled caller can
  never leave half a frame on the wire (the unsent tail is the sender's);
- deferred items are put before anything put or queued after them, and
  at the latest when the run loop is about to wait for I/O; a sender
  woken then runs in the next pass (the wait is cut short), never after
  the wait's timeout;
- the descriptor is forgotten (`aclose`) before the stream closes, and
  checked after every wait, so a reused descriptor number never sees our
  bytes;
- once a write failed the transport is broken: queued and later items are
  discarded (passed to `on_written`), and `run_sender` raises.

Streams without a descriptor (in-memory ones in tests) go through
`receive_some` and `send_all`, every frame through the sender.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import trio

from . import busypoll
from .protocol import Connection
from .protocol.sealing import Buffer

log = logging.getLogger(__name__)

#: Bytes asked for by one read of a chunk.
RECEIVE_SIZE = 1 << 18
#: Items the sender seals and writes together, at most ...
BATCH_ITEMS = 256
#: ... and bytes of payload, about.
BATCH_BYTES = 256 << 10
#: Buffers one writev takes at most (Linux's IOV_MAX).
IOV_MAX = 1024
#: Deferred items put together at most (the peer keeps working on a batch
#: while the next one is collected), and the payload from which an item is
#: put at once (its write costs more than the system call saved).
DEFER_ITEMS = 8
DEFER_BYTES = 64 << 10
#: Reads in a row that found data waiting before `receive` yields anyway.
READS_PER_YIELD = 8

#: What a broken or closed stream raises from `receive` and `run_sender`.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

T = TypeVar("T")

#: A queue entry: the items it stands for, and None (seal the one item when
#: it goes out) or the unsent tail of frames already sealed for them.
_Entry = tuple[list[T], list[Buffer] | None]


def unsent(parts: Sequence[Buffer], sent: int) -> list[Buffer]:
    """What is left of `parts` (one after the other) once `sent` bytes of
    them are on the wire, as views: nothing is copied. Parts are byte
    buffers (len is their size: events hold memoryviews cast to bytes)."""
    for index, part in enumerate(parts):
        size = len(part)
        if sent < size:
            return [memoryview(part)[sent:], *parts[index + 1 :]]
        sent -= size
    return []


def _write(fd: int, parts: Sequence[Buffer]) -> int:
    """One non-blocking write of as much of `parts` as the socket takes."""
    if len(parts) == 1:
        return os.write(fd, parts[0])
    return os.writev(fd, parts if len(parts) <= IOV_MAX else parts[:IOV_MAX])


def _size(parts: Sequence[Buffer]) -> int:
    return sum(map(len, parts))


class _EndOfPass(trio.abc.Instrument):
    """Puts the deferred frames of every transport of a trio run just
    before the run loop waits for I/O: once per pass, after every task that
    was runnable in it has run (trio calls `before_io_wait` then). One per
    run (a RunVar), added as an instrument on first use.

    The wait's timeout was fixed before this hook runs, so a task it wakes
    would sleep through it: when a write left frames for a sender task (a
    full socket), the loop is woken once more (`run_sync_soon`, a write to
    trio's wake-up socket) so that the sender runs at once."""

    _RUN: trio.lowlevel.RunVar[_EndOfPass | None] = trio.lowlevel.RunVar(
        "frames_at_end_of_pass", None
    )

    def __init__(self) -> None:
        self._transports: list[FrameTransport] = []
        self._token = trio.lowlevel.current_trio_token()

    @classmethod
    def current(cls) -> _EndOfPass:
        hook = cls._RUN.get()
        if hook is None:
            hook = cls()
            trio.lowlevel.add_instrument(hook)
            cls._RUN.set(hook)
        return hook

    def add(self, transport: FrameTransport) -> None:
        self._transports.append(transport)

    def before_io_wait(self, timeout: float) -> None:
        if not self._transports:
            return
        transports, self._transports = self._transports, []
        sender_woken = False
        for transport in transports:
            sender_woken |= transport.put_deferred()
        if sender_woken and timeout > 0:
            self._token.run_sync_soon(_nothing)


def _nothing() -> None:
    """What `_EndOfPass` runs to wake the run loop."""


class FrameTransport(Generic[T]):
    """Frames of one session to and from `stream`. `seal(item)` frames an
    item as buffers to write (None: it needs no sending any more);
    `weight(item)` is its payload size, for batching; `on_written(items)`
    is told of items done with. `coalesce()` true: the sender lets other
    tasks run once before it takes a batch, so replies completing in the
    same step join it."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        seal: Callable[[T], list[Buffer] | None],
        weight: Callable[[T], int],
        on_written: Callable[[list[T]], None] | None = None,
        coalesce: Callable[[], bool] | None = None,
    ) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._seal = seal
        self._weight = weight
        self._on_written = on_written
        self._coalesce = coalesce
        self._queue: deque[_Entry[T]] = deque()
        self._deferred: list[T] = []  # `defer`red in this pass, not yet put
        self._awaiting_pass = False  # listed for the end of this pass
        self._sending = False  # the sender holds a batch: sealing or writing it
        self._closed = False  # no more items: the sender ends once the queue is empty
        self.broken = False
        self._sender_lot = trio.lowlevel.ParkingLot()
        self._data_waiting = True  # the last read filled its buffer: more may wait
        self._reads_without_yield = 0
        #: writes made by `put` itself, and by the sender (for tests and benchmarks)
        self.direct_writes = 0
        self.sender_writes = 0

    @property
    def idle(self) -> bool:
        """Nothing queued and the sender holds nothing."""
        return not self._queue and not self._sending

    # -- writing ----------------------------------------------------------
    def put(self, items: list[T]) -> None:
        """Send `items` (in this order) after everything put before; write
        them at once when the transport is idle (see the module doc)."""
        fd = self._fd
        if self._deferred:
            items = [*self._deferred, *items]
            self._deferred = []
        if fd is None or self._queue or self._sending:
            self.queue(items)
            return
        if self.broken or self._closed:
            self._written(items)
            return
        parts: list[Buffer] = []
        for item in items:
            sealed = self._seal(item)
            if sealed is not None:
                parts.extend(sealed)
        if not parts:
            self._written(items)
            return
        try:
            sent = _write(fd, parts)
        except OSError:  # full (EAGAIN) or broken: the sender finds out which
            sent = 0
        self.direct_writes += 1
        if sent == _size(parts):
            self._written(items)
            return
        self._queue.append((items, unsent(parts, sent)))
        self._sender_lot.unpark()

    def defer(self, item: T) -> None:
        """`put` `item` at the end of the current pass of the run loop,
        together with every other item deferred in that pass: one write
        for the frames of all the tasks that ran (see `_EndOfPass`), and
        no task switch. In order with everything put, queued or deferred
        before; a transport without a descriptor puts it at once."""
        if self._fd is None or self._weight(item) >= DEFER_BYTES:
            self.put([item])
            return
        if not self._awaiting_pass:
            self._awaiting_pass = True
            _EndOfPass.current().add(self)
        deferred = self._deferred
        deferred.append(item)
        if len(deferred) >= DEFER_ITEMS:
            self.put([])

    def put_deferred(self) -> bool:
        """Put what `defer` collected; True when the sender was left
        something to write (the socket did not take it all)."""
        self._awaiting_pass = False
        items, self._deferred = self._deferred, []
        if items:
            try:
                self.put(items)
            except Exception as exc:  # noqa: BLE001 - raised here, nobody would see it
                # Called outside any task, and trio drops a hook that raises
                # (and with it every later deferred frame): the connection
                # ends instead; its session resends what was in flight. A
                # failed seal comes before any write: nothing of them left.
                log.error(
                    "frames could not be sealed (%s: %s); dropping the connection",
                    type(exc).__name__,
                    exc,
                )
                self._written(items)
                self.abandon()
                return True
        return not self.idle

    def abandon(self) -> None:
        """Break the transport from outside its tasks: everything queued is
        discarded, and the sender raises (the session ends)."""
        self.broken = True
        self._deferred = []
        self._discard_queue()
        self._sender_lot.unpark()

    def queue(self, items: list[T]) -> None:
        """Leave `items` to the sender, after everything put before."""
        if self._deferred:
            items = [*self._deferred, *items]
            self._deferred = []
        if self.broken or self._closed:
            self._written(items)
            return
        self._queue.extend(([item], None) for item in items)
        self._sender_lot.unpark()

    def _written(self, items: list[T]) -> None:
        if self._on_written is not None:
            self._on_written(items)

    def close(self) -> None:
        """No more items: the sender writes what is queued, then returns."""
        self._closed = True
        self._sender_lot.unpark()

    async def aclose(self) -> None:
        """Forget the descriptor, then close the stream (forcefully)."""
        self._fd = None
        self.close()
        await trio.aclose_forcefully(self.stream)

    async def run_sender(self) -> None:
        """Write what `put` could not and what `queue` left, in queue order,
        batched, until `close` (then the queue is written first). Raises
        one of STREAM_ERRORS when a write fails; the transport is broken
        then and every item still queued is discarded."""
        queue = self._queue
        while True:
            if self.broken:
                raise trio.BrokenResourceError("the transport was abandoned")
            if not queue:
                if self._closed:
                    return
                await self._sender_lot.park()
                continue
            self._sending = True
            items: list[T] = []
            try:
                if self._coalesce is not None and self._coalesce():
                    await trio.lowlevel.checkpoint()
                items, parts = self._take_batch()
                if parts and not self.broken:
                    await self._send(parts)
            except BaseException:
                self.broken = True
                self._written(items)
                self._discard_queue()
                raise
            finally:
                self._sending = False
            self._written(items)

    def _take_batch(self) -> tuple[list[T], list[Buffer]]:
        """Items and sealed buffers of the next batch, in queue order."""
        queue = self._queue
        items: list[T] = []
        parts: list[Buffer] = []
        size = 0
        while queue and size < BATCH_BYTES and len(items) < BATCH_ITEMS:
            entry_items, tail = queue[0]
            if tail is not None:
                if parts and len(parts) + len(tail) > IOV_MAX:
                    break
                parts.extend(tail)
                size += _size(tail)
            else:
                if len(parts) + 3 > IOV_MAX:
                    break
                item = entry_items[0]
                sealed = None if self.broken else self._seal(item)
                if sealed is not None:
                    parts.extend(sealed)
                size += self._weight(item)
            queue.popleft()
            items.extend(entry_items)
        return items, parts

    def _discard_queue(self) -> None:
        while self._queue:
            self._written(self._queue.popleft()[0])

    async def _send(self, parts: list[Buffer]) -> None:
        """Write all of `parts`; on a socket, wait only while it is full."""
        self.sender_writes += 1
        if self._fd is None:
            if isinstance(self.stream, trio.SocketStream):
                raise trio.ClosedResourceError("the transport was closed")
            await self.stream.send_all(b"".join(parts))
            return
        while parts:
            fd = self._fd
            if fd is None:
                raise trio.ClosedResourceError("the transport was closed")
            try:
                sent = _write(fd, parts)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            parts = unsent(parts, sent)

    # -- reading ----------------------------------------------------------
    async def receive(self, conn: Connection) -> bool:
        """Read the next bytes from the peer into `conn`; False once the
        peer closed its side (the end of stream is passed on to `conn`).
        Raises one of STREAM_ERRORS when the connection is lost. Deferred
        items are put first: a reader that keeps reading (a large reply in
        several reads) must not hold back the requests behind it until the
        pass ends."""
        if self._deferred:
            self.put_deferred()
        fd = self._fd
        if fd is None:
            if isinstance(self.stream, trio.SocketStream):
                raise trio.ClosedResourceError("the transport was closed")
            data = await self.stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(data)
            return bool(data)
        target = conn.receive_buffer()
        if self._data_waiting:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                size = self._read(fd, conn, target)
            except BlockingIOError:
                self._data_waiting = False
            else:
                self._reads_without_yield += 1
                if self._reads_without_yield >= READS_PER_YIELD:
                    self._reads_without_yield = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return size > 0
        self._reads_without_yield = 0
        while True:
            await trio.lowlevel.wait_readable(fd)
            fd = self._fd
            if fd is None:
                raise trio.ClosedResourceError("the transport was closed")
            try:
                return self._read(fd, conn, target) > 0
            except BlockingIOError:
                continue

    def _read(self, fd: int, conn: Connection, target: memoryview | None) -> int:
        """One non-blocking read into `target` (the frame's own buffer) or
        as a chunk; what it read, passed on to `conn`."""
        busypoll.poke()
        if target is not None:
            size = os.readv(fd, [target])
            self._data_waiting = size == len(target)
            if size:
                conn.received_into(size)
            else:
                conn.receive_data(b"")
            return size
        data = os.read(fd, RECEIVE_SIZE)
        self._data_waiting = len(data) == RECEIVE_SIZE
        conn.receive_data(data)
        return len(data)

"""A node served by any NBD server (nbdkit, qemu-nbd, nbd-server, ...).

`NbdNode` gives an NBD export the guarantees of a remote node
(docs/protocol.md, "NBD client (nbd: nodes)"):

- at most `max_in_flight` requests outstanding (`TransactionTable`); a
  write, trim or write-zeroes waits for every earlier overlapping one
  (`WriteOrder`, over the whole block-aligned range), so nothing resent
  can overwrite newer data;
- a broken connection is reconnected with backoff; everything in flight
  is resent on the new one in its original order, and requests made
  meanwhile wait (the node is OFFLINE) instead of failing;
- an error the server returns that may pass (EIO, ENOMEM, ESHUTDOWN) is
  retried with backoff; only when a request has had no success for its
  whole budget, `resend * (max_resends + 1)` seconds from when it was
  made, does the caller get EIO. Other errors (EPERM, ENOSPC, EINVAL, ...)
  reach the caller at once;
- a dead peer is found by the connection (TCP keepalive and user
  timeout); a request still unanswered at the end of its budget fails,
  and the connection it was sent on is dropped;
- writes the server acknowledged but did not flush are kept
  (`UnflushedWrites`, up to `unflushed.limit`). An NBD server has no
  instance identity, so after ANY reconnect we cannot know whether its
  cache survived: the kept writes are resent in their original order, and
  acknowledged, before anything else, and writes that were no longer kept
  count as lost (the next flush fails once with EIO).

What the node asks of the server, and what it does where the server does
not offer it (fixed for a connection; re-read on every reconnect):

- READ/WRITE are split at the server's maximum block size (and at most
  MAX_REQUEST); ranges not aligned to its minimum block size are widened
  (reads) or read-modify-written under the write order (writes);
- FUA without SEND_FUA is WRITE then FLUSH; FLUSH without SEND_FLUSH is
  nothing (as in qemu's NBD client): the server makes no promise, this is
  logged when the node starts, and acknowledged writes are treated as
  durable (none are kept for replay);
- trim must leave zeroes (the node interface), which NBD_CMD_TRIM does not
  promise: it is sent as WRITE_ZEROES without NO_HOLE, which lets the
  server punch a hole; WRITE_ZEROES without SEND_WRITE_ZEROES is a WRITE
  of zeroes;
- `checksum` has no NBD command: the node reads the range and digests it
  here (`checksums_on_node` is False, so `dstfuse verify` says so).

Invariants:
- a transaction is encoded at most once per connection, so the codec never
  sees a cookie twice; a reply completes only its own transaction;
- after a reconnect nothing but the replay goes out until every replayed
  write is acknowledged; a replay cut short is done again in full; two
  overlapping replayed writes are never in flight together (an NBD server
  may reorder what it has in flight);
- a FLUSH never returns success over writes a lost cache destroyed.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable

import trio
import xxhash

from ..config import Timeouts, TlsFiles, Unflushed
from ..errors import NodeError, NodeRefused, NodeUnavailable
from ..fanout import gather_or_raise
from ..protocol import WRITE_COMMANDS, Command, Flag, Reply
from ..protocol.nbd.constants import TransmissionFlag
from ..protocol.nbd.uri import NbdUri
from .backoff import BACKOFF_START, next_delay
from .base import NodeState, ReadData
from .nbd_connection import Connector, NbdConnection, open_nbd_stream, tls_context
from .transaction_node import ReplayPart, TransactionNode
from .transactions import Transaction
from .unflushed import KeptWrite

log = logging.getLogger(__name__)

#: The largest READ/WRITE we send, whatever the server allows.
MAX_REQUEST = 4 << 20
#: Payload-less requests (WRITE_ZEROES) are split at this many bytes.
MAX_RANGED = 1 << 30
#: Server errors that may pass: retried until the request's budget ends.
RETRIED_ERRORS = frozenset({errno.EIO, errno.ENOMEM, errno.ESHUTDOWN})
#: Bytes read per step of a checksum.
CHECKSUM_STEP = 8 << 20


def _overlap(txn: Transaction, offset: int, length: int) -> bool:
    return txn.offset < offset + length and offset < txn.offset + txn.length


class NbdNode(TransactionNode[NbdConnection]):
    kind = "N"
    _log = log
    #: `checksum` reads the data over the network and digests it here.
    checksums_on_node = False
    _in_flight_name = "requests"
    _maximum_name = "the server's maximum"
    _dropped_reply_log = "%s: dropped reply for finished request %d"
    _replay_failed_log = "%s: resent unflushed %s failed (%s); the next flush fails with EIO"
    _replayed_log = "%s: resent %d unflushed writes"
    _replay_timeout = "resent unflushed writes not acknowledged within %gs"

    def __init__(
        self,
        uri: NbdUri,
        *,
        timeouts: Timeouts,
        tls: TlsFiles | None = None,
        max_in_flight: int = 64,
        storage: str = "",
        unflushed: Unflushed | None = None,
        read_only: bool = False,
        connector: Connector = open_nbd_stream,
    ) -> None:
        """`tls` names the PEM files of an nbds:// node; `connector` opens
        the transport (tests pass their own); `storage` names the storage
        in log lines; `read_only` (a read-only mount) never writes."""
        super().__init__(
            uri.text,
            timeouts=timeouts,
            max_in_flight=max_in_flight,
            storage=storage,
            unflushed=unflushed,
        )
        self._uri = uri
        self._tls_files = tls
        self._connector = connector
        self._read_only = read_only
        self._limit_lock = trio.Lock()
        self.flags = TransmissionFlag(0)
        # Without FLUSH nothing could ever release a kept write: the
        # server's acknowledgement is all the durability there is.
        self._keeps_writes = False
        self.minimum = 1
        self.max_request = MAX_REQUEST

    # -- lifecycle ------------------------------------------------------
    def _adopt(self, conn: NbdConnection) -> None:
        """Take the export's parameters from its first connection."""
        ready = conn.ready
        self.size = ready.size - ready.size % ready.minimum
        self._take_limits(conn)
        log.info(
            "%s: connected, export %r, %d bytes, %s, block sizes %d/%d/%d, %s%s",
            self._label,
            ready.export,
            self.size,
            "rw" if self.writable else "ro",
            ready.minimum,
            ready.preferred,
            ready.maximum,
            "structured replies" if ready.structured else "simple replies",
            ", TLS" if self._uri.tls else "",
        )
        if self.size != ready.size:
            log.warning(
                "%s: the export's last %d bytes are not a whole block of %d; not used",
                self._label,
                ready.size - self.size,
                ready.minimum,
            )
        if self.writable and not self.flags & TransmissionFlag.SEND_FLUSH:
            log.warning(
                "%s: the server does not support FLUSH: it cannot promise that written data "
                "is durable; flushes succeed without it (as with qemu's NBD client)",
                self._label,
            )

    def _take_limits(self, conn: NbdConnection) -> None:
        ready = conn.ready
        self.flags = ready.flags
        self._keeps_writes = bool(ready.flags & TransmissionFlag.SEND_FLUSH)
        self.minimum = ready.minimum
        self.max_request = min(ready.maximum, MAX_REQUEST)
        self.max_request -= self.max_request % ready.minimum
        self.writable = not ready.read_only and not self._read_only

    async def aclose(self) -> None:
        """Stop reconnecting and drop the connection; callers flush first.
        Requests still waiting fail (NodeUnavailable) at once."""
        self._set_state(NodeState.OFFLINE)
        self._cancel.cancel()
        for txn in self._table:
            self._table.give_up(txn)

    async def _connect(self) -> NbdConnection:
        tls = None
        if self._uri.tls:
            try:
                tls = tls_context(self._tls_files, check_hostname=self._uri.address.kind == "tcp")
            except (OSError, ValueError) as exc:
                raise NodeRefused(str(self), f"cannot load the TLS files: {exc}") from None
        with trio.move_on_after(self._timeouts.connect) as scope:
            conn = await NbdConnection.establish(
                str(self),
                self._uri,
                tls=tls,
                keepalive=self._timeouts.keepalive,
                max_payload=MAX_REQUEST,
                connector=self._connector,
            )
        if scope.cancelled_caught:
            raise NodeUnavailable(
                str(self), f"no answer within {self._timeouts.connect:g}s (connect timeout)"
            )
        return conn

    def _timers(self) -> list[Callable[[], Awaitable[None]]]:
        return [self._expire_overdue]

    async def _serve(self, conn: NbdConnection) -> str:
        """Run `conn` until it ends and return why; a replay owed goes
        first, and only then does the node go online."""
        outcome = "cancelled"
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal outcome
                outcome = await conn.run(self._on_reply)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            if self._replay_owed:
                failure = await self._replay(conn)
                if failure is not None:
                    conn.abort(failure)
                    return failure
            self._go_online(conn)
        return outcome

    def _refusal(self, conn: NbdConnection) -> str | None:
        usable = conn.ready.size - conn.ready.size % conn.ready.minimum
        if usable == self.size:
            return None
        return (
            f"the export now has {conn.ready.size} bytes instead of {self.size}; refusing "
            f"to use it until it has {self.size} again"
        )

    def _renegotiate(self, conn: NbdConnection) -> None:
        """Take the limits of the new connection, and owe the server the
        kept writes: with no instance identity in NBD, any reconnect may
        have met a server whose cache is gone."""
        before = (self.flags, self.minimum, self.max_request, self.writable)
        self._take_limits(conn)
        if (self.flags, self.minimum, self.max_request, self.writable) != before:
            log.warning(
                "%s: the server now offers %s, block sizes %d..%d, %s (was %s, %d..%d, %s)",
                self._label,
                self.flags,
                self.minimum,
                self.max_request,
                "rw" if self.writable else "ro",
                before[0],
                before[1],
                before[2],
                "rw" if before[3] else "ro",
            )
        self._owe_kept_writes(
            "%s: reconnected; %d acknowledged, unflushed writes (%d bytes) were no longer "
            "kept and may have been lost with the server's cache; the next flush fails "
            "with EIO",
            "%s: reconnected; resending %d unflushed writes (%d bytes) before anything "
            "else, since an NBD server cannot tell whether its cache survived",
        )

    # -- replay after a reconnect -------------------------------------------
    def _replay_waits(
        self, window: deque[tuple[Transaction, KeptWrite]], offset: int, length: int
    ) -> bool:
        """An NBD server may run the requests it has in any order: an
        overlapping one waits until the earlier ones are acknowledged (our
        export orders them itself)."""
        return any(_overlap(txn, offset, length) for txn, _ in window)

    def _replay_parts(self, entry: KeptWrite) -> list[ReplayPart]:
        """`entry` as requests the server takes now: WRITEs split at its
        current maximum, WRITE_ZEROES as zeroes written when it no longer
        offers them; FUA only where the server takes it (durability is not
        the replay's promise)."""
        flags = entry.flags & Flag.FUA if self.flags & TransmissionFlag.SEND_FUA else Flag.NONE
        if entry.command is Command.WRITE_ZEROES:
            if self.flags & TransmissionFlag.SEND_WRITE_ZEROES:
                return [(Command.WRITE_ZEROES, o, n, flags, b"") for o, n in self._ranges(entry)]
            zeroes = memoryview(bytes(min(entry.length, self.max_request)))
            return [
                (Command.WRITE, o, n, flags, zeroes[:n])
                for o, n in self._chunks(entry.offset, entry.length)
            ]
        view = memoryview(entry.data)
        return [
            (Command.WRITE, o, n, flags, view[o - entry.offset : o - entry.offset + n])
            for o, n in self._chunks(entry.offset, entry.length)
        ]

    def _ranges(self, entry: KeptWrite) -> list[tuple[int, int]]:
        end = entry.offset + entry.length
        return [(o, min(MAX_RANGED, end - o)) for o in range(entry.offset, end, MAX_RANGED)]

    # -- transactions ---------------------------------------------------
    async def _run(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        flags: Flag = Flag.NONE,
        data: bytes | memoryview = b"",
    ) -> Reply:
        """One request (split if the server's maximum shrank under it) to
        success, retrying errors that may pass until its budget ends; the
        caller holds the write-order ticket of the range."""
        deadline = trio.current_time() + self._budget
        delay = BACKOFF_START
        while True:
            reply = await self._attempt(command, offset, length, flags, data, deadline)
            if reply is None:
                return await self._run_split(command, offset, length, flags, data)
            if not reply.status:
                return reply
            if reply.status in RETRIED_ERRORS and trio.current_time() + delay < deadline:
                log.info(
                    "%s: %s [%d, +%d) failed on the server (%s); retrying in %gs",
                    self._label,
                    command.name,
                    offset,
                    length,
                    os.strerror(reply.status),
                    delay,
                )
                self.counters.resends += 1
                await trio.sleep(delay)
                delay = min(next_delay(delay), self._timeouts.resend)
                continue
            self.counters.errors += 1
            raise NodeError(
                str(self),
                f"{command.name} [{offset}, +{length}) failed on the server: "
                f"{os.strerror(reply.status)}",
                errno=reply.status,
            )

    #: A request as the Node interface issues it is `_run`: nothing to
    #: order here (a READ), or the caller took the aligned range's
    #: write-order ticket (`_ordered`).
    _transact = _run

    async def _attempt(
        self,
        command: Command,
        offset: int,
        length: int,
        flags: Flag,
        data: bytes | memoryview,
        deadline: float,
    ) -> Reply | None:
        """One transaction to its reply; None when it must be split."""
        txn = await self._table.begin(command, offset, length, flags=flags, data=data)
        txn.deadline = deadline
        self.counters.requests += 1
        self.counters.in_flight = len(self._table)
        try:
            if self._conn is not None:
                self._send(self._conn, txn)
            if command in WRITE_COMMANDS:
                # A write the server may hold must not be overtaken by a
                # later overlapping one, so a cancelled caller still waits
                # for its end before its range is released; bounded, since
                # the timer gives up on it at its deadline (aclose at once).
                with trio.CancelScope(deadline=deadline + 1, shield=True):
                    await txn.wait_done()
            else:
                await txn.wait_done()
        finally:
            self._table.end(txn)
            self.counters.in_flight = len(self._table)
        if txn.resplit:
            return None
        if txn.reply is None:  # the deadline passed, or the node was closed
            raise NodeUnavailable(str(self), f"{txn}: no success within {self._budget:g}s")
        return txn.reply

    async def _expire_overdue(self) -> None:
        """The node's one timer: a request still unanswered when its budget
        ends fails, and the connection it went out on is dropped (a server
        that holds a request that long is not one to send more to)."""
        while True:
            now = trio.current_time()
            wake = math.inf
            stuck = False
            for txn in self._table:
                if txn.done:
                    continue
                if txn.deadline <= now:
                    self.counters.errors += 1
                    log.error(
                        "%s: %s failed: no success within %gs", self._label, txn, self._budget
                    )
                    stuck = stuck or txn.sends > 0
                    self._table.give_up(txn)
                else:
                    wake = min(wake, txn.deadline)
            if stuck and self._conn is not None:
                self._conn.abort(f"a request went unanswered for {self._budget:g}s")
            await trio.sleep_until(min(wake, now + self._timeouts.resend))

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest range of whole minimum blocks around the range."""
        start = offset - offset % self.minimum
        end = -(-(offset + length) // self.minimum) * self.minimum
        return start, end

    async def _ordered(self, offset: int, length: int, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` holding the write-order ticket of the aligned range."""
        start, end = self._aligned(offset, length)
        ticket = await self._write_order.admit(start, end - start)
        try:
            await work()
        finally:
            self._write_order.release(ticket)
        await self._keep_within_limit()

    # -- Node interface -------------------------------------------------
    async def read(self, offset: int, length: int) -> ReadData:
        self.check_range(offset, length)
        if length == 0:
            return b""
        start, end = self._aligned(offset, length)
        data = await self._read_aligned(start, end - start)
        self.counters.bytes_read += length
        return data[offset - start : offset - start + length]

    async def _read_aligned(self, offset: int, length: int) -> ReadData:
        parts = await gather_or_raise(
            [lambda o=o, n=n: self._read_chunk(o, n) for o, n in self._chunks(offset, length)]
        )
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        if not data:
            return

        async def work() -> None:
            start, end = self._aligned(offset, len(data))
            if (start, end) == (offset, offset + len(data)):
                await self._write_aligned(offset, data, fua)
                return
            # read-modify-write of the partial blocks at either end
            buffer = bytearray(end - start)
            head, tail = offset - start, end - offset - len(data)
            if head:
                buffer[: self.minimum] = await self._read_aligned(start, self.minimum)
            if tail and (not head or end - start > self.minimum):
                buffer[-self.minimum :] = await self._read_aligned(end - self.minimum, self.minimum)
            buffer[head : head + len(data)] = data
            await self._write_aligned(start, memoryview(buffer), fua)

        await self._ordered(offset, len(data), work)
        self.counters.bytes_written += len(data)

    async def _write_aligned(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        native_fua = fua and bool(self.flags & TransmissionFlag.SEND_FUA)
        flags = Flag.FUA if native_fua else Flag.NONE
        view = memoryview(data)
        await gather_or_raise(
            [
                lambda o=o, n=n: self._run(
                    Command.WRITE, o, n, flags, view[o - offset : o - offset + n]
                )
                for o, n in self._chunks(offset, len(view))
            ]
        )
        if fua and not native_fua:
            await self.flush()

    async def flush(self) -> None:
        """FLUSH, then release the kept writes it covers. Raises
        NodeWritesLost (EIO) once after writes a reconnect may have lost:
        the flush itself still ran, later ones succeed again."""
        if self.flags & TransmissionFlag.SEND_FLUSH:
            mark = self._unflushed.mark()
            await self._run(Command.FLUSH)
            self._unflushed.release(mark)
        self._report_loss(
            "may have been lost when the connection to the NBD server broke before they "
            "were flushed"
        )

    async def _keep_within_limit(self) -> None:
        """Policy flush: past the unflushed limit, one writer flushes (the
        others wait for it) until the kept data is back under it. A FLUSH
        that fails stops protecting the oldest writes instead."""
        kept = self._unflushed
        while self._flush_at_limit and kept.size > kept.limit:
            async with self._limit_lock:
                if kept.size <= kept.limit:
                    return
                try:
                    mark = kept.mark()
                    await self._run(Command.FLUSH)
                    kept.release(mark)
                except NodeError as exc:
                    self._stop_protecting(exc)

    async def trim(self, offset: int, length: int) -> None:
        """Later reads return zeroes: WRITE_ZEROES without NO_HOLE (the
        server may punch a hole), since NBD_CMD_TRIM promises no zeroes."""
        await self.write_zeroes(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, length)
        if length == 0:
            return
        start, end = self._aligned(offset, length)
        inner_start = start if start == offset else start + self.minimum
        inner_end = end if end == offset + length else end - self.minimum
        if not self.flags & TransmissionFlag.SEND_WRITE_ZEROES or inner_end <= inner_start:
            await self._write_zero_bytes(offset, length, fua)
            return
        if inner_start > offset:  # the partial blocks at the ends as data
            await self.write(offset, bytes(inner_start - offset), fua=fua)
        if inner_end < offset + length:
            await self.write(inner_end, bytes(offset + length - inner_end), fua=fua)
        native_fua = fua and bool(self.flags & TransmissionFlag.SEND_FUA)

        async def work() -> None:
            flags = Flag.FUA if native_fua else Flag.NONE
            await gather_or_raise(
                [
                    lambda o=o: self._run(
                        Command.WRITE_ZEROES, o, min(MAX_RANGED, inner_end - o), flags
                    )
                    for o in range(inner_start, inner_end, MAX_RANGED)
                ]
            )

        await self._ordered(inner_start, inner_end - inner_start, work)
        if fua and not native_fua:
            await self.flush()

    async def _write_zero_bytes(self, offset: int, length: int, fua: bool) -> None:
        step = min(length, self.max_request)
        zeroes = bytes(step)
        for at in range(offset, offset + length, step):
            await self.write(at, zeroes[: min(step, offset + length - at)], fua=fua)

    async def checksum(self, offset: int, length: int) -> bytes:
        """xxh3-128 of the range, read over the network and digested here
        (NBD has no checksum command); each step is hashed between awaits,
        a few milliseconds of CPU at most."""
        self.check_range(offset, length)
        hasher = xxhash.xxh3_128()
        for at in range(offset, offset + length, CHECKSUM_STEP):
            hasher.update(await self.read(at, min(CHECKSUM_STEP, offset + length - at)))
        return hasher.digest()

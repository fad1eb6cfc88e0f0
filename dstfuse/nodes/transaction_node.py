"""What a node reached through transactions does, whatever its protocol.

`TransactionNode` is the part `RemoteNode` (our export) and `NbdNode` (any
NBD server) share: the transaction tables (requests, and replayed writes in
a handle space of their own), the acknowledged writes kept until a FLUSH
covers them and what a reconnect lost of them, the write order, and the
connection's life: the first connect (or an OFFLINE start), the keeper that
serves a connection until it ends and reconnects with backoff, going online
(everything in flight resent in submission order) and the replay of the
kept writes before anything else when the peer may have lost them.

A protocol module supplies what differs: the handshake (`_connect`,
`_adopt`, `_refusal`, `_renegotiate`), serving a connection (`_serve`), its
timers (`_timers`), how a request runs (`_run`, `_transact`), what a kept
write is resent as (`_replay_parts`), and the words of its log lines.

Invariants:
- `_conn` is the connection requests go out on; it is set only once the
  node goes online (after any replay owed) and cleared as the connection
  ends, and requests made meanwhile wait in the table;
- a transaction larger than the peer's current maximum request is never
  sent: it finishes with `resplit` and its caller runs it in parts;
- a replay has at most `max_in_flight` writes outstanding; it ends with
  every kept write acknowledged, or gives up within the node's budget
  (then the connection is dropped and the replay is still owed);
- a successful write's reply is recorded in the kept writes in the same
  step that completes it (`_on_reply` never awaits), so no reconnect can
  come between the acknowledgement and the record.
"""

from __future__ import annotations

import abc
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import trio

from ..config import Timeouts, Unflushed
from ..errors import NodeError, NodeUnavailable, NodeWritesLost
from ..fanout import gather_or_raise
from ..protocol import WRITE_COMMANDS, Command, Flag, Reply
from ..ranges import WriteOrder
from .backoff import BACKOFF_MAX, BACKOFF_START, next_delay
from .base import Node, NodeState, ReadData
from .transactions import Transaction, TransactionTable
from .unflushed import KeptWrite, Loss, UnflushedWrites

#: Replayed writes use handles from this space, disjoint from requests'
#: (and from a remote node's pings).
REPLAY_HANDLE_BASE = 1 << 62
#: Commands whose length is bounded by the peer's maximum request.
SPLITTABLE = frozenset({Command.READ, Command.WRITE})

#: One request a kept write is resent as: command, offset, length, flags, data.
ReplayPart = tuple[Command, int, int, Flag, "bytes | memoryview"]


class Link(Protocol):
    """What the node needs of a connection, whatever its protocol."""

    def transmit(self, txn: Transaction) -> None: ...

    async def close(self) -> None: ...


LinkT = TypeVar("LinkT", bound=Link)


class TransactionNode(Node, Generic[LinkT]):
    """A node whose requests are transactions over a connection of type
    `LinkT` that may break and be made again."""

    #: The largest READ or WRITE the peer takes now (set by each protocol).
    max_request: int

    #: The protocol module's logger: its lines keep their logger name.
    _log: logging.Logger

    # Words of the log lines, per protocol, so that each reads as it always has.
    #: What is in flight: "transactions", "requests".
    _in_flight_name: str
    #: The peer's limit in "... is larger than %s of %d bytes".
    _maximum_name: str
    #: A reply no transaction waits for (label, handle).
    _dropped_reply_log: str
    #: A replayed write the peer failed (label, transaction, strerror).
    _replay_failed_log: str
    #: The replay is done (label, writes).
    _replayed_log: str
    #: Why the connection is dropped when the replay ran out of time (budget).
    _replay_timeout: str

    def __init__(
        self,
        address: str,
        *,
        timeouts: Timeouts,
        max_in_flight: int,
        storage: str,
        unflushed: Unflushed | None,
    ) -> None:
        """`storage` names the storage this node belongs to in log lines. An
        `unflushed.limit` of 0 keeps nothing, whatever the policy."""
        super().__init__(address)
        self._label = f"storage {storage}, node {self}" if storage else f"node {self}"
        self._timeouts = timeouts
        self._table = TransactionTable(max_in_flight)
        self._replay_table = TransactionTable(max_in_flight, first_handle=REPLAY_HANDLE_BASE)
        unflushed = unflushed or Unflushed()
        self._unflushed = UnflushedWrites(unflushed.limit, self.counters)
        self._flush_at_limit = unflushed.limit > 0 and unflushed.policy == "flush"
        #: whether acknowledged writes are kept for replay (read per reply)
        self._keeps_writes = True
        self._replay_owed = False  # the peer has not had the kept writes yet
        self._loss: Loss | None = None  # lost on the peer; the next flush reports it
        self._write_order = WriteOrder()
        self._conn: LinkT | None = None
        self._connected_once = False  # `_adopt` has run
        self._cancel = trio.CancelScope()

    @property
    def _budget(self) -> float:
        """How long a request may go without success before it fails."""
        return self._timeouts.resend * (self._timeouts.max_resends + 1)

    # -- what each protocol supplies --------------------------------------
    @abc.abstractmethod
    async def _connect(self) -> LinkT:
        """One connection, negotiated within `timeouts.connect`; raises
        NodeRefused or NodeUnavailable."""

    @abc.abstractmethod
    def _adopt(self, conn: LinkT) -> None:
        """Take the peer's parameters from its first connection."""

    @abc.abstractmethod
    def _refusal(self, conn: LinkT) -> str | None:
        """Why a reconnection may not be used (the peer changed its size),
        or None."""

    @abc.abstractmethod
    def _renegotiate(self, conn: LinkT) -> None:
        """Take the limits of a reconnection, and judge whether the peer
        still holds the kept writes (else `_replay_owed`)."""

    @abc.abstractmethod
    async def _serve(self, conn: LinkT) -> str:
        """Run `conn` (replay first if owed, then `_go_online`) until it
        ends, and return why."""

    @abc.abstractmethod
    def _timers(self) -> list[Callable[[], Awaitable[None]]]:
        """The background tasks that live as long as the keeper."""

    @abc.abstractmethod
    def _replay_parts(self, entry: KeptWrite) -> list[ReplayPart]:
        """`entry` as the requests the peer takes now."""

    @abc.abstractmethod
    async def _run(
        self, command: Command, offset: int, length: int, flags: Flag, data: bytes | memoryview
    ) -> Reply:
        """One request (in parts if the peer's maximum shrank under it) to
        its successful reply; the caller holds its write-order ticket."""

    @abc.abstractmethod
    async def _transact(self, command: Command, offset: int, length: int) -> Reply:
        """One request as the Node interface issues it (here a READ; the
        protocols' take flags and data too), to its successful reply or the
        error."""

    def _reconnect_at_once(self) -> bool:
        """True when the connection just ended on purpose and the next one
        is to be made without backoff or complaint."""
        return False

    def _on_reconnect_failure(self, exc: NodeError) -> None:
        """Judge a failed reconnect; raise to end the keeper for good."""

    def _replay_waits(
        self, window: deque[tuple[Transaction, KeptWrite]], offset: int, length: int
    ) -> bool:
        """True when the replayed write at [offset, +length) must wait for
        those in `window` to be acknowledged first."""
        return False

    # -- lifecycle ------------------------------------------------------
    async def start(self, nursery: trio.Nursery, *, may_start_offline: bool = False) -> None:
        """Connect and negotiate within `timeouts.connect`, then keep the
        connection up in the background. Raises NodeRefused (the user must
        fix something) or NodeUnavailable (unreachable) when the first
        attempt fails, except that with `may_start_offline` (a mirror leg,
        which its storage can do without for a while) an unreachable node
        starts OFFLINE with size 0 and keeps trying."""
        try:
            conn: LinkT | None = await self._connect()
        except NodeUnavailable as exc:
            if not may_start_offline:
                raise
            self._log.warning("%s: starting offline (%s); will keep trying", self._label, exc)
            self.offline_reason = str(exc).removeprefix(f"{self.description}: ")
            conn = None
        if conn is not None:
            self._adopt(conn)
            self._connected_once = True
        await nursery.start(self._keep_connected, conn)

    async def _keep_connected(
        self, conn: LinkT | None, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep connected with the timers running, until aclose,
        cancellation, or the node's end (`_stay_connected` returns)."""
        with self._cancel:
            task_status.started()
            async with trio.open_nursery() as nursery:
                for timer in self._timers():
                    nursery.start_soon(timer)
                await self._stay_connected(conn)
                nursery.cancel_scope.cancel()

    async def _stay_connected(self, conn: LinkT | None) -> None:
        """Serve the connection; when it ends, reconnect with backoff and
        serve the next, forever. With none (started offline), connect first."""
        if conn is None:
            conn = await self._reconnect()
        pause = BACKOFF_START
        while True:
            opened = trio.current_time()
            reason = await self._serve(conn)
            self._conn = None
            self._set_state(NodeState.OFFLINE)
            if self._reconnect_at_once():
                conn = await self._reconnect()
                continue
            self._log.warning(
                "%s: connection lost (%s); %d %s in flight, reconnecting",
                self._label,
                reason,
                len(self._table),
                self._in_flight_name,
            )
            # A peer that drops every connection at once must not make this
            # a busy loop: back off while connections are short.
            if trio.current_time() - opened < BACKOFF_MAX:
                await trio.sleep(pause)
                pause = next_delay(pause)
            else:
                pause = BACKOFF_START
            conn = await self._reconnect()
            self.counters.reconnects += 1

    async def _reconnect(self) -> LinkT:
        """Connect until a connection to the same-sized peer is made (with
        backoff; complaints at the first attempt and every 20th)."""
        delay = BACKOFF_START
        attempt = 0
        while True:
            attempt += 1
            level = logging.WARNING if attempt == 1 or attempt % 20 == 0 else logging.DEBUG
            try:
                conn = await self._connect()
            except NodeError as exc:
                self._on_reconnect_failure(exc)
                self._log.log(
                    level, "%s: reconnect attempt %d failed: %s", self._label, attempt, exc
                )
            else:
                if not self._connected_once:  # started offline: first contact
                    self._adopt(conn)
                    self._connected_once = True
                    return conn
                refusal = self._refusal(conn)
                if refusal is None:
                    self._renegotiate(conn)
                    self._log.info("%s: reconnected after %d attempts", self._label, attempt)
                    return conn
                self._log.log(
                    logging.ERROR if level == logging.WARNING else level,
                    "%s: %s (attempt %d)",
                    self._label,
                    refusal,
                    attempt,
                )
                await conn.close()
            await trio.sleep(delay)
            delay = next_delay(delay)

    def _go_online(self, conn: LinkT) -> None:
        """Send on `conn` from now on, starting with everything in flight."""
        self._conn = conn
        resent = 0
        for txn in self._table:  # in submission order; new requests queue behind
            if not txn.done:
                if txn.sends:
                    resent += 1
                    self.counters.resends += 1
                self._send(conn, txn)
        if resent:
            self._log.info(
                "%s: resent %d %s after reconnect", self._label, resent, self._in_flight_name
            )
        self._set_state(NodeState.ONLINE)

    def _send(self, conn: LinkT, txn: Transaction) -> None:
        """Transmit `txn`, unless it is larger than what the peer takes now
        (it came back with a smaller maximum): then finish it for its caller
        to split (`Transaction.resplit`)."""
        if txn.command in SPLITTABLE and txn.length > self.max_request:
            txn.resplit = True
            txn.finish(None)
            return
        conn.transmit(txn)

    # -- replay of the kept writes --------------------------------------
    async def _replay(self, conn: LinkT) -> str | None:
        """Resend every kept write in order on `conn` (a window of
        max_in_flight at a time) and wait until all are acknowledged; None
        when done, else why it gave up (the connection is then dropped and
        the replay starts over on the next one). Kept writes stay kept: they
        are no more durable on the peer now than they were before."""
        budget = self._budget
        window: deque[tuple[Transaction, KeptWrite]] = deque()
        writes = 0
        with trio.move_on_after(budget) as scope:
            try:
                for entry in self._unflushed:
                    writes += 1
                    for command, offset, length, flags, data in self._replay_parts(entry):
                        while window and (
                            len(window) == self._replay_table.capacity
                            or self._replay_waits(window, offset, length)
                        ):
                            await self._settle_replayed(*window.popleft())
                        txn = await self._replay_table.begin(
                            command, offset, length, flags=flags, data=data
                        )
                        window.append((txn, entry))
                        conn.transmit(txn)
                while window:
                    await self._settle_replayed(*window.popleft())
            finally:
                for txn, _ in window:
                    self._replay_table.end(txn)
        if scope.cancelled_caught:
            return self._replay_timeout % budget
        self._replay_owed = False
        self._log.info(self._replayed_log, self._label, writes)
        return None

    async def _settle_replayed(self, txn: Transaction, entry: KeptWrite) -> None:
        """Wait for a replayed write's reply; one the peer fails is lost."""
        try:
            await txn.wait_done()
        finally:
            self._replay_table.end(txn)
        assert txn.reply is not None  # replays are never given up on
        if txn.reply.status:
            self._add_loss(Loss(txn.length, 1, ((txn.offset, txn.length),)))
            self.counters.errors += 1
            self._log.error(
                self._replay_failed_log, self._label, txn, os.strerror(txn.reply.status)
            )

    # -- kept writes and their loss ---------------------------------------
    def _add_loss(self, loss: Loss) -> None:
        """Remember `loss` for the next flush to report."""
        self._loss = loss if self._loss is None else self._loss + loss

    def _owe_kept_writes(self, lost_log: str, owed_log: str, *context: object) -> None:
        """The peer may have lost what it acknowledged: the writes no longer
        kept are lost (logged with `lost_log`: label, `context`, writes,
        bytes; the next flush reports them), the kept ones are owed to it
        before anything else (`owed_log`, the same arguments)."""
        loss = self._unflushed.lose_unprotected()
        if loss is not None:
            self._add_loss(loss)
            self._log.error(lost_log, self._label, *context, loss.writes, loss.bytes)
        if len(self._unflushed):
            self._replay_owed = True
            self._log.warning(
                owed_log, self._label, *context, len(self._unflushed), self._unflushed.size
            )

    def _report_loss(self, how: str) -> None:
        """Raise NodeWritesLost (EIO) once for what was lost since the last
        report; `how` says how it was lost."""
        loss, self._loss = self._loss, None
        if loss is not None:
            raise NodeWritesLost(
                str(self),
                f"{loss.writes} acknowledged writes ({loss.bytes} bytes) {how}",
                regions=loss.regions,
                lost_bytes=loss.bytes,
            )

    def _stop_protecting(self, exc: NodeError) -> None:
        """A FLUSH to stay within the limit failed: the oldest kept writes
        beyond the limit are no longer kept (the next user flush fails)."""
        self._log.warning(
            "%s: FLUSH to stay within unflushed_limit failed (%s); the oldest "
            "unflushed writes are no longer kept for replay",
            self._label,
            exc,
        )
        self._unflushed.make_room()

    # -- transactions ---------------------------------------------------
    def _on_reply(self, reply: Reply) -> None:
        txn = self._table.complete(reply)
        if txn is None:
            if self._replay_table.complete(reply) is None:
                self._log.debug(self._dropped_reply_log, self._label, reply.handle)
            return
        if not reply.status and txn.command in WRITE_COMMANDS and self._keeps_writes:
            # Kept from the moment the peer acknowledged it: a reconnect can
            # never come between this acknowledgement and the record.
            self._unflushed.record(txn.command, txn.offset, txn.length, txn.flags, txn.data)
            if not self._flush_at_limit:
                self._unflushed.make_room()

    async def _run_split(
        self, command: Command, offset: int, length: int, flags: Flag, data: bytes | memoryview
    ) -> Reply:
        """Run a request the peer no longer takes whole as parts of its
        current maximum; a READ's parts are joined in order."""
        self._log.info(
            "%s: %s [%d, +%d) is larger than %s of %d bytes; splitting it",
            self._label,
            command.name,
            offset,
            length,
            self._maximum_name,
            self.max_request,
        )
        view = memoryview(data) if command is Command.WRITE else None
        replies = await gather_or_raise(
            [
                lambda o=o, n=n: self._run(
                    command, o, n, flags, view[o - offset : o - offset + n] if view else b""
                )
                for o, n in self._chunks(offset, length)
            ]
        )
        joined = b"".join(bytes(reply.data) for reply in replies)
        return Reply(command, 0, 0, offset, length, joined)

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[offset, +length) in parts of at most the peer's maximum request."""
        step = self.max_request
        return [
            (at, min(step, offset + length - at)) for at in range(offset, offset + length, step)
        ]

    async def _read_chunk(self, offset: int, length: int) -> ReadData:
        """One READ of at most the maximum request; exactly `length` bytes."""
        return self._read_data(await self._transact(Command.READ, offset, length), offset, length)

    def _read_data(self, reply: Reply, offset: int, length: int) -> ReadData:
        """A READ's payload as the connection gave it, not copied (`ReadData`:
        bytes, or a read-only view of the one frame's own receive buffer);
        NodeError unless it holds exactly `length` bytes."""
        data = reply.data
        if len(data) != length:
            self.counters.errors += 1
            raise NodeError(str(self), f"READ [{offset}, +{length}) returned {len(data)} bytes")
        if type(data) is bytearray:  # not from the connection: keep it from changing
            return bytes(data)
        return data

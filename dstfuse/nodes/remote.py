"""A node served by a remote `dstfuse export`, reached through transactions.

`RemoteNode` turns each request into one or more transactions (split at the
node's maximum request size), keeps them until the node acknowledges them,
and survives the network: a transaction not acknowledged within `resend`
seconds is sent again; after a broken connection the node reconnects with
backoff, renegotiates every limit (a transaction larger than a smaller new
maximum is split) and resends every transaction still in flight in its
original order. Only when a transaction has gone unanswered for its whole
budget, `resend * (max_resends + 1)` seconds, does the caller get an error.

Writes the node acknowledged but has not flushed are kept (`UnflushedWrites`,
up to `unflushed.limit`). When a reconnect finds a new node instance (another
boot id or backing, see dstfuse/protocol/instance.py), they are resent in
their original order, and acknowledged, before anything else is sent; what
was not kept is a `Loss`, which the next `flush` reports once as
`NodeWritesLost` (EIO), as Linux reports a writeback error to the next fsync.

Each node has one resend timer, a task that sleeps until the earliest
deadline among its transactions and resends (or gives up on) the overdue
ones; a request arms nothing of its own.

Invariants:
- a write, trim or write-zeroes waits for every earlier overlapping one
  still in flight (`WriteOrder`), so a resend can never overwrite newer data;
- at most `max_in_flight` transactions are outstanding; more requests wait;
- a reply completes a transaction only if it passed the frame check; replies
  for unknown handles are read whole and dropped;
- while disconnected, the node is OFFLINE and requests wait instead of failing;
- on a new instance, nothing but the replay goes out until every replayed
  write is acknowledged; a replay cut short is done again in full on the
  next connection;
- a FLUSH never returns success over writes a reboot destroyed.
- fenced: a reconnect refused because another client identity now holds the
  export's write grant (EBUSY) ends the node: everything in flight and every
  later request fails with EIO at once, and it stops reconnecting;
- a probing node (`probe`) writes nothing: its connections are read-only on
  the node until `take_write_grant`, after which no connection is probing.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Awaitable, Callable

import trio

from ..address import Address
from ..config import Timeouts, Unflushed
from ..errors import NodeError, NodeFenced, NodeRefused, NodeSlow, NodeUnavailable
from ..fanout import gather_or_raise
from ..protocol import (
    CLIENT_ID_SIZE,
    WRITE_COMMANDS,
    Command,
    Continuity,
    Feature,
    Flag,
    HelloFlag,
    NodeInstance,
    Permission,
    Reply,
    continuity,
    offered_modes,
)
from ..ranges import RangeTicket
from .base import NodeState, ReadData, StartedWrite
from .session import Connector, Session, open_stream
from .transaction_node import ReplayPart, TransactionNode
from .transactions import Transaction
from .unflushed import KeptWrite

log = logging.getLogger(__name__)

_FEATURE_OF = {
    Command.TRIM: Feature.TRIM,
    Command.WRITE_ZEROES: Feature.WRITE_ZEROES,
    Command.CHECKSUM: Feature.CHECKSUM,
    Command.FLUSH: Feature.FLUSH,
}


class RemoteNode(TransactionNode[Session]):
    kind = "R"
    _log = log
    _in_flight_name = "transactions"
    _maximum_name = "the node's maximum request"
    _dropped_reply_log = "%s: dropped reply for unknown or finished handle %d"
    _replay_failed_log = (
        "%s: resent unflushed %s failed on the new instance (%s); the next flush fails with EIO"
    )
    _replayed_log = "%s: resent %d unflushed writes to the new instance"
    _replay_timeout = "replayed writes not acknowledged within %gs"

    def __init__(
        self,
        address: Address,
        *,
        export: str | None,
        timeouts: Timeouts,
        key: bytes | None,
        cipher: str = "aes-256-gcm",
        max_in_flight: int = 64,
        client_name: str = "dstfuse",
        storage: str = "",
        unflushed: Unflushed | None = None,
        connector: Connector = open_stream,
        read_only: bool = False,
        take_over: bool = False,
        probe: bool = False,
    ) -> None:
        """`connector` opens the transport (tests pass in-memory streams);
        `storage` names the storage this node belongs to in log lines. An
        `unflushed.limit` of 0 keeps nothing, whatever the policy.

        What the node is asked for (dstfuse/export/grant.py): `read_only`,
        only READ (never needs the export's write grant); `take_over`, the
        write grant even if another client identity holds it (its
        connections are ended; first connection only, reconnects never take
        over, so two takers cannot pass the grant back and forth); `probe`,
        the grant a mount would get, reported but not taken (`dstfuse
        check`, and a mirror leg until its storage has decided to write:
        `take_write_grant`)."""
        super().__init__(
            str(address) + (f" {export}" if export else ""),
            timeouts=timeouts,
            max_in_flight=max_in_flight,
            storage=storage,
            unflushed=unflushed,
        )
        self._target = address
        self._export = export
        self._key = key
        self._modes = offered_modes(key is not None, cipher)
        # Names this node's connection to the export: the export treats a new
        # connection with the same id as a reconnect and retires the old one
        # first. So it is new for every RemoteNode (two storages may use one
        # export) and kept across this node's reconnects.
        self._client_id = os.urandom(CLIENT_ID_SIZE)
        self._client_name = client_name
        self._connector = connector
        self._flush_wanted = trio.Event()  # set: the limit flusher should flush
        self._limit_flushed = trio.Event()  # set (and replaced) when it has
        self._instance: NodeInstance | None = None
        self._sessions_opened = 0
        self.max_request = 1 << 20
        self.features = Feature.NONE
        self._read_only = read_only
        self._take_over = take_over  # the next connection takes the grant over
        self._probing = probe
        #: set once a connection that is not probing is online, or fenced
        self._grant_settled = trio.Event()
        self._serving: trio.CancelScope | None = None  # while a session is served
        #: the resend timer's sleep and when it ends (`_wake_resend_timer`)
        self._resend_sleep: trio.CancelScope | None = None
        self._resend_wake = -math.inf
        self._opened_probing = False  # the last connection was opened probing

    # -- lifecycle ------------------------------------------------------
    def _adopt(self, session: Session) -> None:
        """Take the export's parameters from a node seen for the first time."""
        ready = session.ready
        self.size = ready.size
        self.max_request = ready.max_request
        self.features = ready.features
        self.writable = bool(ready.permissions & Permission.WRITE)
        self._instance = ready.instance
        log.info(
            "%s: connected, export %r, %d bytes, %s, cipher %s, %s",
            self._label,
            ready.export,
            self.size,
            "rw" if self.writable else "ro",
            session.mode,
            ready.instance or "instance unknown (a reboot cannot be detected)",
        )

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Use `timeouts` from now on: `resend` and `max_resends` for every
        transaction the resend timer looks at next (the timer may sleep out
        one old `resend` interval first), `connect` for the next connection
        attempt. `keepalive` is fixed per connection (reload refuses it)."""
        old, self._timeouts = self._timeouts, timeouts
        log.info(
            "%s: timeouts now resend %gs, max_resends %d, connect %gs (were %gs, %d, %gs)",
            self._label,
            timeouts.resend,
            timeouts.max_resends,
            timeouts.connect,
            old.resend,
            old.max_resends,
            old.connect,
        )

    async def aclose(self) -> None:
        """Stop reconnecting and drop the connection; callers flush first."""
        self._set_state(NodeState.OFFLINE)
        self._cancel.cancel()

    def _hello_flags(self) -> HelloFlag:
        return (
            (HelloFlag.READ_ONLY if self._read_only else HelloFlag.NONE)
            | (HelloFlag.TAKE_OVER if self._take_over else HelloFlag.NONE)
            | (HelloFlag.PROBE if self._probing else HelloFlag.NONE)
        )

    async def _connect(self) -> Session:
        number = self._sessions_opened + 1
        with trio.move_on_after(self._timeouts.connect) as scope:
            while True:
                flags = self._hello_flags()
                session = await Session.establish(
                    str(self),
                    self._target,
                    export=self._export,
                    key=self._key,
                    modes=self._modes,
                    client_id=self._client_id,
                    client_name=self._client_name,
                    number=number,
                    connector=self._connector,
                    hello_flags=flags,
                )
                if not flags & HelloFlag.PROBE or self._probing:
                    break
                # take_write_grant was called while this probe connected
                await session.close()
        if scope.cancelled_caught:
            raise NodeUnavailable(
                str(self), f"no answer within {self._timeouts.connect:g}s (connect timeout)"
            )
        self._sessions_opened = number
        self._opened_probing = bool(flags & HelloFlag.PROBE)
        if flags & HelloFlag.TAKE_OVER:
            self._take_over = False  # reconnects never take over
        return session

    async def take_write_grant(self) -> None:
        """Stop probing: take the export's write grant over from whoever
        holds it (the node ends the holder's connections, waits for the
        requests they started, and refuses their reconnects). A served
        probe session is ended and this returns once the claiming one is
        online (or after `timeouts.connect`); with none (unreachable, or
        connecting) at once, and the next connection takes the grant.
        Raises NodeFenced if the grant went to another client meanwhile.
        Nothing for a node that is not probing."""
        if not self._probing:
            return
        self._probing = False
        self._take_over = True
        serving = self._serving
        if serving is not None:
            log.info("%s: taking the export's write grant over", self._label)
            serving.cancel()  # the keeper reconnects at once, claiming
            with trio.move_on_after(self._timeouts.connect):
                await self._grant_settled.wait()
        if self.fenced is not None:
            raise NodeFenced(str(self), self.fenced)

    def _timers(self) -> list[Callable[[], Awaitable[None]]]:
        return [self._resend_overdue, *([self._flush_for_limit] if self._flush_at_limit else [])]

    def _reconnect_at_once(self) -> bool:
        return self._opened_probing and not self._probing  # ended by take_write_grant: claim

    async def _stay_connected(self, session: Session | None) -> None:
        """Reconnect forever; a node fenced (see `_fence`) ends here."""
        try:
            await super()._stay_connected(session)
        except NodeFenced as exc:
            self._fence(exc)

    async def _serve(self, session: Session) -> str:
        """Run `session` until it ends and return why. On a new instance the
        kept writes are replayed first; only then does the node go online."""
        outcome = "cancelled"
        if self._opened_probing and not self._probing:
            # take_write_grant came between this probe's connect and now:
            # no connection is served probing after it (the keeper claims)
            await session.close()
            return outcome
        try:
            async with trio.open_nursery() as nursery:
                self._serving = nursery.cancel_scope

                async def run() -> None:
                    nonlocal outcome
                    outcome = await session.run(
                        self._on_reply, keepalive=self._timeouts.keepalive
                    )
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run)
                if self._replay_owed:
                    failure = await self._replay(session)
                    if failure is not None:
                        outcome = failure
                        nursery.cancel_scope.cancel()
                        return outcome
                self._go_online(session)
        finally:
            self._serving = None
        return outcome

    def _go_online(self, session: Session) -> None:
        if not self._opened_probing:
            self._grant_settled.set()
        super()._go_online(session)

    def _on_reconnect_failure(self, exc: NodeError) -> None:
        """Refused EBUSY: another client identity holds the write grant now."""
        if isinstance(exc, NodeRefused) and exc.errno == errno.EBUSY:
            raise NodeFenced(str(self), str(exc).removeprefix(f"{self}: ")) from None

    def _refusal(self, session: Session) -> str | None:
        if session.ready.size == self.size:
            return None
        return (
            f"node now reports {session.ready.size} bytes instead of {self.size}; refusing "
            f"to use it until it serves {self.size} bytes again"
        )

    def _renegotiate(self, session: Session) -> None:
        """Take every limit from the node's new READY (it may have been
        restarted with other settings), and judge its instance."""
        ready = session.ready
        if ready.max_request != self.max_request:
            log.info(
                "%s: node now takes requests of up to %d bytes (was %d)",
                self._label,
                ready.max_request,
                self.max_request,
            )
            self.max_request = ready.max_request
        if ready.features != self.features:
            log.info(
                "%s: node now offers %s (was %s)", self._label, ready.features, self.features
            )
            self.features = ready.features
        writable = bool(ready.permissions & Permission.WRITE)
        if writable != self.writable:
            log.warning(
                "%s: node now grants %s access", self._label, "rw" if writable else "read-only"
            )
            self.writable = writable
        self._judge_instance(ready.instance)

    def _judge_instance(self, instance: NodeInstance | None) -> None:
        """After a reconnect: does the node still hold what it acknowledged?"""
        verdict = continuity(self._instance, instance)
        previous, self._instance = self._instance, instance or self._instance
        if verdict is Continuity.RESTARTED:
            log.info(
                "%s: node process restarted on the same boot and backing (%s); its page cache "
                "kept the unflushed writes, nothing to resend",
                self._label,
                instance,
            )
        elif verdict is Continuity.UNKNOWN:
            log.warning(
                "%s: node does not report its instance; a reboot would go unnoticed", self._label
            )
        elif verdict is Continuity.NEW:
            self._owe_kept_writes(
                "%s: node came back as a new instance (%s, was %s): %d acknowledged, "
                "unflushed writes (%d bytes) were lost and cannot be resent; "
                "the next flush fails with EIO",
                "%s: node came back as a new instance (%s, was %s): resending %d "
                "unflushed writes (%d bytes) before anything else",
                instance,
                previous,
            )

    # -- replay after a node reboot ---------------------------------------
    def _replay_parts(self, entry: KeptWrite) -> list[ReplayPart]:
        """`entry` as requests the node takes now (WRITEs split at its
        current maximum)."""
        if entry.command is not Command.WRITE:
            return [(entry.command, entry.offset, entry.length, entry.flags, b"")]
        view = memoryview(entry.data)
        return [
            (entry.command, at, n, entry.flags, view[at - entry.offset : at - entry.offset + n])
            for at, n in self._chunks(entry.offset, entry.length)
        ]

    def _fence(self, exc: NodeFenced) -> None:
        """Another client writes to the export now: fail everything in
        flight with EIO at once and stop (no resending loop)."""
        pending = [txn for txn in self._table if not txn.done]
        self.fenced = str(exc).removeprefix(f"{self}: ")
        self._grant_settled.set()
        self._set_state(NodeState.OFFLINE)
        log.error(
            "%s: fenced, another client holds the export's write grant (%s); "
            "failing %d requests in flight with EIO, not reconnecting",
            self._label,
            self.fenced,
            len(pending),
        )
        for txn in pending:
            self._table.give_up(txn)

    # -- transactions ---------------------------------------------------
    async def _transact(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: Flag = Flag.NONE,
        data: bytes | memoryview = b"",
        give_up_at: float = math.inf,
    ) -> Reply:
        """Run one request to its end: the node's reply (status 0), or
        NodeError with the node's errno, or NodeUnavailable after the budget,
        or NodeSlow at `give_up_at` (reads only). A write past the unflushed
        limit (policy flush) then waits until a FLUSH has brought the kept
        data back under it."""
        if self.fenced is not None:
            raise NodeFenced(str(self), f"fenced: {self.fenced}")
        if command not in WRITE_COMMANDS:
            return await self._run(command, offset, length, flags, data, give_up_at)
        ticket = self._write_order.register(offset, length)
        try:
            if ticket.earlier is not None:
                await self._write_order.wait_turn(ticket)
            reply = await self._run(command, offset, length, flags, data, give_up_at)
        finally:
            self._write_order.release(ticket)
        await self._after_write()
        return reply

    async def _after_write(self) -> None:
        """A write succeeded: past half the unflushed limit (policy flush),
        ask for a FLUSH; past the limit, wait until one has brought the kept
        data back under it (`_keep_within_limit`)."""
        kept = self._unflushed
        if self._flush_at_limit and kept.size > kept.limit // 2:
            await self._keep_within_limit()

    def _after_write_waits(self) -> bool:
        """`_after_write` would wait now."""
        return self._flush_at_limit and self._unflushed.size > self._unflushed.limit

    async def _run(
        self,
        command: Command,
        offset: int,
        length: int,
        flags: Flag,
        data: bytes | memoryview,
        give_up_at: float = math.inf,
    ) -> Reply:
        """One transaction (or, when the node's maximum shrank under it, its
        parts); the caller holds the write-order ticket for the whole range.
        This is every request's path: it takes a free slot and sends without
        a checkpoint, and awaits nothing but the reply."""
        table = self._table
        txn = table.try_begin(command, offset, length, flags, data)
        if txn is None:
            txn = await table.begin(command, offset, length, flags=flags, data=data)
        try:
            self._launch(txn, give_up_at)
            await txn.wait_done()
        finally:
            self._end(txn)
        return await self._answer(txn)

    def _launch(self, txn: Transaction, give_up_at: float) -> None:
        """Arm a new transaction's deadlines and send it (when connected:
        else the next connection sends it)."""
        if give_up_at < self._resend_wake:
            self._wake_resend_timer(give_up_at)
        txn.give_up_at = give_up_at
        counters = self.counters
        counters.requests += 1
        counters.in_flight = len(self._table)
        txn.deadline = trio.current_time() + self._timeouts.resend
        if self._conn is not None:
            self._send(self._conn, txn)

    def _end(self, txn: Transaction) -> None:
        self._table.end(txn)
        self.counters.in_flight = len(self._table)

    async def _answer(self, txn: Transaction) -> Reply:
        """An ended transaction's successful reply, else `_unanswered`."""
        reply = txn.reply
        if reply is None or reply.status:
            return await self._unanswered(txn)
        return reply

    async def _unanswered(self, txn: Transaction) -> Reply:
        """A transaction that ended without success: its parts' replies
        when it must be split (`resplit`), else the error."""
        if txn.resplit:
            return await self._run_split(txn.command, txn.offset, txn.length, txn.flags, txn.data)
        if txn.reply is not None:
            self.counters.errors += 1
            raise NodeError(
                str(self),
                f"{txn} failed on the node: {os.strerror(txn.reply.status)}",
                errno=txn.reply.status,
            )
        if txn.impatient:
            raise NodeSlow(str(self), f"{txn}: no answer within the caller's patience")
        if self.fenced is not None:
            raise NodeFenced(str(self), f"{txn}: fenced: {self.fenced}")
        # the resend timer gave up on it
        budget = self._timeouts.resend * (self._timeouts.max_resends + 1)
        raise NodeUnavailable(str(self), f"{txn}: no acknowledgement within {budget:g}s")

    async def _resend_overdue(self) -> None:
        """The node's resend timer. A transaction unanswered `resend`
        seconds after it was sent (or last resent) is sent again, on the
        current session if there is one; after `max_resends` resends and one
        more wait, it fails. One whose caller's patience ran out
        (`give_up_at`, a read) is ended instead (NodeSlow), so a read costs
        no timer of its own. Transactions only ever get resend deadlines at
        least `resend` after the moment they are armed, and an earlier
        `give_up_at` moves the timer's wake-up (`_wake_resend_timer`), so
        sleeping until the earliest deadline seen here (or `resend` from
        now) misses none."""
        while True:
            # Read every round: a reload may have changed them.
            resend, max_resends = self._timeouts.resend, self._timeouts.max_resends
            now = trio.current_time()
            wake = now + resend
            for txn in self._table:
                if txn.done:
                    continue
                if txn.give_up_at <= now:
                    txn.impatient = True
                    self._table.give_up(txn)
                    continue
                if txn.deadline <= now:
                    txn.expired += 1
                    if txn.expired > max_resends:
                        self._give_up(txn, resend * (max_resends + 1))
                        continue
                    txn.deadline = now + resend
                    if self._conn is not None:
                        log.info(
                            "%s: %s not acknowledged within %gs; resending",
                            self._label,
                            txn,
                            resend,
                        )
                        self.counters.resends += 1
                        self._send(self._conn, txn)
                wake = min(wake, txn.deadline, txn.give_up_at)
            self._resend_wake = wake
            with trio.CancelScope(deadline=wake) as self._resend_sleep:
                await trio.sleep_forever()

    def _wake_resend_timer(self, at: float) -> None:
        """Have the resend timer look at the transactions at `at` (earlier
        than it planned to)."""
        self._resend_wake = at
        if self._resend_sleep is not None:
            self._resend_sleep.deadline = at

    def _give_up(self, txn: Transaction, budget: float) -> None:
        self.counters.errors += 1
        log.error(
            "%s: %s failed: no acknowledgement within %gs (%d resends)",
            self._label,
            txn,
            budget,
            txn.expired - 1,
        )
        self._table.give_up(txn)

    def _require(self, command: Command) -> None:
        feature = _FEATURE_OF.get(command)
        if feature is not None and not self.features & feature:
            raise NodeError(
                str(self), f"node does not support {command.name}", errno=errno.EOPNOTSUPP
            )

    # -- Node interface -------------------------------------------------
    async def read(self, offset: int, length: int) -> ReadData:
        self.check_range(offset, length)
        if length <= self.max_request:
            data = await self._read_chunk(offset, length)
        else:
            parts = await gather_or_raise(
                [lambda o=o, n=n: self._read_chunk(o, n) for o, n in self._chunks(offset, length)]
            )
            data = b"".join(parts)
        self.counters.bytes_read += length
        return data

    async def read_within(self, offset: int, length: int, patience: float) -> ReadData:
        """`read`, ended by the resend timer with NodeSlow once `patience`
        seconds have passed without the reply (no cancel scope per read)."""
        self.check_range(offset, length)
        if length > self.max_request:
            return await super().read_within(offset, length, patience)
        give_up_at = trio.current_time() + patience
        reply = await self._transact(Command.READ, offset, length, give_up_at=give_up_at)
        data = self._read_data(reply, offset, length)
        self.counters.bytes_read += length
        return data

    def begin_write(
        self, offset: int, data: bytes | memoryview, *, fua: bool = False
    ) -> StartedWrite | None:
        """`write`'s first half without a wait: one transaction, sent now.
        None when `write` must do it: the write would fail its checks, is
        larger than one transaction, overlaps a write still in flight, or
        finds no free slot."""
        length = len(data)
        order = self._write_order
        if (
            self.fenced is not None
            or not self.writable
            or offset < 0
            or offset + length > self.size
            or length > self.max_request
            or order.overlaps(offset, length)
        ):
            return None
        flags = Flag.FUA if fua else Flag.NONE
        txn = self._table.try_begin(Command.WRITE, offset, length, flags, data)
        if txn is None:
            return None
        ticket = order.register(offset, length)
        try:
            self._launch(txn, math.inf)
        except BaseException:
            self._end(txn)
            order.release(ticket)
            raise
        return _StartedRemoteWrite(self, txn, ticket)

    async def _settle(self, started: _StartedRemoteWrite) -> None:
        """`write`'s second half (`_transact` and `_run` after the send)."""
        txn = started.txn
        try:
            try:
                if not txn.done:
                    await txn.wait_done()
            finally:
                self._end(txn)
            await self._answer(txn)
        finally:
            self._write_order.release(started.ticket)
        await self._after_write()
        self.counters.bytes_written += txn.length

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        flags = Flag.FUA if fua else Flag.NONE
        if len(data) <= self.max_request:
            await self._transact(Command.WRITE, offset, len(data), flags=flags, data=data)
            self.counters.bytes_written += len(data)
            return
        view = memoryview(data)
        await gather_or_raise(
            [
                lambda o=o, n=n: self._transact(
                    Command.WRITE, o, n, flags=flags, data=view[o - offset : o - offset + n]
                )
                for o, n in self._chunks(offset, len(view))
            ]
        )
        self.counters.bytes_written += len(view)

    async def flush(self) -> None:
        """FLUSH, then release the kept writes it covers. Raises
        NodeWritesLost (EIO) once after a reboot destroyed acknowledged
        writes: the flush itself still ran, later ones succeed again."""
        self._require(Command.FLUSH)
        await self._flush_kept()
        self._report_loss("were lost when the node's host rebooted before they were flushed")

    async def _flush_kept(self) -> None:
        """One FLUSH; on success drop the kept writes acknowledged before it
        was sent (only those: a later one may not be covered)."""
        mark = self._unflushed.mark()
        await self._transact(Command.FLUSH)
        self._unflushed.release(mark)

    async def _keep_within_limit(self) -> None:
        """Policy flush: past half the limit, ask the limit flusher for a
        FLUSH; past the limit, wait until one has brought the kept data
        back under it."""
        kept = self._unflushed
        if kept.size > kept.limit // 2:
            self._flush_wanted.set()
        while kept.size > kept.limit:
            await self._limit_flushed.wait()
            if kept.size > kept.limit:
                self._flush_wanted.set()

    async def _flush_for_limit(self) -> None:
        """The limit flusher: one FLUSH at a time when writers ask. A FLUSH
        that fails cannot release anything: then the oldest kept writes
        beyond the limit stop being protected (the next user flush fails).
        An ask made while a FLUSH ran is dropped when that FLUSH brought the
        kept data back under half the limit: it saw the data it covered."""
        kept = self._unflushed
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            if kept.size <= kept.limit // 2:
                continue
            try:
                await self._flush_kept()
            except NodeError as exc:
                self._stop_protecting(exc)
            finished, self._limit_flushed = self._limit_flushed, trio.Event()
            finished.set()

    async def trim(self, offset: int, length: int) -> None:
        self.check_writable()
        self.check_range(offset, length)
        self._require(Command.TRIM)
        await self._ranged(Command.TRIM, offset, length, Flag.NONE)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, length)
        self._require(Command.WRITE_ZEROES)
        await self._ranged(Command.WRITE_ZEROES, offset, length, Flag.FUA if fua else Flag.NONE)

    async def _ranged(self, command: Command, offset: int, length: int, flags: Flag) -> None:
        """Commands without payload may cover more than max_request, up to
        the protocol's 32-bit length: split only at that bound."""
        step = 1 << 31
        await gather_or_raise(
            [
                lambda o=o: self._transact(command, o, min(step, offset + length - o), flags=flags)
                for o in range(offset, offset + length, step)
            ]
        )

    async def checksum(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        self._require(Command.CHECKSUM)
        reply = await self._transact(Command.CHECKSUM, offset, length)
        if len(reply.data) != 16:
            raise NodeError(str(self), f"CHECKSUM returned {len(reply.data)} bytes, expected 16")
        return bytes(reply.data)


class _StartedRemoteWrite(StartedWrite):
    """A `RemoteNode.begin_write`: its transaction and write-order ticket."""

    __slots__ = ("node", "txn", "ticket")

    def __init__(self, node: RemoteNode, txn: Transaction, ticket: RangeTicket) -> None:
        self.node = node
        self.txn = txn
        self.ticket = ticket

    @property
    def on_done(self) -> Callable[[], None] | None:  # type: ignore[override]
        return self.txn.on_done

    @on_done.setter
    def on_done(self, notify: Callable[[], None] | None) -> None:
        self.txn.on_done = notify

    @property
    def done(self) -> bool:
        return self.txn.done

    @property
    def succeeded(self) -> bool:
        reply = self.txn.reply
        return reply is not None and not reply.status

    @property
    def settles_at_once(self) -> bool:
        txn = self.txn
        if not txn.done or txn.resplit:
            return False
        return not self.succeeded or not self.node._after_write_waits()

    async def settle(self) -> None:
        await self.node._settle(self)

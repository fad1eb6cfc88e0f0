"""A node served by a remote `dstfuse export`, reached through transactions.

`RemoteNode` turns each request into one or more transactions (split at the
node's maximum request size), keeps them until the node acknowledges them,
and survives the network: a transaction not acknowledged within `resend`
seconds is sent again; after a broken connection the node reconnects with
backoff, renegotiates and resends every transaction still in flight in its
original order. Only when a transaction has gone unanswered for its whole
budget, `resend * (max_resends + 1)` seconds, does the caller get an error.

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
- fenced: a reconnect refused because another client identity now holds the
  export's write grant (EBUSY) ends the node: everything in flight and every
  later request fails with EIO at once, and it stops reconnecting.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from ..address import Address
from ..config import Timeouts
from ..errors import NodeError, NodeFenced, NodeRefused, NodeUnavailable
from ..fanout import gather_or_raise
from ..protocol import (
    CLIENT_ID_SIZE,
    WRITE_COMMANDS,
    Command,
    Feature,
    Flag,
    HelloFlag,
    Permission,
    Reply,
    offered_modes,
)
from ..ranges import WriteOrder
from .base import Node, NodeState
from .session import Connector, Session, open_stream
from .transactions import Transaction, TransactionTable

log = logging.getLogger(__name__)

#: Reconnect backoff: first retry delay, growth factor and cap (seconds).
BACKOFF_START = 0.05
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 2.0

_FEATURE_OF = {
    Command.TRIM: Feature.TRIM,
    Command.WRITE_ZEROES: Feature.WRITE_ZEROES,
    Command.CHECKSUM: Feature.CHECKSUM,
    Command.FLUSH: Feature.FLUSH,
}


class RemoteNode(Node):
    kind = "R"

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
        connector: Connector = open_stream,
        read_only: bool = False,
        take_over: bool = False,
        probe: bool = False,
        coordinated: bool = False,
    ) -> None:
        """`connector` opens the transport (tests pass in-memory streams).

        What the node is asked for (dstfuse/export/grant.py): `read_only`,
        only READ (never needs the export's write grant); `take_over`, the
        write grant even if another client identity holds it (its
        connections are ended; first connection only, reconnects never take
        over, so two takers cannot pass the grant back and forth); `probe`,
        the grant a mount would get, reported but not taken (`dstfuse
        check`); `coordinated`, write without the grant because the caller
        orders its writers itself (a mirror's holder lease)."""
        super().__init__(str(address) + (f" {export}" if export else ""))
        self._target = address
        self._export = export
        self._timeouts = timeouts
        self._key = key
        self._modes = offered_modes(key is not None, cipher)
        # Names this node's connection to the export: the export treats a new
        # connection with the same id as a reconnect and retires the old one
        # first. So it is new for every RemoteNode (two storages may use one
        # export) and kept across this node's reconnects.
        self._client_id = os.urandom(CLIENT_ID_SIZE)
        self._client_name = client_name
        self._connector = connector
        self._table = TransactionTable(max_in_flight)
        self._write_order = WriteOrder()
        self._session: Session | None = None
        self._sessions_opened = 0
        self._cancel = trio.CancelScope()
        self.max_request = 1 << 20
        self.features = Feature.NONE
        self._hello_flags = (
            (HelloFlag.READ_ONLY if read_only else HelloFlag.NONE)
            | (HelloFlag.TAKE_OVER if take_over else HelloFlag.NONE)
            | (HelloFlag.PROBE if probe else HelloFlag.NONE)
            | (HelloFlag.COORDINATED if coordinated else HelloFlag.NONE)
        )
        #: why this node is fenced (see the module doc); None until it is
        self.fenced: str | None = None

    # -- lifecycle ------------------------------------------------------
    async def start(self, nursery: trio.Nursery, *, may_start_offline: bool = False) -> None:
        """Connect and negotiate within `timeouts.connect`, then keep the
        connection up in the background. Raises NodeRefused (ACL, export,
        key: the user must fix something) or NodeUnavailable (unreachable)
        when the first attempt fails — except that with `may_start_offline`
        (a mirror leg, which the storage can do without for a while) an
        unreachable node starts OFFLINE with size 0 and keeps trying."""
        try:
            session: Session | None = await self._connect()
        except NodeUnavailable as exc:
            if not may_start_offline:
                raise
            log.warning("%s: starting offline (%s); will keep trying", self, exc)
            self.offline_reason = str(exc).removeprefix(f"{self.description}: ")
            session = None
        if session is not None:
            self._adopt(session)
        await nursery.start(self._keep_connected, session)

    def _adopt(self, session: Session) -> None:
        """Take the export's parameters from a node seen for the first time."""
        ready = session.ready
        self.size = ready.size
        self.max_request = ready.max_request
        self.features = ready.features
        self.writable = bool(ready.permissions & Permission.WRITE)
        log.info(
            "%s: connected, export %r, %d bytes, %s, cipher %s",
            self,
            ready.export,
            self.size,
            "rw" if self.writable else "ro",
            session.mode,
        )

    async def aclose(self) -> None:
        """Stop reconnecting and drop the connection; callers flush first."""
        self._set_state(NodeState.OFFLINE)
        self._cancel.cancel()

    async def _connect(self) -> Session:
        number = self._sessions_opened + 1
        with trio.move_on_after(self._timeouts.connect) as scope:
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
                hello_flags=self._hello_flags,
            )
        if scope.cancelled_caught:
            raise NodeUnavailable(
                str(self), f"no answer within {self._timeouts.connect:g}s (connect timeout)"
            )
        self._sessions_opened = number
        self._hello_flags &= ~HelloFlag.TAKE_OVER  # reconnects never take over
        return session

    async def _keep_connected(
        self, session: Session | None, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the session; when it breaks, reconnect with backoff and resend
        everything in flight, forever (until aclose or cancellation). With
        no session (started offline), connect first."""
        with self._cancel:
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._resend_overdue)
                if session is None:
                    session = await self._reconnect()
                while True:
                    self._go_online(session)
                    reason = await session.run(self._on_reply, keepalive=self._timeouts.keepalive)
                    self._session = None
                    self._set_state(NodeState.OFFLINE)
                    log.warning(
                        "%s: connection lost (%s); %d transactions in flight, reconnecting",
                        self,
                        reason,
                        len(self._table),
                    )
                    try:
                        session = await self._reconnect()
                    except NodeFenced as exc:
                        self._fence(exc)
                        nursery.cancel_scope.cancel()
                        return
                    self.counters.reconnects += 1

    def _go_online(self, session: Session) -> None:
        self._session = session
        # Resend in original submission order; new requests queue behind.
        resent = 0
        for txn in self._table:
            if not txn.done:
                if txn.sends:
                    resent += 1
                    self.counters.resends += 1
                session.transmit(txn)
        if resent:
            log.info("%s: resent %d transactions after reconnect", self, resent)
        self._set_state(NodeState.ONLINE)

    async def _reconnect(self) -> Session:
        delay = BACKOFF_START
        attempt = 0
        while True:
            attempt += 1
            try:
                session = await self._connect()
            except NodeRefused as exc:
                if exc.errno == errno.EBUSY:
                    raise NodeFenced(str(self), str(exc).removeprefix(f"{self}: ")) from None
                level = logging.WARNING if attempt == 1 or attempt % 20 == 0 else logging.DEBUG
                log.log(level, "%s: reconnect attempt %d failed: %s", self, attempt, exc)
            except NodeUnavailable as exc:
                level = logging.WARNING if attempt == 1 or attempt % 20 == 0 else logging.DEBUG
                log.log(level, "%s: reconnect attempt %d failed: %s", self, attempt, exc)
            else:
                if self._sessions_opened == 1:  # started offline: first contact
                    self._adopt(session)
                    return session
                if session.ready.size != self.size:
                    log.error(
                        "%s: node now reports %d bytes instead of %d; refusing to use it",
                        self,
                        session.ready.size,
                        self.size,
                    )
                    await session.close()
                else:
                    self.writable = bool(session.ready.permissions & Permission.WRITE)
                    log.info("%s: reconnected after %d attempts", self, attempt)
                    return session
            await trio.sleep(delay)
            delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX)

    def _fence(self, exc: NodeFenced) -> None:
        """Another client writes to the export now: fail everything in
        flight with EIO at once and stop (no resending loop)."""
        pending = [txn for txn in self._table if not txn.done]
        self.fenced = str(exc).removeprefix(f"{self}: ")
        self._set_state(NodeState.OFFLINE)
        log.error(
            "%s: fenced, another client holds the export's write grant (%s); "
            "failing %d requests in flight with EIO, not reconnecting",
            self,
            self.fenced,
            len(pending),
        )
        for txn in pending:
            self._table.give_up(txn)

    # -- transactions ---------------------------------------------------
    def _on_reply(self, reply: Reply) -> None:
        if self._table.complete(reply) is None:
            log.debug("%s: dropped reply for unknown handle %d", self, reply.handle)

    async def _transact(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: Flag = Flag.NONE,
        data: bytes | memoryview = b"",
    ) -> Reply:
        """Run one transaction to its end: the node's reply (status 0), or
        NodeError with the node's errno, or NodeUnavailable after the budget."""
        if self.fenced is not None:
            raise NodeFenced(str(self), f"fenced: {self.fenced}")
        ticket = (
            await self._write_order.admit(offset, length) if command in WRITE_COMMANDS else None
        )
        try:
            txn = await self._table.begin(command, offset, length, flags=flags, data=data)
            self.counters.requests += 1
            self.counters.in_flight = len(self._table)
            try:
                reply = await self._await_reply(txn)
            finally:
                self._table.end(txn)
                self.counters.in_flight = len(self._table)
        finally:
            if ticket is not None:
                self._write_order.release(ticket)
        if reply.status:
            self.counters.errors += 1
            raise NodeError(
                str(self),
                f"{txn} failed on the node: {os.strerror(reply.status)}",
                errno=reply.status,
            )
        return reply

    async def _await_reply(self, txn: Transaction) -> Reply:
        txn.deadline = trio.current_time() + self._timeouts.resend
        if self._session is not None:
            self._session.transmit(txn)
        await txn.wait_done()
        if txn.reply is None and self.fenced is not None:
            raise NodeFenced(str(self), f"{txn}: fenced: {self.fenced}")
        if txn.reply is None:  # the resend timer gave up on it
            budget = self._timeouts.resend * (self._timeouts.max_resends + 1)
            raise NodeUnavailable(str(self), f"{txn}: no acknowledgement within {budget:g}s")
        return txn.reply

    async def _resend_overdue(self) -> None:
        """The node's resend timer. A transaction unanswered `resend`
        seconds after it was sent (or last resent) is sent again, on the
        current session if there is one; after `max_resends` resends and one
        more wait, it fails. Transactions only ever get deadlines at least
        `resend` after the moment they are armed, so sleeping until the
        earliest deadline seen here (or `resend` from now) misses none."""
        resend, max_resends = self._timeouts.resend, self._timeouts.max_resends
        while True:
            now = trio.current_time()
            wake = now + resend
            for txn in self._table:
                if txn.done:
                    continue
                if txn.deadline <= now:
                    txn.expired += 1
                    if txn.expired > max_resends:
                        self._give_up(txn, resend * (max_resends + 1))
                        continue
                    txn.deadline = now + resend
                    if self._session is not None:
                        log.info("%s: %s not acknowledged within %gs; resending", self, txn, resend)
                        self.counters.resends += 1
                        self._session.transmit(txn)
                wake = min(wake, txn.deadline)
            await trio.sleep_until(wake)

    def _give_up(self, txn: Transaction, budget: float) -> None:
        self.counters.errors += 1
        log.error(
            "%s: %s failed: no acknowledgement within %gs (%d resends)",
            self,
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

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_request
        return [
            (at, min(step, offset + length - at)) for at in range(offset, offset + length, step)
        ]

    # -- Node interface -------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
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

    async def _read_chunk(self, offset: int, length: int) -> bytes:
        reply = await self._transact(Command.READ, offset, length)
        if len(reply.data) != length:
            self.counters.errors += 1
            raise NodeError(
                str(self), f"READ [{offset}, +{length}) returned {len(reply.data)} bytes"
            )
        return bytes(reply.data)

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
        self._require(Command.FLUSH)
        await self._transact(Command.FLUSH)

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

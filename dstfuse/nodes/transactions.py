"""Transactions: requests kept until the node acknowledges them.

A `Transaction` is one request to a remote node with a handle unique for
the node's lifetime. The `TransactionTable` holds the in-flight ones in
submission order (the order a reconnect resends them in) and bounds how many
there are: `begin` waits while the table is full; `try_begin` takes a free
slot without a trip through the scheduler.

A transaction carries its own resend deadline; the node's one resend timer
(`RemoteNode`) looks them up here, so no request arms a timer of its own.

Invariants:
- a transaction is in the table from `begin` until `end`; a handle is never
  reused, so a late reply for an ended transaction finds nothing and is
  dropped by the caller;
- `complete` records the first reply only, and only on the transaction
  whose handle AND command it carries; duplicates (from resends) are
  ignored and, like replies for unknown handles, return None;
  `give_up` ends the wait without a reply; `done` is set exactly once, by
  whichever comes first;
- the table never holds more than `capacity` transactions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from ..protocol import Command, Flag, Reply, Request


@dataclass(eq=False, slots=True)
class Transaction:
    """`deadline` (trio clock) is when the current wait for an answer runs
    out; `expired` counts the waits that already ran out; `sends` the frames
    sent; `give_up_at` is when the caller stops waiting, whatever is left
    of the budget. `done` turns True once, by the reply or by `give_up`
    (then `reply` is None); `wait_done` returns from then on. One task
    waits at a time: the one that runs the transaction; `on_done`, when
    set, is called once at that moment instead of or besides waking it
    (a request waiting for several transactions at once)."""

    command: Command
    handle: int
    offset: int
    length: int
    flags: Flag = Flag.NONE
    data: bytes | memoryview = field(default=b"", repr=False)
    sends: int = 0
    reply: Reply | None = None
    deadline: float = math.inf
    expired: int = 0
    done: bool = False
    #: Finished without a reply because it is larger than the node's new
    #: maximum request: the caller splits it and runs the parts.
    resplit: bool = False
    #: When the caller stops waiting (a read's patience, trio clock), and
    #: whether the resend timer ended the wait for that reason.
    give_up_at: float = math.inf
    impatient: bool = False
    on_done: Callable[[], None] | None = field(default=None, repr=False)
    _waiter: trio.lowlevel.Task | None = field(default=None, repr=False)

    def request(self) -> Request:
        return Request(self.command, self.handle, self.offset, self.length, self.flags, self.data)

    async def wait_done(self) -> None:
        """Wait until `done` (a bare park and wakeup: cheaper than an Event
        per transaction)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def finish(self, reply: Reply | None) -> None:
        """Mark done with `reply` (None: given up); the first call wins."""
        if self.done:
            return
        self.done = True
        self.reply = reply
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None
        if self.on_done is not None:
            notify, self.on_done = self.on_done, None
            notify()

    def __str__(self) -> str:
        return f"{self.command.name} #{self.handle} [{self.offset}, +{self.length})"


class TransactionTable:
    """Handles start at `first_handle`: two tables of one node (requests,
    replays) use disjoint handle spaces."""

    def __init__(self, capacity: int, *, first_handle: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._slots = trio.Semaphore(capacity)
        self._in_flight: dict[int, Transaction] = {}
        self._next_handle = first_handle

    def __len__(self) -> int:
        return len(self._in_flight)

    def __iter__(self) -> Iterator[Transaction]:
        """In-flight transactions in submission order (a snapshot)."""
        return iter(list(self._in_flight.values()))

    async def begin(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        *,
        flags: Flag = Flag.NONE,
        data: bytes | memoryview = b"",
    ) -> Transaction:
        """Wait for a free slot (only when there is none: a free one is
        taken without a checkpoint), then register a new transaction."""
        txn = self.try_begin(command, offset, length, flags, data)
        if txn is None:
            await self._slots.acquire()
            txn = self._register(command, offset, length, flags, data)
        return txn

    def try_begin(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        flags: Flag = Flag.NONE,
        data: bytes | memoryview = b"",
    ) -> Transaction | None:
        """`begin` without waiting: the new transaction, or None when the
        table is full (then `begin` waits for a slot)."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        return self._register(command, offset, length, flags, data)

    def _register(
        self, command: Command, offset: int, length: int, flags: Flag, data: bytes | memoryview
    ) -> Transaction:
        handle = self._next_handle
        self._next_handle = handle + 1
        txn = Transaction(command, handle, offset, length, flags, data)
        self._in_flight[handle] = txn
        return txn

    def complete(self, reply: Reply) -> Transaction | None:
        """Record `reply` on its transaction and return it; None when no
        transaction of that handle and command waits for a reply (a late
        duplicate, or a reply we never asked for)."""
        txn = self._in_flight.get(reply.handle)
        if txn is None or txn.command is not reply.command or txn.done:
            return None
        txn.finish(reply)
        return txn

    def give_up(self, txn: Transaction) -> None:
        """End the wait for `txn` without a reply (its budget ran out)."""
        txn.finish(None)

    def end(self, txn: Transaction) -> None:
        """Remove `txn` and free its slot; safe to call once per `begin`."""
        if self._in_flight.pop(txn.handle, None) is not None:
            self._slots.release()

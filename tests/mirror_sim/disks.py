"""Simulated export nodes for the mirror simulator: a disk per node and a
connection per (client, disk).

`SimDisk` is one export node's backing store and host. It keeps two images:
`current` (what reads see: the page cache) and `durable` (what survives a
power loss). A write lands in `current` and marks its blocks dirty; FUA
makes its blocks durable at once, FLUSH makes every dirty block durable. A
power loss drops the dirty blocks (all, or a subset chosen by the caller,
like a cache that wrote some pages back). A failed FLUSH drops the cache too
(fsyncgate: Linux discards dirty pages whose write-back failed), so a leg
whose FLUSH failed really lacks the data.

Faults of the host, set by the simulator and never by the code under test:
`die`/`revive` (requests wait up to the connection's budget for the host,
then fail NodeUnavailable), `failing` ops (NodeError EIO), `delay` (a slow
disk), `freeze`/`thaw` (requests hang; one that the client gave up on still
lands at the thaw, as bytes already in the node's socket buffer do), and
`corrupt` (a block's bytes changed behind everyone's back).

`SimNode` is one client's connection to a disk: the `Node` the mirror sees.
Its own `stall` models the client's side of the wire going silent (a frozen
daemon, a partition): its requests hang and fail NodeUnavailable after the
budget without landing; those still waiting at the thaw land then.

Each disk has an export's write grant (dstfuse/export/grant.py), as the
real node does: a connection starts as a probe (it may read), and
`take_write_grant` makes its client the disk's one writer, taking the grant
over from whoever held it; the holder's connections are fenced at once (every
later request of theirs, including those still waiting in a stall, fails
NodeFenced and lands nothing). A connection that could not reach the disk
claims at its first request that does; a node restart (`revive`) forgets the
grant, and the next claimant gets it. A client's clean close releases it.

Every write that lands is checked against the disk's `owner` (the client
that holds the storage: the last one that took the grant over, or set by
the simulator): one from another client, or one written before its client
took the grant, is recorded in `late_writes`, which the simulator's
invariants require to stay empty. Nothing here draws random numbers.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio
import xxhash

from dstfuse.errors import NodeError, NodeFenced, NodeUnavailable
from dstfuse.nodes.base import Node, NodeState

BLOCK = 4096
#: the id of a block that was never written (all zeroes)
ZERO = 0
#: the id of a block whose bytes are no write of the simulator's
GARBAGE = -1


def block_bytes(write_id: int, block: int) -> bytes:
    """The bytes write `write_id` puts in data block `block`: the id and the
    block number repeated, so any block read back names the write it came
    from and a block copied to the wrong place is GARBAGE."""
    if write_id == ZERO:
        return bytes(BLOCK)
    return (write_id.to_bytes(8, "little") + block.to_bytes(8, "little")) * (BLOCK // 16)


def payload(write_id: int, first_block: int, blocks: int) -> bytes:
    return b"".join(block_bytes(write_id, first_block + i) for i in range(blocks))


def decode_block(raw: bytes | bytearray | memoryview, block: int) -> int:
    """The write id whose bytes `raw` holds at data block `block`, ZERO or GARBAGE."""
    write_id = int.from_bytes(raw[:8], "little")
    return write_id if bytes(raw) == block_bytes(write_id, block) else GARBAGE


def decode(image: bytes | bytearray, blocks: int) -> list[int]:
    view = memoryview(image)
    return [decode_block(view[b * BLOCK : (b + 1) * BLOCK], b) for b in range(blocks)]


@dataclass
class LateWrite:
    """A write that landed on a disk from a client that did not hold the storage."""

    disk: str
    client: str
    op: str
    offset: int
    length: int

    def __str__(self) -> str:
        return f"{self.client} {self.op} [{self.offset}, +{self.length}) on {self.disk}"


class SimDisk:
    """One export node: its bytes, its cache and its faults (module doc)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.current = bytearray(size)
        self.durable = bytearray(size)
        self.dirty: set[int] = set()
        self.alive = True
        #: op -> (scope: "all", "data" or "meta", until when) of the EIO it fails with
        self.failing: dict[str, tuple[str, float]] = {}
        #: op -> how many of its next requests fail with EIO (a flaky disk)
        self.fail_next: dict[str, int] = {}
        #: bytes below this are data (the simulator sets it to the storage size)
        self.data_limit = size
        self.delay = 0.0
        self._thawed: trio.Event | None = None
        #: requests the clients gave up on while the disk was frozen (they
        #: land at the thaw, before anything else can reach the disk)
        self._ghosts: list[Callable[[], None]] = []
        #: block -> when a failed FLUSH dropped its cached bytes
        self.dropped: dict[int, float] = {}
        #: every failed FLUSH of a leg in sync at that moment: (when, the
        #: blocks whose cached bytes it dropped, the legs in sync then);
        #: unlike `dropped`, a later write (a resync's copy) does not erase it
        self.flush_failures: list[tuple[float, frozenset[int], frozenset[int]]] = []
        self.owner: str | None = None
        #: the client holding the export's write grant (None: free)
        self.grant_holder: str | None = None
        self.late_writes: list[LateWrite] = []
        self._connections: list[SimNode] = []
        #: durable? -> (what was decoded, its ids): see `data_ids`
        self._decoded: dict[bool, tuple[tuple, list[int]]] = {}

    def __repr__(self) -> str:
        return f"SimDisk({self.name})"

    # -- faults ------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._thawed is not None

    @property
    def healthy(self) -> bool:
        return (
            self.alive
            and not self.frozen
            and not self.delay
            and not any(self.fail_next.values())
            and not any(until > trio.current_time() for _, until in self.failing.values())
        )

    def die(self, power_loss: bool = False, keep: Callable[[int], bool] | None = None) -> set[int]:
        """The host goes down (with `power_loss`, its cache too); returns
        the blocks lost."""
        self.alive = False
        lost = self.lose_cache(keep) if power_loss else set()
        for connection in self._connections:
            connection.lost |= lost
            connection.host_changed()
        return lost

    def revive(self) -> None:
        self.alive = True
        self.grant_holder = None  # a restarted node forgets its grant
        for connection in self._connections:
            connection.host_changed()

    def freeze(self) -> None:
        if self._thawed is None:
            self._thawed = trio.Event()

    def thaw(self) -> None:
        thawed, self._thawed = self._thawed, None
        ghosts, self._ghosts = self._ghosts, []
        owner, self.owner = self.owner, None  # nobody could reach the disk since
        for apply in ghosts:
            apply()
        self.owner = owner
        if thawed is not None:
            thawed.set()

    def heal(self) -> None:
        """Clear EIO faults and slowness (not death, freezing or corruption)."""
        self.failing.clear()
        self.fail_next.clear()
        self.delay = 0.0

    def fail(self, op: str, scope: str, seconds: float | None = None) -> None:
        """Fail `op` requests in `scope` with EIO, for `seconds` (None: until healed)."""
        until = float("inf") if seconds is None else trio.current_time() + seconds
        self.failing[op] = (scope, until)

    def fails(self, op: str, offset: int) -> bool:
        if self.fail_next.get(op):
            self.fail_next[op] -= 1
            return True
        scope, until = self.failing.get(op, ("", 0.0))
        if until <= trio.current_time():
            return False
        if scope == "data":
            return offset < self.data_limit
        if scope == "meta":
            return offset >= self.data_limit
        return True

    def corrupt(self, block: int) -> None:
        """Change a data block's bytes on the medium, behind everyone's back."""
        start = block * BLOCK
        rot = bytes(b ^ 0x5A for b in self.current[start : start + BLOCK])
        self.current[start : start + BLOCK] = rot
        self.durable[start : start + BLOCK] = rot

    def lose_cache(self, keep: Callable[[int], bool] | None = None) -> set[int]:
        """Power loss: dirty blocks revert to their durable bytes (those for
        which `keep(block)` is true were written back first). Returns the
        blocks lost."""
        lost = {block for block in sorted(self.dirty) if keep is None or not keep(block)}
        for block in self.dirty - lost:
            self._make_durable(block)
        for block in lost:
            start = block * BLOCK
            self.current[start : start + BLOCK] = self.durable[start : start + BLOCK]
        self.dirty.clear()
        return lost

    # -- applying requests ---------------------------------------------------
    def _make_durable(self, block: int) -> None:
        start = block * BLOCK
        self.durable[start : start + BLOCK] = self.current[start : start + BLOCK]

    def set_owner(self, client: str | None) -> None:
        self.owner = client

    def take_grant(self, client: str) -> None:
        """`client` takes the write grant over: the holder's connections are
        fenced, and `client` is the storage's owner from now on."""
        if self.grant_holder is not None and self.grant_holder != client:
            for connection in self._connections:
                if connection.client == self.grant_holder and connection.fenced is None:
                    connection.fenced = f"{client} took the write grant of {self.name} over"
        self.grant_holder = client
        self.owner = client

    def apply(self, client: str, op: str, offset: int, data: bytes, fua: bool) -> None:
        if self.owner is not None and client != self.owner:
            self.late_writes.append(LateWrite(self.name, client, op, offset, len(data)))
        self.current[offset : offset + len(data)] = data
        blocks = range(offset // BLOCK, (offset + max(len(data), 1) - 1) // BLOCK + 1)
        for connection in self._connections:
            connection.lost.difference_update(blocks)
        for block in blocks:
            self.dropped.pop(block, None)
        for block in blocks:
            if fua:
                self._make_durable(block)
                self.dirty.discard(block)
            else:
                self.dirty.add(block)

    def flush(self) -> None:
        for block in self.dirty:
            self._make_durable(block)
        self.dirty.clear()

    def data_ids(self, blocks: int, *, durable: bool = False) -> list[int]:
        """The write id in each of the first `blocks` data blocks (of the
        cache, or of stable storage). The invariants ask after every step;
        an image whose bytes did not change (by their hash) is not decoded
        again."""
        image = self.durable if durable else self.current
        key = (durable, blocks, xxhash.xxh3_128_digest(memoryview(image)[: blocks * BLOCK]))
        cached = self._decoded.get(durable)
        if cached is None or cached[0] != key:
            cached = (key, decode(image, blocks))
            self._decoded[durable] = cached
        return list(cached[1])


class SimNode(Node):
    """Client `client`'s connection to `disk` (module doc). `budget` is how
    long a request waits for an unreachable, frozen or stalled node before
    it fails NodeUnavailable (a RemoteNode's resend budget)."""

    kind = "S"

    def __init__(self, disk: SimDisk, client: str, *, budget: float) -> None:
        super().__init__(f"{disk.name}@{client}")
        self.disk = disk
        self.client = client
        self.budget = budget
        self._stall: trio.Event | None = None
        self._closed = False
        #: blocks this client wrote that the disk lost in a power loss; the
        #: next FLUSH fails (as a RemoteNode's does when it cannot replay them)
        self.lost: set[int] = set()
        #: set by the harness: this node's leg index, and which legs of its
        #: mirror are in sync right now (for the record of failed flushes)
        self.leg_index = -1
        self.legs_in_sync: Callable[[], frozenset[int]] = frozenset
        #: set by the harness: told of every read before it is sent
        self.on_read: Callable[[int, int], None] = lambda offset, length: None
        #: `take_write_grant` was called: this connection writes, holding the grant
        self._claimed = False
        #: the take-over is still to be done at the next request that reaches the disk
        self._take_over_owed = False

    # -- lifecycle -------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Like a mirror leg's RemoteNode: an unreachable disk starts OFFLINE
        with size 0 and gets its size when it is first reached."""
        self.disk._connections.append(self)
        self.host_changed()

    async def take_write_grant(self) -> None:
        """Like RemoteNode's: take the grant over now if the disk can be
        reached, else at the first request that reaches it."""
        if self._claimed:
            return
        self._claimed = True
        self._take_over_owed = True
        if self.disk.alive and not self.disk.frozen and self._stall is None:
            self._claim()

    def _claim(self) -> None:
        """At a request that reached the disk: refused if fenced; the owed
        take-over, or a plain claim of a free grant (after a node restart)."""
        if self.fenced is not None:
            raise NodeFenced(str(self), self.fenced)
        if not self._claimed:
            return
        if self._take_over_owed:
            self._take_over_owed = False
            self.disk.take_grant(self.client)
        elif self.disk.grant_holder is None:
            self.disk.grant_holder = self.client
        elif self.disk.grant_holder != self.client:
            self.fenced = f"{self.disk.grant_holder} holds the write grant of {self.disk.name}"
            raise NodeFenced(str(self), self.fenced)

    async def aclose(self) -> None:
        self._closed = True
        if self._claimed and self.disk.grant_holder == self.client:
            self.disk.grant_holder = None  # a clean close releases the grant
        if self in self.disk._connections:
            self.disk._connections.remove(self)
        self._set_state(NodeState.OFFLINE)

    def host_changed(self) -> None:
        if self._closed:
            return
        if self.disk.alive:
            self.size = self.disk.size
            self.writable = True
            self._set_state(NodeState.ONLINE)
        else:
            self._set_state(NodeState.OFFLINE)

    # -- the client's side going silent ---------------------------------------
    @property
    def stalled(self) -> bool:
        return self._stall is not None

    def stall(self) -> None:
        if self._stall is None:
            self._stall = trio.Event()

    def unstall(self) -> None:
        stall, self._stall = self._stall, None
        if stall is not None:
            stall.set()

    # -- requests ----------------------------------------------------------------
    def _unavailable(self, op: str, why: str) -> NodeUnavailable:
        self.counters.errors += 1
        return NodeUnavailable(str(self), f"{op}: {why}")

    async def _reach(self, op: str, offset: int, apply: Callable[[], None] | None) -> None:
        """Wait until the request can reach the disk (or fail), then apply
        its faults; `apply` lands a mutating request."""
        self.counters.requests += 1
        self.counters.in_flight += 1
        try:
            await trio.lowlevel.checkpoint()
            deadline = trio.current_time() + self.budget
            if self._stall is not None:
                with trio.move_on_at(deadline):
                    await self._stall.wait()
                if self._stall is not None:
                    raise self._unavailable(op, "no answer (the client's side is silent)")
            while not self.disk.alive:
                with trio.move_on_at(deadline):
                    await self.wait_state_change(NodeState.OFFLINE)
                if not self.disk.alive:
                    raise self._unavailable(op, "unreachable")
            if self.disk.delay:
                await trio.sleep(self.disk.delay)
            if self.disk._thawed is not None:
                thawed = self.disk._thawed
                with trio.move_on_at(max(deadline, trio.current_time())):
                    await thawed.wait()
                if not thawed.is_set():
                    if apply is not None:
                        self.disk._ghosts.append(apply)
                    raise self._unavailable(op, "no answer (the node is frozen)")
            if not self.disk.alive:
                raise self._unavailable(op, "connection lost")
            self._claim()
            if self.disk.fails(op, offset):
                self.counters.errors += 1
                if op == "flush":
                    now = trio.current_time()
                    lost = self.disk.lose_cache()
                    for block in lost:
                        self.disk.dropped[block] = now
                    in_sync = self.legs_in_sync()
                    if self.leg_index in in_sync:
                        self.disk.flush_failures.append((now, frozenset(lost), in_sync))
                raise NodeError(str(self), f"{op} failed (injected EIO)", errno=errno.EIO)
            if apply is not None:
                apply()
        finally:
            self.counters.in_flight -= 1

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        self.on_read(offset, length)
        await self._reach("read", offset, None)
        self.counters.bytes_read += length
        return bytes(self.disk.current[offset : offset + length])

    async def _mutate(self, op: str, offset: int, data: bytes, fua: bool) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        await self._reach(op, offset, lambda: self._land(op, offset, data, fua))
        self.counters.bytes_written += len(data)

    def _land(self, op: str, offset: int, data: bytes, fua: bool) -> None:
        if not self._claimed:  # a probe writing: the mirror skipped the claim
            self.disk.late_writes.append(
                LateWrite(self.disk.name, f"{self.client} (before taking the grant)", op,
                          offset, len(data))
            )
        self.disk.apply(self.client, op, offset, data, fua)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        await self._mutate("write", offset, bytes(data), fua)

    async def trim(self, offset: int, length: int) -> None:
        await self._mutate("trim", offset, bytes(length), False)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._mutate("write_zeroes", offset, bytes(length), fua)

    async def flush(self) -> None:
        await self._reach("flush", 0, None)
        if self.lost:
            self.lost.clear()
            self.counters.errors += 1
            raise NodeError(str(self), "flush: writes lost in a restart of the node")
        self.disk.flush()

    async def checksum(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        await self._reach("checksum", offset, None)
        return xxhash.xxh3_128_digest(bytes(self.disk.current[offset : offset + length]))


def keep_some(seed: int) -> Callable[[int], bool]:
    """A deterministic choice of the dirty blocks a power loss spares
    (`seed` comes from hypothesis); seed 0 spares none."""
    if seed == 0:
        return lambda block: False
    chooser = random.Random(seed)
    decided: dict[int, bool] = {}

    def keep(block: int) -> bool:
        if block not in decided:
            decided[block] = chooser.random() < 0.5
        return decided[block]

    return keep

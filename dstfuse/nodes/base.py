"""The node interface: one linear range of bytes that a storage places.

A node is a remote export (`RemoteNode`), a local file or block device
(`LocalNode`) or another storage (`StorageNode`). Algorithms see only this
interface. Invariants every implementation keeps:

- offsets are bytes from the node's start; `offset + length <= size` is
  checked here (`check_range`) before any I/O is issued;
- a method either completes (the data is on the node, or read from it) or
  raises `NodeError` with the errno the kernel should see; it never returns
  partial success;
- `read` returns exactly the bytes asked for, as `ReadData`: bytes, or a
  read-only view of a buffer nobody else holds or changes (a received
  frame's own buffer), so that large reads reach FUSE without a copy;
- `write(..., fua=True)` returns only once the data is on stable storage;
  `flush()` puts every write completed before it on stable storage;
- `state` changes are announced through `wait_state_change`, so watchers
  (a mirror's resync) need no callbacks into the node;
- `begin_write` plus `StartedWrite.settle` is `write` in two halves: the
  same checks, the same ordering against overlapping writes, the same
  errors (from `settle`); a node that cannot start a write without waiting
  returns None and the caller uses `write`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import NodeError, NodeSlow, RequestOutOfRange

if TYPE_CHECKING:
    from ..config import Timeouts

#: Digest size of `Node.checksum`: xxh3-128 over the range's bytes.
CHECKSUM_SIZE = 16

#: What `Node.read` returns (module doc): bytes, or a read-only view that
#: nothing else holds.
ReadData = bytes | memoryview


class StartedWrite(abc.ABC):
    """A write `Node.begin_write` sent without waiting for anything.
    `done` turns True once, when the node answered or the write was given
    up; `on_done`, when set, is called then, from the task that finished it
    (it must neither block nor raise). `settle` must be awaited exactly
    once, done or not: it waits for the end and finishes the write as
    `write` would, raising its errors; until then the write holds its
    range (later overlapping writes to the node wait) and its slot."""

    on_done: Callable[[], None] | None

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    @property
    @abc.abstractmethod
    def succeeded(self) -> bool:
        """Done with the node's success: `settle` raises nothing (it may
        still wait for a flush that keeps the unflushed writes in bounds)."""

    @property
    @abc.abstractmethod
    def settles_at_once(self) -> bool:
        """Done, and `settle` would return (or raise) now, without a wait:
        no request left to run for it (a split) and no flush to wait for."""

    @abc.abstractmethod
    async def settle(self) -> None: ...


class NodeState(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass
class NodeCounters:
    """What a node has done since it was opened; shown in the control tree."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    resends: int = 0
    reconnects: int = 0
    errors: int = 0
    in_flight: int = 0
    #: bytes of acknowledged writes kept for replay until a FLUSH covers
    #: them (with their bookkeeping; a gauge like `in_flight`)
    unflushed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Node(abc.ABC):
    """A range of `size` bytes that can be read, written, flushed and trimmed.

    Subclasses set `kind` ("R", "L", "N", "S" as in the control tree's `type`
    file) and `address` (host:port, path, NBD URI or storage name).
    """

    kind: str = "?"
    #: False when `checksum` reads the data over the network and digests it
    #: on the client (an NBD node: NBD has no checksum command).
    checksums_on_node: bool = True

    def __init__(self, address: str) -> None:
        self.address = address
        self.size = 0
        self.writable = False
        self.counters = NodeCounters()
        #: Why the node could not be reached when it was started (a node
        #: that may start OFFLINE), for messages; "" if it was reached.
        self.offline_reason = ""
        #: Why this client may not write to the node any more (another
        #: client took its write grant over, see `take_write_grant`); None
        #: while it may. Once set, it stays.
        self.fenced: str | None = None
        self._state = NodeState.OFFLINE
        self._state_changed = trio.Event()

    # -- identity -------------------------------------------------------
    @property
    def description(self) -> str:
        """The control tree's `type` line, e.g. ``R: 10.0.0.5:1025``."""
        return f"{self.kind}: {self.address}"

    def __str__(self) -> str:
        return self.description

    # -- state ----------------------------------------------------------
    @property
    def state(self) -> NodeState:
        return self._state

    def _set_state(self, state: NodeState) -> None:
        if state is not self._state:
            self._state = state
            self._state_changed.set()
            self._state_changed = trio.Event()

    async def wait_state_change(self, seen: NodeState) -> NodeState:
        """Return the node's state once it differs from `seen`."""
        while self._state is seen:
            await self._state_changed.wait()
        return self._state

    # -- bounds ---------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestOutOfRange(
                f"{self}: request [{offset}, +{length}) is past the end ({self.size} bytes)"
            )

    def check_writable(self) -> None:
        if not self.writable:
            import errno

            raise NodeError(str(self), "node is read-only", errno=errno.EROFS)

    # -- lifecycle ------------------------------------------------------
    @abc.abstractmethod
    async def start(self, nursery: trio.Nursery) -> None:
        """Open the node (connect and negotiate for remote ones) and start its
        background tasks in `nursery`. Sets `size` and `writable`. Raises
        `NodeError` (a `UserError` for refusals) when it cannot be opened."""

    async def take_write_grant(self) -> None:
        """Become the node's one writer where the node has such a grant (a
        remote export's write grant, taken over from any other client, who
        is then fenced by the node). For a storage that decides itself when
        it may write (a mirror's holder lease): its nodes are opened without
        claiming the grant and claim it once the storage has decided. A
        no-op for nodes without a grant."""
        return None

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the node. Callers flush first if they want durability."""

    def set_timeouts(self, timeouts: Timeouts) -> None:  # noqa: B027 - optional hook
        """Take new transaction timing (a reload); nodes without resend
        timers or connections (local files, stacked storages) have none."""

    # -- I/O ------------------------------------------------------------
    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> ReadData:
        """Return exactly `length` bytes at `offset`."""

    async def read_within(self, offset: int, length: int, patience: float) -> ReadData:
        """`read`, given up with NodeSlow once `patience` seconds have
        passed without the data (reads are safe to abandon: nothing changes
        on the node). A node with a request timer of its own overrides this
        to do without a cancel scope per read."""
        with trio.move_on_after(patience):
            return await self.read(offset, length)
        raise NodeSlow(str(self), f"no answer within {patience:g} s")

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        """Write `data` at `offset`; with `fua`, durable before returning."""

    def begin_write(
        self, offset: int, data: bytes | memoryview, *, fua: bool = False
    ) -> StartedWrite | None:
        """Send `write(offset, data, fua=fua)` now and return it unsettled,
        when that needs no wait (module doc); None: call `write`. Nodes
        without transactions of their own always say None."""
        return None

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write completed so far durable."""

    @abc.abstractmethod
    async def trim(self, offset: int, length: int) -> None:
        """Discard the range; later reads return zeroes."""

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Make the range read back as zeroes."""

    @abc.abstractmethod
    async def checksum(self, offset: int, length: int) -> bytes:
        """xxh3-128 digest of the range, computed where the data lives."""

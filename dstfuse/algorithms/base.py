"""The algorithm interface: how a storage places its nodes and runs requests.

Like DST's `dst_alg_ops` and nbdkit's filters, an algorithm sits between the
storage and its nodes. It owns the map from logical offsets to (node, node
offset) and carries out each request on the nodes it maps to. The storage
checks bounds before calling it, so every request an algorithm sees lies
within `[0, size)`.

An algorithm is built from an ordered list of nodes that are already started,
then `start(nursery)` is awaited once (a mirror reads its metadata and starts
resync there). It must never reach around a node's interface.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import trio

from ..nodes.base import Node, ReadData


@dataclass
class ControlFile:
    """One file of a node's control directory: `read()` gives its text;
    `write(text)` is present only for writable files and raises
    `UserError` for bad input. A `write` may be a coroutine function: the
    writer's write(2) then returns once it is done."""

    read: Callable[[], str]
    write: Callable[[str], Awaitable[None] | None] | None = None


@dataclass
class Placement:
    """Where a node sits in the storage: bytes [start, start + size) of the
    storage map to bytes [0, size) of the node. `cookie` is unique within the
    storage and names the node's control directory ``n-<start>-<cookie>``."""

    node: Node
    start: int
    size: int
    cookie: int
    controls: dict[str, ControlFile] = field(default_factory=dict)

    @property
    def directory(self) -> str:
        return f"n-{self.start}-{self.cookie}"


@dataclass(frozen=True)
class ConfigOption:
    """One storage.yaml key of an algorithm: the value a storage gets when
    the key is absent, and `parse(text)` of the value as written, which
    raises ValueError with a one-line reason for a bad value."""

    default: object
    parse: Callable[[str], object]


@dataclass(frozen=True)
class SizeFinding:
    """The size a storage over some nodes has, found without starting it.
    `recorded` is None when the nodes alone fix the size, True when it was
    read from the algorithm's metadata on the nodes (an existing mirror),
    False when nothing is recorded yet (the size a new storage gets)."""

    size: int
    recorded: bool | None = None


class Algorithm(abc.ABC):
    """Base of storage algorithms; subclasses register under `name`."""

    name: ClassVar[str]
    #: The `-o` mount options this algorithm reads -> one line saying what
    #: each does. A mount refuses an option that neither the mount itself
    #: nor an algorithm of one of its storages declares.
    mount_options: ClassVar[Mapping[str, str]] = {}
    #: The storage.yaml keys (besides `algorithm` and `nodes`) this
    #: algorithm reads; the config gives every storage each of them, parsed
    #: or defaulted, in `StorageSpec.options`.
    config_options: ClassVar[Mapping[str, ConfigOption]] = {}
    #: The fewest nodes a storage of this algorithm may be configured with.
    minimum_nodes: ClassVar[int] = 1
    #: True when a storage can serve with one of its nodes unreachable (a
    #: mirror resyncs it later), so such a node may start offline.
    serves_without_a_node: ClassVar[bool] = False
    #: True when every node holds the whole storage (`check` lists their sizes).
    replicated: ClassVar[bool] = False
    #: True when a mount writes the algorithm's own metadata to the nodes,
    #: so the storage cannot be mounted read-only (`-o ro`).
    writes_metadata: ClassVar[bool] = False
    #: True when a running storage can take nodes appended at the end of
    #: its map (`append`), growing without moving any byte.
    grows_by_appending: ClassVar[bool] = False
    #: True when a running storage can take nodes appended at the end of
    #: its node list as new legs (`append`), keeping its size.
    adds_legs: ClassVar[bool] = False

    @classmethod
    async def find_size(
        cls, storage_name: str, nodes: Sequence[tuple[Node | None, int]], options: Mapping
    ) -> SizeFinding:
        """The size a storage of this algorithm over `nodes` has, found
        without starting it and without writing (for `dstfuse check`).
        `nodes` holds, in config order, each started node (None where it
        cannot be read here: a storage node) with the bytes the storage
        uses of it; `options` are the storage's config options. Raises
        ValueError (or a UserError) when the nodes cannot hold the storage."""
        raise NotImplementedError(f"{cls.__name__} does not say its size")

    def __init__(
        self, storage_name: str, nodes: list[tuple[Node, int | None]], options: dict
    ) -> None:
        """`nodes` holds each started node with its optional size limit (the
        config's `size:`). `options` holds the storage's algorithm-specific
        config values plus, from the mount: `client_name` (str), `client_id`
        (16 bytes, new per mount) and `force` (bool, mount -o force)."""
        self.storage_name = storage_name

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The storage's size in bytes."""

    @property
    @abc.abstractmethod
    def writable(self) -> bool:
        """True when every request kind can be served."""

    @abc.abstractmethod
    def placements(self) -> list[Placement]:
        """The node map, in storage order, for the control tree."""

    @property
    def state(self) -> str:
        """`clean`, `degraded`, `resyncing` or `failed` (status contract)."""
        return "clean"

    def node_state(self, placement: Placement) -> str:
        """`clean`, `dirty`, `resyncing` or `offline` for one node."""
        from ..nodes.base import NodeState

        return "offline" if placement.node.state is NodeState.OFFLINE else "clean"

    def controls(self) -> dict[str, ControlFile]:
        """Extra storage-level control files (e.g. a mirror's `verify`)."""
        return {}

    def append(self, nodes: list[tuple[Node, int | None]]) -> None:
        """Place started `nodes` (with their size limits) after the last
        byte of the storage (`grows_by_appending` algorithms), or add them
        as new legs (`adds_legs` algorithms)."""
        raise NotImplementedError(f"{type(self).__name__} does not grow online")

    async def check_append(self, nodes: list[tuple[Node, int | None]]) -> None:  # noqa: B027
        """Before a reload appends started `nodes`: UserError (one line)
        if the algorithm cannot take them. Reads only; nothing is changed."""

    def resync_progress(self, placement: Placement) -> tuple[int, int]:
        """(bytes done, bytes total) of the node's current resync."""
        return (0, 0)

    async def start(self, nursery: trio.Nursery) -> None:  # noqa: B027 - optional hook
        """Start background work (none by default)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and record a clean shutdown (nothing by default)."""

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> ReadData: ...

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    @abc.abstractmethod
    async def trim(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def checksum(self, offset: int, length: int) -> bytes:
        """xxh3-128 of the storage range; used when this storage is a node."""

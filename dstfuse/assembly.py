"""Assembly: turn a `MountConfig` into started nodes, algorithms and storages.

This module owns the order in which a mount's parts are opened and closed:

1. every remote/local node of every storage is built and started at once
   (so N unreachable nodes cost one connect timeout, not N);
2. storages are built in the config's dependency order: a `storage:` node
   wraps the already-built inner storage in a `StorageNode`, then the
   algorithm is made from `(node, size limit)` pairs and started;
3. on exit, everything is closed in reverse order: outer storages before the
   storages and nodes under them.

If any part fails, everything opened so far is closed before the error
leaves, and the error is a `UserError` naming the storage and the node, so
`dstfuse mount` prints one line. It never flushes: the caller decides when
data must be durable (the daemon flushes every storage before closing).

Only top-level storages (those that are not a node of another storage) are
exposed as files in the mount: writing to an inner storage behind the back
of the storage that uses it would corrupt it. Every storage gets a control
directory.

RemoteNode, LocalNode and NbdNode are imported when first needed, so a
config that uses only one kind never imports the others.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .algorithms import algorithm_class
from .config import MountConfig, NodeSpec, StorageSpec
from .errors import DstError, UserError
from .fanout import gather
from .nodes.base import Node, NodeState
from .nodes.stacked import StorageNode
from .storage import Storage
from .units import format_size

log = logging.getLogger(__name__)

#: How long closing one part may take before we give up on it (it is
#: logged); closing must never hang an unmount.
CLOSE_TIMEOUT = 30.0


@dataclass
class Assembly:
    """The started storages of one mount. `storages` holds every storage in
    dependency order; `exposed` only the top-level ones, which become files."""

    storages: dict[str, Storage]
    exposed: dict[str, Storage]
    nodes: list[Node] = field(default_factory=list)
    client_name: str = ""
    client_id: bytes = b""
    #: builds the nodes a reload adds, as the mount built its own
    builder: _Builder | None = field(default=None, repr=False)

    async def extend(
        self, config: MountConfig, appended: Mapping[str, Sequence[NodeSpec]], added: Sequence[str]
    ) -> Extension:
        """For a reload: start the nodes `appended` (storage name -> node
        specs of `config`, to go at the end of that running storage) and
        build the new storages `added` (names in `config`, in its order),
        all at once and as a mount builds its own. All or none: if any part
        fails, whatever was opened for it is closed again and the error is
        raised (a UserError naming storage and node). What is returned is
        closed with the mount; it is in `storages`/`nodes` only once the
        caller `commit`s it."""
        assert self.builder is not None, "only an assembly from open_assembly extends"
        builder = self.builder.for_config(config)
        builder.check_read_only(added)
        mark = builder.opened.mark()
        leaves = [
            (name, index)
            for name, specs in appended.items()
            for index, spec in enumerate(config.storages[name].nodes)
            if any(spec is wanted for wanted in specs)
        ]
        leaves += [
            (name, index)
            for name in added
            for index, spec in enumerate(config.storages[name].nodes)
            if spec.kind != "storage"
        ]
        try:
            started = await builder.start_nodes(leaves)
            nodes: dict[str, list[tuple[Node, int | None]]] = {name: [] for name in appended}
            for name, index in leaves:
                if name in appended:
                    node, spec = started[(name, index)], config.storages[name].nodes[index]
                    _check_size_limit(name, node, spec)
                    if self.storages[name].writable and not node.writable:
                        raise UserError(
                            f"storage {name}: node {node} (line {spec.line}) is read-only; "
                            "appending it would make the whole storage read-only"
                        )
                    nodes[name].append((node, spec.size))
            for name, pairs in nodes.items():
                await self.storages[name].algorithm.check_append(pairs)
            built = dict(self.storages)
            for name in added:
                built[name] = await builder.build_storage(config.storages[name], started, built)
        except BaseException:
            await builder.opened.close_all(since=mark)
            raise
        storages = {name: built[name] for name in added}
        return Extension(
            appended=nodes,
            storages=storages,
            exposed=top_level_storages(config, storages),
            nodes=builder.nodes,
            opened_since=mark,
        )

    def commit(self, extension: Extension) -> None:
        """Count what `extend` built as part of the mount (the storages it
        added are flushed at unmount with the others); the appended nodes
        are the caller's to place."""
        self.storages.update(extension.storages)
        self.exposed.update(extension.exposed)
        self.nodes.extend(extension.nodes)
        # At unmount the running storages (which may now have these nodes)
        # are flushed and closed first. The new storages use only new parts
        # (reload_plan), so they may close after the running ones.
        assert self.builder is not None
        self.builder.opened.close_last(extension.opened_since)


@dataclass
class Extension:
    """What `Assembly.extend` started: `appended` maps a running storage to
    its new (node, size limit) pairs, in order; `storages` the new storages,
    `exposed` those of them that become files; `nodes` every node started;
    `opened_since` where its closers begin in the mount's closing order."""

    appended: dict[str, list[tuple[Node, int | None]]]
    storages: dict[str, Storage]
    exposed: dict[str, Storage]
    nodes: list[Node]
    opened_since: int = 0


def describe_spec(spec: NodeSpec) -> str:
    """The control-tree `type` line a node spec will get, for messages about
    nodes that could not even be built."""
    kind = {"remote": "R", "local": "L", "storage": "S", "nbd": "N"}.get(spec.kind, "?")
    return f"{kind}: {spec.target}"


def default_client_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Opened:
    """Everything opened so far, closed in reverse order by `close_all`."""

    def __init__(self) -> None:
        self._closers: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def add(self, what: str, close: Callable[[], Awaitable[None]]) -> None:
        self._closers.append((what, close))

    def mark(self) -> int:
        """A point to close back to (`close_all(since=...)`)."""
        return len(self._closers)

    def close_last(self, since: int) -> None:
        """What was opened after `since` is closed after everything opened
        before it (still in its own reverse order): nodes a reload appended
        to a running storage must outlive that storage's final flush."""
        moved = self._closers[since:]
        del self._closers[since:]
        self._closers[:0] = moved

    async def close_all(self, since: int = 0) -> None:
        """Close what was opened after `since` (everything by default)."""
        while len(self._closers) > since:
            what, close = self._closers.pop()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                try:
                    await close()
                except Exception:
                    log.exception("%s: error while closing", what)
            if scope.cancelled_caught:
                log.error("%s: not closed within %.0f s; abandoned", what, CLOSE_TIMEOUT)


class _Builder:
    """One mount's construction; kept apart so `open_assembly` stays a small
    lifecycle wrapper."""

    def __init__(
        self,
        config: MountConfig,
        nursery: trio.Nursery,
        opened: _Opened,
        *,
        mount_options: Mapping[str, str | bool],
        force: bool,
        client_name: str,
        client_id: bytes,
    ) -> None:
        self.config = config
        self.nursery = nursery
        self.opened = opened
        self.mount_options = dict(mount_options)
        self.force = force
        self.client_name = client_name
        self.client_id = client_id
        self._key: bytes | None = None
        self.nodes: list[Node] = []

    def for_config(self, config: MountConfig) -> _Builder:
        """A builder of the same mount for nodes of `config` (a reload's)."""
        builder = _Builder(
            config,
            self.nursery,
            self.opened,
            mount_options=self.mount_options,
            force=self.force,
            client_name=self.client_name,
            client_id=self.client_id,
        )
        builder._key = self._key if config.key_file == self.config.key_file else None
        return builder

    # -- nodes ----------------------------------------------------------
    def _key_bytes(self) -> bytes | None:
        if self.config.key_file is None:
            return None
        if self._key is None:
            from .keys import load_key

            self._key = load_key(self.config.key_file)
        return self._key

    @property
    def read_only(self) -> bool:
        """`-o ro`: every node is opened read-only (remote ones ask the
        export node for READ only, so they never need its write grant)."""
        return bool(self.mount_options.get("ro", False))

    def _is_mirror_leg(self, spec: NodeSpec) -> bool:
        return any(
            self._redundant(name) and any(node is spec for node in storage.nodes)
            for name, storage in self.config.storages.items()
        )

    def _make_node(self, storage: str, spec: NodeSpec) -> Node:
        if spec.kind == "remote":
            from .nodes.remote import RemoteNode

            assert spec.address is not None
            return RemoteNode(
                spec.address,
                export=spec.export,
                timeouts=self.config.timeouts,
                key=self._key_bytes(),
                cipher=self.config.cipher,
                max_in_flight=self.config.max_in_flight,
                client_name=self.client_name,
                storage=storage,
                unflushed=self.config.unflushed,
                read_only=self.read_only,
                # A mirror leg claims the export's write grant only once the
                # mirror has read the legs' metadata and decided to write
                # (Node.take_write_grant): a mount refused because another
                # one holds the storage must not displace that holder.
                probe=self._is_mirror_leg(spec),
            )
        if spec.kind == "local":
            from .nodes.local import LocalNode

            return LocalNode(spec.target, read_only=self.read_only)
        if spec.kind == "nbd":
            from .nodes.nbd import NbdNode

            assert spec.nbd is not None
            return NbdNode(
                spec.nbd,
                timeouts=self.config.timeouts,
                tls=spec.tls,
                max_in_flight=self.config.max_in_flight,
                storage=storage,
                unflushed=self.config.unflushed,
                read_only=self.read_only,
            )
        raise AssertionError(f"no builder for {spec.kind} nodes")

    def _redundant(self, storage: str) -> bool:
        """True when `storage` can run with one of its nodes missing."""
        return algorithm_class(self.config.storages[storage].algorithm).serves_without_a_node

    def _start_timeout(self) -> float:
        # RemoteNode gives up after timeouts.connect by itself; this bound
        # only catches a node that hangs in start against its contract.
        return 2 * self.config.timeouts.connect + 10.0

    async def _start_node(self, storage: str, spec: NodeSpec) -> Node:
        described = describe_spec(spec)
        try:
            node = self._make_node(storage, spec)
        except DstError as exc:
            raise _node_error(storage, described, spec, exc) from exc
        except OSError as exc:
            raise _node_error(storage, described, spec, exc) from exc
        try:
            with trio.fail_after(self._start_timeout()):
                if spec.kind in ("remote", "nbd") and self._redundant(storage):
                    # A mirror can serve without this leg and resync it
                    # later: an unreachable leg must not stop the mount.
                    await node.start(self.nursery, may_start_offline=True)
                else:
                    await node.start(self.nursery)
        except trio.TooSlowError:
            await _close_quietly(node)
            raise UserError(
                f"storage {storage}: node {described} (line {spec.line}) did not start "
                f"within {self._start_timeout():.0f} s"
            ) from None
        except (DstError, OSError) as exc:
            await _close_quietly(node)
            raise _node_error(storage, described, spec, exc) from exc
        except BaseException:
            await _close_quietly(node)
            raise
        self.opened.add(f"storage {storage}: node {node}", node.aclose)
        log.info(
            "storage %s: node %s started (%s, %s)",
            storage,
            node,
            format_size(node.size),
            "rw" if node.writable else "ro",
        )
        return node

    async def start_leaf_nodes(self) -> dict[tuple[str, int], Node]:
        """Build and start every remote/local/nbd node of every storage at
        once; (storage name, node index) -> node. The first failure in
        config order is raised after every start has ended; the nodes that
        did start are already registered for closing."""
        self.check_read_only(self.config.storages)
        return await self.start_nodes(
            (name, index)
            for name, storage in self.config.storages.items()
            for index, spec in enumerate(storage.nodes)
            if spec.kind != "storage"
        )

    def check_read_only(self, names: Iterable[str]) -> None:
        """Under `-o ro`, refuse the storages `names` that write metadata."""
        if not self.read_only:
            return
        for name in names:
            algorithm = self.config.storages[name].algorithm
            if algorithm_class(algorithm).writes_metadata:
                raise UserError(
                    f"-o ro: storage {name} is a {algorithm}, which writes its metadata "
                    "when mounted; mount it without ro"
                )

    async def start_nodes(self, wanted: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Node]:
        """Start the leaf nodes `wanted` ((storage name, node index) in the
        config) at once, as `start_leaf_nodes` does for all of them."""
        keys = list(wanted)
        outcomes = await gather(
            [
                lambda n=name, s=self.config.storages[name].nodes[index]: self._start_node(n, s)
                for name, index in keys
            ]
        )
        errors = [error for _, error in outcomes if error is not None]
        for error in errors[1:]:
            log.error("%s", error)
        if errors:
            raise errors[0]
        self.nodes.extend(node for node, _ in outcomes)
        return {key: node for key, (node, _) in zip(keys, outcomes, strict=True)}

    # -- storages -------------------------------------------------------
    async def build_storage(
        self, spec: StorageSpec, leaves: dict[tuple[str, int], Node], built: dict[str, Storage]
    ) -> Storage:
        nodes: list[tuple[Node, int | None]] = []
        for index, node_spec in enumerate(spec.nodes):
            if node_spec.kind == "storage":
                inner = built[node_spec.target]
                node: Node = StorageNode(inner)
                await node.start(self.nursery)
                self.opened.add(f"storage {spec.name}: node {node}", node.aclose)
                self.nodes.append(node)
            else:
                node = leaves[(spec.name, index)]
            _check_size_limit(spec.name, node, node_spec)
            nodes.append((node, node_spec.size))
        options = dict(spec.options)
        options.update(
            client_name=self.client_name,
            client_id=self.client_id,
            force=self.force,
            mount_options=dict(self.mount_options),
        )
        try:
            algorithm = algorithm_class(spec.algorithm)(spec.name, nodes, options)
        except (DstError, ValueError) as exc:
            raise UserError(f"storage {spec.name}: {exc}") from exc
        storage = Storage(spec.name, algorithm)
        try:
            await storage.start(self.nursery)
        except DstError as exc:
            await _close_quietly(storage)
            message = str(exc)
            if message.startswith(f"{spec.name} "):
                # A part named after the storage ("vol0 leg 0 (...)").
                message = f"storage {message}"
            elif not message.startswith(f"storage {spec.name}"):
                message = f"storage {spec.name}: {message}"
            raise UserError(message, errno=exc.errno) from exc
        self.opened.add(f"storage {spec.name}", storage.aclose)
        log.info(
            "storage %s: %s over %d node(s), %s, %s, state %s",
            spec.name,
            spec.algorithm,
            len(nodes),
            format_size(storage.size),
            "rw" if storage.writable else "ro",
            storage.state,
        )
        return storage


def _check_size_limit(storage: str, node: Node, spec: NodeSpec) -> None:
    if node.state is NodeState.ONLINE and spec.size is not None and spec.size > node.size:
        raise UserError(
            f"storage {storage}: node {node} (line {spec.line}): size "
            f"{format_size(spec.size)} is larger than the node ({format_size(node.size)})"
        )


def _node_error(storage: str, described: str, spec: NodeSpec, exc: Exception) -> UserError:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.filename:
            reason = f"{exc.filename}: {reason}"
        message = f"{described}: {reason}"
    else:
        message = str(exc)
        # NodeError messages start with the node's description already.
        if not message.startswith(described):
            message = f"{described}: {message}"
    errno = getattr(exc, "errno", None)
    return UserError(
        f"storage {storage}: node {message} (line {spec.line})",
        errno=errno if isinstance(errno, int) else None,
    )


async def _close_quietly(part: Node | Storage) -> None:
    """Close a part whose start failed; its own error is the one reported."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        try:
            await part.aclose()
        except Exception as exc:  # noqa: BLE001 - the start error is what matters
            log.debug("%s: close after failed start: %s", part, exc)


def top_level_storages(config: MountConfig, storages: Mapping[str, Storage]) -> dict[str, Storage]:
    """The storages that are not a node of another storage, in config order."""
    used = {n.target for s in config.storages.values() for n in s.nodes if n.kind == "storage"}
    return {name: storage for name, storage in storages.items() if name not in used}


@asynccontextmanager
async def open_assembly(
    config: MountConfig,
    *,
    mount_options: Mapping[str, str | bool] | None = None,
    force: bool = False,
    client_name: str | None = None,
    client_id: bytes | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> AsyncIterator[Assembly]:
    """Build and start every node and storage of `config`; close them all on
    exit (outer storages first). Raises `UserError` naming the storage and
    node when a part cannot be opened, after closing what was opened;
    `on_failure` is called with that error before the closing starts."""
    opened = _Opened()
    # Errors are carried out of the nursery and raised after it: raised
    # inside, trio would wrap them in an ExceptionGroup and callers could
    # not catch UserError.
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        builder = _Builder(
            config,
            nursery,
            opened,
            mount_options=mount_options or {},
            force=force,
            client_name=client_name or default_client_name(),
            client_id=client_id if client_id is not None else secrets.token_bytes(16),
        )
        try:
            try:
                leaves = await builder.start_leaf_nodes()
                built: dict[str, Storage] = {}
                for name, spec in config.storages.items():
                    built[name] = await builder.build_storage(spec, leaves, built)
            except Exception as exc:
                if on_failure is not None:
                    on_failure(exc)
                raise
            assembly = Assembly(
                storages=built,
                exposed=top_level_storages(config, built),
                nodes=list(builder.nodes),
                client_name=builder.client_name,
                client_id=builder.client_id,
                builder=builder,
            )
            try:
                yield assembly
            finally:
                await opened.close_all()
        except BaseException as exc:
            error = exc
            await opened.close_all()
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error

"""The control tree model (`.dst/`), without FUSE: what each file says for a
linear storage over in-memory nodes, and how writes reach the algorithm.

`MemoryNode` and `ControlledLinear` are shared with test_assembly.py and
test_fs_operations.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
import xxhash

from dstfuse.algorithms import ControlFile, Placement
from dstfuse.algorithms.linear import Linear
from dstfuse.control import ControlDirectory, ControlTree, DaemonInfo, node_lines
from dstfuse.errors import NodeError, UserError
from dstfuse.nodes.base import Node, NodeState
from dstfuse.storage import Storage

KIB = 1024


class MemoryNode(Node):
    """A node holding its bytes in memory. `calls` records every request as
    (kind, offset, length, fua); `fail` maps a request kind ("read",
    "write", "flush", ...) to the exception it raises."""

    kind = "L"

    def __init__(self, name: str, size: int, *, writable: bool = True, start_error=None):
        super().__init__(f"/memory/{name}")
        self._capacity = size
        self._writable = writable
        self.data = bytearray(size)
        self.calls: list[tuple[str, int, int, bool]] = []
        self.fail: dict[str, BaseException] = {}
        self.start_error = start_error
        self.started = False
        self.closed = False

    async def start(self, nursery: trio.Nursery) -> None:
        await trio.lowlevel.checkpoint()
        if self.start_error is not None:
            raise self.start_error
        self.size = self._capacity
        self.writable = self._writable
        self.started = True
        self._set_state(NodeState.ONLINE)

    async def aclose(self) -> None:
        self.closed = True
        self._set_state(NodeState.OFFLINE)

    def go_offline(self) -> None:
        self._set_state(NodeState.OFFLINE)

    async def _request(self, kind: str, offset: int, length: int, fua: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((kind, offset, length, fua))
        self.counters.requests += 1
        if kind in self.fail:
            self.counters.errors += 1
            raise self.fail[kind]

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        await self._request("read", offset, length)
        self.counters.bytes_read += length
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, len(data))
        await self._request("write", offset, len(data), fua)
        self.data[offset : offset + len(data)] = data
        self.counters.bytes_written += len(data)

    async def flush(self) -> None:
        await self._request("flush", 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        self.check_writable()
        self.check_range(offset, length)
        await self._request("trim", offset, length)
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_writable()
        self.check_range(offset, length)
        await self._request("write_zeroes", offset, length, fua)
        self.data[offset : offset + length] = bytes(length)

    async def checksum(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        await self._request("checksum", offset, length)
        return xxhash.xxh3_128_digest(bytes(self.data[offset : offset + length]))


class ControlledLinear(Linear):
    """Linear plus mirror-like controls, to test how the tree shows them:
    per node `clean`/`dirty` (writing marks the node) and `resync_size`;
    storage-level `verify` and a `name` that clashes with a standard file."""

    name = "linear"

    def __init__(self, storage_name, nodes, options):
        super().__init__(storage_name, nodes, options)
        self.dirty: set[int] = set()
        self.resync_size = 4 * 1024 * 1024
        self.progress = (0, 0)
        for placement in self._placements:
            placement.controls = self._node_controls(placement)

    def _node_controls(self, placement: Placement) -> dict[str, ControlFile]:
        def mark(dirty: bool):
            def write(text: str) -> None:
                if text.strip() not in ("1", ""):
                    raise UserError(f"write 1 to mark {placement.directory}")
                (self.dirty.add if dirty else self.dirty.discard)(placement.cookie)

            return write

        def set_resync_size(text: str) -> None:
            try:
                self.resync_size = int(text)
            except ValueError:
                raise UserError(f"resync_size: {text.strip()!r} is not a number") from None

        return {
            "clean": ControlFile(read=lambda: f"{int(placement.cookie not in self.dirty)}\n",
                                 write=mark(False)),
            "dirty": ControlFile(read=lambda: f"{int(placement.cookie in self.dirty)}\n",
                                 write=mark(True)),
            "resync_size": ControlFile(read=lambda: f"{self.resync_size}\n",
                                       write=set_resync_size),
            "type": ControlFile(read=lambda: "clash\n"),
        }

    def node_state(self, placement: Placement) -> str:
        if placement.node.state is NodeState.OFFLINE:
            return "offline"
        return "dirty" if placement.cookie in self.dirty else "clean"

    def resync_progress(self, placement: Placement) -> tuple[int, int]:
        return self.progress

    @property
    def state(self) -> str:
        return "degraded" if self.dirty else "clean"

    def controls(self) -> dict[str, ControlFile]:
        return {
            "verify": ControlFile(read=lambda: "idle\n"),
            "name": ControlFile(read=lambda: "clash\n"),
        }


async def started(nursery, *nodes: MemoryNode) -> list[MemoryNode]:
    for node in nodes:
        await node.start(nursery)
    return list(nodes)


@pytest.fixture
async def linear_storage(nursery):
    a, b = await started(nursery, MemoryNode("a", 64 * KIB), MemoryNode("b", 32 * KIB))
    storage = Storage("vol0", Linear("vol0", [(a, None), (b, None)], {}))
    return storage, a, b


@pytest.fixture
async def controlled_storage(nursery):
    a, b = await started(nursery, MemoryNode("a", 64 * KIB), MemoryNode("b", 32 * KIB))
    storage = Storage("vol0", ControlledLinear("vol0", [(a, None), (b, 16 * KIB)], {}))
    return storage, a, b


def daemon_file() -> ControlFile:
    info = DaemonInfo(pid=1234, config=Path("/etc/s.yaml"), mountpoint=Path("/mnt"))
    return ControlFile(read=info.render)


async def test_storage_directory_shows_algorithm_name_size_state_and_node_map(linear_storage):
    storage, a, b = linear_storage
    tree = ControlTree({"vol0": storage}, {".daemon": daemon_file()})
    assert set(tree.root.entries()) == {"vol0", ".daemon"}
    assert set(tree.resolve(["vol0"]).entries()) == {
        "alg", "name", "size", "state", "nodes", "n-0-0", f"n-{64 * KIB}-1"
    }
    assert tree.read(["vol0", "alg"]) == "linear\n"
    assert tree.read(["vol0", "name"]) == "vol0\n"
    assert tree.read(["vol0", "size"]) == f"{96 * KIB}\n"
    assert tree.read(["vol0", "state"]) == "clean\n"
    assert tree.read(["vol0", "nodes"]) == (
        f"n-0-0 0 {64 * KIB} L: /memory/a\n"
        f"n-{64 * KIB}-1 {64 * KIB} {32 * KIB} L: /memory/b\n"
    )
    assert node_lines(storage) == tree.read(["vol0", "nodes"])


async def test_node_directory_shows_place_state_flags_and_counters(linear_storage):
    storage, a, b = linear_storage
    tree = ControlTree({"vol0": storage})
    await storage.write(64 * KIB - 1024, b"x" * 4096)  # 1 KiB on a, 3 KiB on b
    await storage.read(0, 512)
    node = ["vol0", f"n-{64 * KIB}-1"]
    expected = {
        "type": "L: /memory/b\n",
        "start": f"{64 * KIB}\n",
        "size": f"{32 * KIB}\n",
        "state": "sync\n",
        "status": "clean\n",
        "flags": "online rw\n",
        "resync_done": "0\n",
        "resync_total": "0\n",
        "requests": "1\n",
        "bytes_read": "0\n",
        "bytes_written": "3072\n",
        "resends": "0\n",
        "reconnects": "0\n",
        "errors": "0\n",
        "in_flight": "0\n",
        "unflushed": "0\n",
    }
    assert set(tree.resolve(node).entries()) == set(expected)
    assert {name: tree.read([*node, name]) for name in expected} == expected
    assert tree.read(["vol0", "n-0-0", "bytes_written"]) == "1024\n"
    assert tree.read(["vol0", "n-0-0", "bytes_read"]) == "512\n"
    assert tree.read(["vol0", "n-0-0", "requests"]) == "2\n"


async def test_offline_node_reads_notsync_and_offline(linear_storage):
    storage, a, b = linear_storage
    tree = ControlTree({"vol0": storage})
    b.go_offline()
    node = ["vol0", f"n-{64 * KIB}-1"]
    assert tree.read([*node, "state"]) == "notsync\n"
    assert tree.read([*node, "status"]) == "offline\n"
    assert tree.read([*node, "flags"]) == "offline rw\n"
    assert tree.read(["vol0", "n-0-0", "state"]) == "sync\n"


async def test_read_only_node_flag(nursery):
    (node,) = await started(nursery, MemoryNode("ro", 8 * KIB, writable=False))
    storage = Storage("golden", Linear("golden", [(node, None)], {}))
    tree = ControlTree({"golden": storage})
    assert tree.read(["golden", "n-0-0", "flags"]) == "online ro\n"


async def test_placement_controls_are_files_and_writes_reach_the_algorithm(controlled_storage):
    storage, a, b = controlled_storage
    tree = ControlTree({"vol0": storage})
    node = ["vol0", f"n-{64 * KIB}-1"]
    dirty = tree.resolve([*node, "dirty"])
    assert isinstance(dirty, ControlFile) and dirty.write is not None
    assert tree.read([*node, "dirty"]) == "0\n"
    dirty.write("1\n")
    assert tree.read([*node, "dirty"]) == "1\n"
    assert tree.read([*node, "clean"]) == "0\n"
    assert tree.read([*node, "state"]) == "notsync\n"
    assert tree.read([*node, "status"]) == "dirty\n"
    assert tree.read(["vol0", "state"]) == "degraded\n"
    tree.resolve([*node, "clean"]).write("1")
    assert tree.read([*node, "status"]) == "clean\n"
    tree.resolve([*node, "resync_size"]).write("65536\n")
    assert tree.read([*node, "resync_size"]) == "65536\n"
    with pytest.raises(UserError, match="not a number"):
        tree.resolve([*node, "resync_size"]).write("lots")
    # the size limit of the second node shows in its directory and the map
    assert tree.read([*node, "size"]) == f"{16 * KIB}\n"


async def test_resync_progress_is_shown(controlled_storage):
    storage, a, b = controlled_storage
    storage.algorithm.progress = (1024, 4096)
    tree = ControlTree({"vol0": storage})
    assert tree.read(["vol0", "n-0-0", "resync_done"]) == "1024\n"
    assert tree.read(["vol0", "n-0-0", "resync_total"]) == "4096\n"


async def test_algorithm_controls_are_added_but_never_replace_standard_files(
    controlled_storage, caplog
):
    storage, a, b = controlled_storage
    tree = ControlTree({"vol0": storage})
    assert tree.read(["vol0", "verify"]) == "idle\n"
    assert tree.read(["vol0", "name"]) == "vol0\n"
    assert tree.read(["vol0", "n-0-0", "type"]) == "L: /memory/a\n"
    assert "clashes with a standard file" in caplog.text


async def test_resolve_missing_paths_and_paths_through_files(linear_storage):
    storage, a, b = linear_storage
    tree = ControlTree({"vol0": storage})
    assert tree.resolve([]) is tree.root
    assert isinstance(tree.resolve(["vol0", "n-0-0"]), ControlDirectory)
    assert tree.resolve(["nope"]) is None
    assert tree.resolve(["vol0", "n-9-9"]) is None
    assert tree.resolve(["vol0", "size", "deeper"]) is None
    with pytest.raises(KeyError):
        tree.read(["vol0", "n-0-0"])


async def test_names_at_the_top_that_are_not_storages_start_with_a_dot(linear_storage):
    storage, a, b = linear_storage
    with pytest.raises(ValueError, match="must start with '.'"):
        ControlTree({"vol0": storage}, {"daemon": daemon_file()})
    with pytest.raises(ValueError, match="must not start with '.'"):
        ControlTree({".vol0": storage})


async def test_tree_follows_state_changes_without_rebuilding(linear_storage):
    storage, a, b = linear_storage
    tree = ControlTree({"vol0": storage})
    before = tree.read(["vol0", "n-0-0", "requests"])
    a.fail["read"] = NodeError(str(a), "disk on fire", errno=errno.EIO)
    with pytest.raises(NodeError):
        await storage.read(0, 10)
    assert before == "0\n"
    assert tree.read(["vol0", "n-0-0", "requests"]) == "1\n"
    assert tree.read(["vol0", "n-0-0", "errors"]) == "1\n"


def test_daemon_info_round_trips_and_rejects_other_text():
    info = DaemonInfo(
        pid=42, config=Path("/etc/dstfuse/s.yaml"), mountpoint=Path("/mnt/a b"),
        result=Path("/run/dstfuse/mnt-a\\x20b.result"),
    )
    assert DaemonInfo.parse(info.render()) == info
    bare = DaemonInfo(pid=7, config=Path("/c"), mountpoint=Path("/m"))
    assert "result -\n" in bare.render()
    assert DaemonInfo.parse(bare.render()) == bare
    with pytest.raises(ValueError, match="not a dstfuse daemon file"):
        DaemonInfo.parse("hello\n")
    with pytest.raises(ValueError):
        DaemonInfo.parse("pid x\nconfig /c\nmountpoint /m\n")

"""Assembly: config -> started nodes -> algorithms -> storages, in dependency
order; what is exposed as a file; and that a failure closes everything
already opened and names the storage and node."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio

from dstfuse import assembly as assembly_module
from dstfuse.algorithms.linear import Linear
from dstfuse.assembly import open_assembly
from dstfuse.config import load_mount_config
from dstfuse.errors import DstError, NodeError, UserError
from dstfuse.nodes.base import NodeState
from dstfuse.nodes.stacked import StorageNode

from .mounts import free_tcp_port
from .test_control import MemoryNode

KIB = 1024


def make_files(tmp_path, **sizes: int) -> None:
    for name, size in sizes.items():
        path = tmp_path / name
        path.write_bytes(b"")
        os.truncate(path, size)


def config_file(tmp_path, text: str):
    path = tmp_path / "storage.yaml"
    path.write_text(text)
    return load_mount_config(path)


@pytest.fixture
def memory_nodes(monkeypatch):
    """Build every `local:` node as a MemoryNode (64 KiB unless the file name
    says otherwise) so tests can look at the node objects afterwards;
    returns target path -> node."""
    built: dict[str, MemoryNode] = {}

    def make_node(self, storage, spec):
        if spec.kind != "local":
            return original(self, storage, spec)
        node = MemoryNode(os.path.basename(spec.target), 64 * KIB)
        node.address = spec.target  # so messages name the configured path
        node.start_error = failures.get(os.path.basename(spec.target))
        built[os.path.basename(spec.target)] = node
        return node

    original = assembly_module._Builder._make_node
    failures: dict[str, BaseException] = {}
    monkeypatch.setattr(assembly_module._Builder, "_make_node", make_node)
    return built, failures


async def test_linear_over_local_files_is_built_started_and_closed(tmp_path):
    make_files(tmp_path, a=64 * KIB, b=32 * KIB)
    config = config_file(
        tmp_path,
        "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n"
        "      - local: a\n      - local: b\n",
    )
    async with open_assembly(config) as built:
        assert list(built.storages) == ["vol0"] and list(built.exposed) == ["vol0"]
        storage = built.storages["vol0"]
        assert storage.size == 96 * KIB and storage.writable
        await storage.write(60 * KIB, b"y" * 8 * KIB)
        await storage.flush()
        nodes = list(built.nodes)
        assert [n.description for n in nodes] == [f"L: {tmp_path}/a", f"L: {tmp_path}/b"]
        assert len(built.client_id) == 16 and built.client_name.endswith(f":{os.getpid()}")
    assert all(node.state is NodeState.OFFLINE for node in nodes)
    assert (tmp_path / "b").read_bytes()[: 4 * KIB] == b"y" * 4 * KIB


async def test_stacked_storage_uses_the_inner_storage_and_only_the_outer_is_exposed(tmp_path):
    make_files(tmp_path, a=16 * KIB, b=16 * KIB, c=8 * KIB)
    config = config_file(
        tmp_path,
        "storages:\n"
        "  big:\n    algorithm: linear\n    nodes:\n      - local: c\n      - storage: vol0\n"
        "  vol0:\n    algorithm: linear\n    nodes:\n      - local: a\n      - local: b\n",
    )
    async with open_assembly(config) as built:
        assert list(built.storages) == ["vol0", "big"]  # dependency order
        assert list(built.exposed) == ["big"]
        big = built.storages["big"]
        assert big.size == 40 * KIB
        stacked = big.placements()[1].node
        assert isinstance(stacked, StorageNode) and stacked.description == "S: vol0"
        assert stacked.state is NodeState.ONLINE
        # bytes 8K + 20K of big = bytes 20K of vol0 = bytes 4K of b
        await big.write(28 * KIB, b"s" * KIB)
        await big.flush()
        assert stacked.counters.requests == 2 and stacked.counters.bytes_written == KIB
    assert (tmp_path / "b").read_bytes()[4 * KIB : 5 * KIB] == b"s" * KIB


async def test_a_node_that_fails_to_start_closes_every_other_node(tmp_path, memory_nodes):
    built, failures = memory_nodes
    failures["b2"] = NodeError(f"L: {tmp_path}/b2", "cannot open: Permission denied",
                               errno=errno.EACCES)
    config = config_file(
        tmp_path,
        "storages:\n"
        "  one:\n    algorithm: linear\n    nodes:\n      - local: a1\n      - local: a2\n"
        "  two:\n    algorithm: linear\n    nodes:\n      - local: b1\n      - local: b2\n",
    )
    with pytest.raises(UserError) as caught:
        async with open_assembly(config):
            pytest.fail("must not get here")
    message = str(caught.value)
    assert message == (
        f"storage two: node L: {tmp_path}/b2: cannot open: Permission denied (line 11)"
    )
    assert caught.value.errno == errno.EACCES
    assert {name for name, node in built.items() if node.started} == {"a1", "a2", "b1"}
    assert all(node.closed for name, node in built.items() if node.started)


async def test_missing_local_file_names_storage_node_and_line(tmp_path):
    make_files(tmp_path, a=8 * KIB)
    config = config_file(
        tmp_path,
        "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n"
        "      - local: a\n      - local: missing\n",
    )
    with pytest.raises(UserError, match=r"storage vol0: node L: .*/missing: .*line 6"):
        async with open_assembly(config):
            pass


async def test_unreachable_nbd_node_names_storage_node_and_line(tmp_path, memory_nodes):
    built, _ = memory_nodes
    port = free_tcp_port()
    config = config_file(
        tmp_path,
        "timeouts: {connect: 1s}\n"
        "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n"
        f"      - local: a\n      - nbd: nbd://127.0.0.1:{port}/x\n",
    )
    with pytest.raises(UserError) as caught:
        async with open_assembly(config):
            pass
    assert str(caught.value).startswith(f"storage vol0: node N: nbd://127.0.0.1:{port}/x: ")
    assert "connection refused" in str(caught.value) and "(line 7)" in str(caught.value)
    assert built["a"].closed


async def test_size_limit_larger_than_the_node_is_refused(tmp_path, memory_nodes):
    built, _ = memory_nodes
    config = config_file(
        tmp_path,
        "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n"
        "      - local: a\n        size: 1M\n",
    )
    with pytest.raises(UserError, match=r"size 1.0 MiB is larger than the node \(64.0 KiB\)"):
        async with open_assembly(config):
            pass
    assert built["a"].closed


async def test_algorithm_gets_its_options_plus_the_mount_ones(tmp_path, memory_nodes, monkeypatch):
    seen = []

    class Recording(Linear):
        def __init__(self, storage_name, nodes, options):
            super().__init__(storage_name, nodes, options)
            seen.append((storage_name, [(n.description, limit) for n, limit in nodes], options))

    monkeypatch.setattr(assembly_module, "algorithm_class", lambda name: Recording)
    config = config_file(
        tmp_path,
        "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n"
        "      - local: a\n        size: 16K\n      - local: b\n",
    )
    async with open_assembly(
        config, mount_options={"force": True, "x": "1"}, force=True, client_name="h:1",
        client_id=b"i" * 16,
    ):
        pass
    ((name, nodes, options),) = seen
    assert name == "vol0"
    assert nodes == [(f"L: {tmp_path}/a", 16 * KIB), (f"L: {tmp_path}/b", None)]
    assert options == {
        "client_name": "h:1",
        "client_id": b"i" * 16,
        "force": True,
        "mount_options": {"force": True, "x": "1"},
    }


async def test_storage_start_failure_closes_nodes_and_names_the_storage(
    tmp_path, memory_nodes, monkeypatch
):
    built, _ = memory_nodes
    closed = []

    class Refusing(Linear):
        async def start(self, nursery):
            raise DstError("held by client other:99 (mount -o force to take over)")

        async def aclose(self):
            closed.append(self.storage_name)

    monkeypatch.setattr(assembly_module, "algorithm_class", lambda name: Refusing)
    config = config_file(
        tmp_path,
        "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n      - local: a\n",
    )
    with pytest.raises(UserError, match="storage vol0: held by client other:99"):
        async with open_assembly(config):
            pass
    assert built["a"].closed and closed == ["vol0"]


async def test_close_order_is_outer_storage_first(tmp_path, memory_nodes, monkeypatch):
    events = []

    class Tracing(Linear):
        async def aclose(self):
            events.append(f"storage {self.storage_name}")

    original_aclose = MemoryNode.aclose

    async def node_aclose(self):
        events.append(f"node {self.address}")
        await original_aclose(self)

    monkeypatch.setattr(assembly_module, "algorithm_class", lambda name: Tracing)
    monkeypatch.setattr(MemoryNode, "aclose", node_aclose)
    config = config_file(
        tmp_path,
        "storages:\n"
        "  inner:\n    algorithm: linear\n    nodes:\n      - local: a\n"
        "  outer:\n    algorithm: linear\n    nodes:\n      - storage: inner\n      - local: b\n",
    )
    async with open_assembly(config):
        pass
    assert events.index("storage outer") < events.index("storage inner")
    assert events.index("storage inner") < events.index(f"node {tmp_path}/a")
    assert events[0] == "storage outer"


async def test_body_errors_leave_unwrapped_after_closing(tmp_path, memory_nodes):
    built, _ = memory_nodes
    config = config_file(
        tmp_path, "storages:\n  vol0:\n    algorithm: linear\n    nodes:\n      - local: a\n"
    )
    with pytest.raises(KeyError):
        async with open_assembly(config):
            raise KeyError("from the body")
    assert built["a"].closed


@pytest.mark.slow
async def test_unreachable_remote_node_fails_within_the_connect_timeout(tmp_path):
    port = free_tcp_port()
    config = config_file(
        tmp_path,
        "timeouts:\n  connect: 1s\n"
        f"storages:\n  vol0:\n    algorithm: linear\n    nodes:\n"
        f"      - remote: 127.0.0.1:{port}\n",
    )
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"storage vol0: node R: 127.0.0.1:{port}"):
        with trio.fail_after(10):
            async with open_assembly(config):
                pass
    assert time.monotonic() - started < 5


async def test_parts_a_reload_opened_close_after_the_running_storages():
    """A node a reload appended to a running storage is closed after that
    storage's final flush (it was closed first, and an added mirror leg
    made the clean shutdown hang until its timeout)."""
    opened = assembly_module._Opened()
    order: list[str] = []

    def closer(name: str):
        async def close() -> None:
            order.append(name)

        return close

    opened.add("node a", closer("node a"))
    opened.add("storage s", closer("storage s"))
    mark = opened.mark()
    opened.add("node b (appended to s)", closer("node b"))
    opened.add("storage new", closer("storage new"))
    opened.close_last(mark)
    await opened.close_all()
    assert order == ["storage s", "node a", "storage new", "node b"]

"""The export node's hardening, with real export processes, real sockets and
real mounts: an empty file or a file another node process serves is refused
at start; an address the ACL refuses takes no connection slot; one client
identity writes to an export at a time (read-only and `shared` aside), the
holder keeps its grant across a node restart and a taker fences it; and a
client that reconnects thousands of times leaves the node's memory flat."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
from pathlib import Path

import pytest
import trio

from dstfuse.address import parse_address
from dstfuse.config import Timeouts
from dstfuse.errors import NodeError
from dstfuse.nodes.remote import RemoteNode

from .mounts import (
    exported,
    force_unmount,
    free_tcp_port,
    is_mounted,
    mounted,
    run_dstfuse,
    stop_pid,
    write_config,
)
from .rawclient import RawClient

pytestmark = pytest.mark.slow

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
TIMEOUTS = {"resend": "1s", "max_resends": 10, "keepalive": "500ms", "connect": "2s"}


def make_disk(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def linear_config(tmp_path: Path, address: str) -> Path:
    return write_config(
        tmp_path / "linear.yaml",
        {"vol0": {"algorithm": "linear", "nodes": [{"remote": address}]}},
        timeouts=TIMEOUTS,
    )


def write_and_sync(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_back(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def refused_mount(config: Path, mountpoint: Path) -> str:
    """`dstfuse mount` that must fail: its one-line stderr. Should it mount
    after all, the mount and its daemon are removed before the test fails."""
    mountpoint.mkdir(exist_ok=True)
    done = run_dstfuse("mount", config, mountpoint, timeout=60)
    if is_mounted(mountpoint):
        from dstfuse.control import DaemonInfo

        pid = DaemonInfo.parse((mountpoint / ".dst" / ".daemon").read_text()).pid
        force_unmount(mountpoint)
        stop_pid(pid, None)
    assert done.returncode != 0, done.stdout
    return one_line(done.stderr)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# -- refused at start ------------------------------------------------------------


def test_an_empty_file_is_refused_at_start_with_one_line(tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()
    done = run_dstfuse("export", empty, "--listen", f"127.0.0.1:{free_tcp_port()}", timeout=30)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert str(empty) in line and "is empty (0 bytes)" in line, line


@pytest.mark.parametrize(
    ("first", "second"),
    [((), ()), ((), ("--read-only",)), (("--read-only",), ())],
    ids=["rw-then-rw", "rw-then-ro", "ro-then-rw"],
)
def test_a_second_export_process_on_the_same_file_is_refused(tmp_path, first, second):
    disk = make_disk(tmp_path / "disk.img")
    with exported(disk, tmp_path, tcp=True, args=first):
        done = run_dstfuse(
            "export", disk, "--listen", f"127.0.0.1:{free_tcp_port()}", *second, timeout=30
        )
        assert done.returncode == 1
        line = one_line(done.stderr)
        assert str(disk) in line and "locked by another process" in line, line


def test_two_read_only_export_processes_may_share_a_file(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with exported(disk, tmp_path / "a", tcp=True, args=["--read-only"]):
        with exported(disk, tmp_path / "b", tcp=True, args=["--read-only"]) as second:
            assert second.process.poll() is None


# -- refused peers take no slot ------------------------------------------------------


def test_a_refused_address_holding_500_connections_cannot_keep_an_allowed_client_out(tmp_path):
    """127.0.0.2 is outside the ACL (127.0.0.1 only) and opens 500
    connections that it never closes; the handshake timeout is long, so on
    a node that counted them they would fill every slot (256)."""
    disk = make_disk(tmp_path / "disk.img")
    args = ["--allow", "127.0.0.1/32", "--handshake-timeout", "60s"]
    with exported(disk, tmp_path, tcp=True, args=args) as export:
        host, port = export.address.rsplit(":", 1)
        held: list[socket.socket] = []
        try:
            for _ in range(500):
                peer = socket.socket()
                held.append(peer)
                peer.bind(("127.0.0.2", 0))
                peer.connect((host, int(port)))
            config = linear_config(tmp_path, export.address)
            data = os.urandom(MiB)
            with mounted(config, tmp_path / "mnt") as mount:
                write_and_sync(mount.file("vol0"), 4 * MiB, data)
                assert read_back(mount.file("vol0"), 4 * MiB, MiB) == data
                assert mount.umount().returncode == 0
            # Each refused peer was told why and closed at once.
            for peer in (held[0], held[-1]):
                peer.settimeout(5)
                received = b""
                while chunk := peer.recv(4096):
                    received += chunk
                assert b"address 127.0.0.2 is not allowed" in received
        finally:
            for peer in held:
                peer.close()
        log = export.log.read_text()
        # Logged once (rate-limited), not 500 times.
        assert 1 <= log.count("address 127.0.0.2 is not allowed") <= 2, log[-2000:]
    with open(disk, "rb") as file:
        file.seek(4 * MiB)
        assert file.read(MiB) == data


# -- superseded sessions ---------------------------------------------------------------


async def _reconnect_many(address: str, pid: int, count: int) -> tuple[int, int]:
    """One client identity connects `count` times, each new connection
    opened while the previous one is still open (the node retires the old
    one first); the node's RSS after the first 1000 and at the end."""
    client_id = os.urandom(16)
    early = 0
    previous = await RawClient.connect(address, client_id=client_id)
    try:
        # A bound against a hang, far above the ~30 s this takes: a node that
        # walks the whole chain of old sessions at every reconnect (O(n^2))
        # does not get there.
        with trio.fail_after(count * 0.06):
            for index in range(count):
                current = await RawClient.connect(address, client_id=client_id)
                await previous.aclose()
                previous = current
                if index == 1000:
                    early = rss_kib(pid)
        data = os.urandom(4 * KiB)
        assert (await previous.write(0, data)).status == 0
        reply = await previous.read(0, len(data))
        assert reply.status == 0 and bytes(reply.data) == data
    finally:
        await previous.aclose()
    return early, rss_kib(pid)


def test_5000_reconnects_of_one_client_keep_the_node_memory_flat_and_its_log_clean(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    with exported(disk, tmp_path) as export:
        path = parse_address(export.address).path
        early, late = trio.run(_reconnect_many, path, export.process.pid, 5000)
        assert export.process.poll() is None
        log = export.log.read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
    assert "unexpected error" not in log
    # 4000 more sessions came and went: what they left behind, if anything,
    # stays far below one kilobyte each.
    assert late - early < 16 * 1024, (early, late)


# -- one writer per export ---------------------------------------------------------------


def test_a_second_read_write_mount_is_refused_naming_the_holder(tmp_path):
    """Read-only mounts are always allowed, `dstfuse check` works beside the
    writer, and once the writer unmounts another client may write at once."""
    disk = make_disk(tmp_path / "disk.img")
    data = os.urandom(256 * KiB)
    with exported(disk, tmp_path, tcp=True) as export:
        config = linear_config(tmp_path, export.address)
        with mounted(config, tmp_path / "a") as first:
            write_and_sync(first.file("vol0"), 0, data)
            line = refused_mount(config, tmp_path / "b")
            assert "storage vol0" in line and "is written by client" in line, line
            assert f":{first.pid} (127.0.0.1:" in line and " since " in line, line
            with mounted(config, tmp_path / "c", options=["ro"]) as reader:
                assert read_back(reader.file("vol0"), 0, len(data)) == data
                with pytest.raises(OSError) as refused:
                    os.open(reader.file("vol0"), os.O_RDWR)
                assert refused.value.errno == errno.EROFS
            checked = run_dstfuse("check", config, timeout=60)
            assert checked.returncode == 0, checked.stderr
            assert " rw " in checked.stdout, checked.stdout
            write_and_sync(first.file("vol0"), MiB, data)  # the writer goes on
            assert first.umount().returncode == 0
        with mounted(config, tmp_path / "b") as later:
            write_and_sync(later.file("vol0"), 2 * MiB, data)
            assert later.umount().returncode == 0
        assert "is written by client" in export.log.read_text()
    content = disk.read_bytes()
    assert content[:256 * KiB] == content[MiB:MiB + 256 * KiB] == data
    assert content[2 * MiB:2 * MiB + 256 * KiB] == data


def test_a_shared_export_takes_several_writers(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    first_data, second_data = os.urandom(64 * KiB), os.urandom(64 * KiB)
    with exported(disk, tmp_path, tcp=True, args=["--shared"]) as export:
        config = linear_config(tmp_path, export.address)
        with mounted(config, tmp_path / "a") as first, mounted(config, tmp_path / "b") as second:
            write_and_sync(first.file("vol0"), 0, first_data)
            write_and_sync(second.file("vol0"), MiB, second_data)
            assert first.umount().returncode == 0
            assert second.umount().returncode == 0
    content = disk.read_bytes()
    assert content[:64 * KiB] == first_data and content[MiB:MiB + 64 * KiB] == second_data


def test_the_holders_reconnect_after_a_node_restart_is_still_its_own(tmp_path):
    """kill -9 of the node and a restart on the same port: the node forgot
    the grant, the holder reconnects first and writes on; a second client
    is then refused as before."""
    disk = make_disk(tmp_path / "disk.img")
    port = free_tcp_port()
    data = os.urandom(128 * KiB)
    (tmp_path / "n1").mkdir()
    (tmp_path / "n2").mkdir()
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(exported(disk, tmp_path / "n1", port=port))
        config = linear_config(tmp_path, node.address)
        with mounted(config, tmp_path / "a") as first:
            write_and_sync(first.file("vol0"), 0, data)
            os.kill(node.process.pid, signal.SIGKILL)
            stop_pid(node.process.pid, node.process)
            stack.enter_context(exported(disk, tmp_path / "n2", port=port))
            write_and_sync(first.file("vol0"), MiB, data)  # reconnected, still the writer
            assert f":{first.pid} (127.0.0.1:" in refused_mount(config, tmp_path / "b")
            assert first.umount().returncode == 0
    content = disk.read_bytes()
    assert content[:128 * KiB] == content[MiB:MiB + 128 * KiB] == data


async def _fence(address: str) -> tuple[NodeError, float]:
    timeouts = Timeouts(resend=1.0, max_resends=10, keepalive=0.5, connect=2.0)
    async with trio.open_nursery() as nursery:
        first = RemoteNode(
            parse_address(address), export=None, timeouts=timeouts, key=None,
            client_name="first",
        )
        second = RemoteNode(
            parse_address(address), export=None, timeouts=timeouts, key=None,
            client_name="second", take_over=True,
        )
        try:
            await first.start(nursery)
            await first.write(0, b"a" * 4096)
            await second.start(nursery)  # ends first's connection
            await second.write(4096, b"b" * 4096)
            started = trio.current_time()
            with pytest.raises(NodeError) as caught:
                await first.write(8192, b"c" * 4096)
            elapsed = trio.current_time() - started
            await second.flush()
        finally:
            await second.aclose()
            await first.aclose()
            nursery.cancel_scope.cancel()
    return caught.value, elapsed


def test_a_taker_fences_the_old_holder_whose_writes_fail_at_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dstfuse")
    disk = make_disk(tmp_path / "disk.img")
    with exported(disk, tmp_path) as export:
        error, elapsed = trio.run(_fence, export.address)
        log = export.log.read_text()
    assert error.errno == errno.EIO and "fenced" in str(error), error
    assert "is written by client second" in str(error), error
    assert elapsed < 5  # the budget is 11 s: no resend loop
    assert any("fenced" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert "takes over the write grant from client first" in log
    content = disk.read_bytes()
    assert content[:4096] == b"a" * 4096 and content[4096:8192] == b"b" * 4096
    assert content[8192:12288] == bytes(4096)


async def _probe_then_take(address: str) -> tuple[bytes, NodeError, int]:
    timeouts = Timeouts(resend=1.0, max_resends=10, keepalive=0.5, connect=2.0)
    async with trio.open_nursery() as nursery:
        first = RemoteNode(
            parse_address(address), export=None, timeouts=timeouts, key=None,
            client_name="first",
        )
        second = RemoteNode(
            parse_address(address), export=None, timeouts=timeouts, key=None,
            client_name="second", probe=True,
        )
        try:
            await first.start(nursery)
            await first.write(0, b"a" * 4096)
            await second.start(nursery)  # probing: reads, takes nothing
            seen = await second.read(0, 4096)
            await first.write(4096, b"b" * 4096)  # still the writer
            await second.take_write_grant()  # ends first's connection
            await second.write(8192, b"c" * 4096)
            with pytest.raises(NodeError) as caught:
                await first.write(8192, b"X" * 4096)
            await second.flush()
            reconnects = second.counters.reconnects
        finally:
            await second.aclose()
            await first.aclose()
            nursery.cancel_scope.cancel()
    return seen, caught.value, reconnects


def test_a_probing_node_displaces_nobody_until_it_takes_the_grant(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    with exported(disk, tmp_path) as export:
        seen, error, reconnects = trio.run(_probe_then_take, export.address)
        log = export.log.read_text()
    assert seen == b"a" * 4096
    assert error.errno == errno.EIO and "fenced" in str(error), error
    assert reconnects == 0  # taking the grant is no connection loss
    assert log.count("takes over the write grant from client first") == 1
    content = disk.read_bytes()
    assert content[:8192] == b"a" * 4096 + b"b" * 4096
    assert content[8192:12288] == b"c" * 4096


async def _take_at_once(address: str) -> bytes:
    timeouts = Timeouts(resend=1.0, max_resends=10, keepalive=0.5, connect=2.0)
    async with trio.open_nursery() as nursery:
        node = RemoteNode(
            parse_address(address), export=None, timeouts=timeouts, key=None,
            client_name="mirror", probe=True,
        )
        try:
            await node.start(nursery)
            await node.take_write_grant()  # before the probe session was served
            await node.write(0, b"d" * 4096)
            await node.flush()
            return await node.read(0, 4096)
        finally:
            await node.aclose()
            nursery.cancel_scope.cancel()


def test_a_node_that_takes_the_grant_right_after_start_writes(tmp_path):
    disk = make_disk(tmp_path / "disk.img")
    with exported(disk, tmp_path) as export:
        assert trio.run(_take_at_once, export.address) == b"d" * 4096
    assert disk.read_bytes()[:4096] == b"d" * 4096

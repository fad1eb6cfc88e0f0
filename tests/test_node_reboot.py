"""A node host reboot and a node restarted with other limits, with real
export processes, a real mount and real sockets.

A reboot is simulated as the issue describes: the node is killed (-9), its
file is put back to the state saved right after the last successful fsync
(what a power loss leaves on disk), and it is restarted on the same port
with another boot id (DSTFUSE_BOOT_ID). The write acknowledged in between
is then only in the client's memory."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import trio
import yaml

from dstfuse.address import parse_address
from dstfuse.config import Timeouts
from dstfuse.nodes.remote import RemoteNode

from .mounts import (
    DSTFUSE,
    START_TIMEOUT,
    SetupFailed,
    dstfuse_env,
    exported,
    free_tcp_port,
    mounted,
    stop_pid,
    tail,
    write_config,
)

pytestmark = pytest.mark.slow

SIZE = 8 << 20
TIMEOUTS = {"resend": "1s", "max_resends": 10, "keepalive": "500ms", "connect": "2s"}
FLUSHED = b"F" * 65536
UNFLUSHED = b"U" * 65536
AT = 1 << 20


def make_disk(path: Path) -> Path:
    with open(path, "wb") as disk:
        disk.truncate(SIZE)
    return path


def revert(disk: Path, saved: bytes) -> None:
    """Put the file back to `saved` in place (same inode: only the boot id
    tells the client that the node rebooted)."""
    with open(disk, "r+b") as file:
        file.write(saved)


def reboot_under_a_mount(tmp_path: Path, **settings: object) -> tuple[int | None, str, Path]:
    """Write FLUSHED and fsync, save the file, write UNFLUSHED at AT, reboot
    the node; return (errno of the fsync after it or None, the mount's
    log, the node's file)."""
    disk = make_disk(tmp_path / "disk.img")
    port = free_tcp_port()
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first_boot = {"DSTFUSE_BOOT_ID": str(uuid.uuid4())}
    # the restarted node outlives the mount, so that unmounting can flush
    with ExitStack() as restarted, exported(
        disk, tmp_path / "first", port=port, env=first_boot
    ) as node:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"remote": node.address}]}},
            timeouts=TIMEOUTS,
            **settings,
        )
        with mounted(config, tmp_path / "mnt") as mount:
            fd = os.open(mount.file("vol"), os.O_RDWR)
            try:
                assert os.pwrite(fd, FLUSHED, 0) == len(FLUSHED)
                os.fsync(fd)
                saved = disk.read_bytes()
                assert os.pwrite(fd, UNFLUSHED, AT) == len(UNFLUSHED)  # acknowledged
                node.process.send_signal(signal.SIGKILL)
                node.process.wait()
                revert(disk, saved)
                second_boot = {"DSTFUSE_BOOT_ID": str(uuid.uuid4())}
                restarted.enter_context(
                    exported(disk, tmp_path / "second", port=port, env=second_boot)
                )
                try:
                    os.fsync(fd)
                    failure = None
                except OSError as exc:
                    failure = exc.errno
                os.fsync(fd)  # an error is reported once, to the next fsync
                log = mount.log_tail(200)
            finally:
                os.close(fd)
    return failure, log, disk


def test_node_reboot_replays_the_unflushed_write_and_fsync_succeeds(tmp_path):
    failure, log, disk = reboot_under_a_mount(tmp_path)
    assert failure is None, log
    content = disk.read_bytes()
    assert content[:len(FLUSHED)] == FLUSHED
    assert content[AT : AT + len(UNFLUSHED)] == UNFLUSHED
    assert "came back as a new instance" in log and "resending 1 unflushed writes" in log


def test_node_reboot_without_kept_writes_fails_fsync_with_eio_naming_the_node(tmp_path):
    failure, log, disk = reboot_under_a_mount(tmp_path, unflushed_limit=0)
    assert failure == errno.EIO, log
    (line,) = [line for line in log.splitlines() if "nodes.remote" in line and "were lost" in line]
    assert "storage vol, node R: 127.0.0.1:" in line
    assert "1 acknowledged, unflushed writes (65536 bytes) were lost" in line
    assert disk.read_bytes()[AT : AT + len(UNFLUSHED)] == bytes(len(UNFLUSHED))


@contextmanager
def export_with_config(tmp_path: Path, disk: Path, port: int, max_request: str, name: str):
    """`dstfuse export --config` serving `disk` as "disk" on 127.0.0.1:port."""
    directory = tmp_path / name
    directory.mkdir()
    config = directory / "export.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": [f"127.0.0.1:{port}"],
                "max_request": max_request,
                "exports": [{"name": "disk", "path": str(disk)}],
            }
        )
    )
    log = directory / "export.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [*DSTFUSE, "export", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=dstfuse_env(),
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SetupFailed(f"dstfuse export did not start:\n{tail(log)}")
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        stop_pid(process.pid, process)


async def test_node_restarted_with_a_smaller_max_request_keeps_serving(tmp_path, caplog):
    disk = make_disk(tmp_path / "disk.img")
    port = free_tcp_port()
    timeouts = Timeouts(resend=1.0, max_resends=10, keepalive=0.5, connect=2.0)
    blocks = [os.urandom(1 << 20) for _ in range(SIZE >> 20)]
    stop = trio.Event()
    # the restarted node outlives the writers, the flush and the read
    with ExitStack() as restarted, export_with_config(tmp_path, disk, port, "1M", "first") as first:
        async with trio.open_nursery() as nursery:
            node = RemoteNode(
                parse_address(f"127.0.0.1:{port}"), export="disk", timeouts=timeouts, key=None,
                max_in_flight=4,
            )
            await node.start(nursery)
            assert node.max_request == 1 << 20

            async def writer(first_block: int) -> None:
                """Writes its blocks over and over until told to stop."""
                while not stop.is_set():
                    for index in range(first_block, len(blocks), 2):
                        await node.write(index << 20, blocks[index])

            async with trio.open_nursery() as writers:
                writers.start_soon(writer, 0)
                writers.start_soon(writer, 1)
                await trio.sleep(0.3)
                first.kill()  # -9 with 1 MiB writes in flight
                first.wait()
                await trio.sleep(0.5)  # the writers' requests wait, in flight
                restarted.enter_context(export_with_config(tmp_path, disk, port, "64K", "second"))
                while not node.counters.reconnects:
                    await trio.sleep(0.05)
                written = node.counters.bytes_written
                while node.counters.bytes_written < written + 2 * SIZE:
                    await trio.sleep(0.05)
                stop.set()
            assert node.max_request == 64 << 10
            await node.flush()
            assert await node.read(0, 1 << 20) == blocks[0]  # reads split too
            await node.aclose()
            nursery.cancel_scope.cancel()
    assert disk.read_bytes() == b"".join(blocks)
    messages = [r.getMessage() for r in caplog.records]
    assert any("node now takes requests of up to 65536 bytes (was 1048576)" in m for m in messages)
    # the writes in flight across the restart were split, not refused
    assert any("larger than the node's maximum request of 65536 bytes" in m for m in messages)

"""Faults under a real mount and loop device: a linear storage over two
export processes keeps every write while one node is paused and the other
is killed and restarted; a node gone for good gives the writer EIO, shows
offline in status, and nothing hangs."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from .mounts import (
    exported,
    free_tcp_port,
    loop_device,
    mounted,
    require_loop,
    run_dstfuse,
    write_config,
)

pytestmark = pytest.mark.slow

NODE = 32 << 20
BLOCK = 1 << 20
TIMEOUTS = {"resend": "1s", "max_resends": 10, "keepalive": "500ms", "connect": "2s"}


def make_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(NODE)
    return path


def write_device(device: str, blocks: list[tuple[int, bytes]], errors: list[BaseException]):
    """Write each (offset, data) to the device with O_DIRECT, in order (the
    buffer is an anonymous mmap: page-aligned, as O_DIRECT needs)."""
    try:
        fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, BLOCK) as aligned:
                for offset, data in blocks:
                    aligned.seek(0)
                    aligned.write(data)
                    assert os.pwritev(fd, [aligned], offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:  # handed to the test thread
        errors.append(exc)


def read_device(device: str, size: int) -> bytes:
    with open(device, "rb", buffering=0) as f:
        return f.read(size)


def test_node_paused_and_node_killed_and_restarted_during_loop_writes_lose_nothing(tmp_path):
    require_loop()
    left, right = make_disk(tmp_path / "left.img"), make_disk(tmp_path / "right.img")
    right_port = free_tcp_port()
    (tmp_path / "restart").mkdir()
    blocks = [(index * BLOCK, os.urandom(BLOCK)) for index in range(2 * NODE // BLOCK)]
    with (
        exported(left, tmp_path, tcp=True) as left_node,
        exported(right, tmp_path, port=right_port) as right_node,
    ):
        config = write_config(
            tmp_path / "storage.yaml",
            {
                "vol": {
                    "algorithm": "linear",
                    "nodes": [
                        {"remote": left_node.address},
                        {"remote": right_node.address},
                    ],
                }
            },
            timeouts=TIMEOUTS,
        )
        with mounted(config, tmp_path / "mnt") as mount, loop_device(mount.file("vol")) as dev:
            errors: list[BaseException] = []
            writer = threading.Thread(target=write_device, args=(dev, blocks, errors))
            writer.start()
            try:
                time.sleep(0.5)
                os.kill(left_node.process.pid, signal.SIGSTOP)  # paused: within the budget
                time.sleep(3)
                os.kill(left_node.process.pid, signal.SIGCONT)
                time.sleep(0.5)
                right_node.process.kill()  # -9, then back on the same port
                right_node.process.wait()
                time.sleep(1)
                with exported(right, tmp_path / "restart", port=right_port):
                    writer.join(timeout=120)
                    assert not writer.is_alive()
                    assert errors == []
                    image = read_device(dev, 2 * NODE)
                    assert image == b"".join(data for _, data in blocks)
                    status = json.loads(run_dstfuse("status", "--json", mount.mountpoint).stdout)
                    assert status["storages"]["vol"]["state"] == "clean"
                    reconnects = int(mount.control("vol", "n-33554432-1", "reconnects"))
                    assert reconnects >= 1
            finally:
                os.kill(left_node.process.pid, signal.SIGCONT)
                writer.join(timeout=120)
    # the node files hold exactly what was written, at the right offsets
    assert (
        hashlib.sha256(left.read_bytes()).digest()
        == hashlib.sha256(b"".join(data for _, data in blocks[: NODE // BLOCK])).digest()
    )
    assert right.read_bytes() == b"".join(data for _, data in blocks[NODE // BLOCK :])


def test_node_gone_for_good_gives_eio_shows_offline_and_nothing_hangs(tmp_path):
    image = make_disk(tmp_path / "disk.img")
    budget = {"resend": "500ms", "max_resends": 2, "keepalive": "500ms", "connect": "1s"}
    with exported(image, tmp_path, tcp=True) as node:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"remote": node.address}]}},
            timeouts=budget,
        )
        with mounted(config, tmp_path / "mnt") as mount:
            with open(mount.file("vol"), "r+b", buffering=0) as f:
                f.write(b"before" * 1000)
            node.process.kill()
            node.process.wait()
            start = time.monotonic()
            with pytest.raises(OSError) as info:
                with open(mount.file("vol"), "r+b", buffering=0) as f:
                    f.write(b"after" * 1000)
            assert info.value.errno == errno.EIO
            assert time.monotonic() - start < 10
            status = json.loads(run_dstfuse("status", "--json", mount.mountpoint).stdout)
            assert status["storages"]["vol"]["nodes"][0]["state"] == "offline"
            assert node.address in mount.log_tail(200)
            start = time.monotonic()
            done = mount.umount(timeout=60)
            assert time.monotonic() - start < 30
            assert done.returncode == 1 and "flush" in done.stderr

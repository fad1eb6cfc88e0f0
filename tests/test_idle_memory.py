"""A mount daemon that wrote a burst gives its free heap back once it is
quiet: a real export process, a real mount, writes through the storage
file, and the daemon's resident memory read from /proc."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from .mounts import exported, mounted, run, write_config

pytestmark = pytest.mark.slow

MiB = 1 << 20
BURST = 96 * MiB
#: The daemon's IDLE_PERIOD is 2 s: a quiet spell is seen within two periods.
SETTLE = 20.0


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_quiet_mount_daemon_returns_what_a_write_burst_left_in_its_heap(tmp_path):
    """96 MiB of 1 MiB writes, 8 at once, kept for replay until the fsync releases
    them (so the heap has held up to the 64 MiB replay buffer and the
    requests in flight); once the daemon is quiet, its resident memory must
    fall by at least a third of the burst. Without the return, glibc keeps
    the freed buffers below the heap's top, and the daemon stays at its
    high-water mark."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as file:
        file.truncate(BURST)
    with exported(disk, tmp_path, tcp=True) as node:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"remote": node.address}]}},
        )
        with mounted(config, tmp_path / "mnt") as mount:
            run(
                "fio", "--name=burst", f"--filename={mount.file('vol')}", "--rw=write",
                "--bs=1M", "--iodepth=8", "--ioengine=libaio", "--direct=1",
                f"--size={BURST}", "--end_fsync=1", "--output-format=terse",
            )  # fmt: skip
            after_burst = resident(mount.pid)
            deadline = time.monotonic() + SETTLE
            while (now := resident(mount.pid)) > after_burst - BURST // 3:
                assert time.monotonic() < deadline, (
                    f"resident {now >> 20} MiB {SETTLE:g} s after the burst, "
                    f"{after_burst >> 20} MiB right after it"
                )
                time.sleep(0.5)

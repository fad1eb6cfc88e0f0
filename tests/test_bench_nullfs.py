"""The benchmark's null file system (benchmarks/bench/nullfs.py, `run.py
--floor`): a real FUSE mount through dstfuse's FuseSession that lists one
file of the size asked for, reads zeros, takes writes, and ends on SIGTERM
with the mount gone; and the plan that --floor makes."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from benchmarks.bench.plan import make_plan
from benchmarks.bench.system import is_mounted

from .mounts import REPO, force_unmount, require_fuse

MiB = 1 << 20


def plan_arguments(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = dict(
        size=None, quick=True, runtime=None, ramp=None, fill_cap=None, jobs=None,
        self_test=False, mirror=False, key=False, floor=False, repeat=1,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_floor_adds_the_null_file_system_against_nbdfuse_and_dstfuse():
    plan = make_plan(plan_arguments(floor=True))
    assert ("nullfs", "nullfs", {}) in plan.peers
    pairs = [(subject, baseline) for _, subject, baseline, _ in plan.comparisons]
    assert ("nullfs", "nbdfuse") in pairs and ("dstfuse", "nullfs") in pairs
    assert not any("nullfs" in pair for pair in [
        (s, b) for _, s, b, _ in make_plan(plan_arguments()).comparisons
    ])  # fmt: skip


def test_the_null_file_system_serves_one_file_of_zeros_and_takes_writes(tmp_path):
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    size = 64 * MiB
    log = open(tmp_path / "nullfs.log", "wb")
    script = REPO / "benchmarks" / "bench" / "nullfs.py"
    process = subprocess.Popen(
        [sys.executable, str(script), str(mountpoint), str(size)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "nullfs.pid").exists() or not is_mounted(mountpoint):
            assert process.poll() is None, (tmp_path / "nullfs.log").read_text()
            assert time.monotonic() < deadline, "the null file system never mounted"
            time.sleep(0.05)
        assert int((tmp_path / "nullfs.pid").read_text()) == process.pid
        assert os.listdir(mountpoint) == ["bench"]
        target = mountpoint / "bench"
        assert target.stat().st_size == size
        fd = os.open(target, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\xff" * 4096, 8192) == 4096
            assert os.pread(fd, 2 * MiB, 0) == bytes(2 * MiB)
            assert os.pread(fd, 4096, size - 1024) == bytes(1024)  # short at the end
            assert os.pread(fd, 4096, size) == b""
        finally:
            os.close(fd)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "nullfs.log").read_text()
        assert not is_mounted(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        if is_mounted(mountpoint):
            force_unmount(mountpoint)
        log.close()

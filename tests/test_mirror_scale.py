"""A mirror's metadata grows with the data written, not with the storage's
size: an 8 TiB mirror on sparse leg files (real export processes, a real
mount, mkfs.ext4 through a loop device) allocates little on its legs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .mounts import loop_device, mounted, require_loop, run
from .test_mirror_e2e import leg_exports, mirror_config

pytestmark = pytest.mark.slow

MiB = 1 << 20
TiB = 1 << 40
SCRATCH = Path("/var/tmp")  # ext4: fallocate allocates as on a real deployment


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_new_8_tib_mirror_and_mkfs_allocate_little_on_its_legs(tmp_path):
    require_loop()
    work = Path(os.path.realpath(SCRATCH)) / f"dstfuse-scale-{os.getpid()}"
    work.mkdir()
    try:
        with leg_exports(work, 2, 8 * TiB) as legs:
            config = mirror_config(work, legs)
            with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
                with loop_device(mount.file("vol0")) as device:
                    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1",
                        "-J", "size=64", device, timeout=600)
                assert mount.umount().returncode == 0
            sizes = [allocated(leg.path) for leg in legs]
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
    # mkfs writes about 200 MiB here (64 MiB of journal); the check array is
    # 16 GiB, allocated whole when it was zeroed with write-zeroes
    assert max(sizes) < 512 * MiB, [size // MiB for size in sizes]

"""End to end: a storage file as a loop device (direct I/O) with ext4 on it,
across an unmount and a second mount: fsck clean, every file intact."""

from __future__ import annotations

import hashlib
import os

import pytest

from .mounts import ext4_mounted, loop_device, mounted, require_loop, run, write_config

pytestmark = pytest.mark.slow

MiB = 1 << 20


def checksums(directory) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(directory))
        if (directory / name).is_file()
    }


def test_ext4_on_a_loop_device_survives_unmount_and_remount(tmp_path):
    require_loop()
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for path, size in ((a, 48 * MiB), (b, 80 * MiB)):
        path.write_bytes(b"")
        os.truncate(path, size)
    config = write_config(
        tmp_path / "storage.yaml",
        {"vol0": {"algorithm": "linear", "nodes": [{"local": str(a)}, {"local": str(b)}]}},
    )
    mountpoint = tmp_path / "mnt"
    files = {f"file{i}": os.urandom(size) for i, size in enumerate([3 * MiB, 1, 700_000, 2 * MiB])}

    with mounted(config, mountpoint) as mount:
        with loop_device(mount.file("vol0")) as device:
            assert run("losetup", "-nO", "DIO", device).stdout.strip() == "1"
            with ext4_mounted(device, tmp_path / "ext4") as ext4:
                for name, data in files.items():
                    (ext4 / name).write_bytes(data)
                (ext4 / "sub").mkdir()
                (ext4 / "sub" / "nested").write_bytes(os.urandom(MiB))
                written = checksums(ext4)
                nested = hashlib.sha256((ext4 / "sub" / "nested").read_bytes()).hexdigest()
                run("fstrim", "-v", ext4, check=False)  # discard reaches fallocate
        done = mount.umount()
        assert done.returncode == 0, done.stderr

    with mounted(config, mountpoint) as mount:
        with loop_device(mount.file("vol0")) as device:
            fsck = run("fsck.ext4", "-fn", device, check=False)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            with ext4_mounted(device, tmp_path / "ext4", mkfs=False) as ext4:
                assert checksums(ext4) == written
                assert {name: len((ext4 / name).read_bytes()) for name in files} == {
                    name: len(data) for name, data in files.items()
                }
                assert hashlib.sha256((ext4 / "sub" / "nested").read_bytes()).hexdigest() == (
                    nested
                )
        assert mount.umount().returncode == 0

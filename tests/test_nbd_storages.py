"""Storages over nbd: nodes end to end: real NBD servers (nbdkit memory and
file, qemu-nbd serving a qcow2), a real `dstfuse mount`, ext4 on a loop
device over the storage file, `fsck -fn` clean and file checksums right;
a mirror with one `dstfuse export` leg and one nbdkit leg (legs identical,
`dstfuse verify` says it reads the NBD leg); stacking; and nbdkit killed
with -9 and restarted under a writer that sees no error.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from .mounts import (
    ext4_mounted,
    free_tcp_port,
    loop_device,
    mounted,
    require_loop,
    run,
    run_dstfuse,
    write_config,
)
from .nbdservers import nbdkit, qcow2_image, qemu_nbd
from .test_mirror_e2e import (
    FAST_TIMEOUTS,
    data_area,
    file_digests,
    leg_exports,
    pread_direct,
    pwrite_direct,
    status,
    storage_size,
    wait_state,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def ext4_round_trip(storage_file: Path, tmp_path: Path) -> dict[str, str]:
    """mkfs.ext4 on a loop device over `storage_file`, files written and
    synced, fsck -fn clean, and the files read back after a remount."""
    with loop_device(storage_file) as device:
        with ext4_mounted(device, tmp_path / "ext4") as ext4:
            (ext4 / "dir").mkdir()
            for index in range(10):
                (ext4 / "dir" / f"f{index}").write_bytes(os.urandom(900_000 + index * 4099))
            os.sync()
            written = file_digests(ext4)
        fsck = run("fsck.ext4", "-fn", device, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with ext4_mounted(device, tmp_path / "ext4", mkfs=False) as ext4:
            assert file_digests(ext4) == written
    return written


def node_types(mount, storage: str) -> list[str]:
    return [line.split(" ", 3)[3] for line in mount.control(storage, "nodes").splitlines()]


def test_linear_and_stacked_storages_over_nbdkit_carry_ext4(tmp_path):
    require_loop()
    disk = make_file(tmp_path / "disk.img", 48 * MiB)
    with (
        nbdkit(tmp_path, ["memory", "size=48M"]) as memory,
        nbdkit(tmp_path, ["file", str(disk)], unix=True) as file,
    ):
        config = write_config(
            tmp_path / "storage.yaml",
            {
                "inner": {"algorithm": "linear", "nodes": [{"nbd": memory.uri}]},
                "vol0": {
                    "algorithm": "linear",
                    "nodes": [{"storage": "inner"}, {"nbd": file.uri}],
                },
            },
            timeouts=FAST_TIMEOUTS,
        )
        checked = run_dstfuse("check", config)
        assert checked.returncode == 0, checked.stderr
        assert f"N: {memory.uri}" in checked.stdout and "plain" in checked.stdout
        with mounted(config, tmp_path / "mnt") as mount:
            assert node_types(mount, "inner") == [f"N: {memory.uri}"]
            assert node_types(mount, "vol0") == ["S: inner", f"N: {file.uri}"]
            assert storage_size(mount) == 96 * MiB
            ext4_round_trip(mount.file("vol0"), tmp_path)
            assert mount.umount().returncode == 0


def test_linear_storage_over_qemu_nbd_qcow2_carries_ext4(tmp_path):
    require_loop()
    image = qcow2_image(tmp_path / "disk.qcow2", "96M")
    with qemu_nbd(tmp_path, image) as server:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol0": {"algorithm": "linear", "nodes": [{"nbd": server.uri}]}},
            timeouts=FAST_TIMEOUTS,
        )
        with mounted(config, tmp_path / "mnt") as mount:
            assert node_types(mount, "vol0") == [f"N: {server.uri}"]
            written = ext4_round_trip(mount.file("vol0"), tmp_path)
            assert mount.umount().returncode == 0
    # the qcow2 holds the filesystem: served again, it mounts with the same files
    with qemu_nbd(tmp_path, image) as server:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol0": {"algorithm": "linear", "nodes": [{"nbd": server.uri}]}},
        )
        with mounted(config, tmp_path / "mnt") as mount:
            with loop_device(mount.file("vol0")) as device:
                with ext4_mounted(device, tmp_path / "ext4", mkfs=False) as ext4:
                    assert file_digests(ext4) == written
            assert mount.umount().returncode == 0


def test_mirror_of_a_dstfuse_export_and_an_nbd_leg_carries_ext4_and_verifies(tmp_path):
    require_loop()
    size = 96 * MiB
    nbd_disk = make_file(tmp_path / "nbdleg.img", size)
    with (
        leg_exports(tmp_path, count=1, size=size) as legs,
        nbdkit(tmp_path, ["file", str(nbd_disk)]) as server,
    ):
        storage = {
            "algorithm": "mirror",
            "nodes": [{"remote": legs[0].listen}, {"nbd": server.uri}],
        }
        config = write_config(tmp_path / "storage.yaml", {"vol0": storage}, timeouts=FAST_TIMEOUTS)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            data_size = storage_size(mount)
            ext4_round_trip(mount.file("vol0"), tmp_path)
            verified = run_dstfuse("verify", mount.mountpoint, "vol0")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert "legs are equal" in verified.stdout
            assert f"leg N: {server.uri} is an NBD server" in verified.stderr
            assert mount.umount().returncode == 0
        # the legs hold the same bytes (each has its metadata after the data)
        assert data_area(legs[0], data_size) == nbd_disk.read_bytes()[:data_size]


def test_nbdkit_killed_and_restarted_under_a_writer_loses_nothing(tmp_path):
    """kill -9 of nbdkit (file plugin) while a writer writes through the
    FUSE file, restarted on the same port a second later: no write fails,
    and the storage and the file behind nbdkit hold every byte written."""
    disk = make_file(tmp_path / "disk.img", 32 * MiB)
    with nbdkit(tmp_path, ["file", str(disk)]) as server:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol0": {"algorithm": "linear", "nodes": [{"nbd": server.uri}]}},
            timeouts=FAST_TIMEOUTS,  # a 2.5 s budget: the outage is shorter
        )
        with mounted(config, tmp_path / "mnt") as mount:
            expected = bytearray(32 * MiB)
            errors: list[BaseException] = []
            stop = threading.Event()

            def writer() -> None:
                fd = os.open(mount.file("vol0"), os.O_RDWR | os.O_DIRECT)
                try:
                    index = 0
                    while not stop.is_set() and index < 2000:
                        offset = (index * 37 % 512) * 65536
                        data = os.urandom(65536)
                        pwrite_direct(fd, offset, data)
                        expected[offset : offset + 65536] = data
                        index += 1
                    os.fsync(fd)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                finally:
                    os.close(fd)

            thread = threading.Thread(target=writer)
            thread.start()
            try:
                time.sleep(0.5)
                server.kill()
                time.sleep(1.0)
                server.start()
                time.sleep(1.0)
            finally:
                stop.set()
                thread.join(60)
            assert not thread.is_alive()
            assert errors == []
            reconnects = int(mount.control("vol0", "n-0-0", "reconnects"))
            assert reconnects >= 1
            fd = os.open(mount.file("vol0"), os.O_RDONLY | os.O_DIRECT)
            try:
                assert pread_direct(fd, 0, 32 * MiB) == expected
            finally:
                os.close(fd)
            assert mount.umount().returncode == 0
    assert disk.read_bytes() == expected


def test_qemu_img_convert_onto_a_storage_file_needs_n(tmp_path):
    """docs/operations.md, "dstfuse for VMs": the storage file cannot be
    recreated, so convert writes into it with -n; compare agrees."""
    source = qcow2_image(tmp_path / "source.qcow2", "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x17 9M 64k", source)
    with nbdkit(tmp_path, ["memory", "size=32M"]) as server:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol0": {"algorithm": "linear", "nodes": [{"nbd": server.uri}]}},
        )
        with mounted(config, tmp_path / "mnt") as mount:
            target = mount.file("vol0")
            refused = run("qemu-img", "convert", "-O", "raw", source, target, check=False)
            assert refused.returncode != 0
            run("qemu-img", "convert", "-n", "-O", "raw", "-t", "none", source, target)
            # the storage is larger than the image: compare the image's part
            compared = run(
                "qemu-img", "compare", "-f", "qcow2", "-F", "raw", source, target, check=False
            )
            assert compared.returncode == 0, compared.stdout + compared.stderr
            assert mount.umount().returncode == 0


def test_a_mirror_whose_nbd_leg_is_down_mounts_degraded_and_resyncs_it(tmp_path):
    """The NBD leg may start offline like a remote one: mounted with
    -o force while nbdkit is down, written, then nbdkit comes up on the
    configured port and the leg is resynced."""
    size = 64 * MiB
    nbd_disk = make_file(tmp_path / "nbdleg.img", size)
    port = free_tcp_port()
    uri = f"nbd://127.0.0.1:{port}/"
    with leg_exports(tmp_path, count=1, size=size) as legs:
        storage = {"algorithm": "mirror", "nodes": [{"remote": legs[0].listen}, {"nbd": uri}]}
        config = write_config(tmp_path / "storage.yaml", {"vol0": storage}, timeouts=FAST_TIMEOUTS)
        with nbdkit(tmp_path, ["file", str(nbd_disk)], port=port):
            with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
                data_size = storage_size(mount)
                assert mount.umount().returncode == 0
        with mounted(config, tmp_path / "mnt", options=["force"]) as mount:
            degraded = status(mount)
            assert degraded["state"] == "degraded"
            assert degraded["nodes"][1]["state"] == "offline"
            payload = os.urandom(3 * MiB)
            with open(mount.file("vol0"), "r+b", buffering=0) as f:
                f.write(payload)
            with nbdkit(tmp_path, ["file", str(nbd_disk)], port=port):
                clean = wait_state(mount, "clean")
                assert clean["nodes"][1]["resync_total"] > 0
                assert mount.umount().returncode == 0
    assert data_area(legs[0], data_size) == nbd_disk.read_bytes()[:data_size]
    assert nbd_disk.read_bytes()[: len(payload)] == payload

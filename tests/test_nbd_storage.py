"""A mount's storages over NBD (`nbd_listen:` in storage.yaml): a mirrored
storage of two real export nodes, mounted for real, used by qemu-img,
qemu-io and nbdcopy over the mount's unix socket, and seen the same
through the FUSE file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from dstfuse.address import Address
from dstfuse.config import load_mount_config
from dstfuse.errors import ConfigError

from .mounts import exported, mounted, write_config
from .nbdpeers import nbd_python, require, run

MiB = 1 << 20


@pytest.fixture
def socket_directory():
    # Short: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="dstn-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_mount_config_nbd_listen(tmp_path):
    storages = {"vol0": {"algorithm": "linear", "nodes": [{"local": "/dev/null"}]}}
    config = write_config(tmp_path / "storage.yaml", storages,
                          nbd_listen=["unix:/run/dstfuse/vol.sock", "127.0.0.1"])
    assert load_mount_config(config).nbd_listen == (
        Address.unix("/run/dstfuse/vol.sock"), Address("tcp", "127.0.0.1", 10809))
    assert load_mount_config(write_config(tmp_path / "s.yaml", storages)).nbd_listen == ()
    with pytest.raises(ConfigError, match="nbd_listen"):
        load_mount_config(write_config(tmp_path / "s.yaml", storages, nbd_listen="unix:rel"))


@pytest.mark.slow
def test_a_mirrored_storage_served_by_the_mount_daemon(tmp_path, socket_directory):
    require("qemu-img", "qemu-io", "nbdcopy", "libnbd-python")
    legs = [tmp_path / "leg0", tmp_path / "leg1"]
    for leg in legs:
        leg.write_bytes(b"")
        os.truncate(leg, 24 * MiB)
    socket_path = socket_directory / "vol.sock"
    uri = f"nbd+unix:///vol0?socket={socket_path}"
    with exported(legs[0], tmp_path) as node0, exported(legs[1], tmp_path) as node1:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol0": {"algorithm": "mirror",
                      "nodes": [{"remote": node0.address}, {"remote": node1.address}]}},
            nbd_listen=f"unix:{socket_path}",
        )
        with mounted(config, tmp_path / "mnt") as mount:
            size = os.stat(mount.file("vol0")).st_size
            info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
            assert info["virtual-size"] == size
            # NBD writes, FUSE reads the same bytes.
            source = tmp_path / "source"
            source.write_bytes(os.urandom(size))
            run("nbdcopy", "--flush", str(source), uri)
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
            assert hashlib.sha256(mount.file("vol0").read_bytes()).hexdigest() == digest
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri)
            # FUSE writes, NBD reads them; qemu-io's zero and discard.
            with open(mount.file("vol0"), "r+b") as file:
                file.seek(2 * MiB)
                file.write(b"\x5a" * 65536)
                file.flush()
                os.fsync(file.fileno())
            run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 2M 64k",
                "-c", "write -P 0x33 4M 128k", "-c", "write -z 6M 64k",
                "-c", "read -P 0 6M 64k", "-c", "flush", uri)
            with open(mount.file("vol0"), "rb") as file:
                file.seek(4 * MiB)
                assert file.read(128 * 1024) == b"\x33" * 128 * 1024
            out = json.loads(nbd_python(r"""
                import json, sys
                import nbd
                h = nbd.NBD()
                h.connect_uri(sys.argv[1])
                print(json.dumps({"multi_conn": h.can_multi_conn(), "ro": h.is_read_only(),
                                  "fast_zero": h.can_fast_zero(), "trim": h.can_trim()}))
                h.shutdown()
            """, uri).stdout)
            assert out == {"multi_conn": True, "ro": False, "fast_zero": False, "trim": True}
            assert "listening for NBD on unix:" in mount.log_tail(200)
            assert mount.umount().returncode == 0
            assert "Traceback" not in mount.log_tail(1000)
        assert not socket_path.exists()
    # Both legs hold the storage's bytes (the mirror's metadata is at the end).
    expected = bytearray(source.read_bytes())
    expected[2 * MiB : 2 * MiB + 65536] = b"\x5a" * 65536
    expected[4 * MiB : 4 * MiB + 128 * 1024] = b"\x33" * 128 * 1024
    expected[6 * MiB : 6 * MiB + 65536] = bytes(65536)
    for leg in legs:
        assert leg.read_bytes()[:size] == bytes(expected)

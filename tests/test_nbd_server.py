"""`dstfuse export --nbd-listen`: real NBD clients nobody here wrote (libnbd's
nbdinfo, nbdcopy and Python binding, qemu-img, qemu-io) against a real
export process over TCP loopback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import trio

from .nbdpeers import SYSTEM_PYTHON, nbd_exported, nbd_python, require, run
from .rawclient import RawClient, RawRefused

pytestmark = pytest.mark.slow

KiB = 1 << 10
MiB = 1 << 20


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sparse_disk(tmp_path):
    """8 MiB, all hole but 4 KiB of data at 1 MiB."""
    path = tmp_path / "disk1"
    with open(path, "wb") as file:
        file.truncate(8 * MiB)
        file.seek(MiB)
        file.write(b"\xa5" * 4096)
    return path


def test_nbdinfo_reports_size_exports_and_the_holes_of_the_file(tmp_path, sparse_disk):
    require("nbdinfo")
    golden = tmp_path / "golden"
    golden.write_bytes(os.urandom(MiB))
    config = {"exports": [
        {"name": "disk1", "path": str(sparse_disk)},
        {"name": "golden", "path": str(golden), "read_only": True},
    ]}
    with nbd_exported(tmp_path, config=config) as export:
        assert run("nbdinfo", "--size", f"{export.uri}/disk1").stdout.strip() == str(8 * MiB)
        listed = json.loads(run("nbdinfo", "--list", "--json", export.uri).stdout)
        exports = {e["export-name"]: e for e in listed["exports"]}
        assert set(exports) == {"disk1", "golden"}
        assert exports["golden"]["is_read_only"] and not exports["disk1"]["is_read_only"]
        assert exports["disk1"]["block_size_minimum"] == 1
        assert exports["disk1"]["block_size_maximum"] == 4 * MiB
        extents = json.loads(run("nbdinfo", "--map", "--json", f"{export.uri}/disk1").stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
            (0, MiB, 3), (MiB, 4096, 0), (MiB + 4096, 7 * MiB - 4096, 3)]
        # Two exports: no default export.
        refused = run("nbdinfo", "--size", export.uri, check=False)
        assert refused.returncode != 0 and "no export named ''" in refused.stderr
        export.wait_log("no default export: this node serves several (disk1, golden)")


def test_nbdcopy_both_ways_keeps_every_byte(tmp_path):
    require("nbdcopy")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(8 * MiB))
    source = tmp_path / "source"
    source.write_bytes(os.urandom(8 * MiB))
    back = tmp_path / "back"
    with nbd_exported(tmp_path, path=disk) as export:
        run("nbdcopy", "--flush", str(source), f"{export.uri}/disk")
        run("nbdcopy", f"{export.uri}/disk", str(back))
    assert sha256(back) == sha256(source) == sha256(disk)


FEATURES = r"""
import json, sys
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
MiB = 1 << 20
pattern = bytes(range(256)) * 256
out = {"flags": [h.can_fua(), h.can_flush(), h.can_trim(), h.can_zero(), h.can_fast_zero(),
                 h.is_read_only(), h.can_multi_conn(), h.can_meta_context("base:allocation")]}
h.pwrite(pattern, 0, nbd.CMD_FLAG_FUA)
h.pwrite(pattern, MiB)
h.pwrite(pattern, 3 * MiB)
h.flush()
out["read"] = h.pread(len(pattern), 0) == pattern
h.trim(MiB, MiB, nbd.CMD_FLAG_FUA)
out["trimmed"] = h.pread(len(pattern), MiB) == bytes(len(pattern))
h.zero(len(pattern), 0, nbd.CMD_FLAG_FAST_ZERO)
out["zeroed"] = h.pread(len(pattern), 0) == bytes(len(pattern))
extents = []
def collect(context, offset, entries, error):
    extents.extend(zip(entries[0::2], entries[1::2]))
    return 0
h.block_status(4 * MiB, 0, collect)
out["extents"] = extents
h.shutdown()
print(json.dumps(out))
"""


def test_nbdsh_fua_flush_trim_zero_and_block_status(tmp_path):
    require("libnbd-python")
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(4 * MiB))
    with nbd_exported(tmp_path, path=disk) as export:
        out = json.loads(nbd_python(FEATURES, f"{export.uri}/disk").stdout)
    # fua flush trim zero fast-zero | not read-only, no multi-conn for a writer | meta context
    assert out["flags"] == [True, True, True, True, True, False, False, True]
    assert out["read"] and out["trimmed"] and out["zeroed"]
    # The trimmed MiB is a hole that reads as zeroes; the rest of the MiB
    # blocks around it hold data.
    position, holes = 0, []
    for length, flags in out["extents"]:
        if flags & 1:
            holes.append((position, length, flags))
        position += length
    assert (MiB, MiB, 3) in holes
    data = disk.read_bytes()
    pattern = bytes(range(256)) * 256
    assert data[:64 * KiB] == bytes(64 * KiB)
    assert data[MiB : 2 * MiB] == bytes(MiB)
    assert data[3 * MiB : 3 * MiB + 64 * KiB] == pattern


ERRORS = r"""
import errno, json, sys
import nbd
h = nbd.NBD()
h.set_strict_mode(0)  # let libnbd send what a careful client would not
h.connect_uri(sys.argv[1])
size = h.get_size()
def error_of(call, *args):
    try:
        call(*args)
    except nbd.Error as exc:
        return errno.errorcode.get(exc.errnum, exc.errnum)
    return None
out = {
    "read_past_end": error_of(h.pread, 4096, size - 1024),
    "read_too_long": error_of(h.pread, 8 << 20, 0),
    "write_past_end": error_of(h.pwrite, b"x" * 4096, size - 1024),
    "trim_past_end": error_of(h.trim, 4096, size),
    "read_ok_after": h.pread(512, 0) == b"\0" * 512,
}
if h.is_read_only():
    out["write_read_only"] = error_of(h.pwrite, b"x" * 512, 0)
    out["zero_read_only"] = error_of(h.zero, 512, 0)
h.shutdown()
print(json.dumps(out))
"""


def test_nbdsh_errors_past_the_end_oversized_and_read_only(tmp_path):
    require("libnbd-python")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MiB))
    with nbd_exported(tmp_path, path=disk) as export:
        out = json.loads(nbd_python(ERRORS, f"{export.uri}/disk").stdout)
    assert out == {"read_past_end": "EINVAL", "read_too_long": "EOVERFLOW",
                   "write_past_end": "ENOSPC", "trim_past_end": "ENOSPC", "read_ok_after": True}
    with nbd_exported(tmp_path, path=disk, args=["--read-only"]) as export:
        out = json.loads(nbd_python(ERRORS, f"{export.uri}/disk").stdout)
        assert "refused (EPERM)" in export.log_text()
    assert out["write_read_only"] == "EPERM" and out["zero_read_only"] == "EPERM"
    assert disk.read_bytes() == bytes(MiB)


def test_qemu_img_info_convert_compare_and_qemu_io(tmp_path):
    require("qemu-img", "qemu-io")
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(4 * MiB))
    original = tmp_path / "original.raw"
    shutil.copyfile(disk, original)
    with nbd_exported(tmp_path, path=disk) as export:
        uri = f"{export.uri}/disk"
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == 4 * MiB
        copy = tmp_path / "copy.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(copy))
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(copy), uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(original), uri)
        run("qemu-io", "-f", "raw",
            "-c", "write -P 0x5a 4096 64k", "-c", "read -P 0x5a 4096 64k",
            "-c", "write -z 1M 64k", "-c", "read -P 0 1M 64k",
            "-c", "discard 2M 64k", "-c", "flush", uri)
        # qemu-img convert onto the export: -n, the target cannot be resized.
        replacement = tmp_path / "replacement.raw"
        replacement.write_bytes(os.urandom(4 * MiB))
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(replacement), uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(replacement), uri)
        different = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(original), uri,
                        check=False)
        assert different.returncode == 1
    assert sha256(disk) == sha256(replacement)


READ_ONLY_CHECK = r"""
import errno, json, sys
import nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
out = {"read_only": h.is_read_only(), "multi_conn": h.can_multi_conn()}
try:
    h.pwrite(b"x" * 4096, 0)
    out["write"] = None
except nbd.Error as exc:
    out["write"] = errno.errorcode.get(exc.errnum)
out["read"] = len(h.pread(4096, 0))
h.shutdown()
print(json.dumps(out))
"""


def test_read_only_grant_refuses_writes(tmp_path):
    require("libnbd-python")
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(MiB))
    before = disk.read_bytes()
    with nbd_exported(tmp_path, path=disk, args=["--allow", "127.0.0.1=ro"]) as export:
        out = json.loads(nbd_python(READ_ONLY_CHECK, f"{export.uri}/disk").stdout)
    assert out == {"read_only": True, "multi_conn": True, "write": "EPERM", "read": 4096}
    assert disk.read_bytes() == before


def test_refused_acl_address_gets_no_service(tmp_path):
    require("nbdinfo")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MiB))
    with nbd_exported(tmp_path, path=disk, args=["--allow", "10.9.9.9"]) as export:
        refused = run("nbdinfo", "--size", f"{export.uri}/disk", check=False)
        assert refused.returncode != 0
        # Refused at accept (by the server, before any session or slot).
        export.wait_log("exports disk: refused 127.0.0.1:")
        assert "address 127.0.0.1 is not allowed by export disk's ACL" in export.log_text()
        assert "NBD peer" not in export.log_text()


HOLD_WRITER = r"""
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("rw" if not h.is_read_only() else "ro", flush=True)
sys.stdin.readline()
h.pwrite(b"N" * 4096, 0)
h.flush()
h.shutdown()
"""


async def test_an_nbd_writer_and_a_dstfuse_writer_exclude_each_other(tmp_path):
    require("libnbd-python")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MiB))
    with nbd_exported(tmp_path, path=disk) as export:
        host, port = export.listen.rsplit(":", 1)
        holder = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", HOLD_WRITER, f"{export.uri}/disk"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert await trio.to_thread.run_sync(holder.stdout.readline) == "rw\n"
            # The NBD connection holds the grant: a dstfuse writer is refused.
            with pytest.raises(RawRefused) as refused:
                await RawClient.connect((host, int(port)))
            assert refused.value.status == errno.EBUSY and "client nbd" in str(refused.value)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert await trio.to_thread.run_sync(holder.wait) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            holder.stdin.close()
            holder.stdout.close()
        assert disk.read_bytes()[:4096] == b"N" * 4096
        # Its connection is gone, so is its grant: the dstfuse client
        # writes, and while it holds the grant an NBD client is read-only.
        async with await RawClient.connect((host, int(port))) as client:
            assert (await client.write(8192, b"D" * 4096)).status == 0
            out = await trio.to_thread.run_sync(
                lambda: json.loads(nbd_python(READ_ONLY_CHECK, f"{export.uri}/disk").stdout)
            )
            assert out["read_only"] and out["write"] == "EPERM"
        export.wait_log("served read-only: the export is written by client rawclient")
    assert disk.read_bytes()[:4096] == b"N" * 4096

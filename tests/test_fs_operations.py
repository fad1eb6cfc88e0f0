"""The FUSE operations called directly (no mount): request mapping, errno
mapping, logging once, and the control tree seen through file handles.
Real mounts are tested in test_fs_mount.py."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import pytest

from dstfuse.algorithms.linear import Linear
from dstfuse.control import ControlTree
from dstfuse.errors import NodeError
from dstfuse.fs import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    StorageFilesystem,
)
from dstfuse.storage import Storage

from .test_control import ControlledLinear, MemoryNode, started

KIB = 1024
SIZE = 96 * KIB


@pytest.fixture
async def mounted_ops(nursery):
    """A filesystem over `vol0` (linear: a 64 KiB + b 32 KiB, with controls)
    and a read-only `golden`; returns (ops, a, b)."""
    a, b, g = await started(
        nursery,
        MemoryNode("a", 64 * KIB),
        MemoryNode("b", 32 * KIB),
        MemoryNode("g", 8 * KIB, writable=False),
    )
    vol0 = Storage("vol0", ControlledLinear("vol0", [(a, None), (b, None)], {}))
    golden = Storage("golden", Linear("golden", [(g, None)], {}))
    storages = {"vol0": vol0, "golden": golden}
    ops = StorageFilesystem(storages, ControlTree(storages))
    return ops, a, b


async def lookup_path(ops, *names: str):
    inode = pyfuse3.ROOT_INODE
    attr = None
    for name in names:
        attr = await ops.lookup(inode, os.fsencode(name), None)
        inode = attr.st_ino
    return attr


async def open_path(ops, *names: str, flags=os.O_RDWR):
    attr = await lookup_path(ops, *names)
    info = await ops.open(attr.st_ino, flags, None)
    assert info.direct_io
    return info.fh


async def errno_of(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    return caught.value.errno


async def test_storage_files_have_the_storage_size_and_mode(mounted_ops):
    ops, a, b = mounted_ops
    vol0 = await lookup_path(ops, "vol0")
    assert stat.S_ISREG(vol0.st_mode) and stat.S_IMODE(vol0.st_mode) == 0o600
    assert vol0.st_size == SIZE
    golden = await lookup_path(ops, "golden")
    assert stat.S_IMODE(golden.st_mode) == 0o400
    control = await lookup_path(ops, ".dst")
    assert stat.S_ISDIR(control.st_mode)
    assert (await ops.getattr(vol0.st_ino, None)).st_size == SIZE
    assert await errno_of(ops.lookup(pyfuse3.ROOT_INODE, b"missing", None)) == errno.ENOENT
    assert await errno_of(ops.getattr(99999, None)) == errno.ENOENT


async def test_write_and_read_cross_the_node_boundary(mounted_ops):
    ops, a, b = mounted_ops
    fh = await open_path(ops, "vol0")
    data = os.urandom(8 * KIB)
    assert await ops.write(fh, 60 * KIB, data) == len(data)
    assert bytes(a.data[60 * KIB :]) == data[: 4 * KIB]
    assert bytes(b.data[: 4 * KIB]) == data[4 * KIB :]
    assert await ops.read(fh, 60 * KIB, 8 * KIB) == data


async def test_reads_past_the_end_are_short_and_writes_past_it_fail_with_enospc(mounted_ops):
    ops, a, b = mounted_ops
    fh = await open_path(ops, "vol0")
    assert len(await ops.read(fh, SIZE - 100, 4096)) == 100
    assert await ops.read(fh, SIZE, 4096) == b""
    assert await ops.read(fh, SIZE + 5000, 4096) == b""
    # crossing the end: the part inside is written, like a block device
    assert await ops.write(fh, SIZE - 100, b"z" * 300) == 100
    assert bytes(b.data[-100:]) == b"z" * 100
    assert await errno_of(ops.write(fh, SIZE, b"z")) == errno.ENOSPC
    assert await errno_of(ops.write(fh, SIZE + 4096, b"z")) == errno.ENOSPC


async def test_read_only_storage_refuses_opening_for_write(mounted_ops):
    ops, a, b = mounted_ops
    assert await errno_of(open_path(ops, "golden", flags=os.O_WRONLY)) == errno.EROFS
    fh = await open_path(ops, "golden", flags=os.O_RDONLY)
    assert await ops.read(fh, 0, 16) == bytes(16)


async def test_o_dsync_makes_writes_fua_and_plain_writes_are_not(mounted_ops):
    ops, a, b = mounted_ops
    sync = await open_path(ops, "vol0", flags=os.O_RDWR | os.O_DSYNC)
    plain = await open_path(ops, "vol0", flags=os.O_RDWR)
    also_sync = await open_path(ops, "vol0", flags=os.O_WRONLY | os.O_SYNC)
    await ops.write(sync, 0, b"s" * 512)
    await ops.write(plain, 4096, b"p" * 512)
    await ops.write(also_sync, 8192, b"o" * 512)
    assert [call for call in a.calls if call[0] == "write"] == [
        ("write", 0, 512, True),
        ("write", 4096, 512, False),
        ("write", 8192, 512, True),
    ]


async def test_fsync_flushes_every_node_and_close_flushes_nothing(mounted_ops):
    ops, a, b = mounted_ops
    fh = await open_path(ops, "vol0")
    await ops.write(fh, 0, b"x")
    await ops.flush(fh)
    await ops.release(fh)
    assert not [call for call in a.calls + b.calls if call[0] == "flush"]
    fh = await open_path(ops, "vol0")
    await ops.fsync(fh, True)
    assert ("flush", 0, 0, False) in a.calls and ("flush", 0, 0, False) in b.calls


async def test_node_errors_become_their_errno_and_are_logged_once(mounted_ops, caplog):
    ops, a, b = mounted_ops
    fh = await open_path(ops, "vol0")
    b.fail["write"] = NodeError(str(b), "disk is full", errno=errno.ENOSPC)
    b.fail["read"] = NodeError(str(b), "timed out after 15 resends", errno=errno.EIO)
    with caplog.at_level(logging.WARNING, logger="dstfuse"):
        assert await errno_of(ops.write(fh, 64 * KIB, b"x" * 10)) == errno.ENOSPC
        assert await errno_of(ops.read(fh, 64 * KIB, 10)) == errno.EIO
    lines = [r.getMessage() for r in caplog.records if r.name == "dstfuse.fs"]
    assert len(lines) == 2
    assert "storage vol0: write 10 bytes at 65536" in lines[0]
    assert "L: /memory/b: disk is full" in lines[0]
    assert "storage vol0: read 10 bytes at 65536" in lines[1]
    assert "timed out after 15 resends" in lines[1]


async def test_unexpected_errors_become_eio_with_a_traceback(mounted_ops, caplog):
    ops, a, b = mounted_ops
    fh = await open_path(ops, "vol0")
    a.fail["read"] = ZeroDivisionError("bug")
    assert await errno_of(ops.read(fh, 0, 10)) == errno.EIO
    (record,) = [r for r in caplog.records if r.name == "dstfuse.fs"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "storage vol0: read 10 bytes at 0" in record.getMessage()
    caplog.clear()  # the traceback was the point; conftest fails tests on unexpected ones


async def test_size_changes_are_refused_and_other_attribute_changes_ignored(mounted_ops):
    ops, a, b = mounted_ops
    vol0 = await lookup_path(ops, "vol0")
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    fields = pyfuse3.SetattrFields()  # nothing to update
    fields_with_size = _setattr_fields(update_size=True)
    assert await errno_of(ops.setattr(vol0.st_ino, attr, fields_with_size, None, None)) == (
        errno.EPERM
    )
    attr.st_size = SIZE
    same = await ops.setattr(vol0.st_ino, attr, fields_with_size, None, None)
    assert same.st_size == SIZE
    attr.st_mode = 0o777
    unchanged = await ops.setattr(vol0.st_ino, attr, fields, None, None)
    assert stat.S_IMODE(unchanged.st_mode) == 0o600


def _setattr_fields(**values: bool):
    """Stands in for pyfuse3.SetattrFields, whose fields Python cannot set;
    the handler only reads these attributes."""

    class Fields:
        update_atime = update_mtime = update_ctime = False
        update_mode = update_uid = update_gid = update_size = False

    fields = Fields()
    for name, value in values.items():
        setattr(fields, name, value)
    return fields


async def test_fallocate_modes(mounted_ops):
    ops, a, b = mounted_ops
    fh = await open_path(ops, "vol0")
    inode = (await lookup_path(ops, "vol0")).st_ino
    await ops.write(fh, 0, b"\xff" * SIZE)
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    await ops.fallocate(inode, punch, 60 * KIB, 8 * KIB)
    assert ("trim", 60 * KIB, 4 * KIB, False) in a.calls
    assert ("trim", 0, 4 * KIB, False) in b.calls
    assert await ops.read(fh, 60 * KIB, 8 * KIB) == bytes(8 * KIB)
    await ops.fallocate(inode, FALLOC_FL_ZERO_RANGE, 0, 4 * KIB)
    assert ("write_zeroes", 0, 4 * KIB, False) in a.calls
    # punching past the end is cut at the end
    await ops.fallocate(inode, punch, SIZE - 4 * KIB, 64 * KIB)
    assert ("trim", 28 * KIB, 4 * KIB, False) in b.calls
    calls = len(a.calls) + len(b.calls)
    await ops.fallocate(inode, 0, 0, SIZE)  # plain allocation inside: nothing to do
    await ops.fallocate(inode, FALLOC_FL_KEEP_SIZE, SIZE, 4 * KIB)
    assert len(a.calls) + len(b.calls) == calls
    assert await errno_of(ops.fallocate(inode, 0, SIZE - 1, 2)) == errno.ENOSPC
    collapse_range = 0x08
    assert await errno_of(ops.fallocate(inode, collapse_range, 0, 4096)) == errno.EOPNOTSUPP
    golden = (await lookup_path(ops, "golden")).st_ino
    assert await errno_of(ops.fallocate(golden, punch, 0, 4096)) == errno.EROFS
    control = (await lookup_path(ops, ".dst", "vol0", "size")).st_ino
    assert await errno_of(ops.fallocate(control, punch, 0, 4096)) == errno.EOPNOTSUPP


async def test_control_files_read_a_snapshot_taken_at_open(mounted_ops):
    ops, a, b = mounted_ops
    attr = await lookup_path(ops, ".dst", "vol0", "n-0-0", "requests")
    assert stat.S_IMODE(attr.st_mode) == 0o444 and attr.st_size == 2
    fh = await open_path(ops, ".dst", "vol0", "n-0-0", "requests", flags=os.O_RDONLY)
    storage_fh = await open_path(ops, "vol0")
    await ops.write(storage_fh, 0, b"x" * 10)
    assert await ops.read(fh, 0, 4096) == b"0\n"
    assert await ops.read(fh, 2, 4096) == b""
    fresh = await open_path(ops, ".dst", "vol0", "n-0-0", "requests", flags=os.O_RDONLY)
    assert await ops.read(fresh, 0, 4096) == b"1\n"
    nodes = await open_path(ops, ".dst", "vol0", "nodes", flags=os.O_RDONLY)
    assert (await ops.read(nodes, 0, 4096)).decode().splitlines()[1] == (
        f"n-{64 * KIB}-1 {64 * KIB} {32 * KIB} L: /memory/b"
    )


async def test_control_file_writes_reach_the_algorithm_and_bad_values_are_einval(
    mounted_ops, caplog
):
    ops, a, b = mounted_ops
    dirty = await lookup_path(ops, ".dst", "vol0", "n-0-0", "dirty")
    assert stat.S_IMODE(dirty.st_mode) == 0o644
    fh = await open_path(ops, ".dst", "vol0", "n-0-0", "dirty", flags=os.O_WRONLY)
    assert await ops.write(fh, 0, b"1\n") == 2
    state = await open_path(ops, ".dst", "vol0", "n-0-0", "state", flags=os.O_RDONLY)
    assert await ops.read(state, 0, 100) == b"notsync\n"
    assert await errno_of(ops.write(fh, 0, b"banana\n")) == errno.EINVAL
    assert await errno_of(ops.write(fh, 0, b"\xff\xfe")) == errno.EINVAL
    assert "write 1 to mark n-0-0" in caplog.text
    # truncation (echo > file) is accepted on control files
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    await ops.setattr(dirty.st_ino, attr, _setattr_fields(update_size=True), None, None)
    assert await errno_of(
        open_path(ops, ".dst", "vol0", "n-0-0", "state", flags=os.O_WRONLY)
    ) == errno.EACCES


async def test_namespace_changes_are_refused(mounted_ops):
    ops, a, b = mounted_ops
    root = pyfuse3.ROOT_INODE
    assert await errno_of(ops.create(root, b"new", 0o644, os.O_RDWR, None)) == errno.EPERM
    assert await errno_of(ops.mkdir(root, b"dir", 0o755, None)) == errno.EPERM
    assert await errno_of(ops.unlink(root, b"vol0", None)) == errno.EPERM
    assert await errno_of(ops.rename(root, b"vol0", root, b"x", 0, None)) == errno.EPERM


async def test_statfs_counts_the_storages(mounted_ops):
    ops, a, b = mounted_ops
    stats = await ops.statfs(None)
    assert stats.f_bsize == 4096
    assert stats.f_blocks == (SIZE + 8 * KIB) // 4096

"""Real mounts (`python -m dstfuse mount` in a subprocess) of a linear storage
over two `local:` files: the storage file maps onto the backing files, the
control tree reads with `cat`, fsync/fallocate/ENOSPC/EROFS behave, request
sizes arrive whole, and unmounting (umount or SIGTERM) leaves every
acknowledged byte in the backing files."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import time

import pytest

from .mounts import (
    exported,
    is_mounted,
    loop_device,
    mounted,
    os_error,
    pid_exited,
    run,
    run_dstfuse,
    write_config,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20
A_SIZE = 4 * MiB
B_SIZE = 6 * MiB
SIZE = A_SIZE + B_SIZE


@pytest.fixture
def backing(tmp_path):
    """Two backing files with random content and a config placing them."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(os.urandom(A_SIZE))
    b.write_bytes(os.urandom(B_SIZE))
    config = write_config(
        tmp_path / "storage.yaml",
        {"vol0": {"algorithm": "linear", "nodes": [{"local": str(a)}, {"local": str(b)}]}},
    )
    return config, a, b


def counter(mount, node: str, name: str) -> int:
    return int(mount.control("vol0", node, name))


B_NODE = f"n-{A_SIZE}-1"


def test_storage_file_maps_onto_the_backing_files(backing, tmp_path):
    config, a, b = backing
    original = a.read_bytes() + b.read_bytes()
    with mounted(config, tmp_path / "mnt") as mount:
        path = mount.file("vol0")
        info = os.stat(path)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == SIZE
        assert sorted(os.listdir(mount.mountpoint)) == [".dst", "vol0"]
        fd = os.open(path, os.O_RDWR)
        try:
            # reads crossing the node boundary come from both files
            assert os.pread(fd, 8192, A_SIZE - 4096) == original[A_SIZE - 4096 : A_SIZE + 4096]
            data = os.urandom(3 * 4096)
            assert os.pwrite(fd, data, A_SIZE - 4096) == len(data)
            os.fsync(fd)
            # reads past the end are short, then empty
            assert os.pread(fd, 4096, SIZE - 100) == original[SIZE - 100 :]
            assert os.pread(fd, 4096, SIZE) == b""
            # writes at the end fail; writes crossing it are cut short
            assert os_error(os.pwrite, fd, b"x", SIZE) == errno.ENOSPC
            assert os.pwrite(fd, b"e" * 200, SIZE - 100) == 100
        finally:
            os.close(fd)
        assert a.read_bytes()[A_SIZE - 4096 :] == data[:4096]
        assert b.read_bytes()[: 2 * 4096] == data[4096:]
        assert b.read_bytes()[-100:] == b"e" * 100
        # nothing else changed
        assert a.read_bytes()[: A_SIZE - 4096] == original[: A_SIZE - 4096]
        # namespace changes are refused
        assert os_error(os.unlink, path) == errno.EPERM
        assert os_error(os.mkdir, mount.mountpoint / "d") == errno.EPERM
        assert os_error(open, mount.mountpoint / "new", "w") == errno.EPERM
        assert os_error(os.truncate, path, 0) == errno.EPERM
        assert mount.umount().returncode == 0


def test_control_tree_reads_with_cat(backing, tmp_path):
    config, a, b = backing
    with mounted(config, tmp_path / "mnt") as mount:
        control = mount.mountpoint / ".dst"
        assert sorted(os.listdir(control)) == [".daemon", ".reload", "vol0"]

        def cat(*parts: str) -> str:
            return run("cat", control.joinpath(*parts)).stdout

        assert cat("vol0", "nodes") == (
            f"n-0-0 0 {A_SIZE} L: {a}\n{B_NODE} {A_SIZE} {B_SIZE} L: {b}\n"
        )
        assert cat("vol0", "alg") == "linear\n"
        assert cat("vol0", "name") == "vol0\n"
        assert cat("vol0", "size") == f"{SIZE}\n"
        assert cat("vol0", "state") == "clean\n"
        assert cat("vol0", B_NODE, "type") == f"L: {b}\n"
        assert cat("vol0", B_NODE, "start") == f"{A_SIZE}\n"
        assert cat("vol0", B_NODE, "state") == "sync\n"
        assert cat("vol0", B_NODE, "status") == "clean\n"
        assert cat("vol0", B_NODE, "flags") == "online rw\n"
        daemon = cat(".daemon")
        assert f"pid {mount.pid}\n" in daemon and f"config {config}\n" in daemon
        before = counter(mount, B_NODE, "bytes_written")
        with open(mount.file("vol0"), "r+b") as file:
            file.seek(A_SIZE)
            file.write(b"z" * 5000)
            file.flush()
        assert counter(mount, B_NODE, "bytes_written") == before + 5000
        # every file in the tree reads, and control files refuse writes
        for directory, _, files in os.walk(control):
            for name in files:
                assert run("cat", os.path.join(directory, name)).stdout.endswith("\n")
        assert os_error(os.open, control / "vol0" / "size", os.O_WRONLY) == errno.EACCES
        assert mount.umount().returncode == 0


def test_one_mib_direct_requests_arrive_whole(backing, tmp_path):
    """dd bs=1M oflag=direct: each 1 MiB write is one request at the node
    (the size libfuse negotiates), and so is each 1 MiB direct read."""
    config, a, b = backing
    with mounted(config, tmp_path / "mnt") as mount:
        path = mount.file("vol0")
        writes = counter(mount, "n-0-0", "requests")
        run("dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=4", "oflag=direct",
            "conv=notrunc")
        assert counter(mount, "n-0-0", "requests") - writes == 4
        assert counter(mount, "n-0-0", "bytes_written") == 4 * MiB
        reads = counter(mount, B_NODE, "requests")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buffer = mmap.mmap(-1, 2 * MiB)  # page aligned, as O_DIRECT needs
            assert os.preadv(fd, [buffer], A_SIZE) == 2 * MiB
        finally:
            os.close(fd)
        assert counter(mount, B_NODE, "requests") - reads == 2
        assert mount.umount().returncode == 0


def test_fallocate_punches_and_zeroes_ranges(backing, tmp_path):
    config, a, b = backing
    original = a.read_bytes() + b.read_bytes()
    with mounted(config, tmp_path / "mnt") as mount:
        path = mount.file("vol0")
        # punch 64 KiB across the boundary, zero 8 KiB inside b
        run("fallocate", "-p", "-o", str(A_SIZE - 32768), "-l", "65536", path)
        run("fallocate", "-z", "-o", str(A_SIZE + MiB), "-l", "8192", path)
        # plain allocation inside the file: accepted, changes nothing
        run("fallocate", "-o", "0", "-l", "4096", path)
        # growing the file: refused
        grow = run("fallocate", "-o", "0", "-l", str(2 * SIZE), path, check=False)
        assert grow.returncode != 0 and "No space left" in grow.stderr
        collapse = run("fallocate", "-c", "-o", "0", "-l", "4096", path, check=False)
        assert collapse.returncode != 0 and "not supported" in collapse.stderr
        with open(path, "rb") as file:
            file.seek(A_SIZE - 32768)
            assert file.read(65536) == bytes(65536)
        assert mount.umount().returncode == 0
    expected = bytearray(original)
    expected[A_SIZE - 32768 : A_SIZE + 32768] = bytes(65536)
    expected[A_SIZE + MiB : A_SIZE + MiB + 8192] = bytes(8192)
    assert a.read_bytes() + b.read_bytes() == bytes(expected)


def test_read_only_export_makes_a_read_only_file(tmp_path):
    image = tmp_path / "golden.img"
    content = os.urandom(2 * MiB)
    image.write_bytes(content)
    with exported(image, tmp_path, args=["--read-only"]) as export:
        config = write_config(
            tmp_path / "storage.yaml",
            {"golden": {"algorithm": "linear", "nodes": [{"remote": export.address}]}},
        )
        with mounted(config, tmp_path / "mnt") as mount:
            path = mount.file("golden")
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
            # root passes the permission check; the storage itself refuses
            assert os_error(os.open, path, os.O_RDWR) == errno.EROFS
            with open(path, "rb") as file:
                assert file.read() == content
            assert mount.control("golden", "n-0-0", "flags") == "online ro\n"
            assert mount.umount().returncode == 0
    assert image.read_bytes() == content


def _write_pattern(path, seed: int) -> dict[int, bytes]:
    """Write blocks at scattered offsets (some crossing the boundary),
    without fsync; return offset -> data."""
    import random

    rng = random.Random(seed)
    written: dict[int, bytes] = {}
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in [0, A_SIZE - 512, A_SIZE, SIZE - 65536] + [
            rng.randrange(0, SIZE - 65536) for _ in range(20)
        ]:
            data = rng.randbytes(rng.randrange(1, 65536))
            assert os.pwrite(fd, data, offset) == len(data)
            written[offset] = data
    finally:
        os.close(fd)
    return written


def _expected(original: bytes, written: dict[int, bytes]) -> bytes:
    image = bytearray(original)
    for offset, data in written.items():  # in write order
        image[offset : offset + len(data)] = data
    return bytes(image)


def test_umount_leaves_every_acknowledged_byte_in_the_node_files(backing, tmp_path):
    config, a, b = backing
    original = a.read_bytes() + b.read_bytes()
    with mounted(config, tmp_path / "mnt", foreground=False) as mount:
        written = _write_pattern(mount.file("vol0"), seed=1)
        done = mount.umount()
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mount.mountpoint)
        assert pid_exited(mount.pid)
    assert a.read_bytes() + b.read_bytes() == _expected(original, written)


def test_sigterm_unmounts_flushes_and_exits_zero(backing, tmp_path):
    config, a, b = backing
    original = a.read_bytes() + b.read_bytes()
    with mounted(config, tmp_path / "mnt") as mount:
        written = _write_pattern(mount.file("vol0"), seed=2)
        mount.process.send_signal(signal.SIGTERM)
        assert mount.wait(60) == 0
        assert not is_mounted(mount.mountpoint)
    assert a.read_bytes() + b.read_bytes() == _expected(original, written)


def test_umount_of_a_busy_mount_names_the_loop_device(backing, tmp_path):
    config, a, b = backing
    with mounted(config, tmp_path / "mnt") as mount:
        with loop_device(mount.file("vol0")) as device:
            busy = mount.umount()
            assert busy.returncode == 1
            assert busy.stderr.strip() == (
                f"dstfuse umount: {mount.mountpoint} is busy: {device} uses "
                f"{mount.file('vol0')}; detach the loop device first (losetup -d {device})"
            )
            assert is_mounted(mount.mountpoint)
        assert mount.umount().returncode == 0


def test_umount_of_something_else_is_refused(tmp_path):
    done = run_dstfuse("umount", tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"dstfuse umount: {tmp_path} is not a dstfuse mount (no {tmp_path}/.dst/.daemon)"
    )


def test_detached_mount_returns_only_once_live(backing, tmp_path):
    config, a, b = backing
    started = time.monotonic()
    with mounted(config, tmp_path / "mnt", foreground=False) as mount:
        # `dstfuse mount` has returned: the file must be there already
        assert os.stat(mount.file("vol0")).st_size == SIZE
        assert time.monotonic() - started < 30
        assert mount.log is not None and "mounted at" in mount.log.read_text()
        assert mount.umount().returncode == 0


def test_stacked_storage_exposes_only_the_outer_file(tmp_path):
    files = []
    for name, size in (("a.img", MiB), ("b.img", MiB), ("c.img", 2 * MiB)):
        path = tmp_path / name
        path.write_bytes(b"")
        os.truncate(path, size)
        files.append(path)
    a, b, c = files
    config = write_config(
        tmp_path / "storage.yaml",
        {
            "big": {"algorithm": "linear", "nodes": [{"local": str(c)}, {"storage": "inner"}]},
            "inner": {"algorithm": "linear", "nodes": [{"local": str(a)}, {"local": str(b)}]},
        },
    )
    with mounted(config, tmp_path / "mnt") as mount:
        assert sorted(os.listdir(mount.mountpoint)) == [".dst", "big"]
        assert sorted(os.listdir(mount.mountpoint / ".dst")) == [
            ".daemon",
            ".reload",
            "big",
            "inner",
        ]
        assert os.stat(mount.file("big")).st_size == 4 * MiB
        assert mount.control("big", f"n-{2 * MiB}-1", "type") == "S: inner\n"
        with open(mount.file("big"), "r+b") as file:
            file.seek(3 * MiB + 10)  # inner byte MiB + 10: b.img byte 10
            file.write(b"stacked")
        assert mount.umount().returncode == 0
    assert b.read_bytes()[10:17] == b"stacked"


def test_failed_final_flush_makes_umount_fail(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 2 * MiB)
    with exported(image, tmp_path) as export:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol0": {"algorithm": "linear", "nodes": [{"remote": export.address}]}},
            timeouts={"resend": "200ms", "max_resends": 2, "keepalive": "200ms", "connect": "1s"},
        )
        with mounted(config, tmp_path / "mnt", foreground=False) as mount:
            with open(mount.file("vol0"), "r+b") as file:
                file.write(b"acknowledged")
            export.process.kill()
            export.process.wait()
            done = mount.umount(timeout=60)
            assert done.returncode == 1
            (line,) = done.stderr.splitlines()
            assert line.startswith(
                f"dstfuse umount: {mount.mountpoint} is unmounted, but the final flush "
                "failed: storage vol0: R: "
            ), line
            assert not is_mounted(mount.mountpoint)

"""Backend (the export node's disk) and LocalNode, on real temporary files."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
import trio
import xxhash

from dstfuse.errors import NodeError, NodeRefused, RequestOutOfRange
from dstfuse.export import backend as backend_module
from dstfuse.export.backend import CHUNK_SIZE, Backend
from dstfuse.nodes import LocalNode, NodeState

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


def thread_calls(backend, monkeypatch) -> list[str]:
    """The names of the disk calls `backend` sends to a thread from now on."""
    threads: list[str] = []
    run = backend._run

    async def counted(function, *args):
        threads.append(function.__name__)
        return await run(function, *args)

    monkeypatch.setattr(backend, "_run", counted)
    return threads


def allocated_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


# -- Backend ---------------------------------------------------------------


async def test_backend_reads_back_what_it_wrote(image):
    backend = Backend(image)
    try:
        assert backend.size == SIZE and not backend.is_block_device
        data = os.urandom(12345)
        await backend.write(1000, data)
        assert await backend.read(1000, len(data)) == data
        await backend.write(SIZE - 10, b"x" * 10, fua=True)
        assert await backend.read(SIZE - 10, 10) == b"x" * 10
        await backend.flush()
    finally:
        await backend.aclose()
    content = image.read_bytes()
    assert content[1000 : 1000 + len(data)] == data
    assert content[-10:] == b"x" * 10
    assert len(content) == SIZE


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EOPNOTSUPP])
async def test_small_reads_not_served_from_the_page_cache_go_to_a_thread(image, monkeypatch, code):
    backend = Backend(image)
    try:
        await backend.write(8192, b"cached" * 100)
        assert await backend.read(8192, 600) == b"cached" * 100  # inline, RWF_NOWAIT
        tried = []

        def not_cached(fd, buffers, offset, flags=0):
            tried.append(flags)
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(backend_module.os, "preadv", not_cached)
        assert await backend.read(8192, 600) == b"cached" * 100  # via the thread's pread
        assert tried == [os.RWF_NOWAIT]
        await backend.read(8192, 600)
        # EAGAIN: tried again next time; unsupported: never again
        assert len(tried) == (2 if code == errno.EAGAIN else 1)
    finally:
        await backend.aclose()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
async def test_on_tmpfs_refusing_rwf_nowait_reads_stay_inline_as_plain_reads(monkeypatch):
    """tmpfs on this kernel refuses RWF_NOWAIT (EOPNOTSUPP): its reads went
    to a thread each (80 us more a request), though they never wait for a
    disk. Now the first refusal switches to plain reads in the event loop."""
    path = f"/dev/shm/dstfuse-test-{os.getpid()}.img"
    with open(path, "wb") as file:
        file.write(os.urandom(SIZE))
    backend = Backend(path)
    threads = thread_calls(backend, monkeypatch)
    try:
        assert backend_module.in_memory(backend._fd)
        data = os.urandom(8192)
        await backend.write(4096, data)
        for _ in range(3):
            assert await backend.read(4096, len(data)) == data
        assert len(threads) <= 1  # at most the read that found RWF_NOWAIT refused
        assert backend._nowait_reads
    finally:
        await backend.aclose()
        os.unlink(path)


def test_in_memory_agrees_with_the_mount_table(image):
    fd = os.open(image, os.O_RDONLY)
    try:
        assert backend_module.in_memory(fd) is _on_memory_file_system(image)
    finally:
        os.close(fd)


def _on_memory_file_system(path) -> bool:
    """From /proc/self/mounts: the longest mount point holding `path`."""
    best = ("", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best[0]):
                best = (point, kind)
    return best[1] in ("tmpfs", "ramfs")


async def test_large_writes_go_to_the_page_cache_inline_and_fua_writes_to_a_thread(
    image, monkeypatch
):
    """A plain write of up to INLINE_MAX bytes (512 KiB and 1 MiB frames
    included) is a pwrite in the event loop; FUA (fdatasync) and larger
    writes are calls that may block long, so they go to a thread."""
    backend = Backend(image)
    threads = thread_calls(backend, monkeypatch)
    try:
        assert backend_module.INLINE_MAX >= MiB
        data = os.urandom(MiB)
        await backend.write(0, data)
        await backend.write(MiB, memoryview(data)[: 512 << 10])
        assert threads == []
        await backend.write(2 * MiB, data, fua=True)
        assert threads == ["_pwrite"]
        monkeypatch.setattr(backend_module, "INLINE_MAX", 512 << 10)
        await backend.write(3 * MiB, data)
        assert threads == ["_pwrite", "_pwrite"]
        assert await backend.read(0, SIZE) == data + data[: 512 << 10] + bytes(
            image.read_bytes()[MiB + (512 << 10) : 2 * MiB]
        ) + data + data
    finally:
        await backend.aclose()


@pytest.mark.parametrize("dsync", ["supported", "unsupported"])
async def test_a_fua_write_syncs_its_own_range_not_the_whole_file(image, monkeypatch, dsync):
    """A FUA write is one pwritev with RWF_DSYNC (its range durable, not the
    file's other dirty pages: fdatasync of a file with 32 MiB dirty took
    60 ms against 0.7 ms, measured); a kernel or file system without
    RWF_DSYNC gets pwrite + fdatasync, once told, for good."""
    calls = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd, buffers, offset, flags=0):
        calls.append(("pwritev", flags))
        if flags & os.RWF_DSYNC and dsync == "unsupported":
            raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC here")
        return real_pwritev(fd, buffers, offset, flags)

    def fdatasync(fd):
        calls.append(("fdatasync", 0))
        real_fdatasync(fd)

    monkeypatch.setattr(backend_module.os, "pwritev", pwritev)
    monkeypatch.setattr(backend_module.os, "fdatasync", fdatasync)
    backend = Backend(image)
    try:
        data = os.urandom(8192)
        await backend.write(4096, data, fua=True)
        await backend.write(MiB, data, fua=True)
        await backend.write(2 * MiB, data)
        if dsync == "supported":
            assert calls == [("pwritev", os.RWF_DSYNC)] * 2
        else:  # plain writes are os.pwrite, not counted here
            assert calls == [("pwritev", os.RWF_DSYNC), ("fdatasync", 0), ("fdatasync", 0)]
        for offset in (4096, MiB, 2 * MiB):
            assert await backend.read(offset, len(data)) == data
    finally:
        await backend.aclose()


async def test_cached_reads_up_to_read_inline_max_skip_the_thread(image, monkeypatch):
    backend = Backend(image)
    threads = thread_calls(backend, monkeypatch)
    try:
        content = image.read_bytes()  # now in the page cache
        assert backend_module.READ_INLINE_MAX >= 512 << 10
        assert await backend.read(MiB, 512 << 10) == content[MiB : MiB + (512 << 10)]
        cached = backend.read_cached(0, backend_module.READ_INLINE_MAX)
        assert cached == content[: backend_module.READ_INLINE_MAX]
        assert threads == []
        length = backend_module.READ_INLINE_MAX + 4096
        assert backend.read_cached(0, length) is None
        assert await backend.read(0, length) == content[:length]
        assert threads == ["_pread"]
    finally:
        await backend.aclose()


async def test_backend_zero_length_requests_touch_nothing(image):
    before = image.read_bytes()
    backend = Backend(image)
    try:
        assert await backend.read(SIZE, 0) == b""
        await backend.write(SIZE, b"")
        await backend.trim(0, 0)
        await backend.write_zeroes(0, 0)
    finally:
        await backend.aclose()
    assert image.read_bytes() == before


async def test_backend_trim_reads_back_zeroes_and_frees_space(tmp_path):
    path = tmp_path / "dense.img"
    path.write_bytes(os.urandom(SIZE))
    backend = Backend(path)
    try:
        allocated = allocated_bytes(path)
        await backend.trim(MiB, 2 * MiB)
        assert await backend.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert os.path.getsize(path) == SIZE
        assert allocated_bytes(path) <= allocated - 2 * MiB
        # Unaligned edges are zeroed too, neighbours untouched.
        keep = await backend.read(0, 10)
        await backend.trim(10, 100)
        assert await backend.read(0, 110) == keep + bytes(100)
    finally:
        await backend.aclose()


async def test_backend_write_zeroes_with_fua(image):
    before = image.read_bytes()
    backend = Backend(image)
    try:
        await backend.write_zeroes(4095, 3 * MiB + 7, fua=True)
    finally:
        await backend.aclose()
    after = image.read_bytes()
    assert after[4095 : 4095 + 3 * MiB + 7] == bytes(3 * MiB + 7)
    assert after[:4095] == before[:4095]
    assert after[4095 + 3 * MiB + 7 :] == before[4095 + 3 * MiB + 7 :]


@pytest.mark.parametrize("operation", ["trim", "write_zeroes"])
async def test_backend_falls_back_to_zero_buffers_without_fallocate(
    image, monkeypatch, operation
):
    """A file system without hole punching still gets zeroes, written in
    bounded chunks."""
    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported here")

    writes: list[int] = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd, data, offset):
        writes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(backend_module, "fallocate", unsupported)
    monkeypatch.setattr(backend_module.os, "pwrite", counting_pwrite)
    before = image.read_bytes()
    backend = Backend(image)
    try:
        await getattr(backend, operation)(100, 2 * CHUNK_SIZE + 5)
    finally:
        await backend.aclose()
    after = image.read_bytes()
    assert after[100 : 100 + 2 * CHUNK_SIZE + 5] == bytes(2 * CHUNK_SIZE + 5)
    assert after[:100] == before[:100]
    assert after[100 + 2 * CHUNK_SIZE + 5 :] == before[100 + 2 * CHUNK_SIZE + 5 :]
    assert writes and max(writes) <= CHUNK_SIZE


async def test_backend_fallocate_errors_that_are_not_unsupported_propagate(image, monkeypatch):
    def broken(fd, mode, offset, length):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(backend_module, "fallocate", broken)
    backend = Backend(image)
    try:
        with pytest.raises(OSError) as caught:
            await backend.trim(0, 4096)
        assert caught.value.errno == errno.EIO
    finally:
        await backend.aclose()


async def test_backend_checksum_is_xxh3_128_of_the_range(image):
    content = image.read_bytes()
    backend = Backend(image)
    try:
        for offset, length in [(0, SIZE), (7, 3 * MiB + 1), (SIZE - 1, 1), (123, 0)]:
            expected = xxhash.xxh3_128_digest(content[offset : offset + length])
            assert await backend.checksum(offset, length) == expected
    finally:
        await backend.aclose()


async def test_backend_refuses_ranges_past_the_end(image):
    before = image.read_bytes()
    backend = Backend(image)
    try:
        for call in (
            lambda: backend.read(SIZE - 1, 2),
            lambda: backend.write(SIZE, b"x"),
            lambda: backend.trim(SIZE - 4096, 8192),
            lambda: backend.write_zeroes(-1, 10),
            lambda: backend.checksum(0, SIZE + 1),
        ):
            with pytest.raises(OSError) as caught:
                await call()
            assert caught.value.errno == errno.EINVAL
    finally:
        await backend.aclose()
    assert image.read_bytes() == before


async def test_read_only_backend_refuses_every_change(image):
    before = image.read_bytes()
    backend = Backend(image, read_only=True)
    try:
        assert await backend.read(0, 100) == before[:100]
        for call in (
            lambda: backend.write(0, b"x"),
            lambda: backend.trim(0, 4096),
            lambda: backend.write_zeroes(0, 4096),
        ):
            with pytest.raises(OSError) as caught:
                await call()
            assert caught.value.errno == errno.EROFS
    finally:
        await backend.aclose()
    assert image.read_bytes() == before


def test_backend_open_errors_keep_their_errno(tmp_path):
    with pytest.raises(FileNotFoundError):
        Backend(tmp_path / "missing.img")
    with pytest.raises(OSError) as caught:
        Backend(tmp_path)
    assert caught.value.errno in (errno.EISDIR, errno.EINVAL)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, os.devnull):  # neither a regular file nor a block device
        with pytest.raises(OSError) as caught:
            Backend(path)
        assert caught.value.errno == errno.EINVAL


async def test_backend_read_of_a_file_that_shrank_is_eio(image):
    backend = Backend(image)
    try:
        os.truncate(image, SIZE // 2)
        with pytest.raises(OSError) as caught:
            await backend.read(SIZE - 4096, 4096)
        assert caught.value.errno == errno.EIO
    finally:
        await backend.aclose()


async def test_backend_runs_disk_calls_concurrently_and_closes_after_them(image):
    backend = Backend(image, threads=4)
    content = image.read_bytes()
    results: dict[int, bytes] = {}

    async def read(index: int) -> None:
        results[index] = await backend.read(index * 4096, 4096)

    async with trio.open_nursery() as nursery:
        for index in range(64):
            nursery.start_soon(read, index)
        await trio.sleep(0)
        nursery.start_soon(backend.aclose)
    assert all(results[i] == content[i * 4096 : (i + 1) * 4096] for i in range(64))
    with pytest.raises(OSError) as caught:
        await backend.read(0, 1)
    assert caught.value.errno == errno.EBADF


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"), reason="needs root")
async def test_backend_on_a_block_device(tmp_path):
    path = tmp_path / "loop.img"
    path.write_bytes(os.urandom(8 * MiB))
    device = subprocess.run(
        ["losetup", "--find", "--show", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        backend = Backend(device)
        try:
            assert backend.is_block_device and backend.size == 8 * MiB
            data = os.urandom(MiB)
            await backend.write(MiB, data, fua=True)
            assert await backend.read(MiB, MiB) == data
            assert await backend.checksum(MiB, MiB) == xxhash.xxh3_128_digest(data)
            await backend.trim(2 * MiB, MiB)
            assert await backend.read(2 * MiB, MiB) == bytes(MiB)
            await backend.write_zeroes(3 * MiB + 100, 5000)  # unaligned: falls back
            assert await backend.read(3 * MiB + 100, 5000) == bytes(5000)
            await backend.flush()
        finally:
            await backend.aclose()
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
    content = path.read_bytes()
    assert content[MiB : 2 * MiB] == data
    assert content[2 * MiB : 3 * MiB] == bytes(MiB)


# -- LocalNode -------------------------------------------------------------


async def test_local_node_serves_io_and_counts_it(image, nursery):
    node = LocalNode(image)
    assert node.state is NodeState.OFFLINE
    await node.start(nursery)
    try:
        assert node.state is NodeState.ONLINE
        assert node.size == SIZE and node.writable
        assert node.description == f"L: {image}"
        data = os.urandom(8192)
        await node.write(4096, data, fua=True)
        assert await node.read(4096, 8192) == data
        assert await node.checksum(4096, 8192) == xxhash.xxh3_128_digest(data)
        await node.trim(4096, 4096)
        await node.write_zeroes(8192, 4096, fua=True)
        assert await node.read(4096, 8192) == bytes(8192)
        await node.flush()
        counters = node.counters
        assert counters.requests == 7
        assert counters.bytes_written == 8192 and counters.bytes_read == 16384
        assert counters.errors == 0 and counters.in_flight == 0
    finally:
        await node.aclose()
    assert node.state is NodeState.OFFLINE


async def test_local_node_checks_bounds_before_io(image, nursery):
    before = image.read_bytes()
    node = LocalNode(image)
    await node.start(nursery)
    try:
        with pytest.raises(RequestOutOfRange):
            await node.write(SIZE - 1, b"ab")
        with pytest.raises(RequestOutOfRange):
            await node.read(SIZE, 1)
        with pytest.raises(RequestOutOfRange):
            await node.trim(0, SIZE + 4096)
        assert node.counters.requests == 0
    finally:
        await node.aclose()
    assert image.read_bytes() == before


async def test_read_only_local_node_refuses_writes(image, nursery):
    before = image.read_bytes()
    node = LocalNode(image, read_only=True)
    await node.start(nursery)
    try:
        assert not node.writable
        assert await node.read(0, 10) == before[:10]
        for call in (
            lambda: node.write(0, b"x"),
            lambda: node.trim(0, 4096),
            lambda: node.write_zeroes(0, 4096),
        ):
            with pytest.raises(NodeError) as caught:
                await call()
            assert caught.value.errno == errno.EROFS
    finally:
        await node.aclose()
    assert image.read_bytes() == before


async def test_local_node_missing_file_is_refused_with_its_errno(tmp_path, nursery):
    node = LocalNode(tmp_path / "missing.img")
    with pytest.raises(NodeRefused) as caught:
        await node.start(nursery)
    assert caught.value.errno == errno.ENOENT
    assert "missing.img" in str(caught.value)
    assert node.state is NodeState.OFFLINE


async def test_local_node_disk_errors_keep_their_errno(image, nursery, monkeypatch):
    node = LocalNode(image)
    await node.start(nursery)
    try:
        def failing_pwrite(fd, data, offset):
            raise OSError(errno.EIO, "medium error")

        monkeypatch.setattr(backend_module.os, "pwrite", failing_pwrite)
        with pytest.raises(NodeError) as caught:
            await node.write(0, b"data")
        assert caught.value.errno == errno.EIO
        assert str(node) in str(caught.value)
        assert node.counters.errors == 1 and node.counters.in_flight == 0
    finally:
        await node.aclose()


async def test_fast_write_zeroes_refuses_what_would_write_zero_buffers(image, monkeypatch):
    """FAST_ZERO (NBD): without fallocate, ENOTSUP and the file untouched;
    without fast, the same request zeroes by writing."""
    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported here")

    monkeypatch.setattr(backend_module, "fallocate", unsupported)
    before = image.read_bytes()
    backend = Backend(image)
    try:
        with pytest.raises(OSError) as caught:
            await backend.write_zeroes(0, 8192, fast=True)
        assert caught.value.errno == errno.ENOTSUP
        assert image.read_bytes() == before
        await backend.write_zeroes(0, 8192)
        assert image.read_bytes()[:8192] == bytes(8192)
    finally:
        await backend.aclose()


async def test_allocation_reports_the_holes_of_a_file(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as file:
        file.truncate(4 * MiB)
        file.seek(MiB)
        file.write(b"x" * 8192)
    backend = Backend(path)
    try:
        assert await backend.allocation(0, 4 * MiB) == [
            (MiB, True), (8192, False), (3 * MiB - 8192, True)]
        assert await backend.allocation(MiB + 4096, MiB) == [(4096, False), (MiB - 4096, True)]
        assert await backend.allocation(0, 4 * MiB, limit=2) == [(MiB, True), (8192, False)]
        with pytest.raises(OSError):
            await backend.allocation(4 * MiB - 10, 20)
    finally:
        await backend.aclose()

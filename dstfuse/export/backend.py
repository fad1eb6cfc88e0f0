"""The bytes behind an export or a local node: one regular file or block device.

`Backend` owns one file descriptor, opened once, and runs disk calls
(pread, pwrite, fdatasync, fallocate, ioctl) in worker threads through a
`trio.CapacityLimiter` it owns, so the event loop does not wait on the disk.
It is shared by the export server (`dstfuse.export.server`, both its dstfuse
and its NBD sessions) and `LocalNode`.

Two exceptions, because a thread handoff costs more CPU than a
page-cache copy (about 80 us per request, measured: a third of a 4 KiB
request's cost on the node):
- a read of at most `READ_INLINE_MAX` bytes is first tried in the event
  loop with RWF_NOWAIT, which returns at once instead of waiting for the
  disk; anything not wholly in the page cache goes to a thread. On tmpfs
  and ramfs, where this kernel refuses RWF_NOWAIT, such reads are plain
  reads in the event loop (the pages are in memory, unless swapped out). Copying
  1 MiB from the page cache takes about as long as the handoff alone;
- a write of at most `INLINE_MAX` bytes (the default largest request)
  without FUA is a pwrite into the page cache in the event loop: 58 us for
  512 KiB against 82 us through a thread, measured. It waits only when the
  kernel throttles writers because dirty pages pile up
  (balance_dirty_pages, at most 200 ms a pause); then the disk is the
  bottleneck for every writer anyway. Calls that may block for long -
  fdatasync, FUA writes, punching holes and zeroing, larger writes - still
  go to a thread.

Invariants:
- `size` is fixed when the backend is opened (fstat for files,
  BLKGETSIZE64 for block devices); every method checks
  `0 <= offset`, `offset + length <= size` before touching the disk, so a
  read never runs into the end of a file;
- a method either does all it was asked or raises `OSError` with the errno
  the disk gave (EIO for a file that shrank underneath us); it never returns
  partial success and never allocates more than `CHUNK_SIZE` bytes for
  TRIM, WRITE_ZEROES or CHECKSUM whatever the range;
- `fua=True` means the data is on stable storage (RWF_DSYNC, or pwrite and
  fdatasync where the kernel lacks it) before the call
  returns;
- the descriptor is closed only by `aclose`, after every call that uses it
  has finished: a closed descriptor number can never be reused under a
  running pread/pwrite.

It must never interpret the bytes it stores, and never log data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio
import xxhash

from .lock import lock_backing

log = logging.getLogger(__name__)

#: Largest buffer TRIM/WRITE_ZEROES fallbacks and CHECKSUM allocate at once.
CHUNK_SIZE = 1 << 20
#: Disk calls one backend runs at once.
DEFAULT_THREADS = 8
#: Largest write done in the event loop (see the module doc).
INLINE_MAX = 4 << 20
#: Largest read tried in the event loop with RWF_NOWAIT (see the module doc).
READ_INLINE_MAX = 1 << 20
#: Cached reads up to this size are returned as bytes (see read_cached).
_COPY_MAX = 64 << 10

# linux/fs.h
_BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
_BLKDISCARD = 0x1277  # _IO(0x12, 119)
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

#: errnos that mean "this file system or device cannot do that operation".
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})

_T = TypeVar("_T")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

#: statfs f_type of file systems whose pages live only in memory (linux/magic.h):
#: a read there never waits for a disk.
_MEMORY_FILE_SYSTEMS = frozenset({0x01021994, 0x858458F6})  # TMPFS_MAGIC, RAMFS_MAGIC


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    libc = _libc
    function = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate_function = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with `mode` flags (os.posix_fallocate has none); raises
    OSError with the call's errno."""
    if _fallocate_function is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate_function(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def in_memory(fd: int) -> bool:
    """The open file is on tmpfs or ramfs (fstatfs; False if that fails).
    f_type is the first member of struct statfs, a native long on Linux."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc.fstatfs(fd, buffer) != 0:
        return False
    return ctypes.c_long.from_buffer(buffer).value in _MEMORY_FILE_SYSTEMS


class Backend:
    """A regular file or block device at `path`, opened read-write (or
    read-only) once; `size` bytes addressable from offset 0. `identity` is
    (st_dev, st_ino) of a file, (st_rdev, 0) of a block device.

    Raises OSError from the constructor when the path cannot be opened or is
    neither a regular file nor a block device (EINVAL then).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(self.path, flags)
        try:
            info = os.fstat(fd)
            if stat.S_ISBLK(info.st_mode):
                self.is_block_device = True
                self.identity = (info.st_rdev, 0)
                raw = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
                self.size: int = struct.unpack("Q", raw)[0]
            elif stat.S_ISREG(info.st_mode):
                self.is_block_device = False
                self.identity = (info.st_dev, info.st_ino)
                self.size = info.st_size
            else:
                raise OSError(
                    errno.EINVAL, "neither a regular file nor a block device", str(self.path)
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._nowait_reads = True  # until the kernel says RWF_NOWAIT is unsupported
        #: the flag of inline reads: RWF_NOWAIT, or none on tmpfs/ramfs when
        #: the kernel refuses RWF_NOWAIT there (such reads never wait for a disk)
        self._inline_read_flags = os.RWF_NOWAIT
        self._dsync_writes = True  # until the kernel says RWF_DSYNC is unsupported
        self._limiter = trio.CapacityLimiter(threads)
        self._calls = 0
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"Backend({str(self.path)!r}, {self.size} bytes, {mode})"

    def lock(self) -> None:
        """Take the export node's OFD lock on the file (dstfuse/export/lock.py):
        exclusive when open read-write, shared when read-only. Raises
        BackingLocked when another process serves the file."""
        lock_backing(self._fd, exclusive=not self.read_only)

    # -- thread plumbing ------------------------------------------------
    async def _run(self, function: Callable[..., _T], *args: object) -> _T:
        """Run `function(*args)` in a worker thread. Not abandoned on
        cancellation: the caller waits for the disk call to finish, so the
        descriptor stays valid and the in-flight count stays exact."""
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path} is closed")
        self._calls += 1
        if self._calls == 1:
            self._idle = trio.Event()
        try:
            return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)
        finally:
            self._calls -= 1
            if self._calls == 0:
                self._idle.set()

    def _check(self, offset: int, length: int, *, writing: bool) -> None:
        if writing and self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(
                errno.EINVAL,
                f"range [{offset}, +{length}) is outside {self.path} ({self.size} bytes)",
            )

    # -- blocking primitives (run in threads) -----------------------------
    def _pread(self, offset: int, length: int) -> bytes:
        first = os.pread(self._fd, length, offset)
        if len(first) == length:
            return first
        # Reads of regular files only come back short at end of file, which
        # bounds checks exclude unless the file shrank under us; block
        # devices may split very large reads.
        buffer = bytearray(first)
        while len(buffer) < length:
            chunk = os.pread(self._fd, length - len(buffer), offset + len(buffer))
            if not chunk:
                raise OSError(errno.EIO, f"{self.path} ended at {offset + len(buffer)} (shrunk?)")
            buffer += chunk
        return bytes(buffer)

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        """Write all of `data`; with `fua`, durable on return. A FUA write is
        one pwritev with RWF_DSYNC: only its own range (and the metadata
        needed to read it back) goes to stable storage, not the file's other
        dirty pages as with fdatasync, which would make every FUA write wait
        for all the writes before it. Kernels or file systems without
        RWF_DSYNC get pwrite + fdatasync."""
        flags = os.RWF_DSYNC if fua and self._dsync_writes else 0
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                try:
                    if flags:
                        written = os.pwritev(self._fd, [view[done:]], offset + done, flags)
                    else:
                        written = os.pwrite(self._fd, view[done:], offset + done)
                except OSError as exc:
                    if not flags or exc.errno not in (*_UNSUPPORTED, errno.EINVAL):
                        raise
                    log.info("%s: no RWF_DSYNC (%s); FUA writes use fdatasync", self.path, exc)
                    self._dsync_writes = False
                    flags = 0
                    continue
                if written <= 0:
                    raise OSError(errno.EIO, f"{self.path}: write made no progress")
                done += written
        if fua and not flags:
            os.fdatasync(self._fd)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, CHUNK_SIZE))
        end = offset + length
        while offset < end:
            step = min(len(zeroes), end - offset)
            self._pwrite(offset, zeroes[:step] if step < len(zeroes) else zeroes, False)
            offset += step

    def _zero_range(self, offset: int, length: int, fua: bool, fast: bool) -> None:
        """WRITE_ZEROES: allocate-and-zero, else punch a hole, else write
        zero buffers; each fallback only when the one before is unsupported.
        `fast`: only what costs no data writes (fallocate on a file; on a
        block device only PUNCH_HOLE, which the kernel never emulates by
        writing zeroes), else ENOTSUP before anything is changed."""
        modes = [
            _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE,
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
        ]
        if fast and self.is_block_device:
            modes = modes[1:]
        if length and not self._try_fallocate(modes, offset, length):
            if fast:
                raise OSError(errno.ENOTSUP, f"{self.path} cannot zero without writing zeroes")
            if not (self.is_block_device and self._try_zeroout(offset, length)):
                self._write_zero_buffers(offset, length)
        if fua:
            os.fdatasync(self._fd)

    def _allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs covering [offset, +length) from the start,
        at most `limit` of them (the rest is left out), from SEEK_DATA /
        SEEK_HOLE. A block device, or a file system without them, is all
        data. The descriptor's file position moves; pread/pwrite ignore it."""
        end = offset + length
        if self.is_block_device:
            return [(length, False)]
        runs: list[tuple[int, bool]] = []
        position = offset
        while position < end and len(runs) < limit:
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                    data = end
                elif exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                    return [(length, False)]
                else:
                    raise
            if data > position:
                runs.append((min(data, end) - position, True))
                position = min(data, end)
                continue
            hole = min(os.lseek(self._fd, position, os.SEEK_HOLE), end)
            runs.append((hole - position, False))
            position = hole
        return runs

    def _discard(self, offset: int, length: int) -> None:
        """TRIM. Files: punch a hole. Block devices: fallocate(PUNCH_HOLE) is
        a discard that guarantees zeroes afterwards (BLKDISCARD alone does
        not, and `Node.trim` promises zeroes); devices that cannot, get
        BLKZEROOUT, then zero buffers."""
        if not length:
            return
        if self._try_fallocate([_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE], offset, length):
            return
        if self.is_block_device and self._try_zeroout(offset, length):
            return
        self._write_zero_buffers(offset, length)

    def _try_fallocate(self, modes: list[int], offset: int, length: int) -> bool:
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
                return True
            except OSError as exc:
                # Block devices refuse ranges not aligned to their logical
                # block size with EINVAL; the range itself was checked.
                if exc.errno in _UNSUPPORTED or (
                    self.is_block_device and exc.errno == errno.EINVAL
                ):
                    continue
                raise
        return False

    def _try_zeroout(self, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return True
        except OSError as exc:
            if exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                return False
            raise

    def _digest(self, offset: int, length: int) -> bytes:
        hasher = xxhash.xxh3_128()
        end = offset + length
        while offset < end:
            step = min(CHUNK_SIZE, end - offset)
            hasher.update(self._pread(offset, step))
            offset += step
        return hasher.digest()

    # -- the async interface --------------------------------------------
    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        """The range if it is at most `READ_INLINE_MAX` bytes and the page
        cache holds all of it, else None; never waits for the disk
        (RWF_NOWAIT; on tmpfs and ramfs, where this kernel refuses it, a
        plain read: their pages are in memory). Bounds are the caller's to check first. Up to
        `_COPY_MAX` bytes come back as bytes (what a Reply's quick check
        takes); larger ranges as the bytearray they were read into, which
        is the caller's alone, saving a copy of the whole range."""
        if length > READ_INLINE_MAX or not self._nowait_reads or self._closed:
            return None
        buffer = bytearray(length)
        try:
            done = os.preadv(self._fd, [buffer], offset, self._inline_read_flags)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED and self._inline_read_flags:
                if not self.is_block_device and in_memory(self._fd):
                    self._inline_read_flags = 0  # plain reads from memory from now on
                else:
                    self._nowait_reads = False
            return None  # EAGAIN (not cached) or any error: the thread path decides
        if done != length:
            return None
        return bytes(buffer) if length <= _COPY_MAX else buffer

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`."""
        self._check(offset, length, writing=False)
        if length == 0:
            return b""
        cached = self.read_cached(offset, length)
        if cached is not None:
            return cached if type(cached) is bytes else bytes(cached)
        return await self._run(self._pread, offset, length)

    def write_cached(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write a range into the page cache now, in the calling
        thread (see the module doc); False, doing nothing, when the write
        is too large or the backend closed. Bounds are the caller's."""
        if not 0 < len(data) <= INLINE_MAX or self._closed or self.read_only:
            return False
        self._pwrite(offset, data, False)
        return True

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write all of `data` at `offset`; with `fua`, durable on return."""
        self._check(offset, len(data), writing=True)
        if fua or not self.write_cached(offset, data):
            if len(data) or fua:
                await self._run(self._pwrite, offset, data, fua)

    async def flush(self) -> None:
        """fdatasync: every write completed before this call is durable."""
        await self._run(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int) -> None:
        """Discard the range; it reads back as zeroes afterwards."""
        self._check(offset, length, writing=True)
        if length:
            await self._run(self._discard, offset, length)

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, fast: bool = False
    ) -> None:
        """Make the range read back as zeroes; with `fua`, durable on return;
        with `fast`, ENOTSUP (nothing changed) unless it can be done without
        writing zeroes (see `_zero_range`)."""
        self._check(offset, length, writing=True)
        if length or fua:
            await self._run(self._zero_range, offset, length, fua, fast)

    async def allocation(
        self, offset: int, length: int, *, limit: int = 1024
    ) -> list[tuple[int, bool]]:
        """Which parts of the range are holes: (length, is_hole) runs from
        `offset` on, consecutive, at most `limit` (then they cover only the
        start of the range). Holes read back as zeroes."""
        self._check(offset, length, writing=False)
        if not length:
            return []
        return await self._run(self._allocation, offset, length, limit)

    async def checksum(self, offset: int, length: int) -> bytes:
        """xxh3-128 digest of the range: equal to
        `xxhash.xxh3_128_digest(data)` of the same bytes."""
        self._check(offset, length, writing=False)
        return await self._run(self._digest, offset, length)

    def close(self) -> None:
        """Close the descriptor now; only for a backend no call is using
        (e.g. when startup fails). Otherwise use `aclose`."""
        if self._calls:
            raise RuntimeError(f"{self.path}: close() with {self._calls} disk call(s) running")
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    async def aclose(self) -> None:
        """Close the descriptor once no disk call uses it. Later calls raise
        EBADF. Does not flush: callers flush first when they want that."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._idle.wait()
        os.close(self._fd)

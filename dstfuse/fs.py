"""The FUSE filesystem: one regular file per storage plus the `.dst/` tree.

This module and `fusehooks.py` (what pyfuse3 lacks, added through its
internals) are the only ones that import pyfuse3. It maps FUSE requests onto
`Storage` calls and onto the control tree model (`control.py`), and turns
every failure into a `FUSEError`: a `DstError` becomes its errno and is
logged once here with the storage and the request (node errors name the
node in their message); anything else is a bug, logged with its traceback,
and becomes EIO. It never caches storage data and never retries: durability
and resends belong to the storage, algorithm and node layers below.

Layout of the mount::

    /<storage>       one file per top-level storage; size = storage size;
                     mode 0600, or 0400 when the storage is not writable
    /.dst/...        the control tree (control.py)

Semantics that users and the loop driver rely on:

- storage files are opened with direct_io, so the kernel caches nothing and
  `losetup --direct-io=on` works; requests up to 1 MiB arrive whole
  (libfuse >= 3.6 negotiates max_write = max_pages * 4 KiB = 1 MiB with the
  kernel, whose `fs.fuse.max_pages_limit` is 256 pages by default) when
  written to the file directly; a loop device splits its requests at about
  512 KiB (its queue's segment limit) before they reach FUSE;
- reads past the end are short or empty; writes starting at or past the end
  fail with ENOSPC, writes crossing it are cut short (like a block device);
- FUSE `flush` is close(2) and sends nothing to the storage; `fsync` flushes
  the storage (FLUSH to every node); files opened with O_SYNC or O_DSYNC
  make every write FUA;
- fallocate: PUNCH_HOLE|KEEP_SIZE trims, ZERO_RANGE writes zeroes, plain
  allocation inside the file succeeds doing nothing, other modes get
  EOPNOTSUPP. pyfuse3 (3.5) has no fallocate handler, so `FuseSession`
  installs one directly in libfuse's handler table (see `LibfusePatch`);
  if that is not possible the kernel answers EOPNOTSUPP by itself;
- pyfuse3's workers take queued requests through `FuseReader` (one poll,
  no lock) and wait through pyfuse3's own wait only when none is queued,
  so that pyfuse3 still starts a worker whenever none is idle: requests
  waiting on a silent node never hold up the others, the control tree or
  `dstfuse status`, however many there are;
- namespace changes (create, unlink, mkdir, rename, ...) fail with EPERM;
  size changes of a storage file fail with EPERM; other attribute changes
  are accepted and ignored. Control files accept truncation (so that
  `echo 1 > .dst/vol0/n-0-0/dirty` works); each write(2) to a control file
  is one value, handed to `ControlFile.write`.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyfuse3
import trio

from .algorithms import ControlFile
from .control import CONTROL_DIRECTORY, ControlDirectory, ControlEntry, ControlTree
from .errors import DstError, UserError
from .fusehooks import FuseReader, LibfusePatch
from .storage import Storage

log = logging.getLogger(__name__)

#: Idle handler tasks kept waiting for requests while the mount is busy
#: (pyfuse3's `min_tasks`); more retire, each freeing its request buffer
#: (about 1 MiB of address space, of which the pages its requests touched
#: are memory: all of it once the task took a 1 MiB write, and idle tasks
#: take turns, so after sequential I/O every idle task holds about 1 MiB).
DEFAULT_IDLE_WORKERS = 64
#: Idle handler tasks kept once the daemon is quiet (`retire_idle_workers`).
IDLE_WORKERS_WHEN_QUIET = 2
#: pyfuse3's `max_tasks`, i.e. none: pyfuse3 starts a handler task whenever
#: a request arrives with no task idle, so that requests waiting on a silent
#: node never leave the next request unread (a ceiling would: once that
#: many wait, nobody reads /dev/fuse). The kernel bounds the tasks busy at
#: once: `max_background` asynchronous requests plus one synchronous request
#: per thread blocked on the mount, each holding its request's pages.
_NO_WORKER_LIMIT = 2**31 - 1
#: Asynchronous requests (the loop driver's direct I/O) the kernel may have
#: outstanding at once; the kernel default is 12.
DEFAULT_MAX_BACKGROUND = 64

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLOCK_SIZE = 4096

TreePath = tuple[str, ...]


# ----------------------------------------------------------------- handles


@dataclass
class _StorageHandle:
    storage: Storage
    fua: bool
    writable: bool


@dataclass
class _ControlHandle:
    path: TreePath
    file: ControlFile
    snapshot: bytes


@dataclass
class _DirectoryHandle:
    entries: list[tuple[str, TreePath]] = field(default_factory=list)


class _Request:
    """Turns what escapes a handler into one `FUSEError`, logging it once.

    `what` is a %-format and `args` its arguments, rendered only when
    something failed."""

    __slots__ = ("what", "args")

    def __init__(self, what: str, *args: object) -> None:
        self.what = what
        self.args = args

    def __enter__(self) -> _Request:
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or isinstance(exc, pyfuse3.FUSEError) or not isinstance(exc, Exception):
            return False
        request = self.what % self.args
        if isinstance(exc, DstError):
            log.warning("%s failed (%s): %s", request, errno.errorcode.get(exc.errno, "?"), exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        log.error("%s failed with an unexpected error", request, exc_info=exc)
        raise pyfuse3.FUSEError(errno.EIO) from None


# -------------------------------------------------------------- operations


class StorageFilesystem(pyfuse3.Operations):
    """The FUSE operations of one mount.

    Inodes: the root is `pyfuse3.ROOT_INODE`; every other path gets an inode
    number on first lookup and keeps it for the life of the mount (the tree
    is small and finite, so the table is bounded by the number of paths
    that ever existed). `forget` therefore has nothing to release.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, storages: Mapping[str, Storage], control: ControlTree) -> None:
        super().__init__()
        self._storages: dict[str, Storage] = {}
        self._control = control
        self._inodes: dict[TreePath, int] = {(): pyfuse3.ROOT_INODE}
        self._paths: dict[int, TreePath] = {pyfuse3.ROOT_INODE: ()}
        self._next_inode = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._handles: dict[int, _StorageHandle | _ControlHandle | _DirectoryHandle] = {}
        self._next_handle = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._time_ns = time.time_ns()
        # Inodes for the storage files and .dst, in a stable order.
        for name, storage in storages.items():
            self._add(name, storage)
        self._inode((CONTROL_DIRECTORY,))

    def add_storage(self, storage: Storage) -> None:
        """Show `storage` as the file `/<name>` when a reload adds it (a
        lookup that failed before is not cached: it appears at once)."""
        self._add(storage.name, storage)

    def _add(self, name: str, storage: Storage) -> None:
        if name.startswith(".") or "/" in name or not name:
            raise ValueError(f"bad storage file name {name!r}")
        self._storages[name] = storage
        self._inode((name,))

    # -- the namespace ----------------------------------------------------
    def _inode(self, path: TreePath) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = next(self._next_inode)
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def _path(self, inode: int) -> TreePath:
        path = self._paths.get(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    def _resolve(self, path: TreePath) -> Storage | ControlEntry | None:
        """What `path` is now: a Storage, a control entry, the root (the
        control root stands in for it as a directory), or None."""
        if not path:
            return _ROOT
        if path[0] == CONTROL_DIRECTORY:
            return self._control.resolve(path[1:])
        if len(path) == 1:
            return self._storages.get(path[0])
        return None

    def _children(self, path: TreePath) -> list[str]:
        if not path:
            return [*self._storages, CONTROL_DIRECTORY]
        entry = self._resolve(path)
        if isinstance(entry, ControlDirectory):
            return list(entry.entries())
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _attributes(self, path: TreePath, entry: Storage | ControlEntry) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self._inode(path)
        attr.generation = 0
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._time_ns
        if isinstance(entry, Storage):
            attr.st_mode = stat.S_IFREG | (0o600 if entry.writable else 0o400)
            attr.st_nlink = 1
            attr.st_size = entry.size
            attr.st_blocks = (entry.size + 511) // 512
            # The size changes only by a reload, which invalidates it
            # (`storage_resized`).
            attr.entry_timeout = attr.attr_timeout = 60
        elif isinstance(entry, ControlDirectory):
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
            attr.entry_timeout = 1
            attr.attr_timeout = 1
        else:
            attr.st_mode = stat.S_IFREG | (0o644 if entry.write is not None else 0o444)
            attr.st_nlink = 1
            attr.st_size = self._rendered_length(path, entry)
            attr.st_blocks = 0
            # Rendered at open: sizes change with the state they show.
            attr.entry_timeout = 1
            attr.attr_timeout = 0
        return attr

    def _rendered_length(self, path: TreePath, entry: ControlFile) -> int:
        try:
            return len(entry.read().encode())
        except Exception:  # noqa: BLE001 - the read at open reports it
            log.debug("%s: cannot render for its size", "/".join(path), exc_info=True)
            return BLOCK_SIZE

    def _entry(self, inode: int) -> tuple[TreePath, Storage | ControlEntry]:
        path = self._path(inode)
        entry = self._resolve(path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path, entry

    # -- lookup and attributes --------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        with _Request("lookup %r in inode %d", name, parent_inode):
            parent = self._path(parent_inode)
            text = os.fsdecode(name)
            if text == ".":
                path = parent
            elif text == "..":
                path = parent[:-1]
            else:
                path = (*parent, text)
            entry = self._resolve(path)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attributes(path, entry)

    async def getattr(self, inode, ctx=None):
        with _Request("getattr inode %d", inode):
            path, entry = self._entry(inode)
            return self._attributes(path, entry)

    async def setattr(self, inode, attr, fields, fh, ctx):
        with _Request("setattr inode %d", inode):
            path, entry = self._entry(inode)
            if fields.update_size and isinstance(entry, Storage) and attr.st_size != entry.size:
                log.warning(
                    "storage %s: refused to change its size to %d bytes", entry.name, attr.st_size
                )
                raise pyfuse3.FUSEError(errno.EPERM)
            # Mode, owner and times are fixed; accepting the change without
            # applying it keeps tools like cp --preserve and touch working.
            return self._attributes(path, entry)

    async def forget(self, inode_list):
        pass

    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        total = sum(storage.size for storage in self._storages.values())
        stats.f_bsize = BLOCK_SIZE
        stats.f_frsize = BLOCK_SIZE
        stats.f_blocks = total // BLOCK_SIZE
        stats.f_bfree = 0
        stats.f_bavail = 0
        stats.f_files = len(self._inodes)
        stats.f_ffree = 0
        stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    # -- directories ------------------------------------------------------
    async def opendir(self, inode, ctx):
        with _Request("opendir inode %d", inode):
            path, entry = self._entry(inode)
            if isinstance(entry, (Storage, ControlFile)):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            handle = _DirectoryHandle([(name, (*path, name)) for name in self._children(path)])
            fh = next(self._next_handle)
            self._handles[fh] = handle
            return fh

    async def readdir(self, fh, start_id, token):
        with _Request("readdir handle %d", fh):
            handle = self._handles.get(fh)
            if not isinstance(handle, _DirectoryHandle):
                raise pyfuse3.FUSEError(errno.EBADF)
            for index in range(start_id, len(handle.entries)):
                name, path = handle.entries[index]
                entry = self._resolve(path)
                if entry is None:  # gone since opendir
                    continue
                attr = self._attributes(path, entry)
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index + 1):
                    break

    async def releasedir(self, fh):
        self._handles.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass

    # -- files --------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        with _Request("open inode %d", inode):
            path, entry = self._entry(inode)
            access = flags & os.O_ACCMODE
            wants_write = access in (os.O_WRONLY, os.O_RDWR)
            handle: _StorageHandle | _ControlHandle
            if isinstance(entry, Storage):
                if wants_write and not entry.writable:
                    raise pyfuse3.FUSEError(errno.EROFS)
                # O_SYNC includes the O_DSYNC bit.
                handle = _StorageHandle(entry, fua=bool(flags & os.O_DSYNC), writable=wants_write)
            elif isinstance(entry, ControlFile):
                if wants_write and entry.write is None:
                    raise pyfuse3.FUSEError(errno.EACCES)
                snapshot = b"" if access == os.O_WRONLY else entry.read().encode()
                handle = _ControlHandle(path, entry, snapshot)
            else:
                raise pyfuse3.FUSEError(errno.EISDIR)
            fh = next(self._next_handle)
            self._handles[fh] = handle
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def release(self, fh):
        self._handles.pop(fh, None)

    async def flush(self, fh):
        # close(2): durability comes from fsync or FUA, not from every close.
        pass

    def _file_handle(self, fh: int) -> _StorageHandle | _ControlHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, (_StorageHandle, _ControlHandle)):
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    async def read(self, fh, off, size):
        handle = self._file_handle(fh)
        if isinstance(handle, _ControlHandle):
            return handle.snapshot[off : off + size]
        storage = handle.storage
        with _Request("storage %s: read %d bytes at %d", storage.name, size, off):
            return await storage.read(off, size)

    async def write(self, fh, off, buf):
        handle = self._file_handle(fh)
        if isinstance(handle, _ControlHandle):
            return await self._write_control(handle, buf)
        storage = handle.storage
        with _Request("storage %s: write %d bytes at %d", storage.name, len(buf), off):
            room = storage.size - off
            if not buf:
                return 0
            if room <= 0:
                log.warning(
                    "storage %s: write %d bytes at %d: past the end (%d bytes)",
                    storage.name,
                    len(buf),
                    off,
                    storage.size,
                )
                raise pyfuse3.FUSEError(errno.ENOSPC)
            data = buf if len(buf) <= room else memoryview(buf)[:room]
            await storage.write(off, data, fua=handle.fua)
            return len(data)

    async def _write_control(self, handle: _ControlHandle, buf: bytes) -> int:
        """Hand one write to the control file; a file whose `write` is a
        coroutine (`.dst/.reload`) answers only once it is done. Afterwards
        the handle shows the file as it is now, so a writer that opened it
        read-write reads its own outcome back at offset 0."""
        try:
            return await self._write_control_value(handle, buf)
        finally:
            handle.snapshot = self._render_after_write(handle)

    def _render_after_write(self, handle: _ControlHandle) -> bytes:
        try:
            return handle.file.read().encode()
        except Exception:  # noqa: BLE001 - a later read reports it
            log.debug("%s: cannot render after a write", "/".join(handle.path), exc_info=True)
            return handle.snapshot

    async def _write_control_value(self, handle: _ControlHandle, buf: bytes) -> int:
        name = "/".join(handle.path)  # the path starts with CONTROL_DIRECTORY
        with _Request("control file %s: write %r", name, bytes(buf[:64])):
            if handle.file.write is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            try:
                text = bytes(buf).decode("utf-8")
            except UnicodeDecodeError:
                log.warning("control file %s: write is not UTF-8 text", name)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            try:
                outcome = handle.file.write(text)
                if inspect.isawaitable(outcome):
                    await outcome
            except UserError as exc:
                log.warning("control file %s: %s", name, exc)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            log.info("control file %s: wrote %r", name, text.strip())
            return len(buf)

    async def fsync(self, fh, datasync):
        handle = self._file_handle(fh)
        if isinstance(handle, _ControlHandle):
            return
        storage = handle.storage
        with _Request("storage %s: fsync", storage.name):
            await storage.flush()

    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a storage file (called through `LibfusePatch`)."""
        with _Request("fallocate inode %d mode %#x at %d (+%d)", inode, mode, offset, length):
            _, entry = self._entry(inode)
            if not isinstance(entry, Storage):
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            storage = entry
            if offset < 0 or length <= 0:
                raise pyfuse3.FUSEError(errno.EINVAL)
            end = offset + length
            keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
            kind = mode & ~FALLOC_FL_KEEP_SIZE
            if kind not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            if end > storage.size and not keep_size:
                # Would grow the file; a storage has a fixed size.
                raise pyfuse3.FUSEError(errno.ENOSPC)
            end = min(end, storage.size)
            if kind == 0 or end <= offset:
                return  # every byte inside the file is already allocated
            if not storage.writable:
                raise pyfuse3.FUSEError(errno.EROFS)
            if kind == FALLOC_FL_PUNCH_HOLE:
                await storage.trim(offset, end - offset)
            else:
                await storage.write_zeroes(offset, end - offset)

    # -- namespace changes are not allowed ------------------------------------
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    def storage_resized(self, name: str) -> None:
        """Make the kernel forget the cached attributes of storage `name`'s
        file, so the next stat (and then `losetup -c`) sees its new size.
        Only the attributes: storage files are direct_io, nothing else is
        cached, so this never waits on writeback."""
        inode = self._inodes.get((name,))
        if inode is None:
            return
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return  # the kernel forgot the inode: it caches nothing of it
            log.warning(
                "storage %s: the kernel may show the old size until its cache times out: %s",
                name,
                exc,
            )

    def open_handles(self) -> dict[str, int]:
        """Storage name -> number of open handles (for shutdown messages)."""
        counts: dict[str, int] = {}
        for handle in self._handles.values():
            if isinstance(handle, _StorageHandle):
                counts[handle.storage.name] = counts.get(handle.storage.name, 0) + 1
        return counts


#: Stands in for the mount root, which is a directory but no control entry.
_ROOT = ControlDirectory(dict)


# ----------------------------------------------------------------- session


class FuseSession:
    """One pyfuse3 mount of a `StorageFilesystem` (pyfuse3 allows one per
    process): `mount()`, then `await serve()` until unmounted or `stop()`,
    then `close()`. `close()` must be called whenever `mount()` was."""

    def __init__(
        self,
        filesystem: StorageFilesystem,
        mountpoint: str,
        *,
        options: Iterable[str] = (),
        idle_workers: int = DEFAULT_IDLE_WORKERS,
        max_background: int = DEFAULT_MAX_BACKGROUND,
    ) -> None:
        self.filesystem = filesystem
        self.mountpoint = mountpoint
        self.options = set(pyfuse3.default_options) | {"fsname=dstfuse", "subtype=dstfuse"}
        self.options |= set(options)
        self.idle_workers = idle_workers
        self._patch = LibfusePatch(self._dispatch_fallocate, max_background)
        self._reader: FuseReader | None = None
        self._nursery: trio.Nursery | None = None
        self._mounted = False
        self._session = False
        self._stopped = False

    @property
    def fallocate_supported(self) -> bool:
        return self._patch.installed

    def mount(self) -> None:
        """Mount at `mountpoint` (raises UserError if the kernel refuses)."""
        try:
            pyfuse3.init(self.filesystem, self.mountpoint, self.options)
        except RuntimeError as exc:
            # A failed mount leaves a session to destroy; a failed
            # fuse_session_new leaves none.
            self._session = "fuse_session_new" not in str(exc)
            raise UserError(
                f"cannot mount FUSE at {self.mountpoint} ({exc}; is /dev/fuse usable?)"
            ) from None
        self._session = True
        self._mounted = True
        self._patch.apply()
        self._reader = FuseReader.for_this_process()

    async def serve(self) -> None:
        """Answer requests until the filesystem is unmounted or `stop()`."""
        error: BaseException | None = None
        if self._reader is not None:
            self._reader.install()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await pyfuse3.main(min_tasks=self.idle_workers, max_tasks=_NO_WORKER_LIMIT)
            except BaseException as exc:
                error = exc  # raised below, outside the nursery, unwrapped
            finally:
                # Pending fallocate tasks still reply before the session goes.
                self._nursery = None
                if self._reader is not None:
                    self._reader.uninstall()
        if error is not None:
            raise error

    def stop(self) -> None:
        """Make `serve()` return once requests in progress are answered."""
        if self._mounted and not self._stopped:
            self._stopped = True
            pyfuse3.terminate()  # wakes the idle worker waiting on /dev/fuse

    async def retire_idle_workers(self) -> int:
        """Retire the idle handler tasks beyond IDLE_WORKERS_WHEN_QUIET, so
        that a quiet daemon does not keep a request buffer for each task
        the last burst needed; how many were told to go (0 without our
        reader, whose wait is what can retire them)."""
        if self._reader is None:
            return 0
        return await self._reader.retire_idle(IDLE_WORKERS_WHEN_QUIET)

    def close(self, *, unmount: bool = True) -> None:
        """Destroy the session; with `unmount`, also unmount (lazily, so an
        open file cannot make it fail). Safe to call more than once."""
        if self._session:
            self._session = False
            self._mounted = False
            pyfuse3.close(unmount=unmount)

    def _dispatch_fallocate(self, request, inode, mode, offset, length) -> None:
        nursery = self._nursery
        if nursery is None:
            self._patch.reply_error(request, errno.ENOSYS)
            return
        nursery.start_soon(self._fallocate, request, inode, mode, offset, length)

    async def _fallocate(self, request, inode, mode, offset, length) -> None:
        error = errno.EIO
        try:
            await self.filesystem.fallocate(inode, mode, offset, length)
            error = 0
        except pyfuse3.FUSEError as exc:
            error = exc.errno
        finally:
            # Exactly one reply per request, also when cancelled.
            self._patch.reply_error(request, error)

"""A FUSE file system with nothing behind it: the ceiling of any client
built on pyfuse3 and dstfuse's FUSE front end, on this machine.

`python nullfs.py MOUNTPOINT SIZE` mounts one file, MOUNTPOINT/bench, of
SIZE bytes, through `dstfuse.fs.FuseSession` (the mount options, the
`max_background` and the request reader of `dstfuse mount`) and answers
every read with zeros and every write at once, discarding it. What fio
measures on it is what pyfuse3, trio and the kernel's FUSE path cost per
request with no storage, network or node at all; `--floor` in run.py
compares it with nbdfuse in the same run (docs/performance.md).

It serves until unmounted, or until SIGTERM/SIGINT; it writes its pid to
MOUNTPOINT/../nullfs.pid once mounted.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from dstfuse.fs import FuseSession

FILE_NAME = b"bench"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class NullFilesystem(pyfuse3.Operations):
    """The root directory and one direct-I/O file of `size` bytes whose
    reads are zeros and whose writes go nowhere."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._zeros = bytes(1 << 20)

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = self.size
        attr.st_blksize = 4096
        attr.st_blocks = attr.st_size // 512
        return attr

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(FILE_INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attributes(FILE_INODE), 1)

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        size = max(0, min(size, self.size - off))
        return self._zeros[:size] if size <= len(self._zeros) else bytes(size)

    async def write(self, fh, off, buf):
        return len(buf)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def fallocate(self, inode, mode, offset, length):
        pass


async def serve(session: FuseSession) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    session.stop()
                    return

        nursery.start_soon(stop_on_signal)
        await session.serve()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("size", type=int, help="the file's size in bytes")
    args = parser.parse_args(argv)
    if args.size <= 0:
        parser.error("size must be positive")
    session = FuseSession(NullFilesystem(args.size), str(args.mountpoint))
    session.mount()
    try:
        (args.mountpoint.parent / "nullfs.pid").write_text(f"{os.getpid()}\n")
        trio.run(serve, session)
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

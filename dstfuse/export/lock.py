"""The export node's lock on its backing file: two node processes never
serve one file.

An open file description (OFD) lock (fcntl F_OFD_SETLK, as QEMU's image
locking uses) over the whole file: exclusive for a read-write export, shared
for a read-only one. So a second `dstfuse export` of the same file is
refused while any other serves it read-write, and a read-write export is
refused while any other serves it at all. The lock belongs to the
descriptor: it lasts exactly as long as the backend's descriptor is open
(a crashed node leaves none behind), and other descriptors of this process
are refused as well. It never waits for a lock.
"""

from __future__ import annotations

import errno
import fcntl
import struct

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t),
# l_pid (pid_t, 0 for OFD locks), padded to 8 bytes.
_FLOCK = struct.Struct("hhqqi4x")
#: errnos F_OFD_SETLK gives when another description holds a conflicting lock.
_HELD = frozenset({errno.EAGAIN, errno.EACCES})


class BackingLocked(OSError):
    """Another open file description holds a conflicting lock."""


def lock_backing(fd: int, *, exclusive: bool) -> None:
    """Lock the whole file behind `fd` (exclusive or shared) without waiting.
    Raises BackingLocked when another description holds a conflicting lock,
    OSError for any other failure (a file system without locks)."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    request = _FLOCK.pack(kind, 0, 0, 0, 0)  # SEEK_SET, from 0, to the end
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in _HELD:
            raise BackingLocked(exc.errno, "in use by another process") from None
        raise

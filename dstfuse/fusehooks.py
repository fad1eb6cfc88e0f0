"""Every reach into pyfuse3's and libfuse's private internals, in one place.

`fs.py` is the FUSE operations and the session; what pyfuse3 3.x does not
offer is added here, behind checks of the assumptions each hook makes, so
that upgrading pyfuse3 or libfuse touches this module and its tests only:

- `LibfusePatch` writes a fallocate handler and a larger `max_background`
  into libfuse's copy of pyfuse3's handler table (found through pyfuse3's
  ELF symbol table). Checked before anything is written: a verified
  libfuse release (`LibfusePatch.VERIFIED_LIBFUSE`), the symbols, the
  table's layout and its copy inside the session, the session's fd being
  /dev/fuse; any mismatch leaves everything untouched (the mount then has
  no fallocate; tests/test_fusehooks.py fails on another libfuse release
  or a pyfuse3 without the symbols, tests/test_fs_mount.py's fallocate test
  on anything else).
- `FuseReader` replaces pyfuse3's module attribute `_wait_fuse_readable`,
  which pyfuse3's compiled request loop looks up before every read of
  /dev/fuse. Checked: the attribute exists, and this process has exactly one
  /dev/fuse descriptor, and pyfuse3 is a release whose request loop was
  verified (`FuseReader.VERIFIED_PYFUSE3`); otherwise pyfuse3's own wait
  stays (tests/test_fs_reader.py fails on any other release).

Verified against pyfuse3 3.5 and libfuse 3.14. This module must never be
used by anything but `fs.py`, and no hook may change what a FUSE request
does: only how it is received or which handler libfuse finds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

from . import busypoll

log = logging.getLogger(__name__)


# ----------------------------------------------------------- libfuse patch


def _elf_symbols(path: str, names: set[str]) -> dict[str, int]:
    """Values of the named symbols in the ELF64 little-endian file's .symtab."""
    with open(path, "rb") as file:
        image = file.read()
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (section_offset,) = struct.unpack_from("<Q", image, 0x28)
    entry_size, count = struct.unpack_from("<HH", image, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", image, section_offset + i * entry_size)
        for i in range(count)
    ]
    found: dict[str, int] = {}
    for section in sections:
        if section[1] != 2:  # SHT_SYMTAB
            continue
        strings = sections[section[6]][4]
        for offset in range(section[4], section[4] + section[5], 24):
            name_offset, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", image, offset)
            start = strings + name_offset
            name = image[start : image.index(b"\0", start)].decode("ascii", "replace")
            if name in names:
                found[name] = value
    return found


_FALLOCATE_HANDLER = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_void_p,
)
_INIT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
# pyfuse3's own init handler runs Python code without taking the GIL (libfuse
# calls it from inside pyfuse3, which holds it), so we must call it holding
# the GIL: PYFUNCTYPE does, CFUNCTYPE would release it.
_PYFUSE3_INIT = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class LibfusePatch:
    """Installs what pyfuse3 3.x cannot: a fallocate handler, and a larger
    `max_background` in the INIT reply.

    libfuse copies the `fuse_lowlevel_ops` table into the session in
    `fuse_session_new`, and looks handlers up there for each request, so we
    write our function pointers into that copy after `pyfuse3.init` and
    before the first request is processed. The session pointer and
    pyfuse3's own table come from pyfuse3's symbol table (pyfuse3 is built
    from source here and keeps it). Every assumption is checked first —
    a libfuse release whose layouts were verified, symbols present,
    pyfuse3's table found byte for byte inside the session, the slots
    pyfuse3 fills (and only those) non-empty, the session's fd being
    /dev/fuse — and any mismatch leaves everything untouched: the
    mount then works without fallocate (the kernel answers EOPNOTSUPP).
    """

    #: libfuse releases (`fuse_version()`: major * 100 + minor) whose
    #: `fuse_lowlevel_ops` and `fuse_conn_info` layouts were read and found
    #: as below; the conn offsets cannot be checked at run time, so another
    #: release gets no patch (no fallocate) until checked.
    VERIFIED_LIBFUSE = frozenset({314})
    #: What pyfuse3's symbol table must hold: the session pointer, its
    #: handler table, and a function to find where the module is loaded.
    SYMBOLS = frozenset({"__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops", "PyInit_pyfuse3"})
    SLOTS = 44  # fuse_lowlevel_ops in libfuse 3.x: 44 function pointers
    INIT, FALLOCATE = 0, 40
    # Slots pyfuse3 fills / leaves empty; a layout check.
    FILLED = (0, 2, 3, 4, 5, 16, 17, 35, 36, 38, 41)
    EMPTY = (1, 37, 39, 40, 42, 43)
    CONN_MAX_BACKGROUND = 7 * 4  # offset in struct fuse_conn_info
    CONN_CONGESTION = 8 * 4

    def __init__(self, on_fallocate: Callable[[int, int, int, int, int], None], max_background):
        self._on_fallocate = on_fallocate
        self._max_background = max_background
        self._libfuse: ctypes.CDLL | None = None
        self._original_init = None
        # The ctypes callbacks must live as long as the session.
        self._fallocate_callback = _FALLOCATE_HANDLER(self._fallocate)
        self._init_callback = _INIT_HANDLER(self._init)
        self.installed = False

    def reply_error(self, request: int, error: int) -> None:
        assert self._libfuse is not None
        result = self._libfuse.fuse_reply_err(ctypes.c_void_p(request), error)
        if result != 0:
            log.debug("fuse_reply_err: %s", os.strerror(-result))

    def apply(self) -> bool:
        try:
            self._apply()
        except Exception as exc:  # noqa: BLE001 - optional; the mount works without it
            log.warning(
                "fallocate (discard) is not available on this mount: cannot extend pyfuse3 (%s)",
                exc,
            )
            return False
        self.installed = True
        return True

    @staticmethod
    def load_libfuse() -> ctypes.CDLL:
        """The libfuse pyfuse3 uses, with the prototypes the patch calls."""
        libfuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
        libfuse.fuse_version.argtypes = []
        libfuse.fuse_version.restype = ctypes.c_int
        libfuse.fuse_session_fd.argtypes = [ctypes.c_void_p]
        libfuse.fuse_session_fd.restype = ctypes.c_int
        libfuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        libfuse.fuse_reply_err.restype = ctypes.c_int
        return libfuse

    def _apply(self) -> None:
        libfuse = self.load_libfuse()
        version = libfuse.fuse_version()
        if version not in self.VERIFIED_LIBFUSE:
            raise RuntimeError(
                f"libfuse {version // 100}.{version % 100}'s layout is not verified"
            )
        module = pyfuse3.__file__
        if module is None:
            raise RuntimeError("pyfuse3 has no file")
        symbols = _elf_symbols(module, set(self.SYMBOLS))
        missing = self.SYMBOLS - set(symbols)
        if missing:
            raise RuntimeError(f"symbols not found in {module}: {', '.join(sorted(missing))}")
        library = ctypes.CDLL(module)
        base = ctypes.cast(library.PyInit_pyfuse3, ctypes.c_void_p).value
        if base is None:
            raise RuntimeError("cannot locate pyfuse3 in memory")
        base -= symbols["PyInit_pyfuse3"]
        session = ctypes.c_void_p.from_address(base + symbols["__pyx_v_7pyfuse3_session"]).value
        if not session:
            raise RuntimeError("no FUSE session")
        pointer_size = ctypes.sizeof(ctypes.c_void_p)
        table = (ctypes.c_void_p * self.SLOTS).from_address(
            base + symbols["__pyx_v_7pyfuse3_fuse_ops"]
        )
        if any(not table[i] for i in self.FILLED) or any(table[i] for i in self.EMPTY):
            raise RuntimeError("unexpected pyfuse3 handler table")
        table_bytes = ctypes.string_at(ctypes.addressof(table), self.SLOTS * pointer_size)
        session_bytes = ctypes.string_at(session, 512)
        where = session_bytes.find(table_bytes)
        if where < 0 or session_bytes.find(table_bytes, where + 1) >= 0:
            raise RuntimeError("handler table not found in the FUSE session")

        fd = libfuse.fuse_session_fd(session)
        if os.readlink(f"/proc/self/fd/{fd}") != "/dev/fuse":
            raise RuntimeError("the session's fd is not /dev/fuse")
        self._libfuse = libfuse

        slots = (ctypes.c_void_p * self.SLOTS).from_address(session + where)
        self._original_init = _PYFUSE3_INIT(slots[self.INIT])
        slots[self.FALLOCATE] = ctypes.cast(self._fallocate_callback, ctypes.c_void_p).value
        slots[self.INIT] = ctypes.cast(self._init_callback, ctypes.c_void_p).value
        log.debug("libfuse handler table at session+%d: fallocate and init installed", where)

    # Both run synchronously inside libfuse's request dispatch, on the trio
    # thread; nothing may escape them.
    def _init(self, userdata, conn) -> None:
        try:
            assert self._original_init is not None
            self._original_init(userdata, conn)
            if self._max_background:
                ctypes.c_uint.from_address(conn + self.CONN_MAX_BACKGROUND).value = (
                    self._max_background
                )
                ctypes.c_uint.from_address(conn + self.CONN_CONGESTION).value = (
                    self._max_background * 3 // 4
                )
        except BaseException:  # noqa: BLE001 - must not unwind through C
            log.exception("FUSE init hook failed")

    def _fallocate(self, request, inode, mode, offset, length, file_info) -> None:
        try:
            self._on_fallocate(request, inode, mode, offset, length)
        except BaseException:  # noqa: BLE001 - must not unwind through C
            log.exception("fallocate dispatch failed")
            self.reply_error(request, errno.EIO)


# ------------------------------------------------------------- fuse reader


class FuseReader:
    """A cheaper stand-in for pyfuse3's `_wait_fuse_readable`.

    pyfuse3's request loop (`_session_loop`, one per worker task) asks this
    coroutine, before each read of /dev/fuse, whether a request is there,
    then reads it and runs its handler to the end before it asks again.
    pyfuse3's own wait takes a trio Lock (which yields to the scheduler even
    when free) and then always parks in `wait_readable`, even with requests
    already queued: two passes through the run loop per request. This one
    first polls the descriptor without waiting and returns at once when a
    request is queued (no lock, no pass through the scheduler); only a worker
    that finds nothing queued goes into pyfuse3's own wait (`idle_wait`).

    That wait is also how pyfuse3 counts idle workers: after each read it
    starts a new worker if none is idle, and a worker retires when more
    than `min_tasks` are idle. So whatever number of requests are waiting
    in handlers (on a silent node, say), one worker is always waiting for
    the next request, and the control tree or another node's I/O is read
    and answered. (A wait of our own, which pyfuse3 cannot count, left
    requests unread once `max_tasks` workers were busy or parked.)

    Invariants: it returns True only when a request is queued now (the
    caller reads it without any await in between, so no other worker can
    take it first, and the read cannot block): a wake-up from `idle_wait`
    whose request a polling worker took meanwhile waits again. Only
    pyfuse3's wait enters trio's `wait_readable`, one worker at a time under
    its lock (trio allows one waiter per descriptor), and a woken worker's
    release of that lock hands the wait to the next idle one. It returns
    False only when `idle_wait` does: the session is ending, or
    `retire_idle` woke the worker to retire it (pyfuse3 then ends it as it
    ends a worker beyond `min_tasks`; at least one idle worker always
    stays). It returns True when
    the kernel reports the mount gone (POLLERR; the read then fails with
    ENODEV, which ends pyfuse3's session). Installed through pyfuse3's
    module attribute, which its compiled loop looks up on every call; if the
    attribute is missing, pyfuse3's own wait stays. Each request found pokes
    the busy-poller (busypoll.py), so the next one is polled for, not slept
    for.
    """

    ATTRIBUTE = "_wait_fuse_readable"
    #: pyfuse3 releases ("major.minor") whose request loop was read and found
    #: to work as described above (internal.pxi: `_session_loop`, and the
    #: idle-worker count kept by `_wait_fuse_readable`). Another release
    #: keeps pyfuse3's own wait (slower, always safe) until checked.
    VERIFIED_PYFUSE3 = frozenset({"3.5"})
    #: Time for the next idle worker to take over the wait on the
    #: descriptor after `retire_idle` woke the one there.
    RETIRE_HANDOVER = 0.002
    #: The longest one `retire_idle` goes on (about 3 ms per worker).
    RETIRE_WITHIN = 1.0

    def __init__(self, fd: int, idle_wait: Callable[[], Awaitable[bool]]) -> None:
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._idle_wait = idle_wait
        #: Workers now in the idle wait (pyfuse3's own count is not visible).
        self._idle = 0
        self._original: Callable[[], Awaitable[bool]] | None = None

    @classmethod
    def for_this_process(cls) -> FuseReader | None:
        """The reader for this process's one /dev/fuse descriptor, waiting
        through pyfuse3's own wait when idle; None when there is not exactly
        one descriptor, or pyfuse3 is not a verified release or lacks the
        hook."""
        release = ".".join(pyfuse3.__version__.split(".")[:2])
        if release not in cls.VERIFIED_PYFUSE3:
            log.debug(
                "pyfuse3 %s: request loop not verified; using its own request wait",
                pyfuse3.__version__,
            )
            return None
        idle_wait = getattr(pyfuse3, cls.ATTRIBUTE, None)
        if idle_wait is None:
            log.debug("pyfuse3 has no %s; using its own request wait", cls.ATTRIBUTE)
            return None
        fds = []
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                    fds.append(int(name))
            except OSError:
                continue  # closed meanwhile (e.g. the listdir's own fd)
        if len(fds) != 1:
            log.debug("%d /dev/fuse descriptors; using pyfuse3's own request wait", len(fds))
            return None
        return cls(fds[0], idle_wait)

    def install(self) -> None:
        self._original = getattr(pyfuse3, self.ATTRIBUTE)
        setattr(pyfuse3, self.ATTRIBUTE, self.wait_readable)

    def uninstall(self) -> None:
        if self._original is not None:
            setattr(pyfuse3, self.ATTRIBUTE, self._original)
            self._original = None

    async def wait_readable(self) -> bool:
        while not self._poll.poll(0):
            self._idle += 1
            try:
                readable = await self._idle_wait()
            finally:
                self._idle -= 1
            if not readable:
                return False
        busypoll.poke()
        return True

    async def retire_idle(self, keep: int) -> int:
        """Retire workers in the idle wait until only `keep` (at least one)
        are left, and say how many went. The one worker waiting on the
        descriptor is woken as pyfuse3's `terminate()` wakes it
        (`notify_closing`, which leaves the descriptor open and usable):
        pyfuse3's wait returns False to it, and its loop ends it as it ends
        a worker beyond `min_tasks`, freeing its request buffer; the next
        idle worker takes over the wait, and is the next to go. Workers
        running a handler are not touched. A request that arrives meanwhile
        is read by the worker that takes over. Wake-ups go RETIRE_HANDOVER
        apart (one that finds nobody on the descriptor, mid hand-over, does
        nothing), for at most RETIRE_WITHIN, and only while more than
        `keep` workers are in the idle wait: the session is live and the
        descriptor open then, so a wake-up never reaches another file that
        reused the number after the session closed it."""
        keep, before = max(1, keep), self._idle
        deadline = trio.current_time() + self.RETIRE_WITHIN
        while self._idle > keep and trio.current_time() < deadline:
            trio.lowlevel.notify_closing(self._fd)
            await trio.sleep(self.RETIRE_HANDOVER)
        return max(0, before - self._idle)

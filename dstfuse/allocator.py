"""Keep large I/O buffers in the C heap while busy; return it when idle.

glibc serves an allocation above its mmap threshold (128 KiB at first,
raised on the fly) with a fresh mapping, and hands the top of its heap
back to the kernel whenever more than the trim threshold is free there.
Request buffers of 512 KiB - 1 MiB come and go with every sequential
request, so without this each one is fresh memory that costs a page fault
per 4 KiB page (about 128 per 512 KiB) when it is first written.

`keep_io_buffers` fixes both thresholds for the process: buffers up to
`MMAP_THRESHOLD` come from the heap, and up to `TRIM_THRESHOLD` of free heap
is kept for the next requests. The process's peak memory is unchanged (the
same buffers are live at the peak); what it keeps between bursts grows by
at most `TRIM_THRESHOLD`, and by the buffers freed below the heap's top,
which glibc never hands back by itself. Never fails: without glibc it does
nothing.

`return_free_heap_when_idle` is the other half, for the mount daemon: in a
period in which the process did (almost) no work, it first lets go of what
idle parts of the process hold for the next burst (the caller's
`release_idle`: surplus FUSE handler tasks and their request buffers),
then, with enough of its heap freed since it last did so, it hands the
heap's free pages back to the kernel (`malloc_trim`), so that a daemon
that wrote a burst does not stay at the burst's high-water mark. The pages
are faulted in again only when the next burst uses them, once, not on
every request.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (largest request: 4 MiB).
MMAP_THRESHOLD = 8 << 20
#: Free heap kept for later requests instead of being returned at once.
TRIM_THRESHOLD = 32 << 20
#: How long a quiet spell must last before free heap is returned.
IDLE_PERIOD = 2.0
#: A period in which the process used less CPU than this share of it is
#: quiet (keepalives and control-tree reads cost far less).
QUIET_CPU_SHARE = 0.02
#: Free heap below this is not worth a `malloc_trim`.
RETURN_AT_LEAST = 8 << 20
#: How long what `release_idle` let go gets to be freed (the tasks it
#: retired run their last steps) before the heap is measured.
RELEASE_SETTLE = 0.05


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]


class GlibcHeap:
    """The process's glibc heap: how much of it is free, and handing that
    back to the kernel."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.argtypes = []
        self._mallinfo2.restype = _Mallinfo2
        self._malloc_trim = libc.malloc_trim
        self._malloc_trim.argtypes = [ctypes.c_size_t]
        self._malloc_trim.restype = ctypes.c_int

    @classmethod
    def open(cls) -> GlibcHeap | None:
        """The heap, or None without glibc (2.33 or later, for mallinfo2)."""
        try:
            return cls(ctypes.CDLL(None))
        except (OSError, AttributeError):
            return None

    def free_bytes(self) -> int:
        """Bytes of free chunks in the heap (`mallinfo2().fordblks`); those
        already handed back still count, as glibc keeps them for reuse."""
        return self._mallinfo2().fordblks

    def return_free(self) -> None:
        """Hand every free page of the heap back to the kernel."""
        self._malloc_trim(0)


class QuietSpells:
    """When to return free heap: in a quiet period (under QUIET_CPU_SHARE
    of its length in CPU time), when at least RETURN_AT_LEAST became free
    since the last return. What was returned stays counted as free
    (`GlibcHeap.free_bytes`), so within one quiet spell only what was freed
    since (cyclic garbage collected later, say) counts; after a busy period
    all of it does, as the returned pages may have been used again."""

    def __init__(self, period: float) -> None:
        self._quiet_cpu = period * QUIET_CPU_SHARE
        self._returned = 0  # free heap at the last return, this quiet spell

    def quiet(self, cpu_used: float) -> bool:
        """Was a period that used `cpu_used` seconds of CPU quiet?"""
        return cpu_used < self._quiet_cpu

    def should_return(self, cpu_used: float, free_heap: int) -> bool:
        """After a period that used `cpu_used` seconds of CPU, with
        `free_heap` bytes free now: return the free heap now?"""
        if not self.quiet(cpu_used):
            self._returned = 0
            return False
        if free_heap - self._returned < RETURN_AT_LEAST:
            return False
        self._returned = free_heap
        return True


async def _nothing_to_release() -> int:
    return 0


async def return_free_heap_when_idle(
    period: float = IDLE_PERIOD,
    release_idle: Callable[[], Awaitable[int]] = _nothing_to_release,
) -> None:
    """Every `period`: if it was quiet, call `release_idle` (which lets go
    of what idle parts of the process keep, and says how many it told to
    go); then hand the heap's free pages back to the kernel when
    `QuietSpells` says so. Runs until cancelled (returns at once without
    glibc). This is housekeeping beside the data path: if `release_idle`
    fails, the failure is logged and it is not called again, and the
    caller's work goes on."""
    heap = GlibcHeap.open()
    if heap is None:
        log.debug("no glibc heap to return when idle")
        return
    spells = QuietSpells(period)
    cpu = time.process_time()
    while True:
        await trio.sleep(period)
        now = time.process_time()
        used, cpu = now - cpu, now
        if spells.quiet(used):
            try:
                released = await release_idle()
            except Exception as exc:  # noqa: BLE001 - housekeeping must not end the mount
                log.error("idle: letting go of idle parts failed (%r); not tried again", exc)
                release_idle, released = _nothing_to_release, 0
            if released:
                await trio.sleep(RELEASE_SETTLE)
        free = heap.free_bytes()
        if spells.should_return(used, free):
            heap.return_free()
            log.debug("idle: returned the heap's free pages (%d MiB) to the kernel", free >> 20)


def keep_io_buffers() -> bool:
    """Set the thresholds; True if glibc took them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt (not glibc); allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.debug("mallopt refused the thresholds; allocator left as it is")
    return done

"""Keep large I/O buffers in the C heap instead of mapping them per request.

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
at most `TRIM_THRESHOLD`. Never fails: without glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (largest request: 4 MiB).
MMAP_THRESHOLD = 8 << 20
#: Free heap kept for later requests instead of being returned at once.
TRIM_THRESHOLD = 32 << 20


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

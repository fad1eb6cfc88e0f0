"""`keep_io_buffers`: request-sized buffers stop costing fresh pages (page
faults) on every request once the thresholds are set. Measured in a child
process each, since the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import resource, sys
from dstfuse.allocator import keep_io_buffers
if sys.argv[1] == "keep":
    assert keep_io_buffers()
def requests():
    for _ in range(200):
        # Two 512 KiB buffers live at once and freed together, as a request
        # buffer and its frame are.
        a = bytearray(512 << 10); b = bytes(a); a[::4096] = b"x" * 128
        del a, b
requests()  # warm up: the heap reaches its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
requests()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_request_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    assert default > 200 * 100  # glibc alone: about a fresh page per 4 KiB per request
    assert kept < default / 20

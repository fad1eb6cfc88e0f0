"""`keep_io_buffers`: request-sized buffers stop costing fresh pages (page
faults) on every request once the thresholds are set; the heap they leave
free is handed back when the process is quiet. Measured in a child process
each, since the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

import trio
import trio.testing

from dstfuse.allocator import (
    QUIET_CPU_SHARE,
    RETURN_AT_LEAST,
    QuietSpells,
    return_free_heap_when_idle,
)

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


_HEAP_CHILD = """
import sys
from dstfuse.allocator import GlibcHeap, keep_io_buffers
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
assert keep_io_buffers()
heap = GlibcHeap.open()
buffers = [bytearray(512 << 10) for _ in range(160)]  # 80 MiB, every page touched
top = bytearray(512 << 10)  # the heap's top stays in use: glibc trims no hole below it
del buffers
print(heap.free_bytes(), rss(), end=" ")
heap.return_free()
print(rss())
"""


def test_the_heap_hands_back_freed_buffers_below_its_top():
    """What glibc keeps by itself (the freed buffers below a live one) is
    free heap, and `return_free` gives its pages back to the kernel."""
    done = subprocess.run(
        [sys.executable, "-c", _HEAP_CHILD], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    free, before, after = map(int, done.stdout.split())
    assert free >= 78 << 20
    assert before - after >= 70 << 20, (before >> 20, after >> 20)


def test_free_heap_is_returned_in_quiet_periods_when_enough_was_freed_since():
    period = 2.0
    busy, quiet = period * QUIET_CPU_SHARE, period * QUIET_CPU_SHARE / 2
    enough = RETURN_AT_LEAST
    spells = QuietSpells(period)
    assert not spells.should_return(quiet, enough - 1)  # not worth it
    assert spells.should_return(quiet, enough)
    assert not spells.should_return(quiet, enough)  # returned already: still counted free
    assert not spells.should_return(quiet, 2 * enough - 1)
    assert spells.should_return(quiet, 2 * enough)  # freed since (garbage collected late)
    assert not spells.should_return(busy, 3 * enough)  # working: the heap is in use
    assert spells.should_return(quiet, enough)  # the work may have used the pages again


async def test_a_failing_release_is_logged_once_and_never_stops_the_caller(caplog):
    """The housekeeping runs in the mount daemon's nursery: an error in
    `release_idle` must not cancel the mount, only end the releasing."""
    calls = []

    async def release_fails() -> int:
        calls.append(trio.current_time())
        raise RuntimeError("reader gone")

    with trio.move_on_after(1.0):  # about 10 periods, quiet but for this test
        await return_free_heap_when_idle(0.1, release_fails)
    assert len(calls) == 1
    assert "letting go of idle parts failed" in caplog.text

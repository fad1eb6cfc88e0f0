"""`FuseReader`, the wait for FUSE requests that replaces pyfuse3's, on a
pipe standing in for /dev/fuse (one byte, one request).

`PyfuseLoop` is pyfuse3 3.5's request loop as far as the reader meets it
(internal.pxi, `_wait_fuse_readable` and `_session_loop`): the idle wait
under a lock that counts idle workers, one read per request, the handler
run to its end, a new worker after a read when none is idle (up to
`max_tasks`), a worker retiring when more than `min_tasks` are idle. On it:
the workers' contract (True only with a request queued, one request per
True, False for everyone once the device is gone or the session stops), and
that requests stuck in handlers, however many, never leave the next request
unread. Real mounts exercise the real loop in every FUSE test, and
tests/test_fs_frozen_node.py with 64 requests stuck on a stopped node.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from dstfuse.fusehooks import FuseReader

Handler = Callable[[bytes], Awaitable[None]]


async def _answer(request: bytes) -> None:
    pass


class PyfuseLoop:
    """pyfuse3's workers over the pipe `fd`, waiting through `reader`."""

    def __init__(
        self, fd: int, *, handler: Handler = _answer, min_tasks: int = 1, max_tasks: int = 1000
    ) -> None:
        self.fd = fd
        self.handler = handler
        self.min_tasks = min_tasks
        self.max_tasks = max_tasks
        self.reader = FuseReader(fd, self.idle_wait)
        self.read: list[bytes] = []
        self.exited = False
        self.active_readers = 0
        self.task_count = 0
        self._lock = trio.Lock()

    async def idle_wait(self) -> bool:
        """pyfuse3's `_wait_fuse_readable`."""
        self.active_readers += 1
        try:
            async with self._lock:
                if self.exited:
                    return False
                await trio.lowlevel.wait_readable(self.fd)
        except trio.ClosedResourceError:
            return False
        finally:
            self.active_readers -= 1
        return True

    def start(self, nursery: trio.Nursery, workers: int = 1) -> None:
        for _ in range(workers):
            self.task_count += 1
            nursery.start_soon(self.session_loop, nursery)

    async def session_loop(self, nursery: trio.Nursery) -> None:
        """pyfuse3's `_session_loop`."""
        while not self.exited:
            if self.active_readers > self.min_tasks:
                break
            if not await self.reader.wait_readable():
                break
            # Read at once, with no await in between.
            request = os.read(self.fd, 1)
            if not self.active_readers and self.task_count < self.max_tasks:
                self.start(nursery)
            if not request:  # ENODEV: libfuse ends the session
                self.exited = True
                break
            self.read.append(request)
            await self.handler(request)
        self.task_count -= 1

    def terminate(self) -> None:
        """pyfuse3.terminate()."""
        self.exited = True
        trio.lowlevel.notify_closing(self.fd)


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    # A read the reader wrongly allows fails (BlockingIOError) instead of
    # blocking the run loop, as it would on /dev/fuse.
    os.set_blocking(read_end, False)
    ends = [read_end, write_end]
    try:
        yield ends
    finally:
        for fd in ends:
            if fd >= 0:
                os.close(fd)


async def test_each_queued_request_goes_to_exactly_one_worker(pipe):
    read_end, write_end = pipe
    loop = PyfuseLoop(read_end, max_tasks=4)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            loop.start(nursery, 4)
            await trio.testing.wait_all_tasks_blocked()
            assert loop.read == []  # nothing queued: every worker waits
            os.write(write_end, b"ab")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(loop.read) == [b"a", b"b"]
            os.write(write_end, b"c")
            await trio.testing.wait_all_tasks_blocked()
            assert loop.read[2:] == [b"c"]
            loop.terminate()
    assert loop.task_count == 0


async def test_a_gone_device_ends_every_worker(pipe):
    read_end, write_end = pipe
    loop = PyfuseLoop(read_end, min_tasks=3, max_tasks=3)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            loop.start(nursery, 3)
            await trio.testing.wait_all_tasks_blocked()
            os.close(write_end)  # POLLHUP, as /dev/fuse says POLLERR after umount
            pipe[1] = -1
    # One worker was told to read (and found the end); all then stopped.
    assert loop.exited and loop.read == [] and loop.task_count == 0


async def test_requests_that_arrive_together_while_others_are_stuck_are_all_read(pipe):
    """A worker woken with two requests queued takes one and leaves the next
    to another worker: nobody is left parked while a request waits.
    (Without spawning, so only the hand-over between workers is tested.)"""
    read_end, write_end = pipe
    stuck = trio.Event()

    async def stick(request: bytes) -> None:
        await stuck.wait()

    loop = PyfuseLoop(read_end, handler=stick, min_tasks=3, max_tasks=3)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            loop.start(nursery, 3)
            await trio.testing.wait_all_tasks_blocked()
            os.write(write_end, b"ab")
            await trio.testing.wait_all_tasks_blocked()
            os.write(write_end, b"c")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(loop.read) == [b"a", b"b", b"c"]
            stuck.set()
            await trio.testing.wait_all_tasks_blocked()
            loop.terminate()


async def test_requests_stuck_in_handlers_never_leave_the_next_one_unread(pipe):
    """200 requests wait (on a silent node, say) in their handlers; a
    request that needs nothing but the daemon is still read and answered at
    once, and when the stuck ones finish, the idle workers retire down to
    `min_tasks` (plus the one waiting)."""
    read_end, write_end = pipe
    node = trio.Event()
    answered: list[bytes] = []

    async def handle(request: bytes) -> None:
        if request == b"n":
            await node.wait()
        answered.append(request)

    loop = PyfuseLoop(read_end, handler=handle, min_tasks=4)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            loop.start(nursery)
            for _ in range(200):
                os.write(write_end, b"n")
                await trio.testing.wait_all_tasks_blocked()
            assert len(loop.read) == 200 and answered == []
            os.write(write_end, b"s")
            await trio.testing.wait_all_tasks_blocked()
            assert answered == [b"s"]
            # Every worker not stuck waits for the next request.
            assert loop.active_readers >= 1
            assert loop.task_count == 200 + loop.active_readers
            node.set()
            await trio.testing.wait_all_tasks_blocked()
            assert len(answered) == 201
            os.write(write_end, b"s")  # workers returning retire as requests come
            await trio.testing.wait_all_tasks_blocked()
            assert loop.task_count <= loop.min_tasks + 1 + 1
            loop.terminate()
    assert loop.task_count == 0


async def test_idle_workers_retire_down_to_those_kept_and_the_next_request_is_read(pipe):
    """A quiet daemon retires its surplus idle workers (fs.py,
    `retire_idle_workers`): only workers in the idle wait go, `keep` of them
    stay (never none), workers in handlers are untouched, and requests are
    read as before through the same descriptor, with workers started again
    as they need."""
    read_end, write_end = pipe
    node = trio.Event()

    async def handle(request: bytes) -> None:
        if request == b"n":
            await node.wait()

    loop = PyfuseLoop(read_end, handler=handle, min_tasks=100)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            loop.start(nursery, 8)
            os.write(write_end, b"nnn")  # three requests stuck in their handlers
            await trio.testing.wait_all_tasks_blocked()
            idle = loop.active_readers  # (reads may have started more workers)
            assert loop.task_count - idle == 3 and idle >= 5
            assert await loop.reader.retire_idle(2) == idle - 2
            await trio.testing.wait_all_tasks_blocked()
            assert loop.task_count == 3 + 2 and loop.active_readers == 2
            assert await loop.reader.retire_idle(0) == 1  # one always stays
            await trio.testing.wait_all_tasks_blocked()
            assert loop.task_count == 3 + 1 and loop.active_readers == 1
            assert await loop.reader.retire_idle(1) == 0
            os.write(write_end, b"nns")
            await trio.testing.wait_all_tasks_blocked()
            assert loop.read == [b"n"] * 5 + [b"s"]
            assert loop.active_readers >= 1  # workers started again as needed
            node.set()
            await trio.testing.wait_all_tasks_blocked()
            loop.terminate()
    assert loop.task_count == 0


async def test_a_request_that_arrives_while_idle_workers_retire_is_read(pipe):
    read_end, write_end = pipe
    loop = PyfuseLoop(read_end, min_tasks=100)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            loop.start(nursery, 6)
            await trio.testing.wait_all_tasks_blocked()
            os.write(write_end, b"s")  # queued as the first wake-up goes out
            await loop.reader.retire_idle(1)
            await trio.testing.wait_all_tasks_blocked()
            assert loop.read == [b"s"] and loop.active_readers >= 1
            os.write(write_end, b"t")
            await trio.testing.wait_all_tasks_blocked()
            assert loop.read == [b"s", b"t"]
            loop.terminate()
    assert loop.task_count == 0


async def test_a_wakeup_whose_request_another_worker_took_waits_again(pipe):
    """The idle wait says readable, but a worker polling meanwhile read the
    request: the reader must wait again, not send its caller to a read that
    would block the run loop."""
    read_end, write_end = pipe
    wakeups = 0

    async def stale_then_real() -> bool:
        nonlocal wakeups
        wakeups += 1
        if wakeups == 1:
            await trio.lowlevel.checkpoint()
            return True  # readable a moment ago; taken since
        await trio.lowlevel.wait_readable(read_end)
        return True

    reader = FuseReader(read_end, stale_then_real)
    result: list[bytes] = []

    async def worker() -> None:
        if await reader.wait_readable():
            result.append(os.read(read_end, 1))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            assert wakeups == 2 and result == []
            os.write(write_end, b"x")
    assert result == [b"x"]


async def test_a_queued_request_is_taken_without_the_idle_wait(pipe):
    read_end, write_end = pipe

    async def idle_wait() -> bool:
        raise AssertionError("the fast path must not wait")

    reader = FuseReader(read_end, idle_wait)
    os.write(write_end, b"x")
    assert await reader.wait_readable()


def test_the_installed_pyfuse3_has_the_hook_and_it_is_swapped_back(pipe):
    """A pyfuse3 release without `_wait_fuse_readable`, or one whose loop was
    not verified, would silently leave every mount on the slower wait: fail
    here instead (after checking the new release's internal.pxi against
    FuseReader's docstring, add it to VERIFIED_PYFUSE3)."""
    import pyfuse3

    release = ".".join(pyfuse3.__version__.split(".")[:2])
    assert release in FuseReader.VERIFIED_PYFUSE3
    original = getattr(pyfuse3, FuseReader.ATTRIBUTE)
    reader = FuseReader(pipe[0], original)
    reader.install()
    assert getattr(pyfuse3, FuseReader.ATTRIBUTE) == reader.wait_readable
    reader.uninstall()
    assert getattr(pyfuse3, FuseReader.ATTRIBUTE) is original


def test_the_reader_is_used_only_with_exactly_one_fuse_descriptor():
    first = os.open("/dev/fuse", os.O_RDWR)
    try:
        reader = FuseReader.for_this_process()
        assert reader is not None and reader._fd == first
        second = os.open("/dev/fuse", os.O_RDWR)
        try:
            assert FuseReader.for_this_process() is None
        finally:
            os.close(second)
    finally:
        os.close(first)

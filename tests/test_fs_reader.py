"""`FuseReader`, the wait for FUSE requests that replaces pyfuse3's, on a
pipe standing in for /dev/fuse: the workers' contract (True only with a
request queued, one request per True, False for everyone once the device is
gone or the session stops). Real mounts exercise it in every FUSE test."""

from __future__ import annotations

import os

import trio

from dstfuse.fusehooks import FuseReader


async def _workers(reader: FuseReader, count: int, fd: int, log: list, nursery) -> None:
    async def worker(number: int) -> None:
        while await reader.wait_readable():
            # pyfuse3 reads the request at once, with no await in between.
            log.append((number, os.read(fd, 1)))
        log.append((number, None))

    for number in range(count):
        nursery.start_soon(worker, number)


async def test_each_queued_request_goes_to_exactly_one_worker():
    read_end, write_end = os.pipe()
    try:
        reader = FuseReader(read_end)
        log: list = []
        async with trio.open_nursery() as nursery:
            await _workers(reader, 4, read_end, log, nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert log == []  # nothing queued: every worker waits
            os.write(write_end, b"ab")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(data for _, data in log) == [b"a", b"b"]
            os.write(write_end, b"c")
            await trio.testing.wait_all_tasks_blocked()
            assert [data for _, data in log][2:] == [b"c"]
            reader.close()
        assert [data for _, data in log][3:] == [None] * 4
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_gone_device_ends_every_worker():
    read_end, write_end = os.pipe()
    try:
        reader = FuseReader(read_end)
        log: list = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await _workers(reader, 3, read_end, log, nursery)
                await trio.testing.wait_all_tasks_blocked()
                os.close(write_end)  # POLLHUP, as /dev/fuse says POLLERR after umount
                write_end = -1
        # One worker was told to read (and found the end); all then stopped.
        assert [data for _, data in log].count(b"") == 1
        assert [data for _, data in log].count(None) == 3
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_the_installed_pyfuse3_has_the_hook_and_it_is_swapped_back():
    """A pyfuse3 release without `_wait_fuse_readable` would silently
    leave every mount on the slower wait: fail here instead."""
    import pyfuse3

    original = getattr(pyfuse3, FuseReader.ATTRIBUTE)
    read_end, write_end = os.pipe()
    try:
        reader = FuseReader(read_end)
        reader.install()
        assert getattr(pyfuse3, FuseReader.ATTRIBUTE) == reader.wait_readable
        reader.uninstall()
        assert getattr(pyfuse3, FuseReader.ATTRIBUTE) is original
    finally:
        os.close(read_end)
        os.close(write_end)


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

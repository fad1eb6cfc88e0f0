"""RemoteNode across node reboots and restarts, against the in-memory
export (tests/fake_export.py) under MockClock: kept writes are resent in
order before anything else, a reboot that destroyed writes fails the next
flush once, the unflushed limit's two policies, limits renegotiated on a
reconnect, and replies matched only by handle and command."""

from __future__ import annotations

import errno
import logging
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dstfuse.address import parse_address
from dstfuse.config import Timeouts, Unflushed
from dstfuse.errors import NodeError, NodeWritesLost
from dstfuse.nodes.base import NodeState
from dstfuse.nodes.remote import RemoteNode
from dstfuse.nodes.transaction_node import REPLAY_HANDLE_BASE
from dstfuse.protocol import Command, NodeInstance

from .fake_export import ANSWER, CUT, DROP, LATE, WRONG_HANDLE, FakeExport

TIMEOUTS = Timeouts(resend=2.0, max_resends=3, keepalive=1.0, connect=5.0)
BLOCK = 4096


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def remote(fake: FakeExport, *, unflushed: Unflushed | None = None, max_in_flight=64):
    async with trio.open_nursery() as nursery:
        node = RemoteNode(
            parse_address("127.0.0.1:1"),
            export=None,
            timeouts=TIMEOUTS,
            key=None,
            max_in_flight=max_in_flight,
            storage="vol0",
            unflushed=unflushed,
            connector=fake.connector(nursery),
        )
        await node.start(nursery)
        try:
            yield node
        finally:
            await node.aclose()
            nursery.cancel_scope.cancel()


def block(index: int) -> bytes:
    return bytes([index + 1]) * BLOCK


def requests_on(fake: FakeExport, connection: int) -> list[tuple[Command, int, bool]]:
    """(command, offset, replayed?) of every request on that connection."""
    return [
        (r.command, r.offset, r.handle >= REPLAY_HANDLE_BASE)
        for n, r in fake.received
        if n == connection and r.command is not Command.PING
    ]


async def reboot_with_one_write_in_flight(fake: FakeExport, node: RemoteNode) -> None:
    """Blocks 0 and 1 written and acknowledged; block 2's write in flight
    (its reply dropped) when the node reboots; a READ sent after the reboot
    is on the first connection and cuts it."""
    await node.write(0, block(0))
    await node.write(BLOCK, block(1))
    fake.policy = lambda r, n: DROP if n == 1 and r.command is Command.WRITE else ANSWER
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.write, 2 * BLOCK, block(2))
        await trio.sleep(0.1)
        fake.reboot(boot=2)
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        nursery.start_soon(node.read, 0, BLOCK)


async def test_kept_writes_are_resent_in_order_before_the_in_flight_ones(autojump_clock):
    fake = FakeExport()
    async with remote(fake) as node:
        await node.write(8 * BLOCK, block(7))
        await node.flush()  # this one is durable: it is not resent
        await reboot_with_one_write_in_flight(fake, node)
        assert requests_on(fake, 2) == [
            (Command.WRITE, 0, True),
            (Command.WRITE, BLOCK, True),
            (Command.WRITE, 2 * BLOCK, False),
            (Command.READ, 0, False),
        ]
        await node.flush()
    assert fake.flushed[: 3 * BLOCK] == block(0) + block(1) + block(2)
    assert fake.flushed[8 * BLOCK : 9 * BLOCK] == block(7)


async def test_a_flush_keeps_the_writes_acknowledged_after_it_was_sent(autojump_clock):
    fake = FakeExport()
    async with remote(fake) as node:
        fake.policy = lambda r, n: LATE if r.command is Command.FLUSH else ANSWER
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.flush)  # done on the node now, answered later
            await trio.sleep(0.1)
            await node.write(0, block(0))  # acknowledged before the FLUSH's reply
        fake.reboot(boot=2)
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        assert await node.read(0, BLOCK) == block(0)
        await node.flush()
    assert fake.flushed[:BLOCK] == block(0)


async def test_a_restarted_process_on_the_same_boot_gets_no_replay(autojump_clock):
    fake = FakeExport()
    async with remote(fake) as node:
        await node.write(0, block(0))
        fake.instance = NodeInstance(bytes(16), 1, 1, b"another process!")
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        assert await node.read(0, BLOCK) == block(0)
        assert requests_on(fake, 2) == [(Command.READ, 0, False)]
        await node.flush()


async def test_a_replay_cut_short_is_done_again_in_full(autojump_clock):
    fake = FakeExport()
    async with remote(fake) as node:
        for index in range(3):
            await node.write(index * BLOCK, block(index))
        fake.reboot(boot=2)
        # the second connection breaks at the second replayed write
        fake.policy = lambda r, n: CUT if n == 1 or (n == 2 and r.offset == BLOCK) else ANSWER
        assert await node.read(2 * BLOCK, BLOCK) == block(2)
        assert [o for _, o, replayed in requests_on(fake, 3) if replayed] == [0, BLOCK, 2 * BLOCK]
        await node.flush()
    assert fake.flushed[: 3 * BLOCK] == block(0) + block(1) + block(2)


async def test_without_kept_writes_the_next_flush_fails_once_naming_the_node(
    autojump_clock, caplog
):
    fake = FakeExport()
    async with remote(fake, unflushed=Unflushed(limit=0)) as node:
        with caplog.at_level(logging.ERROR):
            await reboot_with_one_write_in_flight(fake, node)
        with pytest.raises(NodeWritesLost) as info:
            await node.flush()
        assert info.value.errno == errno.EIO
        assert info.value.regions == ((0, 2 * BLOCK),)
        assert info.value.lost_bytes == 2 * BLOCK
        await node.flush()  # reported once, as Linux reports to the next fsync
    # the write in flight at the reboot was resent: only the kept ones are lost
    assert fake.flushed[2 * BLOCK : 3 * BLOCK] == block(2)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "storage vol0, node R: 127.0.0.1:1" in line and "2 acknowledged, unflushed writes "
        f"({2 * BLOCK} bytes) were lost" in line
        for line in lines
    ), lines


async def test_policy_flush_keeps_every_write_within_the_limit(autojump_clock):
    fake = FakeExport()
    limit = 4 * (BLOCK + 64)
    async with remote(fake, unflushed=Unflushed(limit=limit, policy="flush")) as node:
        for index in range(20):
            await node.write(index * BLOCK, block(index % 200))
            assert node._unflushed.size <= limit
        flushes = [r for _, r in fake.received if r.command is Command.FLUSH]
        assert 3 <= len(flushes) <= 20
        fake.reboot(boot=2)
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        await node.read(0, BLOCK)
        await node.flush()  # nothing was lost
    assert fake.flushed[: 20 * BLOCK] == b"".join(block(i % 200) for i in range(20))


async def test_a_started_write_past_the_limit_says_its_settling_waits_for_the_flush(
    autojump_clock,
):
    """`begin_write`'s writes are kept like `write`'s; once the kept data
    is past the limit, an answered write's `settles_at_once` is False and
    its `settle` returns only after the FLUSH (here dropped once, so it
    comes with its resend)."""
    flushes: list[int] = []

    def drop_first_flush(request, number):
        if request.command is Command.FLUSH:
            flushes.append(request.handle)
            return DROP if len(flushes) == 1 else ANSWER
        return ANSWER

    fake = FakeExport(policy=drop_first_flush)
    limit = 2 * (BLOCK + 64)
    async with remote(fake, unflushed=Unflushed(limit=limit, policy="flush")) as node:
        started = [node.begin_write(index * BLOCK, block(index)) for index in range(3)]
        assert all(one is not None for one in started)
        await trio.sleep(0.1)
        assert all(one.done and one.succeeded for one in started)
        assert node._unflushed.size > limit
        assert not any(one.settles_at_once for one in started)
        begun = trio.current_time()
        for one in started:
            await one.settle()
        assert trio.current_time() - begun == pytest.approx(TIMEOUTS.resend, abs=0.1)
        assert node._unflushed.size <= limit and len(flushes) == 2
        last = node.begin_write(3 * BLOCK, block(3))
        assert last is not None
        await last.settle()


async def test_policy_drop_never_flushes_and_a_reboot_reports_only_the_dropped(autojump_clock):
    fake = FakeExport()
    limit = 2 * (BLOCK + 64)
    async with remote(fake, unflushed=Unflushed(limit=limit, policy="drop")) as node:
        for index in range(5):
            await node.write(index * BLOCK, block(index))
        assert not [r for _, r in fake.received if r.command is Command.FLUSH]
        fake.reboot(boot=2)
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        await node.read(0, BLOCK)
        with pytest.raises(NodeWritesLost) as info:
            await node.flush()
        assert info.value.regions == ((0, 3 * BLOCK),)
    assert fake.flushed[3 * BLOCK : 5 * BLOCK] == block(3) + block(4)  # the kept two


async def test_smaller_max_request_after_reconnect_splits_queued_and_in_flight(autojump_clock):
    fake = FakeExport(max_request=1 << 16)
    big = bytes(range(256)) * 256  # 64 KiB
    with trio.fail_after(60):
        await split_after_reconnect(fake, big)
    assert fake.data[: 1 << 17] == big + big


async def split_after_reconnect(fake: FakeExport, big: bytes) -> None:
    async with remote(fake, max_in_flight=1) as node:
        fake.policy = lambda r, n: DROP if n == 1 else ANSWER
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.write, 0, big)  # in flight
            await trio.sleep(0.1)
            nursery.start_soon(node.write, 1 << 16, big)  # queued for a slot
            await trio.sleep(0.1)
            fake.max_request = 1 << 14
            fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        assert node.max_request == 1 << 14
        assert await node.read(0, 1 << 17) == big + big
        sizes = {r.length for n, r in fake.received if n == 2 and r.command is not Command.PING}
        assert sizes == {1 << 14}


async def test_reply_with_another_handle_never_completes_a_transaction_in_flight(autojump_clock):
    fake = FakeExport()
    async with remote(fake) as node:
        await node.write(0, block(0))  # handle 1 answered normally
        answered_first = {"done": False}

        def wrong_once(request, number):
            if request.command is Command.WRITE and not answered_first["done"]:
                answered_first["done"] = True
                return WRONG_HANDLE
            return ANSWER

        fake.policy = wrong_once
        start = trio.current_time()
        await node.write(BLOCK, block(1))
        # only the resend's reply, a resend interval later, completed it
        assert trio.current_time() - start >= TIMEOUTS.resend
        assert [r.offset for _, r in fake.received if r.command is Command.WRITE] == [
            0,
            BLOCK,
            BLOCK,
        ]


async def test_node_restarted_read_only_is_renegotiated(autojump_clock):
    fake = FakeExport()
    async with remote(fake) as node:
        await node.write(0, block(0))
        fake.writable = False
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        assert await node.read(0, BLOCK) == block(0)
        assert not node.writable
        with pytest.raises(NodeError) as info:
            await node.write(0, block(1))
        assert info.value.errno == errno.EROFS


async def test_node_restarted_with_another_size_is_not_used_until_it_is_back(
    autojump_clock, caplog
):
    fake = FakeExport()
    async with remote(fake) as node:
        fake.size = 1 << 19
        fake.policy = lambda r, n: CUT if n == 1 else ANSWER
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.read, 0, BLOCK)
            await trio.sleep(3)
            assert node.state is NodeState.OFFLINE
            fake.size = 1 << 20  # within the budget of 8 s
        assert node.size == 1 << 20
    assert any(
        "node now reports 524288 bytes instead of 1048576; refusing to use it" in r.getMessage()
        for r in caplog.records
    )


async def test_the_unflushed_counter_shows_what_is_kept_until_a_flush(autojump_clock):
    fake = FakeExport()
    async with remote(fake, unflushed=Unflushed(limit=1 << 20)) as node:
        assert node.counters.unflushed == 0
        await node.write(0, block(1))
        await node.write(BLOCK, block(2))
        assert node.counters.unflushed == node._unflushed.size >= 2 * BLOCK
        await node.flush()
        assert node.counters.unflushed == 0

"""The client transaction layer (RemoteNode) against an in-memory export
speaking the real protocol, under trio's MockClock so that resend and
keepalive timing is exact and instant. Real sockets and processes are
covered in test_remote_faults.py."""

from __future__ import annotations

import errno
import os
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import xxhash

from dstfuse.address import parse_address
from dstfuse.config import Timeouts
from dstfuse.errors import NodeError, NodeRefused, NodeSlow, NodeUnavailable
from dstfuse.nodes.base import NodeState
from dstfuse.nodes.remote import RemoteNode
from dstfuse.protocol import Command

from .fake_export import ANSWER, CORRUPT, CUT, CUT_MID_FRAME, DROP, SILENCE, FakeExport

TIMEOUTS = Timeouts(resend=2.0, max_resends=3, keepalive=1.0, connect=5.0)


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def remote(
    fake: FakeExport, *, key=None, cipher="aes-256-gcm", max_in_flight=64, timeouts=TIMEOUTS
):
    async with trio.open_nursery() as nursery:
        node = RemoteNode(
            parse_address("127.0.0.1:1"),
            export=None,
            timeouts=timeouts,
            key=key,
            cipher=cipher,
            max_in_flight=max_in_flight,
            connector=fake.connector(nursery),
        )
        await node.start(nursery)
        try:
            yield node
        finally:
            await node.aclose()
            nursery.cancel_scope.cancel()


def writes(fake: FakeExport) -> list[tuple[int, int]]:
    """(connection number, handle) of every WRITE the export received."""
    return [(n, r.handle) for n, r in fake.received if r.command is Command.WRITE]


async def test_read_write_flush_trim_zeroes_checksum_round_trip():
    fake = FakeExport(size=1 << 20)
    async with remote(fake) as node:
        assert node.size == 1 << 20 and node.writable
        payload = os.urandom(200_000)  # > max_request: split into transactions
        await node.write(4096, payload)
        assert bytes(fake.data[4096 : 4096 + len(payload)]) == payload
        assert await node.read(4096, len(payload)) == payload
        await node.flush()
        await node.trim(4096, 8192)
        await node.write_zeroes(20000, 100)
        assert await node.read(4096, 8192) == bytes(8192)
        expected = bytes(fake.data[0:65536])
        assert await node.checksum(0, 65536) == xxhash.xxh3_128_digest(expected)
        assert node.counters.bytes_written == len(payload)
        assert node.counters.in_flight == 0


async def test_dropped_reply_is_resent_after_timeout(autojump_clock):
    dropped = []

    def drop_first_write(request, number):
        if request.command is Command.WRITE and not dropped:
            dropped.append(request.handle)
            return DROP
        return ANSWER

    fake = FakeExport(policy=drop_first_write)
    async with remote(fake) as node:
        start = trio.current_time()
        await node.write(0, b"x" * 4096)
        assert trio.current_time() - start == pytest.approx(TIMEOUTS.resend)
        assert node.counters.resends == 1
        assert writes(fake) == [(1, dropped[0]), (1, dropped[0])]
        assert fake.data[:4096] == b"x" * 4096


async def test_each_transaction_is_resent_on_its_own_deadline(autojump_clock):
    """One resend timer serves every transaction: requests sent at
    different moments are resent `resend` seconds after their own send."""
    first_sends: set[int] = set()

    def drop_first_send(request, number):
        if request.command is Command.WRITE and request.handle not in first_sends:
            first_sends.add(request.handle)
            return DROP
        return ANSWER

    fake = FakeExport(policy=drop_first_send)
    async with remote(fake) as node:
        start = trio.current_time()
        finished: dict[int, float] = {}

        async def write_after(delay: float, offset: int) -> None:
            await trio.sleep(delay)
            await node.write(offset, b"z" * 4096)
            finished[offset] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_after, 0.0, 0)
            nursery.start_soon(write_after, 0.5, 4096)
            nursery.start_soon(write_after, 1.25, 8192)
        assert finished == {
            0: pytest.approx(TIMEOUTS.resend),
            4096: pytest.approx(0.5 + TIMEOUTS.resend),
            8192: pytest.approx(1.25 + TIMEOUTS.resend),
        }
        assert node.counters.resends == 3


async def test_unanswered_transaction_fails_with_eio_after_the_budget(autojump_clock, caplog):
    fake = FakeExport(policy=lambda r, n: DROP if r.command is Command.WRITE else ANSWER)
    async with remote(fake) as node:
        start = trio.current_time()
        with pytest.raises(NodeUnavailable) as info:
            await node.write(0, b"y" * 512)
        elapsed = trio.current_time() - start
        assert elapsed == pytest.approx(TIMEOUTS.resend * (TIMEOUTS.max_resends + 1))
        assert info.value.errno == errno.EIO
        assert len(writes(fake)) == TIMEOUTS.max_resends + 1
        assert "127.0.0.1:1" in str(info.value)
        assert any(
            "127.0.0.1:1" in r.getMessage() and "WRITE" in r.getMessage() for r in caplog.records
        )


@pytest.mark.parametrize("action", [CUT, CUT_MID_FRAME, CORRUPT])
async def test_broken_connection_reconnects_and_resends(autojump_clock, action):
    def break_first_connection(request, number):
        return action if request.command is Command.WRITE and number == 1 else ANSWER

    fake = FakeExport(policy=break_first_connection)
    async with remote(fake) as node:
        data = os.urandom(8192)
        await node.write(0, data)
        assert fake.data[:8192] == data
        assert fake.connections == 2
        assert node.counters.reconnects == 1
        assert node.state is NodeState.ONLINE
        handles = [h for _, h in writes(fake)]
        assert handles[0] == handles[-1]  # the same transaction, resent


async def test_resend_after_reconnect_keeps_submission_order(autojump_clock):
    fake = FakeExport(policy=lambda r, n: DROP if n == 1 and r.command is Command.WRITE else ANSWER)
    async with remote(fake) as node:
        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(node.write, index * 4096, bytes([index]) * 4096)
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert len(writes(fake)) == 5
            # cut the connection: every in-flight write must be resent in order
            fake.policy = lambda r, n: CUT if n == 1 else ANSWER
            await node.flush()
        first = [h for n, h in writes(fake) if n == 1]
        second = [h for n, h in writes(fake) if n == 2]
        assert second == first
        for index in range(5):
            assert fake.data[index * 4096 : (index + 1) * 4096] == bytes([index]) * 4096


async def test_overlapping_write_waits_for_the_unacknowledged_one(autojump_clock):
    fake = FakeExport()
    fake.gate = trio.Event()
    async with remote(fake) as node:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.write, 0, b"a" * 8192)
            await trio.sleep(0.1)
            nursery.start_soon(node.write, 4096, b"b" * 8192)  # overlaps
            nursery.start_soon(node.write, 65536, b"c" * 4096)  # does not
            await trio.sleep(0.1)
            offsets = [r.offset for _, r in fake.received if r.command is Command.WRITE]
            assert offsets == [0, 65536]
            fake.gate.set()
        offsets = [r.offset for _, r in fake.received if r.command is Command.WRITE]
        assert offsets == [0, 65536, 4096]
        assert fake.data[:4096] == b"a" * 4096 and fake.data[4096:12288] == b"b" * 8192


async def test_a_started_write_is_sent_at_once_and_settles_like_write(autojump_clock):
    """`begin_write` + `settle` is `write` in two halves: sent without a
    wait, `on_done` called once when the node answered (here after one
    resend: the first reply is dropped), and the range held until settled."""
    sends: list[int] = []

    def drop_first(request, number):
        if request.command is Command.WRITE:
            sends.append(request.handle)
            return DROP if len(sends) == 1 else ANSWER
        return ANSWER

    fake = FakeExport(policy=drop_first)
    async with remote(fake) as node:
        data = os.urandom(4096)
        started = node.begin_write(8192, data)
        assert started is not None and not started.done
        calls: list[bool] = []
        started.on_done = lambda: calls.append(started.done)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.write, 8192, b"later" * 100)  # overlaps: waits
            await trio.sleep(TIMEOUTS.resend + 0.5)
            assert calls == [True] and started.succeeded
            assert len(sends) == 2  # the resend; the overlapping write still waits
            await started.settle()
        assert bytes(fake.data[8192 : 8192 + 500]) == b"later" * 100
        assert bytes(fake.data[8192 + 500 : 8192 + 4096]) == data[500:]
        assert node.counters.bytes_written == 4096 + 500
        assert node.counters.in_flight == 0


async def test_begin_write_leaves_to_write_what_needs_a_wait_or_fails(autojump_clock):
    """None (the caller uses `write`) for a write that overlaps one in
    flight, finds no free slot, is larger than one transaction, lies past
    the end, or goes to a read-only node."""
    fake = FakeExport(size=1 << 20)
    fake.gate = trio.Event()
    async with remote(fake, max_in_flight=2) as node:
        first = node.begin_write(0, b"a" * 4096)
        assert first is not None
        assert node.begin_write(2048, b"b" * 4096) is None  # overlaps the first
        assert node.begin_write(node.size - 100, b"c" * 4096) is None  # past the end
        assert node.begin_write(65536, bytes(node.max_request + 1)) is None
        second = node.begin_write(65536, b"d" * 4096)
        assert second is not None
        assert node.begin_write(131072, b"e" * 4096) is None  # both slots taken
        fake.gate.set()
        await first.settle()
        await second.settle()
        assert node.counters.in_flight == 0
    read_only = FakeExport(writable=False)
    async with remote(read_only) as node:
        assert node.begin_write(0, b"f" * 512) is None


async def test_a_started_write_raises_the_nodes_error_when_settled():
    fake = FakeExport(size=8192)
    async with remote(fake) as node:
        node.size = 1 << 20  # pretend, so the client-side bounds check passes
        started = node.begin_write(16384, b"q" * 512)
        assert started is not None
        with trio.fail_after(5):
            while not started.done:
                await trio.sleep(0.01)
        assert not started.succeeded
        with pytest.raises(NodeError) as info:
            await started.settle()
        assert info.value.errno == errno.EINVAL
        assert node.counters.errors == 1 and node.counters.in_flight == 0


async def test_in_flight_transactions_are_bounded(autojump_clock):
    fake = FakeExport()
    fake.gate = trio.Event()
    async with remote(fake, max_in_flight=3) as node:
        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(node.read, index * 512, 512)
            await trio.sleep(0.5)
            assert len(fake.received) == 3
            assert node.counters.in_flight == 3
            fake.gate.set()
        assert fake.max_in_progress == 3
        assert len(fake.received) == 10


def reads_unanswered(request, number):
    """Every READ's reply is lost; pings and everything else answered (the
    node stays online, as a node whose disk hangs)."""
    return DROP if request.command is Command.READ else ANSWER


@pytest.mark.parametrize("patience", [0.5, 3.0])
async def test_a_read_is_given_up_at_its_patience_by_the_resend_timer(autojump_clock, patience):
    """`read_within`: the resend timer ends the wait at the caller's
    patience, before (0.5 s) or after (3 s) the first resend at 2 s; the
    transaction leaves the table, the node stays usable."""
    fake = FakeExport(policy=reads_unanswered)
    async with remote(fake) as node:
        await node.write(0, b"r" * 4096)
        start = trio.current_time()
        with pytest.raises(NodeSlow, match="patience"):
            await node.read_within(0, 4096, patience)
        assert trio.current_time() - start == pytest.approx(patience)
        assert node.counters.resends == (1 if patience > TIMEOUTS.resend else 0)
        assert node.counters.in_flight == 0 and node.counters.errors == 0
        assert node.state is NodeState.ONLINE
        fake.policy = lambda request, number: ANSWER
        assert await node.read_within(0, 4096, patience) == b"r" * 4096


async def test_64_waiting_reads_are_all_given_up_at_their_patience(autojump_clock):
    """A deep queue of reads on a node that answers none: each is given up
    at its own patience (they are sent 0.1 s apart), none later."""
    fake = FakeExport(policy=reads_unanswered)
    ended: list[float] = []
    async with remote(fake) as node:
        start = trio.current_time()

        async def read(index: int) -> None:
            await trio.sleep(index * 0.1)
            with pytest.raises(NodeSlow):
                await node.read_within(index * 4096, 4096, 1.0)
            ended.append(trio.current_time() - start - index * 0.1)

        async with trio.open_nursery() as nursery:
            for index in range(64):
                nursery.start_soon(read, index)
        assert len(ended) == 64
        assert all(took == pytest.approx(1.0) for took in ended), ended
        assert node.counters.in_flight == 0


async def test_a_read_waiting_for_a_disconnected_node_is_given_up_at_its_patience(
    autojump_clock,
):
    fake = FakeExport(policy=lambda r, n: CUT if n == 1 and r.command is Command.READ else ANSWER)
    async with remote(fake) as node:
        original = fake.serve
        refuse = trio.Event()

        async def down(stream):
            await refuse.wait()  # the node's host is rebooting
            await original(stream)

        fake.serve = down
        start = trio.current_time()
        with pytest.raises(NodeSlow):
            await node.read_within(0, 4096, 1.5)
        assert trio.current_time() - start == pytest.approx(1.5)
        assert node.state is NodeState.OFFLINE
        refuse.set()
        assert await node.read_within(0, 4096, 1.5) == bytes(4096)


async def test_silent_node_is_detected_by_keepalive_and_reconnected(autojump_clock):
    fake = FakeExport(
        policy=lambda r, n: SILENCE if n == 1 and r.command is Command.PING else ANSWER
    )
    async with remote(fake) as node:
        start = trio.current_time()
        await node.wait_state_change(NodeState.ONLINE)
        # silent for three keepalive intervals, pings unanswered
        assert trio.current_time() - start <= 4 * TIMEOUTS.keepalive
        assert await node.wait_state_change(NodeState.OFFLINE) is NodeState.ONLINE
        assert fake.connections == 2
        assert await node.read(0, 512) == bytes(512)


async def test_requests_wait_while_disconnected_then_complete(autojump_clock):
    fake = FakeExport(policy=lambda r, n: CUT if n == 1 else ANSWER)
    refuse = trio.Event()
    async with remote(fake) as node:
        original = fake.serve

        async def slow_serve(stream):
            await refuse.wait()  # the node "reboots" for a while
            await original(stream)

        fake.serve = slow_serve
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.write, 0, b"z" * 4096)
            await trio.sleep(5)  # within the budget of 8 s
            assert node.state is NodeState.OFFLINE
            refuse.set()
        assert fake.data[:4096] == b"z" * 4096


async def test_reply_for_unknown_handle_is_dropped():
    fake = FakeExport()
    async with remote(fake) as node:
        node._on_reply(
            __import__("dstfuse.protocol", fromlist=["Reply"]).Reply(Command.READ, 999999)
        )
        assert await node.read(0, 16) == bytes(16)


async def test_error_status_reaches_the_caller_with_its_errno():
    fake = FakeExport(size=8192)
    async with remote(fake) as node:
        node.size = 1 << 20  # pretend, so the client-side bounds check passes
        with pytest.raises(NodeError) as info:
            await node.write(16384, b"q" * 512)
        assert info.value.errno == errno.EINVAL
        assert node.counters.errors == 1


async def test_read_only_grant_refuses_writes_on_the_client_too():
    fake = FakeExport(writable=False)
    async with remote(fake) as node:
        assert not node.writable
        with pytest.raises(NodeError) as info:
            await node.write(0, b"w")
        assert info.value.errno == errno.EROFS


@pytest.mark.parametrize(
    "client_key, node_key",
    [(os.urandom(32), os.urandom(32)), (None, os.urandom(32)), (os.urandom(32), None)],
    ids=["different keys", "key on the node only", "key on the client only"],
)
async def test_key_problems_refuse_the_node_at_start(client_key, node_key):
    fake = FakeExport(key=node_key)
    async with trio.open_nursery() as nursery:
        node = RemoteNode(
            parse_address("127.0.0.1:1"),
            export=None,
            timeouts=TIMEOUTS,
            key=client_key,
            connector=fake.connector(nursery),
        )
        with pytest.raises(NodeRefused) as info:
            await node.start(nursery)
    assert "key" in str(info.value)
    assert "127.0.0.1:1" in str(info.value)
    assert not fake.received


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305", "none"])
async def test_keyed_modes_carry_data(cipher):
    key = os.urandom(32)
    fake = FakeExport(key=key)
    async with remote(fake, key=key, cipher=cipher) as node:
        await node.write(0, b"secret" * 100)
        assert await node.read(0, 600) == b"secret" * 100


async def test_unreachable_node_fails_start_within_the_connect_timeout(autojump_clock):
    async def never(address):
        await trio.sleep_forever()

    start = trio.current_time()
    node = RemoteNode(
        parse_address("127.0.0.1:9"), export=None, timeouts=TIMEOUTS, key=None, connector=never
    )
    async with trio.open_nursery() as nursery:
        with pytest.raises(NodeUnavailable) as info:
            await node.start(nursery)
    assert trio.current_time() - start == pytest.approx(TIMEOUTS.connect)
    assert "127.0.0.1:9" in str(info.value)


async def test_node_allowed_to_start_offline_comes_online_when_reachable(autojump_clock):
    fake = FakeExport(size=1 << 20)
    reachable = trio.Event()
    async with trio.open_nursery() as nursery:
        serve = fake.connector(nursery)

        async def connector(address):
            if not reachable.is_set():
                raise OSError(111, "Connection refused")
            return await serve(address)

        node = RemoteNode(
            parse_address("127.0.0.1:1"),
            export=None,
            timeouts=TIMEOUTS,
            key=None,
            connector=connector,
        )
        await node.start(nursery, may_start_offline=True)
        assert node.state is NodeState.OFFLINE and node.size == 0
        await trio.sleep(30)
        reachable.set()
        assert await node.wait_state_change(NodeState.OFFLINE) is NodeState.ONLINE
        assert node.size == 1 << 20 and node.writable
        await node.write(0, b"late")
        assert fake.data[:4] == b"late"
        assert node.counters.reconnects == 0
        await node.aclose()
        nursery.cancel_scope.cancel()


async def test_node_refused_at_start_fails_even_when_it_may_start_offline():
    fake = FakeExport(key=os.urandom(32))
    async with trio.open_nursery() as nursery:
        node = RemoteNode(
            parse_address("127.0.0.1:1"),
            export=None,
            timeouts=TIMEOUTS,
            key=None,
            connector=fake.connector(nursery),
        )
        with pytest.raises(NodeRefused):
            await node.start(nursery, may_start_offline=True)

"""The export server in-process over real loopback TCP and unix sockets,
driven by the raw test client (which sends whatever it is told)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import shutil
import socket
import tempfile

import pytest
import trio
import xxhash

from dstfuse.address import Address
from dstfuse.config import AclRule, parse_acl_rule
from dstfuse.errors import UserError
from dstfuse.export import Backend, ExportAcl, ExportServer, ServedExport
from dstfuse.export.grant import WriteGrant
from dstfuse.export.listeners import open_listeners
from dstfuse.export.served import MAX_CHECKSUM_LENGTH
from dstfuse.protocol import Command, Feature, Flag, Permission, Request
from dstfuse.protocol.constants import HEADER, MAGIC, VERSION

from .rawclient import RawClient, RawRefused

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
LOOPBACK = ("127.0.0.1", 0)


# -- fixtures and helpers ---------------------------------------------------


@pytest.fixture(autouse=True)
def info_logs(caplog):
    """Capture INFO and up; any logged traceback (a bug) fails the test."""
    caplog.set_level(logging.INFO, logger="dstfuse")
    yield
    crashes = [r for r in caplog.records if r.exc_info]
    assert not crashes, [r.getMessage() for r in crashes]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def sockdir():
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path may not.
    path = tempfile.mkdtemp(prefix="dstf-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def export(
    path, name="disk1", *, read_only=False, allow=(), backend=None, shared=True
) -> ServedExport:
    """Shared by default: most tests here write from several raw clients
    (identities) at once; the write grant's own tests say shared=False."""
    backend = backend or Backend(path, read_only=read_only)
    return ServedExport(
        name, backend, ExportAcl(allow, read_only=read_only), WriteGrant(shared=shared)
    )


async def start(nursery, exports, listen=(LOOPBACK,), **options):
    if isinstance(exports, ServedExport):
        exports = [exports]
    server = ExportServer(exports, list(listen), **options)
    addresses = await nursery.start(server.serve)
    return server, addresses


async def wait_until(condition, timeout=5.0):
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


class GatedBackend(Backend):
    """A backend whose writes wait at a gate and are logged in completion
    order: a disk that is slow exactly when the test wants it to be."""

    def __init__(self, path, **options):
        super().__init__(path, **options)
        self.gate = trio.Event()
        self.waiting = 0
        self.max_waiting = 0
        self.completed: list[tuple[int, bytes]] = []

    def write_cached(self, offset, data):
        return False  # no write completes at once: each waits at the gate

    async def write(self, offset, data, *, fua=False):
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        await super().write(offset, data, fua=fua)
        self.completed.append((offset, bytes(data)))


class FailingBackend(Backend):
    """Every write fails as a bad disk would, whichever path it takes (in
    the event loop for small ones, in a thread for large or FUA ones)."""

    def _pwrite(self, offset, data, fua):
        raise OSError(errno.EIO, "medium error")

    async def flush(self):
        raise OSError(errno.EIO, "medium error")


# -- handshake and I/O ------------------------------------------------------


async def test_handshake_and_every_request_over_tcp_and_unix(image, sockdir, nursery):
    socket_path = os.path.join(sockdir, "export.sock")
    server, addresses = await start(
        nursery, export(image), listen=[LOOPBACK, Address.unix(socket_path)]
    )
    assert addresses[0].kind == "tcp" and addresses[0].port > 0
    assert addresses[1] == Address.unix(socket_path)
    for address in addresses:
        async with await RawClient.connect(address, client_name="test") as client:
            ready = client.ready
            assert ready.size == SIZE and ready.export == "disk1"
            assert ready.permissions == Permission.READ | Permission.WRITE
            assert ready.block_size == 4096 and ready.max_request == 4 * MiB
            assert ready.features & Feature.TRIM and ready.features & Feature.CHECKSUM
            data = os.urandom(64 * KiB)
            reply = await client.write(12345, data, fua=True)
            assert (reply.status, reply.offset, reply.length) == (0, 12345, len(data))
            reply = await client.read(12345, len(data))
            assert reply.status == 0 and bytes(reply.data) == data
            reply = await client.checksum(12345, len(data))
            assert bytes(reply.data) == xxhash.xxh3_128_digest(data)
            assert (await client.trim(MiB, 64 * KiB)).status == 0
            assert (await client.write_zeroes(2 * MiB, 4 * KiB, fua=True)).status == 0
            assert (await client.flush()).status == 0
            assert (await client.ping()).status == 0
            assert bytes((await client.read(MiB, 64 * KiB)).data) == bytes(64 * KiB)
    server.shutdown()
    await wait_until(lambda: not os.path.exists(socket_path))
    content = image.read_bytes()
    assert content[12345 : 12345 + len(data)] == data
    assert content[2 * MiB : 2 * MiB + 4 * KiB] == bytes(4 * KiB)


async def test_many_clients_with_pipelined_requests(image, nursery):
    _, (address,) = await start(nursery, export(image))
    clients = 24
    per_client = 16
    chunk = 8 * KiB
    payloads = {
        (c, i): os.urandom(chunk) for c in range(clients) for i in range(per_client)
    }

    def offset(c: int, i: int) -> int:
        return (c * per_client + i) * chunk

    async def one_client(c: int) -> None:
        async with await RawClient.connect(address, client_name=f"c{c}") as client:
            handles = [
                await client.send(Command.WRITE, offset(c, i), data=payloads[c, i])
                for i in range(per_client)
            ]
            for handle in handles:
                assert (await client.reply(handle)).status == 0
            handles = [
                await client.send(Command.READ, offset(c, i), chunk) for i in range(per_client)
            ]
            for i, handle in enumerate(handles):
                reply = await client.reply(handle)
                assert reply.status == 0 and bytes(reply.data) == payloads[c, i]

    async with trio.open_nursery() as group:
        for c in range(clients):
            group.start_soon(one_client, c)
    content = image.read_bytes()
    for (c, i), data in payloads.items():
        assert content[offset(c, i) : offset(c, i) + chunk] == data


async def test_ipv6_loopback_listener_is_v6only_and_serves(image, nursery):
    listeners = await open_listeners(("::1", 0))
    try:
        sock = listeners[0].listener.socket
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for listener in listeners:
            listener.close()
    _, (address,) = await start(nursery, export(image), listen=[("::1", 0)])
    assert address.host == "::1"
    async with await RawClient.connect(address) as client:
        assert (await client.ping()).status == 0


async def test_export_is_chosen_by_name(tmp_path, nursery, caplog):
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    (tmp_path / "b.img").write_bytes(bytes(2 * MiB))
    exports = [export(tmp_path / "a.img", "a"), export(tmp_path / "b.img", "b")]
    _, (address,) = await start(nursery, exports)
    async with await RawClient.connect(address, export="b") as client:
        assert client.ready.size == 2 * MiB and client.ready.export == "b"
    with pytest.raises(RawRefused) as caught:
        await RawClient.connect(address, export="nope")
    assert caught.value.status == errno.ENOENT
    assert "no export 'nope'" in caught.value.message and "a, b" in caught.value.message
    with pytest.raises(RawRefused) as caught:
        await RawClient.connect(address)
    assert "several exports (a, b)" in caught.value.message
    assert any(
        "nope" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caught_logs(caplog)
    )


def caught_logs(caplog):
    return [r for r in caplog.records if r.name.startswith("dstfuse.export")]


# -- access control -----------------------------------------------------------


def test_acl_rules():
    loopback_only = ExportAcl()
    rw = Permission.READ | Permission.WRITE
    assert loopback_only.permission("127.0.0.1") == rw
    assert loopback_only.permission("127.8.9.10") == rw
    assert loopback_only.permission("::1") == rw
    assert loopback_only.permission("::ffff:127.0.0.1") == rw
    assert loopback_only.permission("10.0.0.1") is None
    assert loopback_only.permission(None) == rw  # unix socket
    rules = [parse_acl_rule("10.0.0.0/8=ro"), parse_acl_rule("10.0.0.5=rw"),
             parse_acl_rule("fd00::/8")]
    acl = ExportAcl(rules)
    assert acl.permission("10.1.2.3") == Permission.READ
    assert acl.permission("10.0.0.5") == rw  # the longest prefix wins
    assert acl.permission("::ffff:10.0.0.5") == rw
    assert acl.permission("fd00::1") == rw
    assert acl.permission("127.0.0.1") is None  # rules replace the loopback default
    assert acl.permission("11.0.0.1") is None
    assert acl.permission(None) == rw
    read_only = ExportAcl(rules, read_only=True)
    assert read_only.permission("10.0.0.5") == Permission.READ
    assert ExportAcl(read_only=True).permission("127.0.0.1") == Permission.READ
    assert ExportAcl([AclRule(ipaddress.ip_network("0.0.0.0/0"), True)]).permission(
        ipaddress.ip_address("192.0.2.1")
    ) == rw


async def test_address_outside_the_acl_is_refused_with_a_message(image, sockdir, nursery, caplog):
    before = image.read_bytes()
    socket_path = os.path.join(sockdir, "s")
    _, (tcp, unix) = await start(
        nursery,
        export(image, allow=[parse_acl_rule("10.0.0.0/8")]),
        listen=[LOOPBACK, Address.unix(socket_path)],
    )
    with pytest.raises(RawRefused) as caught:
        await RawClient.connect(tcp)
    assert caught.value.by_node and caught.value.status == errno.EACCES
    assert caught.value.message == "address 127.0.0.1 is not allowed by export disk1's ACL"
    assert any(
        "127.0.0.1:" in r.getMessage() and "not allowed" in r.getMessage()
        and r.levelno == logging.WARNING
        for r in caught_logs(caplog)
    )
    # The unix socket's file permissions guard it, not the address rules.
    async with await RawClient.connect(unix) as client:
        assert (await client.ping()).status == 0
    assert image.read_bytes() == before


@pytest.mark.parametrize("how", ["read-only export", "ro acl rule"])
async def test_read_only_grant_is_enforced_by_the_node(image, nursery, caplog, how):
    before = image.read_bytes()
    if how == "read-only export":
        served = export(image, read_only=True)
    else:
        served = export(image, allow=[parse_acl_rule("127.0.0.0/8=ro")])
    _, (address,) = await start(nursery, served)
    async with await RawClient.connect(address) as client:
        assert client.ready.permissions == Permission.READ
        for command, data in [
            (Command.WRITE, b"x" * 4096),
            (Command.TRIM, b""),
            (Command.WRITE_ZEROES, b""),
        ]:
            handle = await client.send(command, 0, 4096, data=data, flags=Flag.FUA)
            reply = await client.reply(handle)
            assert reply.status == errno.EPERM, command
            assert (reply.handle, reply.offset, reply.length) == (handle, 0, 4096)
        assert bytes((await client.read(0, 4096)).data) == before[:4096]
        assert (await client.flush()).status == 0
    assert image.read_bytes() == before
    assert any("EPERM" in r.getMessage() and "handle 1" in r.getMessage() for r in caplog.records)


# -- bad requests -------------------------------------------------------------


async def test_requests_past_the_end_or_too_long_get_an_error(image, nursery):
    before = image.read_bytes()
    _, (address,) = await start(nursery, export(image), max_request=64 * KiB)
    async with await RawClient.connect(address) as client:
        cases = [
            (Command.READ, SIZE - 10, 11, b"", errno.EINVAL),
            (Command.READ, (1 << 64) - 1, 1, b"", errno.EINVAL),
            (Command.CHECKSUM, 4096, SIZE, b"", errno.EINVAL),
            (Command.WRITE, SIZE - 1, 2, b"ab", errno.ENOSPC),
            (Command.TRIM, SIZE, 4096, b"", errno.ENOSPC),
            (Command.WRITE_ZEROES, SIZE - 4096, 8192, b"", errno.ENOSPC),
            (Command.READ, 0, 64 * KiB + 1, b"", errno.EINVAL),
            (Command.CHECKSUM, 0, MAX_CHECKSUM_LENGTH + 1, b"", errno.EINVAL),
        ]
        for command, offset, length, data, status in cases:
            handle = await client.send(command, offset, length, data=data)
            reply = await client.reply(handle)
            assert reply.status == status, (command, offset, length)
            assert (reply.handle, reply.offset, reply.length) == (handle, offset, length)
            assert bytes(reply.data) == b""
        # Within the limits everything still works on the same connection.
        assert (await client.read(SIZE - 64 * KiB, 64 * KiB)).status == 0
        assert (await client.checksum(0, SIZE)).status == 0
    assert image.read_bytes() == before


async def test_disk_errors_reach_the_client(image, nursery):
    _, (address,) = await start(nursery, export(image, backend=FailingBackend(image)))
    async with await RawClient.connect(address) as client:
        assert (await client.write(0, b"data")).status == errno.EIO
        assert (await client.write(0, b"data", fua=True)).status == errno.EIO
        assert (await client.write(0, bytes(256 * KiB))).status == errno.EIO
        assert (await client.flush()).status == errno.EIO
        assert (await client.read(0, 4)).status == 0


async def test_broken_frames_close_only_their_connection(image, nursery, caplog):
    before = image.read_bytes()
    _, (address,) = await start(nursery, export(image), max_request=64 * KiB)
    async with await RawClient.connect(address, client_name="good") as good:
        # Garbage instead of HELLO.
        async with await RawClient.open(address) as bad:
            await bad.send_bytes(b"GET / HTTP/1.1\r\n" * 4)
            assert await bad.wait_closed(5)
        # Bad magic after the handshake.
        async with await RawClient.connect(address, client_name="bad-magic") as bad:
            await bad.send_bytes(b"XXXX" + bytes(HEADER.size + 16 - 4))
            assert await bad.wait_closed(5)
        # A header announcing a 4 GiB payload: refused before it is buffered.
        async with await RawClient.connect(address, client_name="huge") as bad:
            header = HEADER.pack(MAGIC, VERSION, Command.WRITE, 0, 1, 0, 0, 0, 0xFFFFFFFF, 0)
            await bad.send_bytes(header)
            assert await bad.wait_closed(5)
        # A WRITE longer than max_request.
        async with await RawClient.connect(address, client_name="long") as bad:
            await bad.send(Command.WRITE, 0, data=bytes(64 * KiB + 1))
            assert await bad.wait_closed(5)
        # A frame whose checksum does not match (one bit flipped in the payload).
        async with await RawClient.connect(address, client_name="flipped") as bad:
            frame = bytearray(bad.conn.send(Request(Command.WRITE, 1, 0, 4, data=b"abcd")))
            frame[HEADER.size] ^= 1
            await bad.send_bytes(bytes(frame))
            assert await bad.wait_closed(5)
        # Well sealed but inconsistent frames.
        for fields in [
            {"command": Command.WRITE, "length": 1, "payload": b"abcd"},
            {"command": Command.READ, "length": 4, "payload": b"abcd"},
            {"command": Command.PING, "flags": int(Flag.REPLY)},
            {"command": 99},
        ]:
            async with await RawClient.connect(address, client_name="odd") as bad:
                await bad.send_frame(**fields)
                assert await bad.wait_closed(5), fields
        assert (await good.ping()).status == 0
        assert bytes((await good.read(0, 4)).data) == before[:4]
    messages = [r.getMessage() for r in caught_logs(caplog)]
    assert any("bad frame magic" in m and "bad-magic" in m for m in messages)
    assert any("exceeds the limit" in m and "huge" in m for m in messages)
    async with await RawClient.connect(address) as client:
        assert (await client.ping()).status == 0


async def test_random_bytes_never_crash_the_server(image, nursery):
    before = image.read_bytes()
    _, (address,) = await start(nursery, export(image), handshake_timeout=2)
    rng = random.Random(1234)
    for round_ in range(40):
        garbage = rng.randbytes(rng.choice([1, 39, 40, 56, 100, 5000]))
        if round_ % 2:
            garbage = MAGIC + bytes([VERSION]) + garbage  # get past the magic check
        async with await RawClient.connect(address) as raw:
            await raw.send_bytes(garbage)
            await raw.stream.send_eof()  # a partial frame then EOF must close too
            assert await raw.wait_closed(5)
    async with await RawClient.connect(address) as client:
        assert (await client.ping()).status == 0
    assert image.read_bytes() == before


async def test_idle_connections_are_closed_by_the_handshake_deadline(image, nursery, caplog):
    _, (address,) = await start(nursery, export(image), handshake_timeout=0.5)
    idle = [await RawClient.open(address) for _ in range(60)]
    try:
        started = trio.current_time()
        async with await RawClient.connect(address) as client:
            assert (await client.ping()).status == 0
        async with trio.open_nursery() as group:
            closed = []

            async def watch(raw):
                closed.append(await raw.wait_closed(5))

            for raw in idle:
                group.start_soon(watch, raw)
        assert closed == [True] * 60
        assert trio.current_time() - started < 8
    finally:
        for raw in idle:
            await raw.aclose()
    assert sum("no handshake within" in r.getMessage() for r in caught_logs(caplog)) == 60


async def test_connections_beyond_the_cap_are_closed_at_once(image, nursery, caplog):
    server, (address,) = await start(nursery, export(image), max_connections=3)
    clients = [await RawClient.connect(address, client_name=f"c{i}") for i in range(3)]
    try:
        with pytest.raises(RawRefused) as caught:
            await RawClient.connect(address, client_name="one-too-many")
        assert "closed" in caught.value.message
        assert any("max_connections" in r.getMessage() for r in caught_logs(caplog))
        await clients.pop().aclose()
        await wait_until(lambda: server.connections == 2)
        async with await RawClient.connect(address) as client:
            assert (await client.ping()).status == 0
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize(
    "limits",
    [{"max_in_flight": 4}, {"max_buffered": 16 * KiB}],
    ids=["requests", "bytes"],
)
async def test_requests_in_flight_per_connection_are_bounded(image, nursery, limits):
    """Four 4 KiB writes fill either limit; the reader then stops reading."""
    backend = GatedBackend(image)
    _, (address,) = await start(nursery, export(image, backend=backend), **limits)
    async with await RawClient.connect(address) as client:
        handles = [
            await client.send(Command.WRITE, i * 4096, data=bytes([i]) * 4096) for i in range(20)
        ]
        await wait_until(lambda: backend.waiting == 4)
        await trio.sleep(0.2)  # the reader is stopped: no fifth write arrives
        assert backend.waiting == 4
        backend.gate.set()
        for handle in handles:
            assert (await client.reply(handle)).status == 0
    assert backend.max_waiting == 4
    content = image.read_bytes()
    assert all(content[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096 for i in range(20))


# -- write ordering and session takeover -----------------------------------------


async def test_overlapping_writes_from_two_connections_land_in_arrival_order(image, nursery):
    backend = GatedBackend(image)
    _, (address,) = await start(nursery, export(image, backend=backend))
    async with await RawClient.connect(address) as first, \
            await RawClient.connect(address) as second:
        earlier = await first.send(Command.WRITE, 0, data=b"1" * 8192)
        await wait_until(lambda: backend.waiting == 1)
        later = await second.send(Command.WRITE, 4096, data=b"2" * 8192)
        await trio.sleep(0.1)
        backend.gate.set()
        assert (await second.reply(later)).status == 0
        assert (await first.reply(earlier)).status == 0
    assert backend.completed == [(0, b"1" * 8192), (4096, b"2" * 8192)]
    assert image.read_bytes()[:12288] == b"1" * 4096 + b"2" * 8192


class DurableWritesGatedBackend(GatedBackend):
    """Plain writes complete at once (the page cache, in the reader); FUA
    ones, which go to a request task and a thread, wait at the gate."""

    def write_cached(self, offset, data):
        return Backend.write_cached(self, offset, data)


async def test_a_small_write_overlapping_one_in_progress_is_not_served_at_once(image, nursery):
    backend = DurableWritesGatedBackend(image)
    before = image.read_bytes()
    _, (address,) = await start(nursery, export(image, backend=backend))
    async with await RawClient.connect(address) as client:
        large = await client.send(Command.WRITE, 0, data=b"L" * (128 * KiB), flags=Flag.FUA)
        await wait_until(lambda: backend.waiting == 1)
        apart = await client.send(Command.WRITE, 1 * MiB, data=b"A" * 4096)
        assert (await client.reply(apart)).status == 0  # overlaps nothing: served at once
        small = await client.send(Command.WRITE, 4096, data=b"s" * 4096)
        await trio.sleep(0.1)
        # the overlapping one waits its turn (in the write order, not at once)
        assert image.read_bytes()[4096:8192] == before[4096:8192]
        backend.gate.set()
        assert (await client.reply(large)).status == 0
        assert (await client.reply(small)).status == 0
    content = image.read_bytes()
    assert content[:4096] == b"L" * 4096 and content[4096:8192] == b"s" * 4096
    assert content[MiB : MiB + 4096] == b"A" * 4096


async def test_takeover_waits_for_the_old_connections_writes(image, nursery, caplog):
    backend = GatedBackend(image)
    _, (address,) = await start(nursery, export(image, backend=backend))
    client_id = os.urandom(16)
    old = await RawClient.connect(address, client_id=client_id, client_name="old")
    new = await RawClient.open(address)
    try:
        stuck = await old.send(Command.WRITE, 0, data=b"o" * 4096)
        await wait_until(lambda: backend.waiting == 1)
        ready_after: list[list] = []

        async def reconnect():
            await new.handshake(client_id=client_id, client_name="new")
            ready_after.append(list(backend.completed))

        async with trio.open_nursery() as group:
            group.start_soon(reconnect)
            await trio.sleep(0.3)
            assert not ready_after, "READY was sent while the old write was still running"
            backend.gate.set()
        # The old write was on disk before the new connection could send anything.
        assert ready_after == [[(0, b"o" * 4096)]]
        assert (await new.write(0, b"n" * 4096)).status == 0
        assert await old.wait_closed(5)
        # The old connection is gone: whatever it sends now is never applied.
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            for _ in range(20):
                await old.send(Command.WRITE, 0, data=b"s" * 4096)
                await trio.sleep(0.01)
        del stuck
    finally:
        await old.aclose()
        await new.aclose()
    assert image.read_bytes()[:4096] == b"n" * 4096
    assert any("retiring" in r.getMessage() for r in caught_logs(caplog))


async def test_takeover_chain_waits_for_every_older_connection(image, nursery):
    backend = GatedBackend(image)
    _, (address,) = await start(nursery, export(image, backend=backend))
    client_id = os.urandom(16)
    first = await RawClient.connect(address, client_id=client_id)
    second = await RawClient.open(address)
    third = await RawClient.open(address)
    try:
        await first.send(Command.WRITE, 0, data=b"1" * 4096)
        await wait_until(lambda: backend.waiting == 1)
        async with trio.open_nursery() as group:
            group.start_soon(_expect_no_ready, second, client_id)
            await trio.sleep(0.2)
            ready = []

            async def third_connects():
                await third.handshake(client_id=client_id)
                ready.append(list(backend.completed))

            group.start_soon(third_connects)
            await trio.sleep(0.3)
            assert not ready
            backend.gate.set()
        assert ready == [[(0, b"1" * 4096)]]
        assert (await third.ping()).status == 0
    finally:
        for client in (first, second, third):
            await client.aclose()


async def _expect_no_ready(client, client_id):
    with pytest.raises(RawRefused):
        await client.handshake(client_id=client_id)


# -- keys ----------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305", "none"])
async def test_keyed_sessions_serve_io(image, nursery, cipher):
    key = os.urandom(32)
    _, (address,) = await start(nursery, export(image), key=key)
    async with await RawClient.connect(address, key=key, cipher=cipher) as client:
        assert (await client.write(0, b"secret")).status == 0
        assert bytes((await client.read(0, 6)).data) == b"secret"


@pytest.mark.parametrize(
    "server_key, client_key, by_node",
    [
        (os.urandom(32), os.urandom(32), False),  # the client notices first
        (None, os.urandom(32), True),
        (os.urandom(32), None, True),
    ],
    ids=["wrong key", "key only on the client", "key only on the node"],
)
async def test_key_mismatch_is_refused_naming_the_key(
    image, nursery, caplog, server_key, client_key, by_node
):
    _, (address,) = await start(nursery, export(image), key=server_key)
    with pytest.raises(RawRefused) as caught:
        await RawClient.connect(address, key=client_key, client_name="keyed")
    assert "key" in caught.value.message
    assert caught.value.by_node == by_node
    await wait_until(
        lambda: any(
            "key" in r.getMessage() and "127.0.0.1:" in r.getMessage() and "keyed" in r.getMessage()
            for r in caught_logs(caplog)
        )
    )


# -- listeners and shutdown -------------------------------------------------------


async def test_stale_unix_socket_is_replaced_but_a_live_one_is_not(image, sockdir, nursery):
    path = os.path.join(sockdir, "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    _, (address,) = await start(nursery, export(image), listen=[Address.unix(path)])
    async with await RawClient.connect(address) as client:
        assert (await client.ping()).status == 0
    with pytest.raises(UserError, match="another process is listening"):
        await open_listeners(Address.unix(path))
    regular = os.path.join(sockdir, "file")
    open(regular, "w").close()
    with pytest.raises(UserError, match="not a socket"):
        await open_listeners(Address.unix(regular))
    assert os.path.exists(regular)


async def test_address_in_use_is_a_user_error(image, nursery):
    _, (address,) = await start(nursery, export(image))
    server = ExportServer([export(image, "other")], [("127.0.0.1", address.port)])
    with pytest.raises(UserError, match="address already in use"):
        await server.serve()


async def test_shutdown_lets_started_writes_finish_and_flushes(image, sockdir, nursery):
    backend = GatedBackend(image)
    path = os.path.join(sockdir, "s")
    server = ExportServer([export(image, backend=backend)], [Address.unix(path)])
    done = trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await server.serve(task_status=task_status)
        done.set()

    (address,) = await nursery.start(serve)
    async with await RawClient.connect(address) as client:
        handle = await client.send(Command.WRITE, 0, data=b"z" * 4096)
        await wait_until(lambda: backend.waiting == 1)
        server.shutdown()
        await trio.sleep(0.1)
        assert not done.is_set()
        backend.gate.set()
        assert (await client.reply(handle)).status == 0
        with trio.fail_after(5):
            await done.wait()
    assert image.read_bytes()[:4096] == b"z" * 4096
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        await backend.read(0, 1)  # closed by the server


async def test_shutdown_is_bounded_when_a_client_stops_reading(image, nursery):
    server = ExportServer([export(image)], [LOOPBACK], drain_timeout=0.3)
    done = trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await server.serve(task_status=task_status)
        done.set()

    (address,) = await nursery.start(serve)
    async with await RawClient.connect(address) as client:
        for _ in range(64):  # far more reply data than socket buffers hold
            await client.send(Command.READ, 0, 4 * MiB)
        await trio.sleep(0.2)
        server.shutdown()
        with trio.fail_after(5):
            await done.wait()

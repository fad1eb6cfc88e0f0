"""The export server's NBD side in-process over real loopback TCP, driven
by raw NBD bytes packed from the specification here: the handshake caps
and deadline, and write order shared with dstfuse connections."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from dstfuse.export import Backend, ExportAcl, ExportServer, ServedExport
from dstfuse.export.grant import WriteGrant
from dstfuse.protocol import HelloFlag
from dstfuse.protocol.nbd.constants import IHAVEOPT, NBDMAGIC, REQUEST_MAGIC, Command, Option

from .rawclient import RawClient
from .test_export_server import GatedBackend, wait_until

MiB = 1 << 20
LOOPBACK = ("127.0.0.1", 0)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


async def closed_by_server(stream: trio.SocketStream, timeout: float = 5.0) -> bool:
    with trio.fail_after(timeout):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
    return True


async def go(stream: trio.SocketStream, name: str) -> None:
    """Greeting, client flags, NBD_OPT_GO; reads the replies up to the ACK."""
    greeting = await receive_exactly(stream, 18)
    assert struct.unpack(">QQH", greeting)[:2] == (NBDMAGIC, IHAVEOPT)
    encoded = name.encode()
    data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
    await stream.send_all(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Option.GO,
                                                            len(data)) + data)
    while True:
        _, _, reply, length = struct.unpack(">QIII", await receive_exactly(stream, 20))
        await receive_exactly(stream, length)
        if reply == 1:  # ACK
            return
        assert reply == 3, hex(reply)  # INFO


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


async def test_nbd_handshakes_are_capped_and_timed_out(image, nursery):
    served = ServedExport("disk", Backend(image), ExportAcl())
    server = ExportServer([served], [LOOPBACK], nbd_listen=[LOOPBACK], max_handshakes=1,
                          handshake_timeout=1.0)
    await nursery.start(server.serve)
    address = server.nbd_addresses[0]
    silent = await trio.open_tcp_stream(address.host, address.port)
    await receive_exactly(silent, 18)  # holds the one handshake slot, says nothing
    second = await trio.open_tcp_stream(address.host, address.port)
    assert await closed_by_server(second, timeout=0.9)  # no slot: closed at once
    assert await closed_by_server(silent)  # the deadline ends the silent one
    await wait_until(lambda: server.connections == 0)
    third = await trio.open_tcp_stream(address.host, address.port)
    await go(third, "disk")  # the slot is free again
    for stream in (silent, second, third):
        await stream.aclose()
    server.shutdown()


async def test_overlapping_writes_wait_for_each_other_across_nbd_and_dstfuse(image, nursery):
    backend = GatedBackend(image)
    served = ServedExport("disk", backend, ExportAcl(), WriteGrant(shared=True))
    server = ExportServer([served], [LOOPBACK], nbd_listen=[LOOPBACK])
    await nursery.start(server.serve)
    address = server.nbd_addresses[0]
    nbd = await trio.open_tcp_stream(address.host, address.port)
    await go(nbd, "disk")
    first = b"N" * 8192
    await nbd.send_all(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.WRITE, 1, 0, 8192) + first)
    await wait_until(lambda: backend.waiting == 1)
    async with await RawClient.connect(server.addresses[0]) as client:
        async with trio.open_nursery() as writes:
            replies = []

            async def write_second() -> None:
                replies.append(await client.write(4096, b"D" * 8192))

            writes.start_soon(write_second)
            await trio.sleep(0.2)
            # The dstfuse write overlaps the NBD write in flight: it waits
            # for it instead of reaching the disk beside it.
            assert backend.max_waiting == 1
            backend.gate.set()
        assert replies[0].status == 0
    magic, error, cookie = struct.unpack(">IIQ", await receive_exactly(nbd, 16))
    assert (error, cookie) == (0, 1)
    await nbd.aclose()
    assert [offset for offset, _ in backend.completed] == [0, 4096]
    server.shutdown()
    await wait_until(lambda: server.connections == 0)
    assert image.read_bytes()[:12288] == b"N" * 4096 + b"D" * 8192


async def test_a_dstfuse_take_over_ends_the_nbd_writer(image, nursery):
    served = ServedExport("disk", Backend(image), ExportAcl(), WriteGrant())
    server = ExportServer([served], [LOOPBACK], nbd_listen=[LOOPBACK])
    await nursery.start(server.serve)
    address = server.nbd_addresses[0]
    nbd = await trio.open_tcp_stream(address.host, address.port)
    await go(nbd, "disk")
    holder = served.grant.holder(trio.current_time())
    assert holder is not None and holder.client_name == "nbd"
    async with await RawClient.connect(server.addresses[0], flags=HelloFlag.TAKE_OVER) as client:
        assert (await client.write(0, b"T" * 4096)).status == 0
        assert await closed_by_server(nbd)
        assert served.grant.holder(trio.current_time()).client_name == "rawclient"
    await nbd.aclose()
    server.shutdown()

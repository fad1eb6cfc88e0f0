"""Our NBD client codec against our NBD server codec, in memory.

Each side is tested against real peers elsewhere (test_nbd_server.py with
libnbd and qemu, test_nbd_nodes.py with nbdkit and qemu-nbd); this checks
that the two agree with each other on every command, with simple and with
structured replies, so a storage served by one dstfuse and used as an
`nbd:` node by another speaks one protocol."""

from __future__ import annotations

import errno

import pytest

from dstfuse.protocol.nbd.client import NEED_DATA as CLIENT_NEEDS_DATA
from dstfuse.protocol.nbd.client import NbdClient, NbdReply, Ready
from dstfuse.protocol.nbd.constants import (
    AllocationFlag,
    Command,
    CommandFlag,
    TransmissionFlag,
)
from dstfuse.protocol.nbd.server import NEED_DATA as SERVER_NEEDS_DATA
from dstfuse.protocol.nbd.server import NbdServerConnection
from dstfuse.protocol.nbd.server_events import (
    Disconnected,
    ExportInfo,
    InfoRequested,
    MetaContextRequested,
    NbdRequest,
    OptionAnswered,
)

SIZE = 1 << 20
FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
)


class Disk:
    """The server's side: a bytearray, and every request it ran."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.requests: list[NbdRequest] = []


def pump(client: NbdClient, server: NbdServerConnection, disk: Disk, to_server: bytes) -> list:
    """Deliver bytes both ways until neither side has more to say; the
    client's events in order."""
    events = []
    to_client = b""
    while to_server or to_client:
        if to_server:
            server.receive_data(to_server)
            to_server = b""
            while True:
                event = server.next_event()
                if event is SERVER_NEEDS_DATA:
                    break
                to_client += answer(server, disk, event)
        if to_client:
            client.receive_data(to_client)
            to_client = b""
            while True:
                event = client.next_event()
                if event is CLIENT_NEEDS_DATA:
                    break
                events.append(event)
            to_server += client.data_to_send()
    return events


def answer(server: NbdServerConnection, disk: Disk, event) -> bytes:
    if isinstance(event, InfoRequested):
        return server.answer_info(ExportInfo(size=SIZE, flags=FLAGS, minimum_block=512))
    if isinstance(event, MetaContextRequested):
        return server.answer_meta_context()
    if isinstance(event, OptionAnswered):
        return event.data
    if isinstance(event, Disconnected):
        return b""
    assert isinstance(event, NbdRequest), event
    disk.requests.append(event)
    start, end = event.offset, event.offset + event.length
    if event.command is Command.READ:
        return b"".join(bytes(part) for part in server.reply_read(event, disk.data[start:end]))
    if event.command is Command.WRITE:
        if start == 4096 * 9:
            return server.reply_error(event, errno.EIO, "injected")
        disk.data[start:end] = event.data
    elif event.command in (Command.TRIM, Command.WRITE_ZEROES):
        disk.data[start:end] = bytes(event.length)
    elif event.command is Command.BLOCK_STATUS:
        return server.reply_block_status(
            event, [(4096, 0), (event.length - 4096, AllocationFlag.HOLE | AllocationFlag.ZERO)]
        )
    return server.reply_ok(event)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_every_command_round_trips_between_our_client_and_our_server(structured):
    disk = Disk()
    client = NbdClient("vol0", structured=structured, allocation=structured)
    server = NbdServerConnection()
    client.receive_data(server.greeting())
    assert client.next_event() is CLIENT_NEEDS_DATA  # its answer to the greeting is queued
    events = pump(client, server, disk, client.data_to_send())
    ready = [event for event in events if isinstance(event, Ready)]
    assert len(ready) == 1
    assert ready[0].size == SIZE and ready[0].minimum == 512
    assert ready[0].structured is structured
    assert (ready[0].allocation is not None) is structured

    payload = bytes(range(256)) * 32  # 8 KiB
    requests = [
        client.request(Command.WRITE, 1, 4096, len(payload), CommandFlag.FUA, payload),
        client.request(Command.READ, 2, 4096, len(payload)),
        client.request(Command.FLUSH, 3),
        client.request(Command.TRIM, 4, 4096, 4096),
        client.request(Command.WRITE_ZEROES, 5, 8192, 512),
        client.request(Command.READ, 6, 4096, 8192),
        client.request(Command.WRITE, 7, 4096 * 9, 512, data=bytes(512)),
    ]
    if structured:
        requests.append(client.request(Command.BLOCK_STATUS, 8, 0, 65536))
    replies = {
        event.cookie: event
        for event in pump(client, server, disk, b"".join(requests))
        if isinstance(event, NbdReply)
    }
    assert sorted(replies) == list(range(1, len(requests) + 1))
    assert all(replies[cookie].error == 0 for cookie in range(1, 7))
    assert replies[2].data == payload
    assert replies[6].data == bytes(4096) + bytes(512) + payload[4096 + 512 :]
    assert replies[7].error == errno.EIO
    assert disk.requests[0].flags & CommandFlag.FUA
    if structured:
        assert replies[7].message == "injected"
        extents = replies[8].extents
        assert [(e.length, e.flags) for e in extents] == [
            (4096, 0), (65536 - 4096, AllocationFlag.HOLE | AllocationFlag.ZERO)
        ]
    server.receive_data(client.disconnect())
    assert isinstance(server.next_event(), Disconnected)

"""`Connection.receive_buffer` / `received_into`: a large frame read in
place, in every sealing mode, fed in pieces of any size, next to frames
fed as chunks; a corrupted frame read in place fails its check; misuse is
a LocalProtocolError."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from dstfuse.protocol import (
    Command,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
)
from dstfuse.protocol.connection import ASSEMBLE_MIN, NEED_DATA
from dstfuse.protocol.testing import DEFAULT_READY, open_pair

MiB = 1 << 20
MODES = ["xxh3-128", "blake2b-mac", "aes-256-gcm", "chacha20-poly1305"]


def read_in_place(conn, data: bytes, chunk: int, piece: int) -> list:
    """Feed `data` as a transport would: `chunk` bytes at a time through
    receive_data, or `piece` bytes at a time into receive_buffer when it
    offers one; return the events."""
    events = []
    position = 0
    while True:
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        if position == len(data):
            return events
        target = conn.receive_buffer()
        if target is None:
            conn.receive_data(data[position : position + chunk])
            position = min(len(data), position + chunk)
        else:
            size = min(piece, len(target), len(data) - position)
            target[:size] = data[position : position + size]
            conn.received_into(size)
            position += size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("chunk", "piece"), [(1 << 18, 1 << 18), (4096, 100_000), (70_000, 1)])
def test_large_frames_read_in_place_equal_those_fed_as_chunks(mode, chunk, piece):
    client, server = open_pair(mode, max_payload=4 * MiB)
    payloads = [os.urandom(size) for size in (3 * MiB, 4096, ASSEMBLE_MIN + 1, 0, MiB)]
    requests = [
        Request(Command.WRITE, i, 0, len(p), data=p) if p else Request(Command.FLUSH, i)
        for i, p in enumerate(payloads)
    ]
    wire = b"".join(client.send(request) for request in requests)
    if piece == 1:
        wire = wire[:200_000]  # one byte at a time: only part of the first frame
        events = read_in_place(server, wire, chunk, piece)
        assert events == [] and server.buffered == len(wire)
        return
    events = read_in_place(server, wire, chunk, piece)
    assert [e.handle for e in events] == [r.handle for r in requests]
    assert [bytes(e.data) for e in events] == [bytes(r.data) for r in requests]


@pytest.mark.parametrize("mode", MODES)
def test_a_reply_read_in_place_comes_to_the_client_whole(mode):
    ready = replace(DEFAULT_READY, max_request=4 * MiB)
    client, server = open_pair(mode, ready=ready, max_payload=4 * MiB)
    data = os.urandom(MiB)
    wire = server.send(Reply(Command.READ, 7, 0, 0, len(data), data))
    [reply] = read_in_place(client, wire, 1 << 18, 1 << 18)
    assert reply.handle == 7 and bytes(reply.data) == data


@pytest.mark.parametrize("mode", MODES)
def test_a_corrupted_frame_read_in_place_fails_its_check(mode):
    client, server = open_pair(mode, max_payload=4 * MiB)
    wire = bytearray(client.send(Request(Command.WRITE, 1, 0, MiB, data=os.urandom(MiB))))
    wire[600_000] ^= 1
    with pytest.raises(IntegrityError):
        read_in_place(server, bytes(wire), 1 << 18, 1 << 18)


def test_the_end_of_stream_inside_a_frame_read_in_place_is_an_error():
    client, server = open_pair(max_payload=4 * MiB)
    wire = client.send(Request(Command.WRITE, 1, 0, MiB, data=os.urandom(MiB)))
    read_in_place(server, wire[: MiB // 2], 1 << 18, 1 << 18)
    assert server.receive_buffer() is not None
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


def test_misuse_of_the_receive_buffer_is_a_local_error():
    client, server = open_pair(max_payload=4 * MiB)
    with pytest.raises(LocalProtocolError):
        server.received_into(1)  # no buffer offered
    wire = client.send(Request(Command.WRITE, 1, 0, MiB, data=os.urandom(MiB)))
    server.receive_data(wire[:4096])
    assert server.next_event() is NEED_DATA
    target = server.receive_buffer()
    assert target is not None and len(target) == len(wire) - 4096
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")  # bytes outside the buffer
    with pytest.raises(LocalProtocolError):
        server.received_into(len(target) + 1)

"""Round trips through the sans-IO protocol: every request and reply
command, every handshake step and every sealing mode, fed whole, byte by
byte, and followed by the first bytes of the next frame. The same events
must come out, field for field, whatever way the bytes arrive."""

from __future__ import annotations

import errno

import pytest

from dstfuse.protocol import (
    NEED_DATA,
    Challenged,
    Command,
    Confirmed,
    Connection,
    ConnectionClosed,
    Feature,
    Flag,
    HelloFlag,
    HelloReceived,
    NodeInstance,
    Permission,
    Ready,
    Refused,
    Reply,
    Request,
    State,
)
from dstfuse.protocol.testing import CLIENT_ID, drain, feed, make_pair, open_pair

MODES = ["xxh3-128", "aes-256-gcm", "chacha20-poly1305", "blake2b-mac"]
#: How a frame is delivered: whole; one byte at a time; whole plus the first
#: 7 bytes (part of a header) or 45 bytes (a header and some payload) of the
#: frame that follows it.
STYLES = ["whole", "bytewise", "trailing-7", "trailing-45"]

BLOCK = bytes(range(256)) * 4
DIGEST = bytes(range(0xA0, 0xB0))

REQUESTS = [
    (
        Request(Command.READ, 1, 4096, 8192),
        dict(command=Command.READ, handle=1, offset=4096, length=8192, flags=Flag.NONE, data=b""),
    ),
    (
        Request(Command.WRITE, 2, 0, 5, data=b"hello"),
        dict(command=Command.WRITE, handle=2, offset=0, length=5, flags=Flag.NONE, data=b"hello"),
    ),
    (
        Request(Command.WRITE, 3, 1 << 40, len(BLOCK), Flag.FUA, memoryview(BLOCK)),
        dict(command=Command.WRITE, handle=3, offset=1 << 40, length=1024, flags=Flag.FUA,
             data=BLOCK),
    ),
    (
        Request(17, 4, 7, 3, 1, bytearray(b"abc")),  # plain ints are normalised
        dict(command=Command.WRITE, handle=4, offset=7, length=3, flags=Flag.FUA, data=b"abc"),
    ),
    (
        Request(Command.WRITE, 5, 512, 0),
        dict(command=Command.WRITE, handle=5, offset=512, length=0, flags=Flag.NONE, data=b""),
    ),
    (
        Request(Command.FLUSH, 6),
        dict(command=Command.FLUSH, handle=6, offset=0, length=0, flags=Flag.NONE, data=b""),
    ),
    (
        Request(Command.TRIM, 7, 1 << 20, (1 << 31)),
        dict(command=Command.TRIM, handle=7, offset=1 << 20, length=1 << 31, flags=Flag.NONE,
             data=b""),
    ),
    (
        Request(Command.WRITE_ZEROES, 8, 512, 4096, Flag.FUA),
        dict(command=Command.WRITE_ZEROES, handle=8, offset=512, length=4096, flags=Flag.FUA,
             data=b""),
    ),
    (
        Request(Command.PING, (1 << 63) + 1),
        dict(command=Command.PING, handle=(1 << 63) + 1, offset=0, length=0, flags=Flag.NONE,
             data=b""),
    ),
    (
        Request(Command.CHECKSUM, (1 << 64) - 1, (1 << 64) - 4096, (1 << 32) - 1),
        dict(command=Command.CHECKSUM, handle=(1 << 64) - 1, offset=(1 << 64) - 4096,
             length=(1 << 32) - 1, flags=Flag.NONE, data=b""),
    ),
]

REPLIES = [
    (
        Reply(Command.READ, 1, 0, 4096, 5, b"world"),
        dict(command=Command.READ, handle=1, status=0, offset=4096, length=5, data=b"world"),
    ),
    (
        Reply(Command.READ, 2, 0, 0, len(BLOCK), memoryview(BLOCK)),
        dict(command=Command.READ, handle=2, status=0, offset=0, length=1024, data=BLOCK),
    ),
    (
        Reply(Command.READ, 3, errno.EIO, 4096, 8192),
        dict(command=Command.READ, handle=3, status=errno.EIO, offset=4096, length=8192, data=b""),
    ),
    (
        Reply(Command.WRITE, 4, 0, 0, 5),
        dict(command=Command.WRITE, handle=4, status=0, offset=0, length=5, data=b""),
    ),
    (
        Reply(Command.WRITE, 5, errno.EPERM, 0, 5),
        dict(command=Command.WRITE, handle=5, status=errno.EPERM, offset=0, length=5, data=b""),
    ),
    (
        Reply(Command.WRITE, 6, errno.ENOSPC, 1 << 40, 4096),
        dict(command=Command.WRITE, handle=6, status=errno.ENOSPC, offset=1 << 40, length=4096,
             data=b""),
    ),
    (
        Reply(Command.FLUSH, 7),
        dict(command=Command.FLUSH, handle=7, status=0, offset=0, length=0, data=b""),
    ),
    (
        Reply(Command.TRIM, 8, errno.EOPNOTSUPP, 0, 4096),
        dict(command=Command.TRIM, handle=8, status=errno.EOPNOTSUPP, offset=0, length=4096,
             data=b""),
    ),
    (
        Reply(Command.WRITE_ZEROES, 9, 0, 512, 4096),
        dict(command=Command.WRITE_ZEROES, handle=9, status=0, offset=512, length=4096, data=b""),
    ),
    (
        Reply(Command.PING, (1 << 63) + 1),
        dict(command=Command.PING, handle=(1 << 63) + 1, status=0, offset=0, length=0, data=b""),
    ),
    (
        Reply(Command.CHECKSUM, 10, 0, 0, 1 << 20, DIGEST),
        dict(command=Command.CHECKSUM, handle=10, status=0, offset=0, length=1 << 20,
             data=DIGEST),
    ),
    (
        Reply(22, 11, (1 << 32) - 1, (1 << 64) - 1, (1 << 32) - 1),
        dict(command=Command.CHECKSUM, handle=11, status=(1 << 32) - 1, offset=(1 << 64) - 1,
             length=(1 << 32) - 1, data=b""),
    ),
]


def fields_of(event: object) -> dict[str, object]:
    values = dict(vars(event))
    if "data" in values:
        values["data"] = bytes(values["data"])  # compare contents, not buffer types
    return values


def deliver(receiver: Connection, frame: bytes, style: str, following: bytes) -> tuple[list, bytes]:
    """Deliver `frame` in `style`; return the events it produced and the
    part of `following` not delivered yet."""
    if style == "whole":
        return feed(receiver, frame), following
    if style == "bytewise":
        return feed(receiver, frame, chunk=1), following
    cut = int(style.split("-")[1])
    events = feed(receiver, frame + following[:cut])
    # The partial next frame stays buffered and produces nothing yet.
    assert receiver.next_event() is NEED_DATA
    assert receiver.buffered == cut
    return events, following[cut:]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("request_, expected", REQUESTS, ids=lambda v: getattr(v, "command", ""))
def test_request_round_trip(mode, style, request_, expected):
    client, server = open_pair(mode, max_payload=1 << 16)
    frame = client.send(request_)
    following = client.send(Request(Command.PING, 99))
    events, rest = deliver(server, frame, style, following)
    assert len(events) == 1 and isinstance(events[0], Request)
    assert fields_of(events[0]) == expected
    assert feed(server, rest) == [Request(Command.PING, 99)]
    assert server.buffered == 0


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reply, expected", REPLIES, ids=lambda v: getattr(v, "command", ""))
def test_reply_round_trip(mode, style, reply, expected):
    client, server = open_pair(mode, max_payload=1 << 16)
    frame = server.send(reply)
    following = server.send(Reply(Command.PING, 99))
    events, rest = deliver(client, frame, style, following)
    assert len(events) == 1 and isinstance(events[0], Reply)
    assert fields_of(events[0]) == expected
    assert feed(client, rest) == [Reply(Command.PING, 99)]
    assert client.buffered == 0


@pytest.mark.parametrize("mode", MODES)
def test_many_frames_fed_in_one_call_come_out_in_order(mode):
    client, server = open_pair(mode)
    requests = [Request(Command.WRITE, h, h * 10, 3, data=bytes([h]) * 3) for h in range(50)]
    assert feed(server, b"".join(client.send(r) for r in requests)) == requests
    replies = [Reply(Command.WRITE, h, h % 3, h * 10, 3) for h in range(50)]
    assert feed(client, b"".join(server.send(r) for r in replies)) == replies


@pytest.mark.parametrize("mode", MODES)
def test_largest_payload_the_receiver_allows_round_trips(mode):
    limit = 1 << 20
    client, server = open_pair(
        mode, max_payload=limit, ready=Ready(size=1 << 30, permissions=Permission.READ,
                                             max_request=limit)
    )
    data = bytes(range(256)) * (limit // 256)
    [request] = feed(server, client.send(Request(Command.WRITE, 1, 0, limit, data=data)))
    assert request.data == data
    [reply] = feed(client, server.send(Reply(Command.READ, 1, 0, 0, limit, data)))
    assert reply.data == data


# ----------------------------------------------------------------------
# the handshake, step by step

CLIENT_NONCE = bytes(range(32))
SERVER_NONCE = bytes(range(100, 132))
READY = Ready(
    size=(1 << 40) + 512,
    permissions=Permission.READ,
    block_size=512,
    max_request=1 << 16,
    features=Feature.FLUSH | Feature.CHECKSUM,
    export="disk1",
    instance=NodeInstance(bytes(range(16)), 2049, 1 << 40, bytes(range(200, 216))),
)
LAST_REQUEST = Request(Command.WRITE, 1, 0, 4, data=b"data")
LAST_REPLY = Reply(Command.WRITE, 1, 0, 0, 4)


def fixed_pair(mode):
    return make_pair(mode, client_nonce=CLIENT_NONCE, server_nonce=SERVER_NONCE)


def scripted_frames(mode):
    """The frames of one reproducible conversation: HELLO, CHALLENGE,
    CONFIRM, READY, then one request and its reply."""
    client, server = fixed_pair(mode)
    frames = {"HELLO": client.hello(export="disk1", client_id=CLIENT_ID, client_name="client")}
    feed(server, frames["HELLO"])
    frames["CHALLENGE"] = server.challenge(node_name="node")
    feed(client, frames["CHALLENGE"])
    frames["CONFIRM"] = client.confirm()
    feed(server, frames["CONFIRM"])
    frames["READY"] = server.ready(READY)
    feed(client, frames["READY"])
    frames["REQUEST"] = client.send(LAST_REQUEST)
    frames["REPLY"] = server.send(LAST_REPLY)
    return frames


def expected_handshake_event(step, mode):
    return {
        "HELLO": (HelloReceived, dict(export="disk1", client_id=CLIENT_ID, client_name="client",
                                      versions=(1,), modes=(mode,), flags=HelloFlag.NONE)),
        "CHALLENGE": (Challenged, dict(version=1, mode=mode, node_name="node")),
        "CONFIRM": (Confirmed, {}),
        "READY": (Ready, dict(size=(1 << 40) + 512, permissions=Permission.READ, block_size=512,
                              max_request=1 << 16, features=Feature.FLUSH | Feature.CHECKSUM,
                              export="disk1", instance=READY.instance)),
    }[step]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step", ["HELLO", "CHALLENGE", "CONFIRM", "READY"])
def test_handshake_step_round_trip(mode, style, step):
    reference = scripted_frames(mode)
    client, server = fixed_pair(mode)
    # Each handshake step: who produces the frame, who receives it, and the
    # frame that follows it in the same direction (its trailing data).
    steps = [
        ("HELLO", lambda: client.hello(export="disk1", client_id=CLIENT_ID,
                                       client_name="client"), server, "CONFIRM"),
        ("CHALLENGE", lambda: server.challenge(node_name="node"), client, "READY"),
        ("CONFIRM", client.confirm, server, "REQUEST"),
        ("READY", lambda: server.ready(READY), client, "REPLY"),
        ("REQUEST", lambda: client.send(LAST_REQUEST), server, None),
        ("REPLY", lambda: server.send(LAST_REPLY), client, None),
    ]
    undelivered: dict[str, bytes] = {}  # frame name -> its part still to deliver
    seen = {}
    for name, produce, receiver, following in steps:
        frame = produce()
        assert frame == reference[name]  # the conversation is reproducible
        frame = undelivered.pop(name, frame)
        if name == step:
            events, undelivered[following] = deliver(receiver, frame, style, reference[following])
        else:
            events = feed(receiver, frame)
        assert len(events) == 1
        seen[name] = events[0]
    expected_type, expected = expected_handshake_event(step, mode)
    assert type(seen[step]) is expected_type
    assert fields_of(seen[step]) == expected
    assert seen["REQUEST"] == LAST_REQUEST and seen["REPLY"] == LAST_REPLY
    assert client.state is State.OPEN and server.state is State.OPEN
    assert client.mode == server.mode == mode and client.version == server.version == 1


def refused_at(stage, mode):
    """Drive a fresh pair to `stage` and refuse there; return the refusing
    frame and the connection that must receive it."""
    client, server = make_pair(mode)
    feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="client"))
    if stage == "server-at-hello":
        return server.refuse(errno.EACCES, "address 10.1.2.3 not allowed"), client, server
    feed(client, server.challenge(node_name="node"))
    if stage == "client-at-challenge":
        return client.refuse(errno.EPROTO, "node name not trusted ✓"), server, client
    feed(server, client.confirm())
    assert stage == "server-after-confirm"
    return server.refuse(errno.EBUSY, "export busy"), client, server


REFUSALS = [
    ("server-at-hello", Refused(errno.EACCES, "address 10.1.2.3 not allowed")),
    ("client-at-challenge", Refused(errno.EPROTO, "node name not trusted ✓")),
    ("server-after-confirm", Refused(errno.EBUSY, "export busy")),
]


@pytest.mark.parametrize("style", ["whole", "bytewise", "then-eof"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage, expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_round_trip(mode, style, stage, expected):
    frame, receiver, refuser = refused_at(stage, mode)
    assert refuser.state is State.CLOSED
    if style == "then-eof":
        receiver.receive_data(frame)
        receiver.receive_data(b"")
        assert drain(receiver) == [expected, ConnectionClosed()]
    else:
        assert feed(receiver, frame, chunk=1 if style == "bytewise" else None) == [expected]
    assert receiver.state is State.CLOSED


def test_hello_without_export_asks_for_the_default():
    client, server = make_pair()
    [hello] = feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    assert hello.export is None
    client, server = make_pair()
    [hello] = feed(server, client.hello(export="", client_id=CLIENT_ID, client_name="c"))
    assert hello.export == ""


def test_end_of_stream_between_frames_is_a_clean_close():
    client, server = open_pair()
    server.receive_data(client.send(Request(Command.FLUSH, 1)))
    server.receive_data(b"")
    assert drain(server) == [Request(Command.FLUSH, 1), ConnectionClosed()]
    assert server.state is State.CLOSED
    assert server.next_event() == ConnectionClosed()  # and stays so


def test_the_reserved_hello_flag_8_is_ignored_like_any_unknown_bit():
    """Bit 8 was COORDINATED (write without the grant) in earlier builds: a
    node now reads it as nothing, so such a client claims the grant."""
    client, server = make_pair()
    hello = client.hello(
        export=None, client_id=CLIENT_ID, client_name="old",
        flags=HelloFlag.PROBE | HelloFlag(8) | HelloFlag(1 << 20),
    )
    (event,) = feed(server, hello)
    assert isinstance(event, HelloReceived) and event.flags == HelloFlag.PROBE

"""What the protocol rejects: truncated and oversized frames, bad headers,
frames in the wrong direction or state, malformed handshake attributes,
and our own misuse of the API (LocalProtocolError). After any error from
`next_event` the connection is in ERROR and every later call raises."""

from __future__ import annotations

import errno

import pytest

from dstfuse.protocol import (
    NEED_DATA,
    Command,
    Connection,
    ConnectionClosed,
    Flag,
    HandshakeFailed,
    HelloReceived,
    LocalProtocolError,
    Permission,
    Ready,
    Refused,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
)
from dstfuse.protocol import attributes as attrs
from dstfuse.protocol.constants import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_HANDSHAKE_PAYLOAD,
    Attr,
)
from dstfuse.protocol.testing import (
    CLIENT_ID,
    feed,
    forge_frame,
    handshake,
    make_pair,
    open_pair,
)

MODES = ["xxh3-128", "aes-256-gcm", "chacha20-poly1305", "blake2b-mac"]


def header(
    command=Command.READ, *, magic=MAGIC, version=1, flags=0, handle=0, offset=0, length=0,
    status=0, payload_len=0, reserved=0,
) -> bytes:
    return HEADER.pack(magic, version, command, flags, handle, offset, length, status,
                       payload_len, reserved)


def assert_error_state(conn: Connection) -> None:
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        conn.send(Request(Command.PING, 1))
    with pytest.raises(LocalProtocolError):
        conn.send(Reply(Command.PING, 1))


def hello_payload(**overrides: bytes | None) -> bytes:
    """A valid HELLO payload; overrides replace (bytes) or drop (None) attributes."""
    items = {
        Attr.VERSIONS: bytes([1]),
        Attr.CLIENT_ID: CLIENT_ID,
        Attr.CLIENT_NAME: b"client",
        Attr.CIPHERS: b"xxh3-128",
        Attr.NONCE: bytes(32),
    }
    for name, value in overrides.items():
        if value is None:
            del items[Attr[name]]
        else:
            items[Attr[name]] = value
    return attrs.encode(items.items())


def forged_hello(payload: bytes) -> bytes:
    """HELLO frames are sealed with the unkeyed checksum, sequence 0."""
    return forge_frame(Connection(Role.CLIENT), Command.HELLO, payload=payload)


# ----------------------------------------------------------------------
# truncation and size limits


@pytest.mark.parametrize("mode", MODES)
def test_end_of_stream_inside_any_frame_is_a_protocol_error(mode):
    client, server = open_pair(mode)
    frame = client.send(Request(Command.WRITE, 1, 0, 6, data=b"abcdef"))
    for cut in range(1, len(frame)):
        _, receiver = open_pair(mode)
        feed(receiver, frame[:cut])
        receiver.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="middle of a frame"):
            receiver.next_event()
        assert_error_state(receiver)


def test_end_of_stream_inside_a_handshake_frame_is_a_protocol_error():
    client, server = make_pair()
    hello = client.hello(export=None, client_id=CLIENT_ID, client_name="c")
    server.receive_data(hello[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


@pytest.mark.parametrize("limit", [1, 4096, 1 << 20])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_oversized_payload_is_rejected_as_soon_as_the_header_arrives(role, limit):
    client, server = open_pair(
        max_payload=limit, ready=Ready(size=1 << 30, permissions=Permission.READ, max_request=limit)
    )
    receiver = server if role is Role.SERVER else client
    flags = 0 if role is Role.SERVER else Flag.REPLY
    too_big = header(Command.WRITE, flags=flags, length=limit + 1, payload_len=limit + 1)
    receiver.receive_data(too_big)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        receiver.next_event()
    assert receiver.buffered == HEADER_SIZE  # nothing of the payload was waited for
    assert_error_state(receiver)


@pytest.mark.parametrize("payload_len", [MAX_HANDSHAKE_PAYLOAD + 1, (1 << 32) - 1])
def test_handshake_frames_are_capped_whatever_max_payload_says(payload_len):
    server = Connection(Role.SERVER, max_payload=1 << 30)
    server.receive_data(header(Command.HELLO, payload_len=payload_len))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit 4096"):
        server.next_event()
    assert server.buffered == HEADER_SIZE


def test_payload_exactly_at_the_limit_is_waited_for():
    client, server = open_pair(max_payload=100)
    frame = client.send(Request(Command.WRITE, 1, 0, 100, data=bytes(100)))
    server.receive_data(frame[:HEADER_SIZE])
    assert server.next_event() is NEED_DATA
    assert feed(server, frame[HEADER_SIZE:]) == [Request(Command.WRITE, 1, 0, 100,
                                                         data=bytes(100))]


def test_client_caps_the_nodes_max_request_at_its_own_limit():
    client, server = make_pair(max_payload=1 << 20, client_max_payload=4096)
    handshake(client, server, ready=Ready(size=1 << 20, permissions=Permission.READ,
                                          max_request=1 << 20))
    assert client.max_payload == 4096
    oversized = server.send(Reply(Command.READ, 1, 0, 0, 4097, bytes(4097)))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        feed(client, oversized)


def test_ready_advertises_at_most_the_servers_own_limit():
    client, server = make_pair(max_payload=4096, client_max_payload=1 << 20)
    handshake(client, server, ready=Ready(size=1 << 20, permissions=Permission.READ,
                                          max_request=1 << 20))
    assert client.max_payload == 4096


# ----------------------------------------------------------------------
# bad headers

BAD_HEADERS = [
    ("magic", dict(magic=b"DSTX"), "magic"),
    ("magic-zero", dict(magic=bytes(4)), "magic"),
    ("version-0", dict(version=0), "version"),
    ("version-2", dict(version=2), "version"),
    ("version-255", dict(version=255), "version"),
    ("reserved", dict(reserved=1), "reserved"),
    ("reserved-high", dict(reserved=1 << 31), "reserved"),
    ("flag-0x2", dict(flags=0x0002), "flags"),
    ("flag-0x4000", dict(flags=0x4000), "flags"),
    ("command-0", dict(command=0), "command"),
    ("command-6", dict(command=6), "command"),
    ("command-15", dict(command=15), "command"),
    ("command-23", dict(command=23), "command"),
    ("command-255", dict(command=255), "command"),
]


@pytest.mark.parametrize("state", ["idle", "open"])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
@pytest.mark.parametrize(
    "fields, word", [b[1:] for b in BAD_HEADERS], ids=[b[0] for b in BAD_HEADERS]
)
def test_bad_header_is_rejected_from_the_header_alone(role, state, fields, word):
    if state == "idle":
        receiver = Connection(role, modes=["xxh3-128"])
        if role is Role.CLIENT:
            receiver.hello(export=None, client_id=CLIENT_ID, client_name="c")
    else:
        client, server = open_pair()
        receiver = server if role is Role.SERVER else client
    fields = dict(fields)
    raw = header(fields.pop("command", Command.READ), **fields)
    receiver.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=word):
        receiver.next_event()
    assert receiver.buffered == HEADER_SIZE
    assert_error_state(receiver)


# ----------------------------------------------------------------------
# direction, state and request-shape violations


def test_server_rejects_a_reply():
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="client sent a reply"):
        feed(server, forge_frame(client, Command.READ, flags=Flag.REPLY, length=1))
    assert_error_state(server)


def test_client_rejects_a_request():
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="server sent a request"):
        feed(client, forge_frame(server, Command.READ, length=1))
    assert_error_state(client)


def test_client_rejects_a_reply_with_request_flags():
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="request flags"):
        feed(client, forge_frame(server, Command.WRITE, flags=Flag.REPLY | Flag.FUA))


def test_server_rejects_a_request_with_a_status():
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="status"):
        feed(server, forge_frame(client, Command.FLUSH, status=errno.EIO))


@pytest.mark.parametrize("length, payload", [(10, b"12345"), (0, b"x"), (5, b"")])
def test_write_length_must_match_its_payload(length, payload):
    client, server = open_pair()
    frame = forge_frame(client, Command.WRITE, length=length, payload=payload)
    with pytest.raises(RemoteProtocolError, match="WRITE length"):
        feed(server, frame)
    assert_error_state(server)


@pytest.mark.parametrize(
    "command",
    [Command.READ, Command.FLUSH, Command.TRIM, Command.WRITE_ZEROES, Command.PING,
     Command.CHECKSUM],
)
def test_requests_other_than_write_carry_no_payload(command):
    client, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="payload"):
        feed(server, forge_frame(client, command, length=3, payload=b"abc"))


@pytest.mark.parametrize("command", [Command.READ, Command.WRITE, Command.PING])
def test_requests_before_the_handshake_are_rejected(command):
    server = Connection(Role.SERVER)
    frame = forge_frame(Connection(Role.CLIENT), command, length=0)
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        feed(server, frame)
    assert_error_state(server)


def test_replies_before_the_handshake_are_rejected():
    client = Connection(Role.CLIENT, modes=["xxh3-128"])
    client.hello(export=None, client_id=CLIENT_ID, client_name="c")
    frame = forge_frame(Connection(Role.SERVER), Command.READ, flags=Flag.REPLY)
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        feed(client, frame)


def test_requests_between_hello_and_ready_are_rejected():
    client, server = make_pair()
    hello = client.hello(export=None, client_id=CLIENT_ID, client_name="c")
    sender = Connection(Role.CLIENT)
    forge_frame(sender, Command.HELLO)  # sequence 0 is the HELLO's
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        feed(server, hello + forge_frame(sender, Command.PING))


@pytest.mark.parametrize(
    "receiver_role, command",
    [
        (Role.SERVER, Command.CONFIRM),
        (Role.SERVER, Command.READY),
        (Role.SERVER, Command.CHALLENGE),
        (Role.CLIENT, Command.HELLO),
        (Role.CLIENT, Command.READY),
        (Role.CLIENT, Command.CONFIRM),
    ],
)
def test_handshake_frames_out_of_order_are_rejected(receiver_role, command):
    receiver = Connection(receiver_role, modes=["xxh3-128"])
    if receiver_role is Role.CLIENT:
        receiver.hello(export=None, client_id=CLIENT_ID, client_name="c")
    frame = forge_frame(Connection(Role.CLIENT), command, payload=hello_payload())
    with pytest.raises(RemoteProtocolError, match=f"unexpected {command.name}"):
        feed(receiver, frame)
    assert_error_state(receiver)


def test_a_second_hello_is_rejected():
    client, server = make_pair()
    sender = Connection(Role.CLIENT)
    frames = forge_frame(sender, Command.HELLO, payload=hello_payload())
    frames += forge_frame(sender, Command.HELLO, payload=hello_payload())
    with pytest.raises(RemoteProtocolError, match="unexpected HELLO"):
        feed(server, frames)


def test_handshake_frames_must_not_carry_request_fields():
    server = Connection(Role.SERVER)
    frame = forge_frame(Connection(Role.CLIENT), Command.HELLO, handle=5, payload=hello_payload())
    with pytest.raises(RemoteProtocolError, match="non-zero"):
        feed(server, frame)
    server = Connection(Role.SERVER)
    frame = forge_frame(Connection(Role.CLIENT), Command.HELLO, status=1, payload=hello_payload())
    with pytest.raises(RemoteProtocolError, match="status"):
        feed(server, frame)


@pytest.mark.parametrize("mode", MODES)
def test_refused_on_an_open_connection_is_rejected(mode):
    client, server = open_pair(mode)
    frame = forge_frame(server, Command.REFUSED, status=errno.EACCES)
    with pytest.raises(RemoteProtocolError, match="REFUSED on an open"):
        feed(client, frame)


def test_frames_after_a_refusal_are_rejected():
    client, server = make_pair()
    feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    sender_frames = server.refuse(errno.EACCES, "no") + forge_frame(server, Command.CHALLENGE)
    with pytest.raises(RemoteProtocolError, match="refused"):
        feed(client, sender_frames)


# ----------------------------------------------------------------------
# handshake attributes

BAD_HELLOS = [
    ("truncated-tlv-header", hello_payload() + b"\x00\x63\x00", "truncated handshake attribute"),
    ("truncated-tlv-value", hello_payload() + b"\x00\x63\x00\x0aabcde", "attribute 99 truncated"),
    ("missing-nonce", hello_payload(NONCE=None), "NONCE"),
    ("short-nonce", hello_payload(NONCE=bytes(31)), "NONCE"),
    ("long-nonce", hello_payload(NONCE=bytes(33)), "NONCE"),
    ("missing-versions", hello_payload(VERSIONS=None), "VERSIONS"),
    ("missing-ciphers", hello_payload(CIPHERS=None), "CIPHERS"),
    ("ciphers-not-utf8", hello_payload(CIPHERS=b"\xff\xfe"), "UTF-8"),
    ("missing-client-id", hello_payload(CLIENT_ID=None), "CLIENT_ID"),
    ("short-client-id", hello_payload(CLIENT_ID=bytes(15)), "CLIENT_ID"),
    ("export-not-utf8", hello_payload(EXPORT=b"\xc3"), "EXPORT"),
    ("name-not-utf8", hello_payload(CLIENT_NAME=b"\x80"), "CLIENT_NAME"),
    (
        "65-attributes",
        hello_payload() + attrs.encode([(1000 + i, b"") for i in range(60)]),
        "more than 64",
    ),
]


@pytest.mark.parametrize(
    "payload, word", [b[1:] for b in BAD_HELLOS], ids=[b[0] for b in BAD_HELLOS]
)
def test_malformed_hello_is_rejected(payload, word):
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match=word):
        feed(server, forged_hello(payload))
    assert_error_state(server)


def test_unknown_and_duplicate_attributes_are_ignored_in_hello():
    payload = (
        attrs.encode([(0xFFFF, b"future"), (200, bytes(300))])
        + hello_payload(CLIENT_NAME=b"first")
        + attrs.encode([(Attr.CLIENT_NAME, b"second"), (0, b"")])
    )
    assert len(attrs.decode(payload)) == 8
    server = Connection(Role.SERVER)
    [hello] = feed(server, forged_hello(payload))
    assert hello == HelloReceived(export=None, client_id=CLIENT_ID, client_name="first",
                                  versions=(1,), modes=("xxh3-128",))
    assert server.challenge(node_name="n")


def test_exactly_64_attributes_are_accepted():
    payload = hello_payload() + attrs.encode([(1000 + i, b"") for i in range(59)])
    assert len(attrs.decode(payload)) == 64
    [hello] = feed(Connection(Role.SERVER), forged_hello(payload))
    assert isinstance(hello, HelloReceived)


def test_unknown_attributes_are_ignored_in_challenge_and_ready():
    client = Connection(Role.CLIENT, modes=["xxh3-128"])
    client.hello(export=None, client_id=CLIENT_ID, client_name="c")
    sender = Connection(Role.SERVER)
    challenge = attrs.encode([
        (500, b"x"), (Attr.VERSION, b"\x01"), (Attr.CIPHER, b"xxh3-128"), (Attr.NONCE, bytes(32)),
    ])
    [challenged] = feed(client, forge_frame(sender, Command.CHALLENGE, payload=challenge))
    assert challenged.mode == "xxh3-128" and challenged.node_name == "?"
    client.confirm()
    # READY is sealed by the session sealer: a fresh unkeyed one starts at 0.
    ready = attrs.encode([
        (Attr.SIZE, attrs.u64(1 << 20)), (999, b"?" * 100), (Attr.PERMISSIONS, b"\xff"),
        (Attr.MAX_REQUEST, attrs.u32(8192)), (Attr.FEATURES, attrs.u32(0xFFFFFFFF)),
    ])
    [opened] = feed(client, forge_frame(Connection(Role.SERVER), Command.READY, payload=ready))
    # Unknown permission and feature bits are dropped; defaults fill the gaps.
    assert opened == Ready(size=1 << 20, permissions=Permission.READ | Permission.WRITE,
                           block_size=4096, max_request=8192, features=31, export="")


@pytest.mark.parametrize("mode", ["aes-256-gcm", "blake2b-mac"])
def test_unknown_attributes_in_a_keyed_ready_are_ignored(mode):
    client, server = make_pair(mode)
    feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    feed(client, server.challenge(node_name="n"))
    feed(server, client.confirm())
    ready = attrs.encode([(77, b"new"), (Attr.SIZE, attrs.u64(5)),
                          (Attr.PERMISSIONS, b"\x01"), (Attr.MAX_REQUEST, attrs.u32(512))])
    [opened] = feed(client, forge_frame(server, Command.READY, payload=ready))
    assert (opened.size, opened.permissions, opened.max_request) == (5, Permission.READ, 512)


BAD_READIES = [
    ("no-size", [(Attr.PERMISSIONS, b"\x01"), (Attr.MAX_REQUEST, attrs.u32(512))], "SIZE"),
    ("no-max-request", [(Attr.SIZE, attrs.u64(5)), (Attr.PERMISSIONS, b"\x01")], "MAX_REQUEST"),
    ("no-permissions", [(Attr.SIZE, attrs.u64(5)), (Attr.MAX_REQUEST, attrs.u32(1))],
     "PERMISSIONS"),
    ("zero-max-request", [(Attr.SIZE, attrs.u64(5)), (Attr.PERMISSIONS, b"\x01"),
                          (Attr.MAX_REQUEST, attrs.u32(0))], "max request"),
    ("zero-block-size", [(Attr.SIZE, attrs.u64(5)), (Attr.PERMISSIONS, b"\x01"),
                         (Attr.MAX_REQUEST, attrs.u32(1)), (Attr.BLOCK_SIZE, attrs.u32(0))],
     "block size"),
    ("short-size", [(Attr.SIZE, b"\x05"), (Attr.PERMISSIONS, b"\x01"),
                    (Attr.MAX_REQUEST, attrs.u32(1))], "SIZE"),
]


@pytest.mark.parametrize(
    "items, word", [b[1:] for b in BAD_READIES], ids=[b[0] for b in BAD_READIES]
)
def test_malformed_ready_is_rejected(items, word):
    client, server = make_pair()
    feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    feed(client, server.challenge(node_name="n"))
    feed(server, client.confirm())
    frame = forge_frame(server, Command.READY, payload=attrs.encode(items))
    with pytest.raises(RemoteProtocolError, match=word):
        feed(client, frame)
    assert_error_state(client)


def test_refused_without_a_message_still_reports_its_status():
    client = Connection(Role.CLIENT, modes=["xxh3-128"])
    client.hello(export=None, client_id=CLIENT_ID, client_name="c")
    frame = forge_frame(Connection(Role.SERVER), Command.REFUSED, status=errno.EACCES)
    assert feed(client, frame) == [Refused(errno.EACCES, "refused")]


def test_refusal_message_is_cut_to_one_thousand_characters():
    client, server = make_pair()
    feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    [refused] = feed(client, server.refuse(errno.EACCES, "ü" * 5000))
    assert refused.message == "ü" * 1000


# ----------------------------------------------------------------------
# local misuse


def test_events_are_validated_where_they_are_built():
    bad = [
        lambda: Request(Command.HELLO, 1),
        lambda: Request(99, 1),
        lambda: Request(Command.READ, -1),
        lambda: Request(Command.READ, 1 << 64),
        lambda: Request(Command.READ, 1, offset=1 << 64),
        lambda: Request(Command.READ, 1, length=1 << 32),
        lambda: Request(Command.READ, 1, flags=Flag.REPLY),
        lambda: Request(Command.READ, 1, flags=4),
        lambda: Request(Command.WRITE, 1, 0, 3, data=b"ab"),
        lambda: Request(Command.FLUSH, 1, data=b"x"),
        lambda: Request(Command.WRITE, 1, 0, 3, data="abc"),
        lambda: Request(Command.WRITE, 1, 0, 3, data=memoryview(b"abcdef")[::2]),
        lambda: Reply(Command.REFUSED, 1),
        lambda: Reply(Command.READ, 1, status=-1),
        lambda: Reply(Command.READ, 1, status=1 << 32),
        lambda: Ready(size=-1, permissions=Permission.READ),
        lambda: Ready(size=1, permissions=Permission.READ, max_request=0),
        lambda: Ready(size=1, permissions=Permission.READ, block_size=1 << 32),
        lambda: Ready(size=1, permissions=8),
        lambda: Ready(size=1, permissions=Permission.READ, features=1 << 10),
    ]
    for build in bad:
        with pytest.raises(LocalProtocolError):
            build()


def test_wide_memoryviews_are_sent_as_their_bytes():
    import array

    words = array.array("I", [1, 2, 3])
    request = Request(Command.WRITE, 1, 0, 12, data=memoryview(words))
    client, server = open_pair()
    [received] = feed(server, client.send(request))
    assert received.data == words.tobytes()


def test_connection_arguments_are_checked():
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, max_payload=0)
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, max_payload=1 << 32)
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, key=b"")
    with pytest.raises(LocalProtocolError, match="rot13"):
        Connection(Role.CLIENT, modes=["rot13"])


def test_calls_out_of_place_are_local_errors():
    client, server = make_pair()
    with pytest.raises(LocalProtocolError):
        server.hello(export=None, client_id=CLIENT_ID, client_name="c")
    with pytest.raises(LocalProtocolError):
        client.hello(export=None, client_id=b"short", client_name="c")
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).hello(export=None, client_id=CLIENT_ID, client_name="c")
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, modes=["aes-256-gcm"]).hello(
            export=None, client_id=CLIENT_ID, client_name="c"
        )
    for call in (client.confirm, lambda: server.challenge(node_name="n"),
                 lambda: server.ready(Ready(1, Permission.READ)),
                 lambda: client.send(Request(Command.PING, 1))):
        with pytest.raises(LocalProtocolError):
            call()
    client, server = open_pair()
    with pytest.raises(LocalProtocolError):
        server.send(Request(Command.PING, 1))
    with pytest.raises(LocalProtocolError):
        client.send(Reply(Command.PING, 1))
    with pytest.raises(LocalProtocolError):
        client.refuse(errno.EACCES, "too late")
    with pytest.raises(LocalProtocolError):
        server.send(Refused(1, "x"))  # type: ignore[arg-type]


def test_handshake_frames_that_would_be_too_big_are_local_errors():
    client, _ = make_pair()
    with pytest.raises(LocalProtocolError, match="exceeds"):
        client.hello(export="x" * 5000, client_id=CLIENT_ID, client_name="c")
    assert client.state is State.IDLE  # nothing was sent, so nothing changed


def test_long_names_for_logs_are_cut():
    client, server = make_pair()
    [hello] = feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c" * 9999))
    assert hello.client_name == "c" * 256
    [challenged] = feed(client, server.challenge(node_name="n" * 9999))
    assert challenged.node_name == "n" * 256


def test_data_after_end_of_stream_is_a_local_error():
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")
    assert server.next_event() == ConnectionClosed()


def test_an_error_leaves_the_receive_buffer_free_even_if_the_exception_is_kept():
    client, server = open_pair()
    frame = bytearray(client.send(Request(Command.WRITE, 1, 0, 3, data=b"abc")))
    frame[-1] ^= 1
    server.receive_data(bytes(frame))
    try:
        server.next_event()
    except RemoteProtocolError as exc:
        kept = exc  # its traceback references the frames that opened the frame
    assert kept.__traceback__ is not None
    with pytest.raises(LocalProtocolError):  # not BufferError
        server.receive_data(b"more")


def test_challenge_failure_puts_the_server_in_error_but_allows_refuse():
    client = Connection(Role.CLIENT, modes=["xxh3-128"])
    server = Connection(Role.SERVER, key=b"k" * 32)
    feed(server, client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    with pytest.raises(HandshakeFailed):
        server.challenge(node_name="n")
    assert server.state is State.ERROR and server.mode is None and server.version is None
    with pytest.raises(LocalProtocolError):
        server.challenge(node_name="n")
    [refused] = feed(client, server.refuse(errno.EACCES, "key required"))
    assert refused == Refused(errno.EACCES, "key required")
    assert server.state is State.ERROR

"""The NBD client codec (dstfuse/protocol/nbd/client.py), without I/O.

Tables of server bytes -> events, fed whole, byte by byte and in random
pieces; then hypothesis: whatever a server sends, the client raises only
RemoteProtocolError or HandshakeFailed, never holds much more than the
replies in flight allow, and a valid reply stream cut anywhere parses to
the same replies.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstfuse.protocol import HandshakeFailed, LocalProtocolError, RemoteProtocolError
from dstfuse.protocol.nbd.client import (
    NEED_DATA,
    ConnectionClosed,
    Extent,
    NbdClient,
    NbdReply,
    Phase,
    Ready,
    StartTls,
)
from dstfuse.protocol.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REQUEST,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    TransmissionFlag,
)

ALL_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
SIZE = 1 << 20
ALLOWED = (RemoteProtocolError, HandshakeFailed)
FUZZ = settings(
    max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


# ------------------------------------------------------------ server bytes


def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def opt_reply(option: int, kind: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, kind, len(data)) + data


def info_export(size: int = SIZE, flags: int = ALL_FLAGS) -> bytes:
    return opt_reply(Option.GO, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))


def info_block(minimum: int = 1, preferred: int = 4096, maximum: int = 1 << 20) -> bytes:
    payload = struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)
    return opt_reply(Option.GO, OptionReply.INFO, payload)


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes = b"", *, done: bool = False) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return (
        STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload
    )


def data_chunk(cookie: int, offset: int, data: bytes, *, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_DATA, struct.pack(">Q", offset) + data, done=done)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_HOLE, struct.pack(">QI", offset, length), done=done)


def error_chunk(cookie: int, error: int, message: bytes = b"", *, done: bool = True) -> bytes:
    return chunk(cookie, Chunk.ERROR, struct.pack(">IH", error, len(message)) + message, done=done)


def parse_options(data: bytes) -> list[tuple[int, bytes]]:
    """The options a client sent (after its 4 bytes of flags)."""
    options = []
    while data:
        magic, option, length = OPTION.unpack_from(data)
        assert magic == IHAVEOPT
        options.append((option, data[OPTION.size : OPTION.size + length]))
        data = data[OPTION.size + length :]
    return options


def events(client: NbdClient, data: bytes, *, pieces: int = 0) -> list[object]:
    """Feed `data` (whole, or byte by byte when pieces is 1) and collect events."""
    out: list[object] = []
    chunks = [data] if pieces == 0 else [data[i : i + pieces] for i in range(0, len(data), pieces)]
    for piece in chunks:
        client.receive_data(piece)
        while (event := client.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def handshake(client: NbdClient, **ready: int) -> Ready:
    """Run the usual modern handshake (structured replies, GO with block sizes)."""
    client.receive_data(greeting())
    assert client.next_event() is NEED_DATA
    client.receive_data(opt_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    assert client.next_event() is NEED_DATA
    if client._want_allocation:
        meta = struct.pack(">I", 7) + b"base:allocation"
        client.receive_data(opt_reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT, meta))
        client.receive_data(opt_reply(Option.SET_META_CONTEXT, OptionReply.ACK))
        assert client.next_event() is NEED_DATA
    size = ready.pop("size", SIZE)
    flags = ready.pop("flags", ALL_FLAGS)
    client.receive_data(info_export(size, flags) + info_block(**ready))
    client.receive_data(opt_reply(Option.GO, OptionReply.ACK))
    event = client.next_event()
    assert isinstance(event, Ready)
    client.data_to_send()
    return event


def open_client(**kwargs: object) -> NbdClient:
    client = NbdClient("disk", allocation=bool(kwargs.pop("allocation", False)))
    handshake(client, **kwargs)  # type: ignore[arg-type]
    return client


# ---------------------------------------------------------------- handshake


def test_modern_handshake_asks_for_structured_replies_then_go_with_block_size() -> None:
    client = NbdClient("disk")
    client.receive_data(greeting())
    assert client.next_event() is NEED_DATA
    sent = client.data_to_send()
    assert struct.unpack(">I", sent[:4])[0] == 3  # FIXED_NEWSTYLE | NO_ZEROES
    assert parse_options(sent[4:]) == [(Option.STRUCTURED_REPLY, b"")]
    client.receive_data(opt_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    assert client.next_event() is NEED_DATA
    [(option, data)] = parse_options(client.data_to_send())
    assert option == Option.GO
    assert data == struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, Info.BLOCK_SIZE)
    ready_bytes = info_export() + info_block(512, 4096, 1 << 16) + opt_reply(Option.GO, 1)
    [ready] = events(client, ready_bytes, pieces=1)
    assert ready == Ready("disk", SIZE, TransmissionFlag(ALL_FLAGS), 512, 4096, 1 << 16, True)
    assert client.phase is Phase.TRANSMISSION


def test_meta_context_is_negotiated_when_asked() -> None:
    client = NbdClient("", allocation=True)
    ready = handshake(client)
    assert ready.allocation == 7


def test_old_server_without_go_gets_export_name() -> None:
    client = NbdClient("disk")
    client.receive_data(greeting(HandshakeFlag.FIXED_NEWSTYLE))  # no NO_ZEROES
    client.next_event()
    assert struct.unpack(">I", client.data_to_send()[:4])[0] == 1
    client.receive_data(opt_reply(Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP))
    client.next_event()
    client.data_to_send()
    client.receive_data(opt_reply(Option.GO, OptionReply.ERR_UNSUP))
    assert client.next_event() is NEED_DATA
    assert parse_options(client.data_to_send()) == [(Option.EXPORT_NAME, b"disk")]
    reply = struct.pack(">QH", 4096, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)
    [ready] = events(client, reply + bytes(124), pieces=7)
    assert ready.size == 4096 and ready.read_only and not ready.structured
    assert (ready.minimum, ready.preferred, ready.maximum) == (1, 4096, 32 << 20)


def test_starttls_comes_first_and_waits_for_the_caller() -> None:
    client = NbdClient("disk", tls=True)
    client.receive_data(greeting())
    client.next_event()
    assert parse_options(client.data_to_send()[4:]) == [(Option.STARTTLS, b"")]
    client.receive_data(opt_reply(Option.STARTTLS, OptionReply.ACK))
    assert client.next_event() == StartTls()
    assert client.data_to_send() == b""
    client.tls_started()
    assert parse_options(client.data_to_send()) == [(Option.STRUCTURED_REPLY, b"")]


@pytest.mark.parametrize(
    ("option", "reply", "message", "status"),
    [
        (Option.GO, OptionReply.ERR_UNKNOWN, "no export 'disk'", errno.ENOENT),
        (Option.GO, OptionReply.ERR_POLICY, "policy", errno.EACCES),
        (Option.GO, OptionReply.ERR_TLS_REQD, "nbds://", errno.EACCES),
        (Option.STRUCTURED_REPLY, OptionReply.ERR_TLS_REQD, "requires TLS", errno.EACCES),
    ],
)
def test_refusals_are_handshake_failures_with_one_line(
    option: Option, reply: OptionReply, message: str, status: int
) -> None:
    client = NbdClient("disk")
    client.receive_data(greeting())
    client.next_event()
    if option is Option.GO:
        client.receive_data(opt_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
        client.next_event()
    client.receive_data(opt_reply(option, reply, b"go away"))
    with pytest.raises(HandshakeFailed) as caught:
        client.next_event()
    assert message in caught.value.message and "go away" in caught.value.message
    assert caught.value.status == status
    assert client.phase is Phase.ERROR
    with pytest.raises(LocalProtocolError):
        client.next_event()


def test_starttls_refused_says_use_plain_nbd() -> None:
    client = NbdClient("disk", tls=True)
    client.receive_data(greeting())
    client.next_event()
    client.receive_data(opt_reply(Option.STARTTLS, OptionReply.ERR_POLICY))
    with pytest.raises(HandshakeFailed, match="does not offer TLS"):
        client.next_event()


@pytest.mark.parametrize(
    "server",
    [
        struct.pack(">QQH", 0x1234, IHAVEOPT, 1),  # not NBD
        struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 0),  # oldstyle
        greeting(0),  # newstyle, not fixed
    ],
)
def test_servers_we_do_not_speak_to_are_refused(server: bytes) -> None:
    client = NbdClient("disk")
    client.receive_data(server)
    with pytest.raises(ALLOWED):
        client.next_event()


@pytest.mark.parametrize(
    "block",
    [(3, 4096, 1 << 20), (512, 256, 1 << 20), (512, 4096, 1000), (1 << 17, 1 << 17, 1 << 20)],
)
def test_invalid_block_sizes_are_protocol_errors(block: tuple[int, int, int]) -> None:
    with pytest.raises(RemoteProtocolError, match="block size"):
        open_client(minimum=block[0], preferred=block[1], maximum=block[2])


def test_maximum_is_capped_at_our_payload_limit_and_aligned() -> None:
    client = NbdClient("disk", max_payload=10000)
    ready = handshake(client, minimum=512, maximum=0xFFFFFFFF)
    assert ready.maximum == 9728


def test_go_without_info_export_is_a_protocol_error() -> None:
    client = NbdClient("disk")
    client.receive_data(greeting() + opt_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    client.next_event()
    client.receive_data(opt_reply(Option.GO, OptionReply.ACK))
    with pytest.raises(RemoteProtocolError, match="INFO_EXPORT"):
        client.next_event()


def test_oversized_option_reply_is_refused_before_buffering() -> None:
    client = NbdClient("disk", max_option_reply=1024)
    client.receive_data(greeting())
    client.next_event()
    client.receive_data(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, Option.STRUCTURED_REPLY, 1, 1 << 30))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        client.next_event()


# ------------------------------------------------------------- requests


def test_request_bytes_and_write_payload() -> None:
    client = open_client()
    frame = client.request(Command.WRITE, 5, 4096, 3, CommandFlag.FUA, b"abc")
    assert frame == REQUEST.pack(0x25609513, CommandFlag.FUA, Command.WRITE, 5, 4096, 3) + b"abc"
    assert client.disconnect() == REQUEST.pack(0x25609513, 0, Command.DISC, 0, 0, 0)


@pytest.mark.parametrize(
    ("flags", "command", "kwargs", "message"),
    [
        (ALL_FLAGS & ~TransmissionFlag.SEND_FLUSH, Command.FLUSH, {}, "FLUSH"),
        (ALL_FLAGS & ~TransmissionFlag.SEND_TRIM, Command.TRIM, {"length": 512}, "TRIM"),
        (
            ALL_FLAGS & ~TransmissionFlag.SEND_FUA,
            Command.WRITE,
            {"length": 1, "data": b"x", "flags": CommandFlag.FUA},
            "FUA",
        ),
        (
            ALL_FLAGS | TransmissionFlag.READ_ONLY,
            Command.WRITE,
            {"length": 1, "data": b"x"},
            "read-only",
        ),
        (ALL_FLAGS, Command.READ, {"offset": SIZE - 1, "length": 2}, "past"),
        (ALL_FLAGS, Command.READ, {"length": 4096}, "maximum"),
        (ALL_FLAGS, Command.READ, {"length": 0}, "length"),
        (ALL_FLAGS, Command.BLOCK_STATUS, {"length": 512}, "meta context"),
        (ALL_FLAGS, Command.WRITE, {"length": 2, "data": b"x"}, "data"),
    ],
)
def test_misuse_is_a_local_error_and_changes_nothing(
    flags: int, command: Command, kwargs: dict, message: str
) -> None:
    client = open_client(flags=flags, maximum=2048)
    with pytest.raises(LocalProtocolError, match=message):
        client.request(command, 1, **kwargs)
    assert client.in_flight == 0
    client.request(Command.READ, 1, 0, 1)  # still usable


def test_misaligned_request_is_refused() -> None:
    client = open_client(minimum=512)
    with pytest.raises(LocalProtocolError, match="aligned"):
        client.request(Command.READ, 1, 100, 512)


def test_cookie_in_flight_twice_is_refused() -> None:
    client = open_client()
    client.request(Command.READ, 9, 0, 1)
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.request(Command.READ, 9, 0, 1)


# ---------------------------------------------------------------- replies

DATA = bytes(range(256)) * 4


def read_cases() -> list[tuple[str, bytes, NbdReply]]:
    return [
        ("simple", simple(1, 0, DATA), NbdReply(1, Command.READ, 0, DATA)),
        ("simple error has no payload", simple(1, errno.EIO), NbdReply(1, Command.READ, errno.EIO)),
        ("one data chunk", data_chunk(1, 0, DATA, done=True), NbdReply(1, Command.READ, 0, DATA)),
        (
            "data and hole out of order",
            data_chunk(1, 512, DATA[512:]) + hole_chunk(1, 0, 512) + chunk(1, 0, done=True),
            NbdReply(1, Command.READ, 0, bytes(512) + DATA[512:]),
        ),
        (
            "error after data",
            data_chunk(1, 0, DATA[:512]) + error_chunk(1, errno.EIO, b"disk on fire"),
            NbdReply(1, Command.READ, errno.EIO, b"", "disk on fire"),
        ),
        (
            "error with offset",
            chunk(
                1,
                Chunk.ERROR_OFFSET,
                struct.pack(">IH", errno.EIO, 2) + b"no" + struct.pack(">Q", 100),
                done=True,
            ),
            NbdReply(1, Command.READ, errno.EIO, b"", "no"),
        ),
    ]


@pytest.mark.parametrize("pieces", [0, 1, 13])
@pytest.mark.parametrize(("name", "server", "expected"), read_cases(), ids=lambda c: str(c)[:30])
def test_read_replies(name: str, server: bytes, expected: NbdReply, pieces: int) -> None:
    client = open_client()
    client.request(Command.READ, 1, 0, len(DATA))
    client.request(Command.FLUSH, 2)  # its reply trails the READ's
    assert events(client, server + simple(2), pieces=pieces) == [
        expected,
        NbdReply(2, Command.FLUSH),
    ]
    assert client.in_flight == 0


def test_replies_match_cookies_in_any_order() -> None:
    client = open_client()
    client.request(Command.WRITE, 10, 0, 3, data=b"abc")
    client.request(Command.FLUSH, 11)
    client.request(Command.TRIM, 12, 0, 4096)
    server = chunk(12, Chunk.NONE, done=True) + simple(10) + simple(11, errno.ENOSPC)
    assert events(client, server) == [
        NbdReply(12, Command.TRIM),
        NbdReply(10, Command.WRITE),
        NbdReply(11, Command.FLUSH, errno.ENOSPC),
    ]


def test_block_status_extents() -> None:
    client = open_client(allocation=True)
    client.request(Command.BLOCK_STATUS, 3, 0, 8192)
    payload = struct.pack(">IIIII", 7, 4096, 0, 8192, 3)
    [reply] = events(client, chunk(3, Chunk.BLOCK_STATUS, payload, done=True))
    assert reply.extents == (Extent(4096, 0), Extent(8192, 3))


def test_end_of_stream() -> None:
    client = open_client()
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


@pytest.mark.parametrize(
    ("name", "server"),
    [
        ("unknown cookie", simple(99)),
        ("bad magic", b"\x00" * 16),
        ("chunk past the request", data_chunk(1, 4000, b"x" * 200, done=True)),
        ("overlapping chunks", data_chunk(1, 0, b"x" * 600) + data_chunk(1, 512, b"y" * 10)),
        ("read not covered", data_chunk(1, 0, b"x" * 10, done=True)),
        ("hole of length 0", hole_chunk(1, 0, 0)),
        ("status chunk for a read", chunk(1, Chunk.BLOCK_STATUS, bytes(12))),
        ("NONE without DONE", chunk(1, Chunk.NONE)),
        ("error value 0", error_chunk(1, 0)),
        ("chunk too big", STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, 0, 1, 1, 1 << 30)),
        ("cut inside a reply", simple(1)[:10] + b""),
    ],
)
def test_malformed_replies_are_protocol_errors(name: str, server: bytes) -> None:
    client = open_client()
    client.request(Command.READ, 1, 0, 1024)
    client.receive_data(server)
    if name == "cut inside a reply":
        client.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        while client.next_event() is not NEED_DATA:
            pass
        raise AssertionError("no error")
    assert client.phase is Phase.ERROR


def test_structured_reply_without_negotiation_is_an_error() -> None:
    client = NbdClient("disk", structured=False)
    client.receive_data(greeting())
    client.next_event()
    client.receive_data(info_export() + opt_reply(Option.GO, OptionReply.ACK))
    assert isinstance(client.next_event(), Ready)
    client.request(Command.READ, 1, 0, 4)
    client.receive_data(data_chunk(1, 0, b"abcd", done=True))
    with pytest.raises(RemoteProtocolError, match="structured"):
        client.next_event()


# ----------------------------------------------------------------- fuzzing

READ_LEN = 2048


def fuzz_client() -> NbdClient:
    client = open_client(allocation=True)
    client.request(Command.READ, 1, 0, READ_LEN)
    client.request(Command.WRITE, 2, 0, 4, data=b"abcd")
    client.request(Command.BLOCK_STATUS, 3, 0, 4096)
    return client


#: The most the client may buffer after NEED_DATA with fuzz_client's
#: requests in flight: a chunk header plus its largest payload, plus a
#: header's worth of the next message.
BUFFER_BOUND = STRUCTURED_REPLY.size + 8 + READ_LEN + STRUCTURED_REPLY.size + (4 + 8 * (1 << 16))


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=20), st.booleans())
def test_any_bytes_in_transmission_raise_only_remote_errors(pieces: list[bytes], eof: bool) -> None:
    client = fuzz_client()
    try:
        for piece in pieces + ([b""] if eof else []):
            client.receive_data(piece)
            while True:
                event = client.next_event()
                if event is NEED_DATA:
                    assert len(client._buffer) <= BUFFER_BOUND
                    break
                if isinstance(event, ConnectionClosed):
                    return
                assert isinstance(event, NbdReply) and event.cookie in (1, 2, 3)
                if event.command is Command.READ and not event.error:
                    assert len(event.data) == READ_LEN
    except ALLOWED:
        assert client.phase is Phase.ERROR


@FUZZ
@given(st.binary(max_size=300), st.integers(1, 40))
def test_any_bytes_in_the_handshake_raise_only_remote_errors(data: bytes, step: int) -> None:
    client = NbdClient("disk", allocation=True)
    prefix = greeting() + opt_reply(Option.STRUCTURED_REPLY, OptionReply.ACK)
    stream = prefix + data
    try:
        for at in range(0, len(stream), step):
            client.receive_data(stream[at : at + step])
            while (event := client.next_event()) is not NEED_DATA:
                if isinstance(event, StartTls):
                    raise AssertionError("STARTTLS never asked for")
                if isinstance(event, Ready | ConnectionClosed):
                    return
    except ALLOWED:
        assert client.phase is Phase.ERROR


@st.composite
def read_replies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid structured READ reply of READ_LEN bytes in random chunks, in
    random order, with holes; and the data it means."""
    cuts = sorted(draw(st.sets(st.integers(1, READ_LEN - 1), max_size=8)))
    bounds = list(zip([0, *cuts], [*cuts, READ_LEN], strict=True))
    order = draw(st.permutations(bounds))
    data = bytearray(READ_LEN)
    frames = b""
    for start, end in order:
        if draw(st.booleans()):
            piece = draw(st.binary(min_size=end - start, max_size=end - start))
            data[start:end] = piece
            frames += data_chunk(1, start, piece)
        else:
            frames += hole_chunk(1, start, end - start)
    return frames + chunk(1, Chunk.NONE, done=True), bytes(data)


@FUZZ
@given(read_replies(), st.lists(st.integers(1, 400), min_size=1, max_size=30))
def test_valid_read_replies_parse_the_same_however_cut(
    reply: tuple[bytes, bytes], cuts: list[int]
) -> None:
    frames, data = reply
    client = open_client()
    client.request(Command.READ, 1, 0, READ_LEN)
    got = []
    at = 0
    for size in cuts * (len(frames) // sum(cuts) + 1):
        client.receive_data(frames[at : at + size])
        at += size
        while (event := client.next_event()) is not NEED_DATA:
            got.append(event)
        if at >= len(frames):
            break
    assert got == [NbdReply(1, Command.READ, 0, data)]

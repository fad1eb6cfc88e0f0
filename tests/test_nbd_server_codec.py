"""The sans-IO NBD server codec: table-driven round trips (each fed whole,
byte by byte and with trailing data) and hypothesis fuzzing.

The client side is spelled out here as raw struct packing from the
specification, so these tests do not trust any client code of ours.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstfuse.protocol import LocalProtocolError, RemoteProtocolError
from dstfuse.protocol.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    ClientFlag,
    Command,
    CommandFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from dstfuse.protocol.nbd.server import (
    BASE_ALLOCATION_ID,
    NEED_DATA,
    NbdServerConnection,
    ServerState,
)
from dstfuse.protocol.nbd.server_events import (
    ConnectionClosed,
    Disconnected,
    ExportInfo,
    ExportNameRequested,
    HandshakeEnded,
    InfoRequested,
    ListRequested,
    MetaContextRequested,
    NbdRejected,
    NbdRequest,
    OptionAnswered,
    TlsRequested,
)

KiB = 1 << 10
SIZE = 1 << 20
ALL_FLAGS = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.CAN_MULTI_CONN
)
EXPORT = ExportInfo(SIZE, ALL_FLAGS, minimum_block=512, preferred_block=4096,
                    maximum_block=64 * KiB, description="a test disk")
READ_ONLY = ExportInfo(SIZE, ALL_FLAGS | TransmissionFlag.READ_ONLY, minimum_block=512,
                       maximum_block=64 * KiB)
FIXED = int(ClientFlag.FIXED_NEWSTYLE)
NO_ZEROES = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


# -- the client's bytes, from the spec ----------------------------------------
def flags(value: int = NO_ZEROES) -> bytes:
    return struct.pack(">I", value)


def option(kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, kind, len(data)) + data


def go(name: str, *infos: int, kind: int = Option.GO) -> bytes:
    encoded = name.encode()
    data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", len(infos))
    return option(kind, data + b"".join(struct.pack(">H", i) for i in infos))


def meta(kind: int, name: str, *queries: str) -> bytes:
    encoded = name.encode()
    data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(queries))
    for query in queries:
        data += struct.pack(">I", len(query)) + query.encode()
    return option(kind, data)


def request(command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
            cookie: int = 7, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + data


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of every option reply in `data`."""
    replies = []
    while data:
        magic, kind, reply, length = struct.unpack_from(">QIII", data)
        assert magic == OPTION_REPLY_MAGIC
        replies.append((kind, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return replies


# -- driving ------------------------------------------------------------------
def drain(conn: NbdServerConnection, answer: bool = True) -> tuple[list, bytes]:
    """Every event the codec yields from what it holds, answering options
    the way a server with one export "disk" (EXPORT) would; and the bytes
    it produced."""
    events, out = [], b""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events, out
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events, out
        if not answer:
            if isinstance(event, (TlsRequested, ExportNameRequested, InfoRequested,
                                  ListRequested, MetaContextRequested)):
                return events, out  # the caller answers (or switches to TLS) first
            continue
        if isinstance(event, (OptionAnswered, TlsRequested, HandshakeEnded)):
            out += event.data
            if isinstance(event, TlsRequested):
                conn.tls_started()
        elif isinstance(event, ExportNameRequested):
            if event.name in ("", "disk"):
                out += conn.answer_export_name(EXPORT)
            else:
                conn.refuse_export_name()
        elif isinstance(event, InfoRequested):
            if event.name in ("", "disk"):
                out += conn.answer_info(EXPORT, canonical_name="disk")
            else:
                out += conn.refuse_option(OptionReply.ERR_UNKNOWN, "no such export")
        elif isinstance(event, ListRequested):
            out += conn.answer_list([("disk", "a test disk")])
        elif isinstance(event, MetaContextRequested):
            if event.name in ("", "disk"):
                out += conn.answer_meta_context()
            else:
                out += conn.refuse_option(OptionReply.ERR_UNKNOWN, "no such export")


def feed(data: bytes, *, chunk: int | None = None, conn: NbdServerConnection | None = None,
         answer: bool = True) -> tuple[NbdServerConnection, list, bytes]:
    conn = conn or NbdServerConnection(tls_available=True)
    events, out = [], b""
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        conn.receive_data(piece)
        more, produced = drain(conn, answer)
        events += more
        out += produced
    return conn, events, out


CHUNKINGS = [None, 1, 7]


def opened(*, structured: bool = True, meta_context: bool = True,
           info: ExportInfo = EXPORT) -> NbdServerConnection:
    """A connection in transmission on `info`."""
    conn = NbdServerConnection()
    conn.receive_data(flags())
    if structured:
        conn.receive_data(option(Option.STRUCTURED_REPLY))
    if meta_context:
        conn.receive_data(meta(Option.SET_META_CONTEXT, "disk", "base:allocation"))
    conn.receive_data(go("disk"))
    while True:
        event = conn.next_event()
        assert event is not NEED_DATA
        if isinstance(event, OptionAnswered):
            continue
        if isinstance(event, MetaContextRequested):
            conn.answer_meta_context()
            continue
        assert isinstance(event, InfoRequested)
        conn.answer_info(info)
        assert conn.state is ServerState.TRANSMISSION
        return conn


# -- handshake tables -----------------------------------------------------------
def test_greeting_is_fixed_newstyle_with_no_zeroes():
    assert NbdServerConnection().greeting() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_go_reports_export_block_sizes_name_and_description(chunk):
    data = flags() + go("disk", Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
    conn, events, out = feed(data, chunk=chunk)
    assert events == [InfoRequested("disk", go=True,
                                    requests=(Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))]
    replies = option_replies(out)
    assert [r[:2] for r in replies] == [(Option.GO, OptionReply.INFO)] * 4 + [
        (Option.GO, OptionReply.ACK)]
    kind, size, tflags = struct.unpack(">HQH", replies[0][2])
    assert (kind, size) == (Info.EXPORT, SIZE)
    assert tflags == int(ALL_FLAGS | TransmissionFlag.HAS_FLAGS)
    assert struct.unpack(">HIII", replies[1][2]) == (Info.BLOCK_SIZE, 512, 4096, 64 * KiB)
    assert replies[2][2] == struct.pack(">H", Info.NAME) + b"disk"
    assert replies[3][2] == struct.pack(">H", Info.DESCRIPTION) + b"a test disk"
    assert conn.state is ServerState.TRANSMISSION and conn.export_name == "disk"


def test_info_keeps_haggling_and_unknown_export_is_refused():
    data = flags() + go("disk", kind=Option.INFO) + go("nope")
    conn, events, out = feed(data)
    replies = option_replies(out)
    assert replies[-1] == (Option.GO, OptionReply.ERR_UNKNOWN, b"no such export")
    assert (Option.INFO, OptionReply.ACK, b"") in replies
    assert conn.state is ServerState.OPTIONS


@pytest.mark.parametrize(("client", "tail"), [(NO_ZEROES, 0), (FIXED, 124)])
def test_export_name_reply_with_and_without_zeroes(client, tail):
    conn, events, out = feed(flags(client) + option(Option.EXPORT_NAME, b"disk"))
    assert events == [ExportNameRequested("disk")]
    assert out == struct.pack(">QH", SIZE, int(ALL_FLAGS | 1)) + bytes(tail)
    assert conn.state is ServerState.TRANSMISSION


def test_unknown_export_name_ends_the_session_without_reply():
    conn, events, out = feed(flags() + option(Option.EXPORT_NAME, b"nope"))
    assert out == b"" and conn.state is ServerState.CLOSED


def test_list_names_every_export():
    conn, events, out = feed(flags() + option(Option.LIST))
    assert option_replies(out) == [
        (Option.LIST, OptionReply.SERVER, struct.pack(">I", 4) + b"disk" + b"a test disk"),
        (Option.LIST, OptionReply.ACK, b""),
    ]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # SET before STRUCTURED_REPLY is invalid
        ([meta(Option.SET_META_CONTEXT, "disk", "base:allocation")],
         [(Option.SET_META_CONTEXT, OptionReply.ERR_INVALID)]),
        ([option(Option.STRUCTURED_REPLY),
          meta(Option.SET_META_CONTEXT, "disk", "base:allocation")],
         [(Option.STRUCTURED_REPLY, OptionReply.ACK),
          (Option.SET_META_CONTEXT, OptionReply.META_CONTEXT),
          (Option.SET_META_CONTEXT, OptionReply.ACK)]),
        ([option(Option.STRUCTURED_REPLY), meta(Option.SET_META_CONTEXT, "disk", "qemu:dirty")],
         [(Option.STRUCTURED_REPLY, OptionReply.ACK), (Option.SET_META_CONTEXT, OptionReply.ACK)]),
        ([option(Option.STRUCTURED_REPLY), meta(Option.LIST_META_CONTEXT, "disk")],
         [(Option.STRUCTURED_REPLY, OptionReply.ACK),
          (Option.LIST_META_CONTEXT, OptionReply.META_CONTEXT),
          (Option.LIST_META_CONTEXT, OptionReply.ACK)]),
        ([option(Option.STRUCTURED_REPLY), meta(Option.LIST_META_CONTEXT, "nope", "base:")],
         [(Option.STRUCTURED_REPLY, OptionReply.ACK),
          (Option.LIST_META_CONTEXT, OptionReply.ERR_UNKNOWN)]),
        ([option(Option.STRUCTURED_REPLY, b"x")],
         [(Option.STRUCTURED_REPLY, OptionReply.ERR_INVALID)]),
        ([option(Option.LIST, b"x")], [(Option.LIST, OptionReply.ERR_INVALID)]),
        ([option(Option.GO, b"\0\0\0\x09disk")], [(Option.GO, OptionReply.ERR_INVALID)]),
        ([option(Option.GO, b"\0\0\0\x02\xff\xfe\0\0")], [(Option.GO, OptionReply.ERR_INVALID)]),
        ([option(Option.EXTENDED_HEADERS)], [(Option.EXTENDED_HEADERS, OptionReply.ERR_UNSUP)]),
        ([option(99, b"whatever")], [(99, OptionReply.ERR_UNSUP)]),
        ([option(Option.INFO, bytes(70 * KiB))], [(Option.INFO, OptionReply.ERR_TOO_BIG)]),
    ],
)
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_option_replies(messages, expected, chunk):
    conn, events, out = feed(flags() + b"".join(messages), chunk=chunk)
    assert [r[:2] for r in option_replies(out)] == expected
    assert conn.state is ServerState.OPTIONS


def test_selected_meta_context_has_its_id():
    conn, _, out = feed(flags() + option(Option.STRUCTURED_REPLY)
                        + meta(Option.SET_META_CONTEXT, "disk", "base:allocation"))
    assert option_replies(out)[1][2] == struct.pack(">I", BASE_ALLOCATION_ID) + b"base:allocation"


def test_meta_context_set_for_another_export_is_not_selected():
    conn, _, _ = feed(flags() + option(Option.STRUCTURED_REPLY)
                      + meta(Option.SET_META_CONTEXT, "", "base:allocation") + go("disk"))
    assert conn.state is ServerState.TRANSMISSION and not conn.meta_context


def test_meta_context_for_the_default_name_survives_a_canonical_name():
    conn, _, _ = feed(flags() + option(Option.STRUCTURED_REPLY)
                      + meta(Option.SET_META_CONTEXT, "", "base:allocation") + go(""))
    assert conn.state is ServerState.TRANSMISSION and conn.meta_context


def test_abort_is_acknowledged_and_ends_the_handshake():
    conn, events, out = feed(flags() + option(Option.ABORT) + b"ignored")
    assert isinstance(events[0], HandshakeEnded)
    assert option_replies(out) == [(Option.ABORT, OptionReply.ACK, b"")]
    assert conn.state is ServerState.CLOSED


def test_starttls_without_tls_configured_is_unsupported():
    conn, _, out = feed(flags() + option(Option.STARTTLS), conn=NbdServerConnection())
    assert option_replies(out)[0][:2] == (Option.STARTTLS, OptionReply.ERR_UNSUP)


def test_tls_required_refuses_everything_but_starttls():
    conn = NbdServerConnection(tls_required=True)
    conn, events, out = feed(flags() + option(Option.LIST) + go("disk") + option(Option.STARTTLS),
                             conn=conn, answer=False)
    assert [(e.option, e.reply) for e in events[:2]] == [
        (Option.LIST, OptionReply.ERR_TLS_REQD), (Option.GO, OptionReply.ERR_TLS_REQD)]
    assert isinstance(events[2], TlsRequested) and conn.state is ServerState.TLS_PENDING
    assert option_replies(events[2].data) == [(Option.STARTTLS, OptionReply.ACK, b"")]
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.tls_started()
    conn.receive_data(option(Option.STARTTLS) + go("disk"))
    events, _ = drain(conn, answer=False)
    assert (events[0].option, events[0].reply) == (Option.STARTTLS, OptionReply.ERR_INVALID)
    assert events[1] == InfoRequested("disk", go=True)


def test_export_name_without_required_tls_ends_the_session():
    conn, events, out = feed(flags() + option(Option.EXPORT_NAME, b"disk"),
                             conn=NbdServerConnection(tls_required=True))
    assert isinstance(events[0], HandshakeEnded) and out == b""
    assert conn.state is ServerState.CLOSED


def test_plaintext_after_starttls_is_a_protocol_error():
    conn = NbdServerConnection(tls_required=True)
    conn.receive_data(flags() + option(Option.STARTTLS) + option(Option.LIST))
    assert isinstance(conn.next_event(), TlsRequested)
    with pytest.raises(RemoteProtocolError):
        conn.tls_started()
    assert conn.state is ServerState.ERROR


def test_starttls_forgets_what_was_negotiated_before():
    conn = NbdServerConnection(tls_available=True)
    conn.receive_data(flags() + option(Option.STRUCTURED_REPLY))
    assert isinstance(conn.next_event(), OptionAnswered) and conn.structured_replies
    conn.receive_data(option(Option.STARTTLS))
    assert isinstance(conn.next_event(), TlsRequested)
    conn.tls_started()
    assert not conn.structured_replies and conn.tls_active


@pytest.mark.parametrize(
    "data",
    [
        flags(4),  # unknown client flag
        flags(0),  # not fixed newstyle
        flags() + struct.pack(">QII", 0x1234, 1, 0),  # bad option magic
    ],
)
def test_handshake_protocol_violations(data):
    conn = NbdServerConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        drain(conn)
    assert conn.state is ServerState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_pending_option_blocks_parsing_until_answered():
    conn = NbdServerConnection()
    conn.receive_data(flags() + go("disk") + option(Option.LIST))
    assert isinstance(conn.next_event(), InfoRequested)
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.answer_list([])
    conn.refuse_option(OptionReply.ERR_UNKNOWN, "no")
    assert isinstance(conn.next_event(), ListRequested)


def test_maximum_block_above_max_payload_is_a_local_error():
    conn = NbdServerConnection(max_payload=64 * KiB)
    conn.receive_data(flags() + go("disk"))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.answer_info(ExportInfo(SIZE, ALL_FLAGS, maximum_block=1 << 20))


# -- transmission tables --------------------------------------------------------
E = 64 * KiB
FUA = int(CommandFlag.FUA)
TRANSMISSION_CASES = [
    # (command, flags, offset, length, export, error or None)
    (Command.READ, 0, 0, 4096, EXPORT, None),
    (Command.READ, FUA, SIZE - 512, 512, EXPORT, None),
    (Command.READ, 0, SIZE - 512, 1024, EXPORT, errno.EINVAL),  # past the end
    (Command.READ, 0, 100, 512, EXPORT, errno.EINVAL),  # misaligned offset
    (Command.READ, 0, 0, 100, EXPORT, errno.EINVAL),  # misaligned length
    (Command.READ, 0, 0, 0, EXPORT, errno.EINVAL),  # empty
    (Command.READ, 0, 0, E + 512, EXPORT, errno.EOVERFLOW),  # over the maximum block
    (Command.READ, int(CommandFlag.DF), 0, 512, EXPORT, errno.EINVAL),  # DF not advertised
    (Command.READ, 0, (1 << 64) - 512, 512, EXPORT, errno.EINVAL),  # offset wraps
    (Command.WRITE, FUA, 0, 512, EXPORT, None),
    (Command.WRITE, 0, SIZE, 512, EXPORT, errno.ENOSPC),
    (Command.WRITE, 0, 0, 512, READ_ONLY, errno.EPERM),
    (Command.WRITE, int(CommandFlag.REQ_ONE), 0, 512, EXPORT, errno.EINVAL),
    (Command.FLUSH, 0, 0, 0, EXPORT, None),
    (Command.FLUSH, 0, 512, 0, EXPORT, errno.EINVAL),
    (Command.TRIM, FUA, 0, SIZE, EXPORT, None),  # longer than max block: fine
    (Command.TRIM, 0, 512, SIZE, EXPORT, errno.ENOSPC),
    (Command.TRIM, 0, 0, 512, READ_ONLY, errno.EPERM),
    (Command.WRITE_ZEROES, int(CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO), 0, SIZE,
     EXPORT, None),
    (Command.WRITE_ZEROES, int(CommandFlag.FAST_ZERO), 0, 512,
     ExportInfo(SIZE, TransmissionFlag.SEND_WRITE_ZEROES), errno.EINVAL),  # not advertised
    (Command.WRITE_ZEROES, 0, 0, 512, READ_ONLY, errno.EPERM),
    (Command.BLOCK_STATUS, int(CommandFlag.REQ_ONE), 0, SIZE, EXPORT, None),
    (Command.BLOCK_STATUS, 0, 0, SIZE + 512, EXPORT, errno.EINVAL),
    (Command.CACHE, 0, 0, 512, EXPORT, errno.EINVAL),  # not advertised
    (Command.RESIZE, 0, 0, 512, EXPORT, errno.EINVAL),
    (99, 0, 0, 512, EXPORT, errno.EINVAL),  # unknown command
]


@pytest.mark.parametrize(("command", "cflags", "offset", "length", "info", "error"),
                         TRANSMISSION_CASES)
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_requests_are_checked(command, cflags, offset, length, info, error, chunk):
    conn = opened(info=info)
    payload = bytes(range(256)) * (length // 256) if command == Command.WRITE else b""
    trailing = request(Command.FLUSH, cookie=99)
    _, events, _ = feed(request(command, offset, length, flags=cflags, cookie=5, data=payload)
                        + trailing, chunk=chunk, conn=conn, answer=False)
    first, second = events
    if error is None:
        assert first == NbdRequest(command, cflags, 5, offset, length, payload)
    else:
        assert isinstance(first, NbdRejected) and first.error == error
        assert (first.cookie, first.offset, first.length) == (5, offset, length)
    assert isinstance(second, (NbdRequest, NbdRejected)) and second.cookie == 99


def test_block_status_needs_a_meta_context():
    conn = opened(meta_context=False)
    _, events, _ = feed(request(Command.BLOCK_STATUS, 0, 512), conn=conn, answer=False)
    assert events[0].error == errno.EINVAL


def test_oversized_write_is_dropped_unbuffered_and_the_stream_continues():
    conn = NbdServerConnection(max_payload=64 * KiB)
    conn.receive_data(flags() + go("disk"))
    conn.next_event()
    conn.answer_info(EXPORT)
    conn.receive_data(request(Command.WRITE, 0, 128 * KiB, cookie=3))
    for _ in range(15):
        conn.receive_data(bytes(8 * KiB))
        assert conn.next_event() is NEED_DATA
        assert conn.buffered < 64 * KiB
    conn.receive_data(bytes(8 * KiB) + request(Command.READ, 0, 512, cookie=4))
    rejected = conn.next_event()
    assert isinstance(rejected, NbdRejected) and rejected.error == errno.EOVERFLOW
    assert conn.next_event() == NbdRequest(Command.READ, 0, 4, 0, 512)


@pytest.mark.parametrize("trailing", [b"", request(Command.FLUSH, cookie=2)])
def test_large_write_payloads_are_handed_over_intact(trailing):
    conn = opened(info=ExportInfo(SIZE, ALL_FLAGS, maximum_block=256 * KiB))
    payload = os.urandom(128 * KiB)
    conn.receive_data(request(Command.WRITE, 0, len(payload), cookie=1, data=payload) + trailing)
    write = conn.next_event()
    assert isinstance(write, NbdRequest) and bytes(write.data) == payload
    conn.receive_data(request(Command.READ, 0, 512, cookie=3))  # the buffer takes more
    cookies = []
    while (event := conn.next_event()) is not NEED_DATA:
        cookies.append(event.cookie)
    assert cookies == ([2, 3] if trailing else [3])
    assert bytes(write.data) == payload  # unchanged by what came after


def test_disc_closes_and_earlier_requests_can_still_be_answered():
    conn = opened()
    conn.receive_data(request(Command.READ, 0, 512, cookie=1) + request(Command.DISC) + b"junk")
    read = conn.next_event()
    assert isinstance(conn.next_event(), Disconnected)
    assert conn.state is ServerState.CLOSED
    assert conn.next_event() is NEED_DATA
    assert conn.reply_read(read, bytes(512))


def test_bad_request_magic_is_a_protocol_error():
    conn = opened()
    conn.receive_data(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_end_of_stream_between_and_inside_messages():
    conn = opened()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    conn = opened()
    conn.receive_data(request(Command.WRITE, 0, 512)[:-3])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# -- replies --------------------------------------------------------------------
def test_read_reply_simple_and_structured():
    data = bytes(range(256)) * 2
    req = NbdRequest(Command.READ, 0, 9, 1024, 512)
    simple = opened(structured=False, meta_context=False).reply_read(req, data)
    assert b"".join(simple) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 9) + data
    structured = b"".join(opened().reply_read(req, data))
    assert structured == struct.pack(
        ">IHHQIQ", STRUCTURED_REPLY_MAGIC, 1, Chunk.OFFSET_DATA, 9, 520, 1024) + data
    with pytest.raises(LocalProtocolError):
        opened().reply_read(req, data[:-1])


def test_error_reply_simple_and_structured_with_message():
    req = NbdRejected(0, 0, 9, 0, 512, errno.EINVAL, "bad")
    assert opened(structured=False, meta_context=False).reply_error(req, errno.EINVAL) == (
        struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.EINVAL, 9))
    assert opened().reply_error(req, errno.EROFS, "read-only") == struct.pack(
        ">IHHQIIH", STRUCTURED_REPLY_MAGIC, 1, Chunk.ERROR, 9, 15, errno.EPERM, 9) + b"read-only"
    # An errno outside the spec's list goes out as EIO.
    assert opened(structured=False).reply_error(req, errno.ENOENT)[4:8] == struct.pack(
        ">I", errno.EIO)


def test_block_status_reply_and_req_one():
    conn = opened()
    req = NbdRequest(Command.BLOCK_STATUS, 0, 4, 0, 8192)
    extents = [(4096, 0), (4096, 3)]
    assert conn.reply_block_status(req, extents) == struct.pack(
        ">IHHQIIIIII", STRUCTURED_REPLY_MAGIC, 1, Chunk.BLOCK_STATUS, 4, 20,
        BASE_ALLOCATION_ID, 4096, 0, 4096, 3)
    one = NbdRequest(Command.BLOCK_STATUS, int(CommandFlag.REQ_ONE), 4, 0, 8192)
    assert len(conn.reply_block_status(one, extents)) == 20 + 12
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(req, [(8192, 0), (512, 0)])


def test_ok_reply_is_simple():
    req = NbdRequest(Command.FLUSH, 0, 11, 0, 0)
    assert opened().reply_ok(req) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 11)


def test_read_only_export_does_not_advertise_write_commands():
    conn, _, out = feed(flags() + go("disk"), conn=NbdServerConnection(), answer=False)
    conn.answer_info(READ_ONLY)
    assert not conn.export.flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)


# -- fuzzing ----------------------------------------------------------------------
FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
MAX_OPTION = 8 * KiB
MAX_PAYLOAD = 64 * KiB
PREFIXES = {
    "client-flags": b"",
    "options": flags(),
    "transmission": flags() + option(Option.STRUCTURED_REPLY) + go("disk"),
}


@FUZZ
@given(prefix=st.sampled_from(sorted(PREFIXES)), junk=st.binary(max_size=600),
       chunk=st.integers(1, 64))
def test_any_bytes_raise_nothing_but_remote_protocol_error(prefix, junk, chunk):
    conn = NbdServerConnection(tls_available=True, max_payload=MAX_PAYLOAD,
                               max_option_data=MAX_OPTION)
    data = PREFIXES[prefix] + junk
    try:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
            drain(conn)
            assert conn.buffered <= 28 + MAX_PAYLOAD
        conn.receive_data(b"")
        drain(conn)
    except RemoteProtocolError:
        assert conn.state is ServerState.ERROR


def _header_fuzz():
    """Request headers with arbitrary fields (magic right), lengths kept
    small enough that a WRITE's payload can follow."""
    return st.builds(
        lambda command, cflags, offset, length: (command, cflags, offset, length),
        st.integers(0, 10), st.integers(0, 0xFFFF),
        st.one_of(st.integers(0, SIZE + 4096), st.integers(0, (1 << 64) - 1)),
        st.integers(0, 4 * KiB),
    )


@FUZZ
@given(requests=st.lists(_header_fuzz(), max_size=20), chunk=st.integers(1, 4096))
def test_request_streams_round_trip_whatever_the_chunking(requests, chunk):
    conn = opened()
    stream = b""
    for cookie, (command, cflags, offset, length) in enumerate(requests):
        if command == Command.DISC:
            continue
        payload = bytes([cookie % 256]) * length if command == Command.WRITE else b""
        stream += request(command, offset, length, flags=cflags, cookie=cookie, data=payload)
    _, events, _ = feed(stream, chunk=chunk, conn=conn, answer=False)
    kept = [(c, r) for c, r in enumerate(requests) if r[0] != Command.DISC]
    assert len(events) == len(kept)
    for event, (cookie, (command, cflags, offset, length)) in zip(events, kept, strict=True):
        assert (event.cookie, event.offset, event.length, event.flags) == (
            cookie, offset, length, cflags)
        if isinstance(event, NbdRequest):
            # Whatever was accepted is within the export and aligned.
            assert offset + length <= SIZE and offset % 512 == length % 512 == 0
            assert length or command == Command.FLUSH
            if command == Command.WRITE:
                assert bytes(event.data) == bytes([cookie % 256]) * length
        else:
            assert event.error in (errno.EINVAL, errno.EPERM, errno.ENOSPC, errno.EOVERFLOW)

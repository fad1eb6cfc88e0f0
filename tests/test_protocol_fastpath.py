"""The protocol's fast paths and their fallbacks.

- Hand-built `Request` and `Reply`: one test accepts the usual fields, the
  field-by-field checks handle everything else. Both must give the same
  event, or the same error, for any input.
- Parsed requests and replies are built without a second check; they must
  be indistinguishable from hand-built ones.
- Receiving keeps bytes chunks uncopied, reads frames in place, joins only
  frames that straddle chunks and merges small chunks while a frame is
  pending.
- Sealers build a frame in one join and open the three parts the receiver
  cut out; the default mode's methods are written out by hand.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstfuse.protocol import (
    NEED_DATA,
    Command,
    Connection,
    ConnectionClosed,
    Flag,
    IntegrityError,
    LocalProtocolError,
    Permission,
    Ready,
    RemoteProtocolError,
    Reply,
    Request,
    State,
)
from dstfuse.protocol.connection import _SMALL_CHUNK
from dstfuse.protocol.constants import HEADER, HEADER_SIZE, MAGIC, TAG_SIZE, VERSION
from dstfuse.protocol.sealing import (
    AeadSealer,
    Blake2bMacSealer,
    Sealer,
    Xxh3Sealer,
    session_sealer,
)
from dstfuse.protocol.testing import drain, forge_frame, open_pair

MODES = ["xxh3-128", "aes-256-gcm", "chacha20-poly1305", "blake2b-mac"]
PROPERTY = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------
# hand-built events: the fast test and the field-by-field checks agree


def checked_field_by_field(cls: type, **fields: object) -> object:
    """What the field-by-field checks alone make of `fields`."""
    event = object.__new__(cls)
    event.__dict__.update({f.name: fields[f.name] for f in dataclasses.fields(cls)})
    event._check_fields()
    return event


def outcome(build) -> tuple:
    try:
        event = build()
    except Exception as exc:  # the exception itself is what is compared
        return ("raised", type(exc), str(exc))
    values = vars(event)
    try:
        hashed: object = hash(event)
    except (TypeError, ValueError) as exc:  # bytearray or a wide memoryview: no hash
        hashed = str(exc)
    return ("built", list(values), {k: (type(v), v) for k, v in values.items()}, hashed)


COMMANDS = (
    st.sampled_from(list(Command))
    | st.integers(-1, 30)
    | st.sampled_from([True, 16.0, 17.0, 1.5, "READ", None, (16,)])
)
U64S = st.sampled_from([0, 1, (1 << 64) - 1, 1 << 64, -1, True, 2.5]) | st.integers(0, 1 << 65)
U32S = st.sampled_from([0, 3, (1 << 32) - 1, 1 << 32, -1, True, 3.0]) | st.integers(0, 1 << 33)
FLAGS = st.sampled_from(
    [Flag.NONE, Flag.FUA, Flag.REPLY, Flag.FUA | Flag.REPLY, 0, 1, 2, 0x8000, -1, True, 1.0]
)
DATA = st.one_of(
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
    st.binary(max_size=4).map(memoryview),
    st.sampled_from([
        lambda: "abc", lambda: None, lambda: memoryview(b"abcdef")[::2],
        lambda: memoryview(b"abcd").cast("H"),
    ]).map(lambda make: make()),
)


REQUEST_COMMANDS = [c for c in Command if c >= Command.READ]
#: Values to put in one field of an otherwise valid event.
ODD = dict(command=COMMANDS, handle=U64S, offset=U64S, length=U32S, status=U32S, flags=FLAGS,
           data=DATA)


@st.composite
def event_fields(draw, cls: type) -> dict:
    """The fields of a valid event, then up to two of them replaced by odd
    values: the inputs where the fast test and the fallback part ways."""
    command = draw(st.sampled_from(REQUEST_COMMANDS) | st.integers(16, 22))
    data = draw(st.binary(max_size=4))
    if cls is Request and command != Command.WRITE:
        data = b""
    fields = dict(
        command=command,
        handle=draw(st.integers(0, (1 << 64) - 1)),
        offset=draw(st.integers(0, (1 << 64) - 1)),
        length=len(data) if cls is Request and command == Command.WRITE
        else draw(st.integers(0, (1 << 32) - 1)),
        data=data,
    )
    if cls is Request:
        fields["flags"] = draw(st.sampled_from([Flag.NONE, Flag.FUA, 0, 1]))
    else:
        fields["status"] = draw(st.sampled_from([0, errno.EIO]))
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        fields[name] = draw(ODD[name])
    return fields


@PROPERTY
@given(fields=event_fields(Request))
def test_request_fast_test_agrees_with_the_field_by_field_checks(fields):
    assert outcome(lambda: Request(**fields)) == outcome(
        lambda: checked_field_by_field(Request, **fields)
    )


@PROPERTY
@given(fields=event_fields(Reply))
def test_reply_fast_test_agrees_with_the_field_by_field_checks(fields):
    assert outcome(lambda: Reply(**fields)) == outcome(
        lambda: checked_field_by_field(Reply, **fields)
    )


ODD_VALUES = dict(
    command=[Command.HELLO, Command.READ, Command.WRITE, 1, 15, 16, 17, 23, -1, True, 17.0, 1.5,
             "READ", None, (16,)],
    handle=[0, (1 << 64) - 1, 1 << 64, -1, True, 2.5, None],
    offset=[0, (1 << 64) - 1, 1 << 64, -1, True, 2.5, None],
    length=[0, 3, (1 << 32) - 1, 1 << 32, -1, True, 3.0, None],
    status=[0, (1 << 32) - 1, 1 << 32, -1, True, 3.0, None],
    flags=[Flag.NONE, Flag.FUA, Flag.REPLY, Flag.FUA | Flag.REPLY, 0, 1, 2, 0x8000, -1, True,
           1.0, None],
    data=[b"", b"abc", bytearray(b"abc"), memoryview(b"abc"), memoryview(b"abcdef")[::2],
          memoryview(b"abcdef").cast("H"), "abc", None],
)
BASES = [
    (Request, dict(command=Command.WRITE, handle=1, offset=2, length=3, flags=Flag.FUA,
                   data=b"abc")),
    (Request, dict(command=Command.READ, handle=1, offset=2, length=3, flags=Flag.NONE,
                   data=b"")),
    (Reply, dict(command=Command.READ, handle=1, status=0, offset=2, length=3, data=b"abc")),
    (Reply, dict(command=Command.WRITE, handle=1, status=5, offset=2, length=3, data=b"")),
]


@pytest.mark.parametrize(
    "cls, fields",
    [
        (cls, dict(base, **{name: value}))
        for cls, base in BASES
        for name, values in ODD_VALUES.items() if name in base
        for value in values
    ],
)
def test_each_odd_field_gives_what_the_field_by_field_checks_give(cls, fields):
    assert outcome(lambda: cls(**fields)) == outcome(
        lambda: checked_field_by_field(cls, **fields)
    )


def test_usual_events_skip_the_field_by_field_checks(monkeypatch):
    def unexpected(self):
        raise AssertionError("field-by-field checks ran")

    monkeypatch.setattr(Request, "_check_fields", unexpected)
    monkeypatch.setattr(Reply, "_check_fields", unexpected)
    Request(Command.WRITE, 1, 4096, 3, Flag.FUA, b"abc")
    Request(Command.READ, 2, 0, 4096)
    Request(Command.PING, (1 << 64) - 1)
    # plain byte views: a mirror's view of a FUSE write, a piece of a split one
    Request(Command.WRITE, 3, 0, 3, Flag.NONE, memoryview(b"abc"))
    Request(Command.WRITE, 4, 0, 2, Flag.NONE, memoryview(b"abcd")[1:3])
    Reply(Command.READ, 1, 0, 0, 3, b"abc")
    Reply(Command.READ, 2, 0, 0, 3, memoryview(b"abc"))
    Reply(Command.WRITE, 2, errno.EIO, 0, 4096)
    # Anything unusual takes the checks that normalise it or say what is wrong.
    for unusual in (
        lambda: Request(17, 1, 0, 3, Flag.NONE, bytearray(b"abc")),
        lambda: Request(Command.READ, -1),
        lambda: Request(Command.HELLO, 1),
        lambda: Request(Command.WRITE, 1, 0, 3, Flag.NONE, memoryview(b"abcdef")[::2]),
        lambda: Request(Command.WRITE, 1, 0, 4, Flag.NONE, memoryview(b"abcd").cast("H")),
        lambda: Reply(Command.READ, 1, 0, 0, 3, memoryview(b"abcdef")[::2]),
        lambda: Reply(Command.READ, 1, -1),
    ):
        with pytest.raises(AssertionError, match="field-by-field"):
            unusual()


def test_hand_built_events_stay_frozen_dataclasses():
    request = Request(Command.WRITE, 1, 0, 3, data=b"abc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.handle = 2  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(Request)] == [
        "command", "handle", "offset", "length", "flags", "data"
    ]
    assert [f.name for f in dataclasses.fields(Reply)] == [
        "command", "handle", "status", "offset", "length", "data"
    ]
    assert dataclasses.replace(request, handle=2) == Request(Command.WRITE, 2, 0, 3, data=b"abc")
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(request, length=4)
    assert Request(command=Command.READ, handle=1, length=5) == Request(Command.READ, 1, 0, 5)
    assert Reply(Command.READ, 1) == Reply(Command.READ, 1, 0, 0, 0, b"")
    assert "data" not in repr(request) and "WRITE" in repr(request)
    assert Request(18, 1).command is Command.FLUSH and Request(18, 1, flags=1).flags is Flag.FUA


# ----------------------------------------------------------------------
# parsed events are indistinguishable from hand-built ones

REQUESTS = [
    Request(command, 7, 1 << 40, 3 if command is Command.WRITE else 4096, flags,
            b"abc" if command is Command.WRITE else b"")
    for command in Command if command >= Command.READ
    for flags in (Flag.NONE, Flag.FUA)
]
REPLIES = [
    Reply(command, (1 << 64) - 1, status, 512, 4096, data)
    for command in Command if command >= Command.READ
    for status, data in ((0, b""), (0, b"xyz"), (errno.EIO, b""))
]


@pytest.mark.parametrize("mode", MODES)
def test_parsed_events_equal_hand_built_ones(mode):
    client, server = open_pair(mode)
    for sent in REQUESTS:
        server.receive_data(client.send(sent))
        received = server.next_event()
        assert outcome(lambda: received) == outcome(lambda: sent)  # noqa: B023
        assert type(received.command) is Command and type(received.flags) is Flag
        assert type(received.data) is bytes
    for sent in REPLIES:
        client.receive_data(server.send(sent))
        received = client.next_event()
        assert outcome(lambda: received) == outcome(lambda: sent)  # noqa: B023
        assert type(received.command) is Command and type(received.data) is bytes
    with pytest.raises(dataclasses.FrozenInstanceError):
        received.status = 1  # type: ignore[misc]


# ----------------------------------------------------------------------
# receiving: chunks kept, frames read in place, straddling frames joined


def test_a_bytes_chunk_is_kept_and_dropped_after_its_last_frame():
    client, server = open_pair()
    chunk = b"".join(client.send(Request(Command.WRITE, h, 0, 3, data=b"abc")) for h in range(3))
    server.receive_data(chunk)
    assert server._buffer is chunk  # not copied
    assert [e.handle for e in drain(server)] == [0, 1, 2]
    assert server._buffer == b"" and server.buffered == 0


@pytest.mark.parametrize("kind", [bytearray, memoryview])
@pytest.mark.parametrize("pending", [0, 10])  # nothing pending, or part of a frame
@pytest.mark.parametrize("size", [3, 2 * _SMALL_CHUNK])  # merged small chunk, or queued one
def test_other_buffers_are_copied_so_the_caller_may_reuse_them(kind, pending, size):
    client, server = open_pair(max_payload=1 << 16)
    data = bytes(range(256)) * (size // 256) + b"abc"[: size % 256]
    frame = client.send(Request(Command.WRITE, 1, 0, len(data), data=data))
    if pending:
        server.receive_data(frame[:pending])
    rest = bytearray(frame[pending:])
    server.receive_data(kind(rest))
    rest[:] = bytes(len(rest))  # the caller reuses its buffer
    [request] = drain(server)
    assert request.data == data


def test_a_header_split_across_chunks_is_checked_as_soon_as_it_is_complete():
    client, server = open_pair(max_payload=100)
    header = HEADER.pack(MAGIC, VERSION, Command.WRITE, 0, 1, 0, 101, 0, 101, 0)
    for i in range(HEADER_SIZE - 1):
        server.receive_data(header[i : i + 1])
        assert server.next_event() is NEED_DATA
    server.receive_data(header[-1:])
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        server.next_event()
    assert server.buffered == HEADER_SIZE and server.state is State.ERROR


def test_end_of_stream_with_a_frame_pending_in_queued_chunks_is_an_error():
    client, server = open_pair(max_payload=1 << 16)
    size = 3 * _SMALL_CHUNK
    frame = client.send(Request(Command.WRITE, 1, 0, size, data=bytes(size)))
    cut = 2 * _SMALL_CHUNK
    for part in (frame[:5], frame[5:50], frame[50:cut], frame[cut:-1]):
        server.receive_data(part)
        assert server.next_event() is NEED_DATA
    assert server.buffered == len(frame) - 1
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


def queue_is_compact(conn: Connection) -> bool:
    """Small chunks are merged: the queue has no more entries than its
    bytes allow (each entry of bytes is a large chunk, no two merged
    bytearrays are adjacent)."""
    entries = list(conn._queue)
    large = [e for e in entries if type(e) is bytes]
    merged = [e for e in entries if type(e) is bytearray]
    pairs = zip(entries, entries[1:], strict=False)
    adjacent = any(type(a) is type(b) is bytearray for a, b in pairs)
    return (
        all(len(e) >= _SMALL_CHUNK for e in large)
        and len(merged) <= len(large) + 1
        and not adjacent
        and sum(map(len, entries)) == conn._queued
    )


def deliver(conn: Connection, stream: bytes, sizes: list[int], bound: int) -> list:
    events, pos, i = [], 0, 0
    while pos < len(stream):
        size = sizes[i % len(sizes)]
        conn.receive_data(stream[pos : pos + size])
        pos, i = pos + size, i + 1
        assert queue_is_compact(conn)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        assert conn.buffered <= bound
        assert type(conn._buffer) is bytes
    return events


LARGE_LIMIT = 3 * _SMALL_CHUNK
SIZES = st.lists(st.integers(1, 40) | st.integers(1, 2 * LARGE_LIMIT), min_size=1, max_size=6)
PAYLOADS = st.integers(0, LARGE_LIMIT).map(lambda n: bytes(range(256)) * (n // 256 + 1))


@settings(PROPERTY, max_examples=150)
@given(mode=st.sampled_from(MODES),
       writes=st.lists(st.tuples(st.integers(0, LARGE_LIMIT), st.booleans()), max_size=6),
       sizes=SIZES)
def test_frames_round_trip_however_large_chunks_and_small_ones_mix(mode, writes, sizes):
    ready = Ready(size=1 << 40, permissions=Permission.READ | Permission.WRITE,
                  max_request=LARGE_LIMIT)
    client, server = open_pair(mode, ready=ready, max_payload=LARGE_LIMIT)
    pattern = bytes(range(256)) * (LARGE_LIMIT // 256 + 1)
    requests = [
        Request(Command.WRITE, h, h, n, Flag.FUA if fua else Flag.NONE, pattern[h : h + n])
        for h, (n, fua) in enumerate(writes)
    ]
    replies = [Reply(Command.READ, r.handle, 0, 0, r.length, r.data) for r in requests]
    bound = HEADER_SIZE + LARGE_LIMIT + TAG_SIZE - 1
    stream = b"".join(client.send(r) for r in requests)
    assert deliver(server, stream, sizes, bound) == requests
    stream = b"".join(server.send(r) for r in replies)
    assert deliver(client, stream, sizes, bound) == replies
    assert server.buffered == client.buffered == 0 and not server._queue
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


# ----------------------------------------------------------------------
# sealers

KEY = bytes(range(32))


def sealer_pair(mode: str) -> tuple[Sealer, Sealer]:
    key = None if mode == "xxh3-128" else KEY
    return session_sealer(mode, key), session_sealer(mode, key)


def frame_header(payload_len: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, Command.WRITE, 0, 1, 0, payload_len, 0, payload_len, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("payload", [b"", b"abc", bytearray(b"x" * 5000), memoryview(b"yz")])
def test_a_whole_frame_is_the_header_and_what_seal_returns(mode, payload):
    sender, twin = sealer_pair(mode)
    header = frame_header(len(payload))
    for _ in range(3):  # and the sequence numbers advance alike
        assert sender.frame(header, payload) == header + twin.seal(header, payload)
    assert sender.sequence == twin.sequence == 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("changed", ["header", "body", "tag"])
def test_open_returns_the_payload_and_rejects_any_change(mode, changed):
    sender, receiver = sealer_pair(mode)
    payload = b"payload bytes"
    header = frame_header(len(payload))
    frame = sender.frame(header, payload)
    parts = frame[:HEADER_SIZE], frame[HEADER_SIZE:-TAG_SIZE], frame[-TAG_SIZE:]
    opened = receiver.open(*parts)
    assert opened == payload
    if mode in ("xxh3-128", "blake2b-mac"):
        assert opened is parts[1]  # the body is the payload: not copied again
    frame = sender.frame(header, payload)
    pieces = [frame[:HEADER_SIZE], frame[HEADER_SIZE:-TAG_SIZE], frame[-TAG_SIZE:]]
    at = ["header", "body", "tag"].index(changed)
    pieces[at] = bytes([pieces[at][0] ^ 1]) + pieces[at][1:]
    with pytest.raises(IntegrityError):
        receiver.open(*pieces)
    assert receiver.sequence == sender.sequence == 2  # a failed frame uses its number
    with pytest.raises(IntegrityError):  # and a replay of the good one fails
        receiver.open(*parts)


@pytest.mark.parametrize(
    "sealer",
    [Xxh3Sealer(), Blake2bMacSealer(KEY), AeadSealer("aes-256-gcm", KEY)],
    ids=lambda s: s.mode,
)
def test_sequence_numbers_run_out_in_every_method(sealer):
    header = frame_header(0)
    last = (1 << 64) - 2
    for call in (lambda: sealer.frame(header, b""), lambda: sealer.seal(header, b"")):
        sealer._seq = last
        call()  # the last number is still usable
        with pytest.raises(LocalProtocolError, match="exhausted"):
            call()
        assert sealer.sequence == last + 1
    twin = type(sealer)(*(() if isinstance(sealer, Xxh3Sealer) else
                          (("aes-256-gcm", KEY) if isinstance(sealer, AeadSealer) else (KEY,))))
    twin._seq = last
    frame = twin.frame(header, b"")
    sealer._seq = last
    assert sealer.open(frame[:HEADER_SIZE], frame[HEADER_SIZE:-TAG_SIZE], frame[-TAG_SIZE:]) == b""
    with pytest.raises(LocalProtocolError, match="exhausted"):
        sealer.open(frame[:HEADER_SIZE], frame[HEADER_SIZE:-TAG_SIZE], frame[-TAG_SIZE:])


# ----------------------------------------------------------------------
# send: the header comes straight from the checked event


@pytest.mark.parametrize("mode", MODES)
def test_send_packs_the_header_from_the_event(mode):
    client, server = open_pair(mode)
    for sender, event, header, payload in (
        (client, Request(Command.WRITE, 9, 512, 3, Flag.FUA, bytearray(b"abc")),
         (Command.WRITE, 1, 9, 512, 3, 0), b"abc"),
        (client, Request(Command.READ, 10, 1 << 40, 4096), (Command.READ, 0, 10, 1 << 40, 4096, 0),
         b""),
        (server, Reply(Command.READ, 9, errno.EIO, 512, 3), (Command.READ, 0x8000, 9, 512, 3,
                                                              errno.EIO), b""),
        (server, Reply(Command.READ, 10, 0, 0, 2, memoryview(b"ok")),
         (Command.READ, 0x8000, 10, 0, 2, 0), b"ok"),
    ):
        frame = sender.send(event)
        assert frame[:HEADER_SIZE] == HEADER.pack(MAGIC, VERSION, *header, len(payload), 0)
        assert len(frame) == HEADER_SIZE + len(payload) + TAG_SIZE
        receiver = server if sender is client else client
        receiver.receive_data(frame)
        assert receiver.next_event() == event


def test_a_forged_frame_and_a_sent_frame_are_read_alike():
    client, server = open_pair()
    sent = client.send(Request(Command.WRITE, 3, 8, 2, Flag.FUA, b"hi"))
    forged = forge_frame(client, Command.WRITE, flags=1, handle=4, offset=8, length=2,
                         payload=b"hi")
    server.receive_data(sent + forged)
    assert drain(server) == [Request(Command.WRITE, 3, 8, 2, Flag.FUA, b"hi"),
                             Request(Command.WRITE, 4, 8, 2, Flag.FUA, b"hi")]


def test_a_released_view_gives_the_field_by_field_error():
    """With another field bad too, the field's error comes first, as the
    field-by-field checks give it; alone, the view's own error."""
    released = memoryview(b"abc")
    released.release()
    for fields in (
        dict(command=Command.WRITE, handle=-1, offset=0, length=3, flags=Flag.NONE),
        dict(command=Command.WRITE, handle=1, offset=0, length=3, flags=Flag.NONE),
    ):
        assert outcome(lambda f=fields: Request(**f, data=released)) == outcome(
            lambda f=fields: checked_field_by_field(Request, **f, data=released)
        )

"""Property tests of the protocol with hypothesis.

(a) Whatever bytes arrive, in whatever state, a Connection raises nothing
    but RemoteProtocolError or HandshakeFailed, and never holds more than
    one frame's worth of bytes without raising.
(b) A valid conversation with bit flips, cuts, splices, duplicated or
    swapped frames yields a prefix of the original events, then an error:
    never an event the sender did not send.
(c) Any valid sequence of requests and replies round-trips exactly, in
    every mode, however the stream is chunked.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dstfuse.protocol import (
    NEED_DATA,
    Challenged,
    Command,
    Confirmed,
    Connection,
    ConnectionClosed,
    Flag,
    HandshakeFailed,
    HelloReceived,
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
    MAX_HANDSHAKE_PAYLOAD,
    TAG_SIZE,
    Attr,
)
from dstfuse.protocol.testing import CLIENT_ID, forge_frame, handshake, make_pair

MODES = ["xxh3-128", "aes-256-gcm", "chacha20-poly1305", "blake2b-mac"]
MAX_PAYLOAD = 512
READY = Ready(size=1 << 20, permissions=Permission.READ | Permission.WRITE,
              max_request=MAX_PAYLOAD)
#: The most a connection may hold after returning NEED_DATA.
BUFFER_BOUND = HEADER_SIZE + max(MAX_PAYLOAD, MAX_HANDSHAKE_PAYLOAD) + TAG_SIZE - 1
ALLOWED = (RemoteProtocolError, HandshakeFailed)

FUZZ = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------
# receivers in various states


def receiver_in(state: str, role: Role, mode: str = "xxh3-128") -> tuple[Connection, Connection]:
    """(receiver, its peer) with the receiver in `state`."""
    client, server = make_pair(mode, max_payload=MAX_PAYLOAD)
    receiver, peer = (server, client) if role is Role.SERVER else (client, server)
    if state == "idle":
        if role is Role.CLIENT:
            client.hello(export=None, client_id=CLIENT_ID, client_name="c")
        return receiver, peer
    server.receive_data(client.hello(export=None, client_id=CLIENT_ID, client_name="c"))
    server.next_event()
    client.receive_data(server.challenge(node_name="n"))
    client.next_event()
    if state == "challenged":  # server waits for CONFIRM, client has not confirmed
        return receiver, peer
    server.receive_data(client.confirm())
    server.next_event()
    if state == "confirmed":  # client waits for READY, server has not sent it
        return receiver, peer
    client.receive_data(server.ready(READY))
    client.next_event()
    assert state == "open"
    return receiver, peer


def react(conn: Connection, event: object) -> None:
    """What an application does with a handshake event (output discarded)."""
    if isinstance(event, HelloReceived):
        conn.challenge(node_name="node")  # as `handshake` does: same transcript
    elif isinstance(event, Challenged):
        conn.confirm()
    elif isinstance(event, Confirmed):
        conn.ready(READY)


def pump(conn: Connection, chunks: list[bytes], *, eof: bool = True) -> list[object]:
    """Feed chunks, draining after each, reacting like an application; stop
    at the first (allowed) error. Checks the buffering bound throughout."""
    events: list[object] = []
    try:
        for chunk in chunks + ([b""] if eof else []):
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    assert conn.buffered <= BUFFER_BOUND
                    break
                assert isinstance(event, (HelloReceived, Challenged, Confirmed, Ready, Refused,
                                          Request, Reply, ConnectionClosed))
                events.append(event)
                note(f"event {type(event).__name__}")
                if isinstance(event, (ConnectionClosed, Refused)) and conn.state is State.CLOSED:
                    if isinstance(event, ConnectionClosed):
                        return events
                react(conn, event)
    except ALLOWED as exc:
        assert conn.state is State.ERROR
        note(f"{type(exc).__name__}: {str(exc).split(':')[0][:40]}")
    return events


def note(label: str) -> None:
    """Label the example for --hypothesis-show-statistics (what was reached)."""
    event(label)


STATES = st.sampled_from(["idle", "challenged", "confirmed", "open"])
ROLES = st.sampled_from([Role.SERVER, Role.CLIENT])

MAGIC_HEADERS = st.builds(
    lambda command, flags, handle, length, status, payload_len, reserved: HEADER.pack(
        b"DSTF", 1, command, flags, handle, 0, length, status, payload_len, reserved
    ),
    st.sampled_from(list(Command)) | st.integers(0, 255),
    st.sampled_from([0, 1, 0x8000, 0x8001]) | st.integers(0, 0xFFFF),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 64) | st.integers(0, (1 << 32) - 1),
    st.just(0) | st.integers(0, (1 << 32) - 1),
    st.integers(0, 80) | st.integers(0, (1 << 32) - 1),
    st.just(0) | st.integers(1, (1 << 32) - 1),
)
#: Chunks of noise, some shaped like headers so parsing gets past the magic.
NOISE = st.lists(st.binary(max_size=200) | MAGIC_HEADERS, max_size=12)


#: Follows the noise when drawn: more bytes than any one frame may hold, so
#: a connection that waits for an impossible frame breaks the bound.
FILLER = st.sampled_from([b"", bytes(BUFFER_BOUND + 1), b"\xff" * (BUFFER_BOUND + 1)])


@FUZZ
@given(state=STATES, role=ROLES, chunks=NOISE, filler=FILLER)
def test_random_bytes_only_raise_protocol_errors(state, role, chunks, filler):
    receiver, _ = receiver_in(state, role)
    pump(receiver, chunks + [filler])


# Frames that pass the integrity check but carry arbitrary fields and
# payloads: they reach the dispatch logic. Handshake frames start from a
# valid attribute set and get attributes dropped, replaced or added, so the
# fuzzing reaches every attribute check, key derivation and proof.
_BASES = {
    Command.HELLO: {Attr.VERSIONS: b"\x01", Attr.CLIENT_ID: bytes(16), Attr.CLIENT_NAME: b"c",
                    Attr.CIPHERS: b"xxh3-128", Attr.NONCE: bytes(32), Attr.EXPORT: b"e"},
    Command.CHALLENGE: {Attr.VERSION: b"\x01", Attr.CIPHER: b"xxh3-128", Attr.NONCE: bytes(32),
                        Attr.NODE_NAME: b"n"},
    Command.CONFIRM: {Attr.PROOF: bytes(32)},
    Command.READY: {Attr.SIZE: bytes(8), Attr.PERMISSIONS: b"\x03",
                    Attr.BLOCK_SIZE: attrs.u32(4096), Attr.MAX_REQUEST: attrs.u32(512),
                    Attr.FEATURES: attrs.u32(31), Attr.EXPORT: b"e"},
    Command.REFUSED: {Attr.MESSAGE: b"no"},
}
_VALUES = st.sampled_from([
    b"", b"\x00", b"\x01", b"\x02", b"\xff", b"xxh3-128", b"aes-256-gcm", b"blake2b-mac",
    b"chacha20-poly1305,xxh3-128", b",", b"\xc3", bytes(16), bytes(32), bytes(33),
    attrs.u32(0), attrs.u32(1 << 31), attrs.u64((1 << 64) - 1), b"\x01\x02",
]) | st.binary(max_size=40)
_KINDS = st.sampled_from(list(Attr)) | st.integers(0, 0xFFFF)
_EDITS = st.lists(st.tuples(_KINDS, st.none() | _VALUES), max_size=4)


def _handshake_payload(command: Command, edits: list, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    items = dict(_BASES[command])
    for kind, value in edits:
        if value is None:
            items.pop(kind, None)
        else:
            items[kind] = value
    return attrs.encode(items.items())


HANDSHAKE_FRAMES = st.builds(
    lambda command, edits, raw, status: dict(
        command=command, status=status if command is Command.REFUSED else 0,
        payload=_handshake_payload(command, edits, raw),
    ),
    st.sampled_from(list(_BASES)),
    _EDITS,
    st.none() | st.binary(max_size=40),
    st.integers(0, (1 << 32) - 1),
)


@st.composite
def io_frames(draw):
    payload = draw(st.binary(max_size=64))
    return dict(
        command=draw(st.sampled_from(list(Command)) | st.integers(0, 255)),
        flags=draw(st.sampled_from([0, int(Flag.FUA), int(Flag.REPLY), 0x8001])),
        handle=draw(st.integers(0, (1 << 64) - 1)),
        offset=draw(st.integers(0, (1 << 64) - 1)),
        length=draw(st.just(len(payload)) | st.integers(0, (1 << 32) - 1)),
        status=draw(st.just(0) | st.integers(0, (1 << 32) - 1)),
        payload=payload,
    )


FRAME_FIELDS = HANDSHAKE_FRAMES | io_frames()


@FUZZ
@given(state=STATES, role=ROLES, mode=st.sampled_from(MODES),
       frames=st.lists(FRAME_FIELDS, min_size=1, max_size=6), cut=st.integers(1, 7))
def test_sealed_frames_with_arbitrary_fields_only_raise_protocol_errors(
    state, role, mode, frames, cut
):
    receiver, peer = receiver_in(state, role, mode)
    # Seal as the peer's current direction would, so the check passes.
    stream = b"".join(forge_frame(peer, **fields) for fields in frames)
    pump(receiver, [stream[i : i + len(stream) // cut + 1]
                    for i in range(0, len(stream), len(stream) // cut + 1)])


#: Which side expects each handshake message, and in which state.
_EXPECTING = {
    Command.HELLO: (Role.SERVER, "idle"),
    Command.CHALLENGE: (Role.CLIENT, "idle"),
    Command.CONFIRM: (Role.SERVER, "challenged"),
    Command.READY: (Role.CLIENT, "confirmed"),
    Command.REFUSED: (Role.CLIENT, "confirmed"),
}


@FUZZ
@given(mode=st.sampled_from(MODES), command=st.sampled_from(list(_BASES)),
       edits=st.lists(st.tuples(_KINDS, st.none() | _VALUES), min_size=1, max_size=4))
def test_handshake_messages_with_edited_attributes_only_raise_protocol_errors(
    mode, command, edits
):
    role, state = _EXPECTING[command]
    receiver, peer = receiver_in(state, role, mode)
    pump(receiver, [forge_frame(peer, command, payload=_handshake_payload(command, edits, None))])


# ----------------------------------------------------------------------
# (b) mutated conversations

CLIENT_NONCE, SERVER_NONCE = bytes(range(32)), bytes(range(32, 64))


def conversation(mode: str, n: int) -> tuple[list[bytes], list[bytes], list, list]:
    """Frames and events of a reproducible conversation with n requests:
    (client frames, server frames, events the server saw, events the client saw)."""
    client, server = make_pair(mode, max_payload=MAX_PAYLOAD, client_nonce=CLIENT_NONCE,
                               server_nonce=SERVER_NONCE)
    client_frames, server_frames = handshake(client, server, ready=READY)
    server_events: list = [
        HelloReceived(None, CLIENT_ID, "client", (1,), (mode,)), Confirmed()
    ]
    client_events: list = [Challenged(1, mode, "node"), READY]
    for handle in range(n):
        data = bytes([handle]) * 8
        request = Request(Command.WRITE, handle, handle * 8, 8, Flag(handle % 2), data)
        reply = Reply(Command.WRITE, handle, handle % 5, handle * 8, 8)
        client_frames.append(client.send(request))
        server_frames.append(server.send(reply))
        server_events.append(request)
        client_events.append(reply)
    return client_frames, server_frames, server_events, client_events


def fresh_receiver(mode: str, role: Role) -> Connection:
    client, server = make_pair(mode, max_payload=MAX_PAYLOAD, client_nonce=CLIENT_NONCE,
                               server_nonce=SERVER_NONCE)
    if role is Role.CLIENT:
        client.hello(export=None, client_id=CLIENT_ID, client_name="client")
        return client
    return server


MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 20)),
        st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 80)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=20)),
        st.tuples(st.just("duplicate"), st.integers(0, 20)),
        st.tuples(st.just("swap"), st.integers(0, 20)),
        st.tuples(st.just("drop"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=3,
)


def mutate(frames: list[bytes], mutations: list[tuple]) -> bytes:
    frames = list(frames)
    stream = None
    for op, *args in mutations:
        if op in ("duplicate", "swap", "drop") and stream is None:
            if not frames:
                continue
            i = args[0] % len(frames)
            if op == "duplicate":
                frames.insert(i, frames[i])
            elif op == "swap" and len(frames) > 1:
                j = (i + 1) % len(frames)
                frames[i], frames[j] = frames[j], frames[i]
            elif op == "drop":
                del frames[i]
            continue
        if stream is None:
            stream = bytearray(b"".join(frames))
        if not stream:
            break
        at = args[0] % len(stream)
        if op == "flip":
            stream[at] ^= 1 << (args[0] % 8)
        elif op == "cut":
            del stream[at:]
        elif op == "delete":
            del stream[at : at + args[1]]
        elif op == "insert":
            stream[at:at] = args[1]
    return bytes(stream) if stream is not None else b"".join(frames)


@FUZZ
@given(mode=st.sampled_from(MODES), role=ROLES, n=st.integers(0, 4), mutations=MUTATIONS,
       chunk=st.integers(1, 300))
def test_mutated_conversations_yield_only_a_prefix_of_the_real_events(
    mode, role, n, mutations, chunk
):
    client_frames, server_frames, server_events, client_events = conversation(mode, n)
    frames, expected = (
        (client_frames, server_events) if role is Role.SERVER else (server_frames, client_events)
    )
    stream = mutate(frames, mutations)
    receiver = fresh_receiver(mode, role)
    events = pump(receiver, [stream[i : i + chunk] for i in range(0, len(stream), chunk)])
    if events and isinstance(events[-1], ConnectionClosed):
        events.pop()
    assert events == expected[: len(events)]
    if stream == b"".join(frames):
        assert events == expected  # the mutations cancelled out


# ----------------------------------------------------------------------
# (c) valid sequences round-trip

HANDLES = st.integers(0, (1 << 64) - 1)
OFFSETS = st.integers(0, (1 << 64) - 1)
LENGTHS = st.integers(0, (1 << 32) - 1)
NO_DATA_COMMANDS = [c for c in Command if c >= Command.READ and c is not Command.WRITE]

REQUESTS = st.one_of(
    st.builds(
        lambda handle, offset, fua, data: Request(
            Command.WRITE, handle, offset, len(data), Flag.FUA if fua else Flag.NONE, data
        ),
        HANDLES, OFFSETS, st.booleans(), st.binary(max_size=MAX_PAYLOAD),
    ),
    st.builds(
        lambda command, handle, offset, length, fua: Request(
            command, handle, offset, length, Flag.FUA if fua else Flag.NONE
        ),
        st.sampled_from(NO_DATA_COMMANDS), HANDLES, OFFSETS, LENGTHS, st.booleans(),
    ),
)
REPLIES = st.builds(
    Reply,
    st.sampled_from([c for c in Command if c >= Command.READ]),
    HANDLES,
    st.integers(0, (1 << 32) - 1),
    OFFSETS,
    LENGTHS,
    st.binary(max_size=MAX_PAYLOAD),
)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos, i = pos + size, i + 1
    return chunks


@settings(FUZZ, max_examples=300)
@given(mode=st.sampled_from(MODES), requests=st.lists(REQUESTS, max_size=8),
       replies=st.lists(REPLIES, max_size=8),
       sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5))
def test_valid_sequences_round_trip_exactly(mode, requests, replies, sizes):
    client, server = make_pair(mode, max_payload=MAX_PAYLOAD)
    handshake(client, server, ready=READY)
    to_server = b"".join(client.send(r) for r in requests)
    to_client = b"".join(server.send(r) for r in replies)
    assert pump(server, chunked(to_server, sizes), eof=False) == requests
    assert pump(client, chunked(to_client, sizes), eof=False) == replies
    assert server.buffered == client.buffered == 0
    assert server.state is client.state is State.OPEN


def test_headers_are_what_the_fuzzers_think_they_are():
    # The strategies above build headers by hand; keep them honest.
    assert HEADER.size == HEADER_SIZE == 40
    assert struct.calcsize(">4sBBHQQIIII") == 40

"""The sans-IO protocol connection: bytes in, events out; events in, bytes out.

One `Connection` is one side (client or server) of one transport stream. It
frames, seals and checks every frame, runs the handshake state machine, and
never touches a socket, a clock or a thread.

Handshake (see docs/protocol.md):

    client                                server
    HELLO  (versions, modes, nonce) --->
                                    <---  CHALLENGE (version, mode, nonce, proof)
    CONFIRM (proof)                 --->
                                    <---  READY (size, permissions, limits)   | REFUSED

HELLO, CHALLENGE and CONFIRM are sealed with the unkeyed checksum; every
later frame of a direction with the negotiated session sealer. Either side
may send REFUSED instead of its next handshake frame.

Receiving: `receive_data` keeps the chunks it is given (bytes are not
copied) and `next_event` cuts each frame's header, body and tag straight
out of the chunk it lies in; only a frame that straddles chunks is joined
from its pieces, once (small chunks are merged as they arrive, so a
trickling peer cannot make the queue of chunks cost more than the bytes
it holds). A chunk is dropped as soon as its last frame is returned.
A frame with a large part still missing can instead be read straight into
the one buffer it will be returned from (`receive_buffer`, sized from its
header, then `received_into`): the part already received is copied there
once, the rest arrives in place, and the payload is a view of that buffer.
Frames of the open state (requests, replies) take a fast path: one header
unpack, commands and flags looked up in tables instead of enum calls, and
events built without re-running the checks their constructors do for
hand-built events, because the parser checked the same things.

Invariants:
- a frame's payload length is checked against the limit for the current
  state as soon as its header is complete, before any of its payload is
  buffered for it; after `next_event` returned NEED_DATA, `buffered` is at
  most HEADER_SIZE + limit + TAG_SIZE - 1 (the memory held is at most
  that plus the already returned part of the chunk being read);
- an event built by the fast path is equal to the one its constructor
  would build from the same fields, and passes the constructor's checks;
- no event is returned from a frame that failed its check, and the fields
  of every returned event are exactly those the peer sealed;
- once `next_event` raised RemoteProtocolError or HandshakeFailed (or
  `challenge` raised HandshakeFailed), the connection is in ERROR and every
  later call raises LocalProtocolError, except `refuse` during the
  handshake; the caller must drop the transport;
- requests and replies are only accepted in state OPEN, requests only by a
  server and replies only by a client.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections import deque
from dataclasses import replace
from typing import Any, NamedTuple, NoReturn

from . import attributes as attrs
from .constants import (
    ALL_FEATURES,
    ALL_HELLO_FLAGS,
    ALL_PERMISSIONS,
    CLIENT_ID_SIZE,
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    KEYED_MODES,
    KNOWN_FLAGS,
    MAGIC,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    MAX_PAYLOAD_LIMIT,
    NONCE_SIZE,
    PROOF_SIZE,
    REQUEST_COMMANDS,
    SUPPORTED_VERSIONS,
    TAG_SIZE,
    UNKEYED_MODES,
    VERSION,
    Attr,
    Command,
    Feature,
    Flag,
    HelloFlag,
    Permission,
)
from .errors import HandshakeFailed, LocalProtocolError, RemoteProtocolError
from .events import (
    Challenged,
    Confirmed,
    ConnectionClosed,
    Event,
    HelloReceived,
    Ready,
    Refused,
    Reply,
    Request,
    parsed_reply,
    parsed_request,
)
from .handshake import (
    SessionKeys,
    allowed_modes,
    choose_mode,
    choose_version,
    derive_keys,
    proof,
    transcript_hash,
)
from .instance import NodeInstance
from .need_data import NEED_DATA, NeedData
from .sealing import Buffer, Sealer, Xxh3Sealer, session_sealer


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    IDLE = "idle"
    HELLO_SENT = "hello-sent"  # client
    HELLO_RECEIVED = "hello-received"  # server, the application decides
    CHALLENGE_SENT = "challenge-sent"  # server
    CHALLENGED = "challenged"  # client, must confirm
    CONFIRM_SENT = "confirm-sent"  # client
    CONFIRMED = "confirmed"  # server, must send READY
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class _Header(NamedTuple):
    magic: bytes
    version: int
    command: int
    flags: int
    handle: int
    offset: int
    length: int
    status: int
    payload_len: int
    reserved: int


_PROOF_TLV_SIZE = attrs.TLV_HEADER_SIZE + PROOF_SIZE
_KNOWN_MODES = frozenset(KEYED_MODES + UNKEYED_MODES)

# Hot-path constants: enum member and attribute lookups cost as much as a
# call in Python 3.11, and Command(...) / Flag(...) several times more.
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_OPEN = State.OPEN
_ERROR = State.ERROR
_CLIENT = Role.CLIENT
_SERVER = Role.SERVER
_WRITE = Command.WRITE
_FRAME_SIZE = HEADER_SIZE + TAG_SIZE
#: Received chunks shorter than this are merged while a frame is pending.
_SMALL_CHUNK = 4096
#: A frame missing at least this many bytes gets a buffer of its own to be
#: read into (`receive_buffer`); below, the copy saved is worth less than
#: the extra read it takes.
ASSEMBLE_MIN = 64 << 10
_REPLY = int(Flag.REPLY)
_FUA = int(Flag.FUA)
_UNKNOWN_FLAGS = 0xFFFF & ~int(KNOWN_FLAGS)
#: Every command by its wire value (the header's u8), None where unknown.
_COMMAND_BY_VALUE = {int(command): command for command in Command}
_COMMAND_AT: tuple[Command | None, ...] = tuple(_COMMAND_BY_VALUE.get(v) for v in range(256))
#: Request commands by wire value, None for handshake and unknown values.
_REQUEST_AT: tuple[Command | None, ...] = tuple(
    c if c in REQUEST_COMMANDS else None for c in _COMMAND_AT
)
#: A request's Flag by its (already checked) wire value: 0 or FUA.
_REQUEST_FLAG_AT = (Flag.NONE, Flag.FUA)
assert _FUA == 1 and _UNKNOWN_FLAGS == 0xFFFF & ~(_FUA | _REPLY)


class Connection:
    """One side of a dstfuse protocol stream.

    `key` is the pre-shared key (None: unkeyed checksums only); `modes` the
    modes a client offers (preferred first). A server accepts the keyed
    modes with a key and the unkeyed ones without, narrowed to `modes` when
    given (a node restricted to some ciphers). `max_payload`
    bounds the payload of every frame received after the handshake;
    handshake frames are bounded by MAX_HANDSHAKE_PAYLOAD.
    """

    def __init__(
        self,
        role: Role,
        *,
        key: bytes | None = None,
        modes: list[str] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if not 1 <= max_payload <= MAX_PAYLOAD_LIMIT:
            raise LocalProtocolError(f"max_payload must be in 1..{MAX_PAYLOAD_LIMIT}")
        if key is not None and not key:
            raise LocalProtocolError("an empty key authenticates nothing; pass None")
        unknown = [m for m in modes or [] if m not in _KNOWN_MODES]
        if unknown:
            raise LocalProtocolError(f"unknown modes {', '.join(unknown)}")
        self.role = role
        self.state = State.IDLE
        self.max_payload = max_payload
        self.mode: str | None = None
        self.version: int | None = None
        self._key = key
        self._modes = list(modes) if modes else None
        self._send_sealer: Sealer = Xxh3Sealer()
        self._recv_sealer: Sealer = Xxh3Sealer()
        # Received bytes not yet returned as events: _buffer[_start:], then
        # the chunks in _queue (_queued bytes in all; see receive_data).
        self._buffer: bytes | memoryview = b""
        self._start = 0
        self._queue: deque[bytes | bytearray] = deque()
        self._queued = 0
        # Size of the frame next_event last found incomplete (its header
        # checked), and the buffer it is being read into (receive_buffer).
        self._pending = 0
        self._assembly: bytearray | None = None
        self._filled = 0
        self._eof = False
        self._opened = False  # reached OPEN once: REFUSED is no longer possible
        self._nonce = os.urandom(NONCE_SIZE)
        self._hello_payload = b""
        self._peer_nonce = b""
        self._peer_modes: tuple[str, ...] = ()
        self._peer_versions: tuple[int, ...] = ()
        self._keys: SessionKeys | None = None
        self._transcript = b""

    # ------------------------------------------------------------------
    # framing
    def _frame(
        self,
        command: int,
        *,
        flags: int = 0,
        handle: int = 0,
        offset: int = 0,
        length: int = 0,
        status: int = 0,
        payload: Buffer = b"",
    ) -> bytes:
        size = memoryview(payload).nbytes
        if command not in REQUEST_COMMANDS and size > MAX_HANDSHAKE_PAYLOAD:
            raise LocalProtocolError(
                f"{Command(command).name} payload of {size} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}"
            )
        if size > MAX_PAYLOAD_LIMIT:
            raise LocalProtocolError(f"payload of {size} bytes does not fit in one frame")
        header = _pack_header(
            MAGIC, VERSION, command, flags, handle, offset, length, status, size, 0
        )
        return self._send_sealer.frame(header, payload)

    def _expect(self, *states: State) -> None:
        if self.state not in states:
            raise LocalProtocolError(f"not allowed in state {self.state.value}")

    # ------------------------------------------------------------------
    # client side of the handshake
    def hello(
        self,
        *,
        export: str | None,
        client_id: bytes,
        client_name: str,
        flags: HelloFlag = HelloFlag.NONE,
    ) -> bytes:
        """Client: the opening HELLO frame; `flags` (HelloFlag) only when set."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client says HELLO")
        self._expect(State.IDLE)
        if len(client_id) != CLIENT_ID_SIZE:
            raise LocalProtocolError(f"client id must be {CLIENT_ID_SIZE} bytes")
        modes = self._modes or []
        if not modes:
            raise LocalProtocolError("a client must offer at least one mode")
        if any(m in KEYED_MODES for m in modes) and self._key is None:
            raise LocalProtocolError("keyed modes offered without a key")
        items = [
            (Attr.VERSIONS, bytes(SUPPORTED_VERSIONS)),
            (Attr.CLIENT_ID, bytes(client_id)),
            (Attr.CLIENT_NAME, attrs.text(client_name[:MAX_NAME_CHARS])),
            (Attr.CIPHERS, attrs.text(",".join(modes))),
            (Attr.NONCE, self._nonce),
        ]
        if export is not None:
            items.append((Attr.EXPORT, attrs.text(export)))
        if flags:
            items.append((Attr.HELLO_FLAGS, attrs.u32(int(flags))))
        payload = attrs.encode(items)
        frame = self._frame(Command.HELLO, payload=payload)
        self._hello_payload = payload
        self.state = State.HELLO_SENT
        return frame

    def confirm(self) -> bytes:
        """Client: the CONFIRM frame after a `Challenged` event."""
        self._expect(State.CHALLENGED)
        items = []
        if self._keys is not None:
            client_proof = proof(self._keys.client_confirm, b"client", self._transcript)
            items.append((Attr.PROOF, client_proof))
        frame = self._frame(Command.CONFIRM, payload=attrs.encode(items))
        self._send_sealer = self._session_sealer(sending=True)
        self.state = State.CONFIRM_SENT
        return frame

    # ------------------------------------------------------------------
    # server side of the handshake
    def challenge(self, *, node_name: str) -> bytes:
        """Server: answer a `HelloReceived` the application accepted. Raises
        HandshakeFailed when no version or mode is common; the connection is
        then in ERROR and the caller sends `refuse(exc.status, exc.message)`."""
        self._expect(State.HELLO_RECEIVED)
        try:
            version = choose_version(list(self._peer_versions))
            allowed = allowed_modes(self._key is not None)
            if self._modes:  # a node restricted to some ciphers
                allowed = [m for m in allowed if m in self._modes]
            mode = choose_mode(list(self._peer_modes), allowed)
        except HandshakeFailed:
            self.state = State.ERROR
            raise
        items = [
            (Attr.VERSION, attrs.u8(version)),
            (Attr.CIPHER, attrs.text(mode)),
            (Attr.NONCE, self._nonce),
            (Attr.NODE_NAME, attrs.text(node_name[:MAX_NAME_CHARS])),
        ]
        prefix = attrs.encode(items)
        payload = prefix
        keys: SessionKeys | None = None
        if mode in KEYED_MODES:
            assert self._key is not None
            keys = derive_keys(self._key, self._peer_nonce, self._nonce, mode)
            self._transcript = transcript_hash(self._hello_payload, prefix)
            server_proof = proof(keys.server_confirm, b"server", self._transcript)
            payload = prefix + attrs.encode([(Attr.PROOF, server_proof)])
        frame = self._frame(Command.CHALLENGE, payload=payload)
        self.version, self.mode, self._keys = version, mode, keys
        self._send_sealer = self._session_sealer(sending=True)
        self.state = State.CHALLENGE_SENT
        return frame

    def ready(self, ready: Ready) -> bytes:
        """Server: the READY frame after `Confirmed`; the connection opens.
        The max_request sent is capped at this side's own `max_payload`, so
        the client never sends a WRITE this connection would reject."""
        self._expect(State.CONFIRMED)
        payload = attrs.encode(
            [
                (Attr.SIZE, attrs.u64(ready.size)),
                (Attr.PERMISSIONS, attrs.u8(int(ready.permissions))),
                (Attr.BLOCK_SIZE, attrs.u32(ready.block_size)),
                (Attr.MAX_REQUEST, attrs.u32(min(ready.max_request, self.max_payload))),
                (Attr.FEATURES, attrs.u32(int(ready.features))),
                (Attr.EXPORT, attrs.text(ready.export)),
            ]
        )
        if ready.instance is not None:
            payload += attrs.encode([(Attr.INSTANCE, ready.instance.encode())])
        frame = self._frame(Command.READY, payload=payload)
        self.state = State.OPEN
        self._opened = True
        return frame

    def refuse(self, status: int, message: str) -> bytes:
        """Either side, during the handshake (also after a handshake error):
        a REFUSED frame carrying errno `status` and a one-line `message`.
        The connection is CLOSED afterwards (it stays ERROR if it was)."""
        if self.state is State.CLOSED or self._opened:
            raise LocalProtocolError(f"cannot refuse in state {self.state.value}")
        if not 0 <= status <= MAX_PAYLOAD_LIMIT:
            raise LocalProtocolError("status out of range")
        payload = attrs.encode([(Attr.MESSAGE, attrs.text(message[:MAX_MESSAGE_CHARS]))])
        frame = self._frame(Command.REFUSED, status=status, payload=payload)
        if self.state is not State.ERROR:
            self.state = State.CLOSED
        return frame

    def _session_sealer(self, *, sending: bool) -> Sealer:
        assert self.mode is not None
        if self._keys is None:
            return session_sealer(self.mode, None)
        client_to_server = sending == (self.role is Role.CLIENT)
        key = self._keys.client_write if client_to_server else self._keys.server_write
        return session_sealer(self.mode, key)

    # ------------------------------------------------------------------
    # requests and replies
    def send(self, event: Request | Reply) -> bytes:
        """Frame a request (client) or reply (server) on an open connection,
        as one joined buffer (see `send_parts`)."""
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Request | Reply) -> list[Buffer]:
        """Frame a request (client) or reply (server) on an open connection:
        the buffers to write one after the other (header, payload, tag; the
        event's data itself, not a copy, in the checksum modes), for one
        scatter-gather write. Frames must go out in the order they were
        framed: each one's check covers its sequence number."""
        if self.state is not _OPEN:
            self._expect(State.OPEN)
        if isinstance(event, Request):
            if self.role is not _CLIENT:
                raise LocalProtocolError("only a client sends requests")
            flags: int = event.flags
            status = 0
        elif isinstance(event, Reply):
            if self.role is not _SERVER:
                raise LocalProtocolError("only a server sends replies")
            flags, status = _REPLY, event.status
        else:
            raise LocalProtocolError(f"cannot send {type(event).__name__}")
        # The event's constructor checked its fields, so the header is
        # packed straight from them; only the payload's size is taken now
        # (a bytearray may have been resized since).
        data = event.data
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        if size > MAX_PAYLOAD_LIMIT:
            raise LocalProtocolError(f"payload of {size} bytes does not fit in one frame")
        header = _pack_header(
            MAGIC, VERSION, event.command, flags, event.handle, event.offset, event.length,
            status, size, 0,
        )
        return self._send_sealer.frame_parts(header, data)

    # ------------------------------------------------------------------
    # receiving
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the transport; b"" means the peer closed. Bytes
        are kept as they are, other buffers are copied."""
        if self.state is _ERROR:
            raise LocalProtocolError("connection is in the error state")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data after end of stream")
        if self._assembly is not None:
            raise LocalProtocolError("data passed outside the frame's receive buffer")
        if type(data) is not bytes:
            data = bytes(memoryview(data))  # a copy of any buffer, and only of a buffer
        if self._start == len(self._buffer):  # then the queue is empty too
            self._buffer, self._start = data, 0
            return
        # A frame is incomplete: queue the chunk until next_event has all of
        # the frame. Small chunks are appended to a bytearray at the end of
        # the queue instead, so that a peer trickling bytes costs no more
        # memory than it sends.
        queue = self._queue
        if len(data) >= _SMALL_CHUNK:
            queue.append(data)
        elif queue and type(queue[-1]) is bytearray:
            queue[-1] += data
        else:
            queue.append(bytearray(data))
        self._queued += len(data)

    def receive_buffer(self) -> memoryview | None:
        """Where to read the next bytes into, when that saves a copy: after
        `next_event` returned NEED_DATA with a frame's header buffered and
        at least ASSEMBLE_MIN bytes of that frame still missing, a writable
        view of exactly the missing bytes, in place in one buffer of the
        frame's size (what was received of it is copied there, once). The
        transport reads into it and reports each read with `received_into`;
        meanwhile `receive_data` takes only the end of stream (b""). Once
        the view is filled, `next_event` returns the frame, its payload a
        view of that buffer. None: read a chunk and pass it to
        `receive_data`. The size was checked against the payload limit
        when `next_event` read the header."""
        assembly = self._assembly
        if assembly is None:
            total = self._pending
            if not total or self._eof:
                return None
            have = self.buffered
            if total - have < ASSEMBLE_MIN:
                return None
            # The frame is the first thing buffered (all before it were
            # returned) and incomplete, so it is all that is buffered.
            assembly = bytearray(total)
            view = memoryview(assembly)
            first = len(self._buffer) - self._start
            view[:first] = memoryview(self._buffer)[self._start :]
            filled = first
            for chunk in self._queue:
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            self._queue.clear()
            self._queued = 0
            self._buffer, self._start = b"", 0
            self._assembly, self._filled = assembly, filled
        return memoryview(assembly)[self._filled :]

    def received_into(self, size: int) -> None:
        """`size` more bytes were read into the view `receive_buffer` gave."""
        assembly = self._assembly
        if assembly is None or not 0 <= size <= len(assembly) - self._filled:
            raise LocalProtocolError("received_into without a receive buffer to fill")
        self._filled += size
        if self._filled == len(assembly):
            self._buffer, self._start = memoryview(assembly).toreadonly(), 0
            self._assembly, self._filled = None, 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buffer) - self._start + self._queued + self._filled

    def _take(self, size: int) -> Buffer:
        """Remove the next `size` bytes from what is buffered and return
        them: a slice of the current chunk if they lie in it (the chunk
        itself if they are all of it), else the pieces joined, so a frame
        part that arrived in several chunks is copied once. The caller
        checked that `buffered` >= `size`."""
        buffer, start = self._buffer, self._start
        end = start + size
        if end <= len(buffer):
            if end < len(buffer):
                self._start = end
            else:
                self._next_chunk()
            return buffer[start:end]
        queue = self._queue
        # The views die with `pieces`; a bytearray among them has left the
        # queue, so nothing resizes it meanwhile.
        pieces: list[Buffer] = [memoryview(buffer)[start:]]
        wanted = end - len(buffer)
        while wanted:
            chunk = queue.popleft()
            self._queued -= len(chunk)
            if len(chunk) > wanted:
                pieces.append(memoryview(chunk)[:wanted])
                if type(chunk) is bytes:
                    self._buffer, self._start = chunk, wanted
                else:
                    self._buffer, self._start = bytes(memoryview(chunk)[wanted:]), 0
                return b"".join(pieces)
            pieces.append(chunk)
            wanted -= len(chunk)
        self._next_chunk()
        return b"".join(pieces)

    def _next_chunk(self) -> None:
        """Make the first queued chunk (or nothing) the current buffer,
        which is always bytes."""
        if self._queue:
            chunk = self._queue.popleft()
            self._queued -= len(chunk)
            self._buffer, self._start = bytes(chunk), 0
        else:
            self._buffer, self._start = b"", 0

    def _payload_limit(self) -> int:
        if self.state is State.OPEN:
            return self.max_payload
        return MAX_HANDSHAKE_PAYLOAD

    def next_event(self) -> Event | NeedData:
        """The next complete event, or NEED_DATA. Raises RemoteProtocolError
        (IntegrityError for a failed check) or HandshakeFailed, after which
        the connection is in ERROR."""
        if self.state is _ERROR:
            raise LocalProtocolError("connection is in the error state")
        if self._assembly is not None:  # the frame being read in place is incomplete
            return self._at_end_of_data()
        try:
            buffer, start = self._buffer, self._start
            available = len(buffer) - start  # contiguous, in the current chunk
            if available >= HEADER_SIZE:
                fields = _unpack_header(buffer, start)
            elif self._queued and self.buffered >= HEADER_SIZE:
                fields = self._peek_header()
            else:
                return self._at_end_of_data()
            magic, version, command, flags, handle, offset, length, status, size, reserved = fields
            # One test for the usual case; _reject_header says what is wrong.
            if (
                magic != MAGIC
                or version != VERSION
                or reserved
                or flags & _UNKNOWN_FLAGS
                or _COMMAND_AT[command] is None
                or size > (self.max_payload if self.state is _OPEN else MAX_HANDSHAKE_PAYLOAD)
            ):
                self._reject_header(_Header._make(fields))
            total = size + _FRAME_SIZE
            if available >= total:  # the usual case: the frame lies in one chunk
                body = start + HEADER_SIZE
                end = start + total
                tag = end - TAG_SIZE
                payload = self._recv_sealer.open(
                    buffer[start:body], buffer[body:tag], buffer[tag:end]
                )
                if end < len(buffer):
                    self._start = end
                else:  # drop the chunk now rather than at the next one
                    self._next_chunk()
            elif self.buffered >= total:
                header = self._take(HEADER_SIZE)
                payload = self._recv_sealer.open(header, self._take(size), self._take(TAG_SIZE))
            else:
                self._pending = total
                return self._at_end_of_data()
            self._pending = 0
            request_command = _REQUEST_AT[command]
            if request_command is None or self.state is not _OPEN:
                return self._dispatch(_Header._make(fields), payload)
            # A request or reply on an open connection: the frame checks of
            # docs/protocol.md section 3 on the unpacked ints, then the
            # event built without its constructor's second check.
            if self.role is _SERVER:
                if flags & _REPLY:
                    raise RemoteProtocolError("a client sent a reply")
                if status:
                    raise RemoteProtocolError(
                        f"{request_command.name} request with a non-zero status"
                    )
                if request_command is _WRITE:
                    if size != length:
                        raise RemoteProtocolError("WRITE length differs from its payload")
                elif size:
                    raise RemoteProtocolError(f"{request_command.name} request with a payload")
                return parsed_request(
                    request_command, handle, offset, length, _REQUEST_FLAG_AT[flags], payload
                )
            if flags != _REPLY:
                if not flags & _REPLY:
                    raise RemoteProtocolError("a server sent a request")
                raise RemoteProtocolError(f"reply with request flags {flags:#x}")
            return parsed_reply(request_command, handle, status, offset, length, payload)
        except (RemoteProtocolError, HandshakeFailed):
            self.state = _ERROR
            raise

    def _peek_header(self) -> tuple[Any, ...]:
        """The fields of a header that straddles chunks (it stays buffered)."""
        head = bytes(self._buffer[self._start :])
        for chunk in self._queue:
            head += chunk[:HEADER_SIZE]
            if len(head) >= HEADER_SIZE:
                break
        return _unpack_header(head)

    def _at_end_of_data(self) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        if self.buffered:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        self.state = State.CLOSED
        return ConnectionClosed()

    def _reject_header(self, fields: _Header) -> NoReturn:
        """Raise the RemoteProtocolError for the first thing wrong with a
        header (the checks of section 2 of docs/protocol.md, in order)."""
        if fields.magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {fields.magic!r}")
        if fields.version != VERSION:
            raise RemoteProtocolError(f"unsupported frame version {fields.version}")
        if fields.reserved != 0:
            raise RemoteProtocolError("reserved header field is not zero")
        if fields.flags & ~int(KNOWN_FLAGS):
            raise RemoteProtocolError(f"unknown frame flags {fields.flags:#x}")
        if _COMMAND_AT[fields.command] is None:
            raise RemoteProtocolError(f"unknown command {fields.command}")
        limit = self._payload_limit()
        if fields.payload_len > limit:
            raise RemoteProtocolError(
                f"frame payload of {fields.payload_len} bytes exceeds the limit {limit}"
            )
        raise AssertionError(f"header {fields} is valid")

    def _dispatch(self, fields: _Header, body: Buffer) -> Event:
        """Every frame but a request or reply on an open connection (those
        take next_event's fast path)."""
        payload = bytes(body)  # small: a handshake frame's, or a bad frame's
        command = Command(fields.command)
        if self.state is State.CLOSED:
            raise RemoteProtocolError(f"{command.name} after the handshake was refused")
        if command in REQUEST_COMMANDS:
            raise RemoteProtocolError(f"{command.name} before the handshake finished")
        if fields.flags or fields.handle or fields.offset or fields.length:
            raise RemoteProtocolError(f"{command.name} with non-zero request fields")
        if command is Command.REFUSED:
            if self.state is State.OPEN:
                raise RemoteProtocolError("REFUSED on an open connection")
            reader = attrs.Reader(attrs.decode(payload))
            message = reader.text(Attr.MESSAGE, default="refused")
            self.state = State.CLOSED
            return Refused(status=fields.status, message=message)
        if fields.status:
            raise RemoteProtocolError(f"{command.name} with a non-zero status")
        return self._dispatch_handshake(command, payload)

    def _dispatch_handshake(self, command: Command, payload: bytes) -> Event:
        reader = attrs.Reader(attrs.decode(payload))
        if self.role is Role.SERVER:
            if command is Command.HELLO and self.state is State.IDLE:
                return self._on_hello(payload, reader)
            if command is Command.CONFIRM and self.state is State.CHALLENGE_SENT:
                return self._on_confirm(reader)
        else:
            if command is Command.CHALLENGE and self.state is State.HELLO_SENT:
                return self._on_challenge(payload, reader)
            if command is Command.READY and self.state is State.CONFIRM_SENT:
                return self._on_ready(reader)
        raise RemoteProtocolError(f"unexpected {command.name} in state {self.state.value}")

    def _on_hello(self, payload: bytes, reader: attrs.Reader) -> HelloReceived:
        nonce = reader.raw(Attr.NONCE, size=NONCE_SIZE)
        versions = tuple(reader.raw(Attr.VERSIONS))
        modes = tuple(m for m in reader.text(Attr.CIPHERS).split(",") if m)
        event = HelloReceived(
            export=reader.text(Attr.EXPORT) if reader.has(Attr.EXPORT) else None,
            client_id=reader.raw(Attr.CLIENT_ID, size=CLIENT_ID_SIZE),
            client_name=reader.text(Attr.CLIENT_NAME, default="?"),
            versions=versions,
            modes=modes,
            flags=HelloFlag(reader.u32(Attr.HELLO_FLAGS, 0) & int(ALL_HELLO_FLAGS)),
        )
        self._hello_payload = payload
        self._peer_nonce, self._peer_versions, self._peer_modes = nonce, versions, modes
        self.state = State.HELLO_RECEIVED
        return event

    def _on_challenge(self, payload: bytes, reader: attrs.Reader) -> Challenged:
        version = reader.u8(Attr.VERSION)
        mode = reader.text(Attr.CIPHER)
        if version not in SUPPORTED_VERSIONS:
            raise HandshakeFailed(f"node chose protocol version {version}, which we do not speak")
        if mode not in (self._modes or []):
            raise HandshakeFailed(
                f"node chose cipher {mode}, which we did not offer ({', '.join(self._modes or [])})"
            )
        keys: SessionKeys | None = None
        if mode in KEYED_MODES:
            assert self._key is not None
            server_proof = reader.raw(Attr.PROOF, size=PROOF_SIZE)
            if payload[-_PROOF_TLV_SIZE:] != attrs.encode([(Attr.PROOF, server_proof)]):
                raise RemoteProtocolError("CHALLENGE must end with its PROOF attribute")
            prefix = payload[:-_PROOF_TLV_SIZE]
            server_nonce = reader.raw(Attr.NONCE, size=NONCE_SIZE)
            keys = derive_keys(self._key, self._nonce, server_nonce, mode)
            self._transcript = transcript_hash(self._hello_payload, prefix)
            expected = proof(keys.server_confirm, b"server", self._transcript)
            if not hmac.compare_digest(expected, server_proof):
                raise HandshakeFailed(
                    "wrong key: the node does not hold the same pre-shared key as this client"
                )
        elif self._key is not None:
            # Only reachable when this client offered an unkeyed mode too;
            # accepting it would let anyone on the path forge every frame.
            raise HandshakeFailed(
                f"key not used: the node chose {mode} without authentication although this "
                "client has a key; configure the same key on the node"
            )
        node_name = reader.text(Attr.NODE_NAME, "?")
        self.version, self.mode, self._keys = version, mode, keys
        self._recv_sealer = self._session_sealer(sending=False)
        self.state = State.CHALLENGED
        return Challenged(version=version, mode=mode, node_name=node_name)

    def _on_confirm(self, reader: attrs.Reader) -> Confirmed:
        if self._keys is not None:
            expected = proof(self._keys.client_confirm, b"client", self._transcript)
            if not hmac.compare_digest(expected, reader.raw(Attr.PROOF, size=PROOF_SIZE)):
                raise HandshakeFailed(
                    "wrong key: the client does not hold this node's pre-shared key"
                )
        self._recv_sealer = self._session_sealer(sending=False)
        self.state = State.CONFIRMED
        return Confirmed()

    def _on_ready(self, reader: attrs.Reader) -> Ready:
        # Unknown permission and feature bits are ignored: a newer node may
        # grant more than this client understands.
        try:
            ready = Ready(
                size=reader.u64(Attr.SIZE),
                permissions=Permission(reader.u8(Attr.PERMISSIONS) & int(ALL_PERMISSIONS)),
                block_size=reader.u32(Attr.BLOCK_SIZE, 4096),
                max_request=reader.u32(Attr.MAX_REQUEST),
                features=Feature(reader.u32(Attr.FEATURES, 0) & int(ALL_FEATURES)),
                export=reader.text(Attr.EXPORT, ""),
                instance=(
                    NodeInstance.decode(reader.raw(Attr.INSTANCE))
                    if reader.has(Attr.INSTANCE)
                    else None
                ),
            )
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"bad READY: {exc}") from None
        if ready.max_request > self.max_payload:
            ready = replace(ready, max_request=self.max_payload)
        self.max_payload = ready.max_request
        self.state = State.OPEN
        self._opened = True
        return ready

"""The client side of the NBD protocol, sans-IO: bytes in, events out.

`NbdClient` runs one connection to an NBD server: the fixed newstyle
handshake, then transmission. It never touches a socket, a clock or a
thread; the `nbd:` node (dstfuse/nodes/nbd.py) drives it.

Handshake, as the client asks for it (docs/protocol.md, "NBD client"):

    server                                 client
    NBDMAGIC IHAVEOPT flags          --->
                                     <---  client flags (FIXED_NEWSTYLE, NO_ZEROES)
                                     <---  OPT_STARTTLS              (nbds:// only)
    REP_ACK                          --->  -> StartTls: the caller wraps the
                                              transport, then `tls_started()`
                                     <---  OPT_STRUCTURED_REPLY
    REP_ACK | ERR_UNSUP              --->
                                     <---  OPT_SET_META_CONTEXT base:allocation
    REP_META_CONTEXT* REP_ACK        --->     (only if asked and structured)
                                     <---  OPT_GO export [INFO_BLOCK_SIZE]
    REP_INFO* REP_ACK                --->  -> Ready
    ERR_UNSUP                        --->  OPT_EXPORT_NAME (an old server)
    size flags [124 zeroes]          --->  -> Ready

Outgoing handshake bytes collect in an outbox (`data_to_send`); in
transmission, `request` returns the bytes of each request.

Invariants:
- a reply is matched to the request of its cookie; a cookie is in flight at
  most once, and a reply for a cookie not in flight is a protocol
  violation (a simple READ reply cannot even be framed without its request);
- a request is checked against what the server advertised (commands,
  flags, read-only, size, block size constraints) before any byte is made:
  misuse is a LocalProtocolError and changes nothing;
- a structured chunk's length is checked against what its type and its
  request allow as soon as its header is complete, before its payload is
  buffered; so after NEED_DATA the buffer holds less than one header plus
  the largest payload the requests in flight allow;
- a READ reply is returned only when its chunks covered the request exactly
  once (holes read as zeroes) or an error chunk came;
- per-request errors (the server's error values) are in `NbdReply.error`;
  anything malformed is a RemoteProtocolError and puts the client into
  ERROR, after which every call raises LocalProtocolError: the caller drops
  the transport (and resends what was in flight on a new connection);
- the handshake's refusals (unknown export, policy, TLS required) are
  HandshakeFailed with a one-line message and an errno.
"""

from __future__ import annotations

import bisect
import enum
import errno
import struct
from dataclasses import dataclass, field
from typing import Final

from ..errors import HandshakeFailed, LocalProtocolError, RemoteProtocolError
from ..need_data import NEED_DATA, NeedData
from .constants import (
    BASE_ALLOCATION,
    CHUNK_ERROR_BIT,
    CLIENT_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    EXTENT,
    GREETING,
    HOLE_CHUNK,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_DATA,
    MAX_STRING,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REPLY_ERROR_BIT,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U32_FIELD,
    U64_FIELD,
    Chunk,
    ClientFlag,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    TransmissionFlag,
)

Buffer = bytes | bytearray | memoryview

_U32 = 1 << 32
_U64 = 1 << 64
#: Block sizes a server may not exceed as its minimum (the spec's 64 KiB).
MAX_MINIMUM_BLOCK = 64 << 10
#: Defaults when the server sends no NBD_INFO_BLOCK_SIZE.
DEFAULT_MINIMUM_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
#: Extents one BLOCK_STATUS chunk may carry unless the constructor says otherwise.
DEFAULT_MAX_EXTENTS = 1 << 16

#: Server option errors -> what we tell the user, and the errno for it.
_OPTION_ERRORS: dict[int, tuple[str, int]] = {
    OptionReply.ERR_UNSUP: ("the server does not support it", errno.EOPNOTSUPP),
    OptionReply.ERR_POLICY: ("refused by the server's policy", errno.EACCES),
    OptionReply.ERR_INVALID: ("the server calls the request invalid", errno.EINVAL),
    OptionReply.ERR_PLATFORM: ("not supported on the server's platform", errno.EOPNOTSUPP),
    OptionReply.ERR_TLS_REQD: (
        "the server requires TLS (use an nbds:// URI)",
        errno.EACCES,
    ),
    OptionReply.ERR_UNKNOWN: ("the server has no such export", errno.ENOENT),
    OptionReply.ERR_SHUTDOWN: ("the server is shutting down", errno.ESHUTDOWN),
    OptionReply.ERR_BLOCK_SIZE_REQD: (
        "the server requires block size negotiation",
        errno.EOPNOTSUPP,
    ),
    OptionReply.ERR_TOO_BIG: ("the request is too big for the server", errno.E2BIG),
    OptionReply.ERR_EXT_HEADER_REQD: (
        "the server requires extended headers, which dstfuse does not speak",
        errno.EOPNOTSUPP,
    ),
}

#: Commands that carry a payload and are bounded by the maximum block size.
_PAYLOAD_COMMANDS = frozenset({Command.READ, Command.WRITE})
#: Commands that change the export (refused on a read-only one).
_WRITING_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: The transmission flag a command needs.
_COMMAND_NEEDS = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
#: The flags each command may carry, and the transmission flag each needs.
_FLAGS_ALLOWED = {
    Command.READ: CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag(0),
    Command.TRIM: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
}
_FLAG_NEEDS = {
    CommandFlag.FUA: TransmissionFlag.SEND_FUA,
    CommandFlag.DF: TransmissionFlag.SEND_DF,
    CommandFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}
NO_FLAGS: Final = CommandFlag(0)


class Phase(enum.Enum):
    GREETING = "greeting"  # waiting for the server's greeting
    OPTIONS = "options"  # an option sent, waiting for its reply
    TLS = "tls"  # STARTTLS acknowledged, the caller upgrades the transport
    EXPORT_NAME = "export-name"  # OPT_EXPORT_NAME sent, waiting for size and flags
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class StartTls:
    """The server accepted STARTTLS: wrap the transport in TLS, then call
    `NbdClient.tls_started()`; nothing else may be sent or fed before."""


@dataclass(frozen=True)
class Ready:
    """The export's parameters; transmission starts after this event.

    `minimum`, `preferred`, `maximum` are the block size constraints (the
    spec's defaults when the server sent none); `maximum` is already capped
    at the client's `max_payload`. `allocation` is the context id of
    base:allocation, None when it was not negotiated."""

    export: str
    size: int
    flags: TransmissionFlag
    minimum: int = DEFAULT_MINIMUM_BLOCK
    preferred: int = DEFAULT_PREFERRED_BLOCK
    maximum: int = DEFAULT_MAX_PAYLOAD
    structured: bool = False
    allocation: int | None = None
    description: str = ""

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)


@dataclass(frozen=True)
class Extent:
    """One base:allocation extent of a BLOCK_STATUS reply."""

    length: int
    flags: int


@dataclass(frozen=True)
class NbdReply:
    """The complete answer to one request. `error` is the server's error
    value (0: success; a Linux errno by the spec); `message` the text of an
    error chunk, if any. READ: `data` is exactly the requested bytes (on
    success). BLOCK_STATUS: `extents` of the base:allocation context."""

    cookie: int
    command: Command
    error: int = 0
    data: bytes = field(default=b"", repr=False)
    message: str = ""
    extents: tuple[Extent, ...] = ()


@dataclass(frozen=True)
class ConnectionClosed:
    """The server closed the connection at a message boundary."""


Event = StartTls | Ready | NbdReply | ConnectionClosed


@dataclass(eq=False)
class _Pending:
    """A request in flight, as far as its reply needs it."""

    command: Command
    offset: int
    length: int
    buffer: bytearray | None = None  # READ with structured replies
    covered: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0
    message: str = ""
    extents: tuple[Extent, ...] = ()


# ------------------------------------------------------------------ client


class NbdClient:
    """One client connection. `export` is the name asked for ("" is the
    server's default). `structured` asks for structured replies,
    `allocation` (with them) for the base:allocation meta context, `tls`
    for STARTTLS first. `max_payload` bounds every READ/WRITE we send (and
    so every READ reply); `max_extents` one BLOCK_STATUS chunk;
    `max_option_reply` one option reply."""

    def __init__(
        self,
        export: str = "",
        *,
        structured: bool = True,
        allocation: bool = False,
        tls: bool = False,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_extents: int = DEFAULT_MAX_EXTENTS,
        max_option_reply: int = MAX_OPTION_DATA,
    ) -> None:
        encoded = export.encode()
        if len(encoded) > MAX_STRING:
            raise LocalProtocolError(f"export name longer than {MAX_STRING} bytes")
        if max_payload < 1 or max_extents < 1 or max_option_reply < 16:
            raise LocalProtocolError("limits must be positive")
        self.export = export
        self._export = encoded
        self._want_structured = structured
        self._want_allocation = allocation and structured
        self._want_tls = tls
        self.max_payload = max_payload
        self.max_extents = max_extents
        self.max_option_reply = max_option_reply
        self.phase = Phase.GREETING
        self.ready: Ready | None = None
        self._buffer = bytearray()
        self._eof = False
        self._outbox = bytearray()
        self._no_zeroes = False
        self._option: Option | None = None  # the option whose reply we wait for
        self._structured = False
        self._allocation: int | None = None
        self._infos: dict[Info, tuple[int, ...] | str] = {}
        self._in_flight: dict[int, _Pending] = {}
        self._chunk: tuple[int, int, int, int] | None = None  # a header awaiting its payload

    # -- outgoing ---------------------------------------------------------
    def data_to_send(self) -> bytes:
        """The handshake bytes produced so far (then forgotten)."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def tls_started(self) -> None:
        """The transport is TLS now: go on with the handshake."""
        self._expect(Phase.TLS)
        self.phase = Phase.OPTIONS
        self._after_tls()

    def abort(self) -> bytes:
        """OPT_ABORT, for a client giving up during option haggling."""
        if self.phase not in (Phase.OPTIONS, Phase.ERROR):
            raise LocalProtocolError(f"cannot abort in phase {self.phase.value}")
        self.phase = Phase.CLOSED
        return OPTION.pack(IHAVEOPT, Option.ABORT, 0)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def request(
        self,
        command: Command,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: CommandFlag = NO_FLAGS,
        data: Buffer = b"",
    ) -> bytes:
        """The bytes of one request; raises LocalProtocolError (and changes
        nothing) when the server did not offer what it needs or the range
        breaks the export's constraints."""
        self._expect(Phase.TRANSMISSION)
        ready = self.ready
        assert ready is not None
        command = Command(command)
        flags = CommandFlag(flags)
        self._check_request(ready, command, cookie, offset, length, flags, data)
        pending = _Pending(command, offset, length)
        if command is Command.READ and self._structured:
            pending.buffer = bytearray(length)
        self._in_flight[cookie] = pending
        header = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
        return header + bytes(data) if command is Command.WRITE else header

    def _check_request(
        self,
        ready: Ready,
        command: Command,
        cookie: int,
        offset: int,
        length: int,
        flags: CommandFlag,
        data: Buffer,
    ) -> None:
        if command not in _FLAGS_ALLOWED:
            raise LocalProtocolError(f"{command.name} is not a request this client sends")
        if not 0 <= cookie < _U64:
            raise LocalProtocolError("cookie out of range")
        if cookie in self._in_flight:
            raise LocalProtocolError(f"cookie {cookie} is already in flight")
        needed = _COMMAND_NEEDS.get(command)
        if needed is not None and not ready.flags & needed:
            raise LocalProtocolError(f"the server does not offer {command.name}")
        if command in _WRITING_COMMANDS and ready.read_only:
            raise LocalProtocolError(f"{command.name} on a read-only export")
        if command is Command.BLOCK_STATUS and self._allocation is None:
            raise LocalProtocolError("BLOCK_STATUS without a negotiated meta context")
        if flags & ~_FLAGS_ALLOWED[command]:
            raise LocalProtocolError(f"flags {flags!r} not allowed on {command.name}")
        for flag, needs in _FLAG_NEEDS.items():
            if flags & flag and not ready.flags & needs:
                raise LocalProtocolError(f"the server does not offer {flag.name}")
        if flags & CommandFlag.DF and not self._structured:
            raise LocalProtocolError("DF needs structured replies")
        if command is Command.FLUSH:
            if offset or length:
                raise LocalProtocolError("FLUSH takes no range")
            return
        if command is Command.WRITE and len(data) != length:
            raise LocalProtocolError(f"WRITE of {length} bytes with {len(data)} bytes of data")
        if command is not Command.WRITE and data:
            raise LocalProtocolError(f"{command.name} carries no data")
        if length < 1 or length >= _U32:
            raise LocalProtocolError(f"{command.name} length {length} out of range")
        if offset < 0 or offset + length > ready.size:
            raise LocalProtocolError(
                f"{command.name} [{offset}, +{length}) is past the export's {ready.size} bytes"
            )
        if command in _PAYLOAD_COMMANDS and length > ready.maximum:
            raise LocalProtocolError(
                f"{command.name} of {length} bytes exceeds the maximum of {ready.maximum}"
            )
        if offset % ready.minimum or length % ready.minimum:
            raise LocalProtocolError(
                f"{command.name} [{offset}, +{length}) is not aligned to the server's "
                f"minimum block size of {ready.minimum}"
            )

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC: the server closes after the requests in flight."""
        self._expect(Phase.TRANSMISSION)
        self.phase = Phase.CLOSED
        return REQUEST.pack(REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0)

    # -- incoming ---------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the server; b"" means the server closed."""
        if self.phase is Phase.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        if self._eof:
            raise LocalProtocolError("data after the end of the stream")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError (the
        server broke the protocol) or HandshakeFailed (it refused us)."""
        if self.phase is Phase.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        try:
            while True:
                event = self._step()
                if event is not None:
                    return event
        except (RemoteProtocolError, HandshakeFailed):
            self.phase = Phase.ERROR
            raise

    def _step(self) -> Event | NeedData | None:
        """One parsing step: an event, NEED_DATA, or None to go on."""
        phase = self.phase
        if phase is Phase.TRANSMISSION:
            return self._next_reply()
        if phase is Phase.GREETING:
            return self._on_greeting()
        if phase is Phase.OPTIONS:
            return self._on_option_reply()
        if phase is Phase.EXPORT_NAME:
            return self._on_export_name_reply()
        if phase is Phase.TLS:
            if self._buffer:
                raise RemoteProtocolError("plaintext data after the STARTTLS acknowledgement")
            return NEED_DATA
        return self._at_end() if phase is Phase.CLOSED else NEED_DATA

    def _take(self, size: int) -> bytes | None:
        """The next `size` bytes, or None (at the end of the stream: a
        protocol violation, since we are inside a message)."""
        if len(self._buffer) < size:
            if self._eof:
                raise RemoteProtocolError(
                    f"the server closed the connection inside a message ({self.phase.value})"
                )
            return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _at_end(self) -> Event | NeedData:
        if self._eof and not self._buffer:
            return ConnectionClosed()
        return NEED_DATA

    def _expect(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise LocalProtocolError(f"not allowed in phase {self.phase.value}")

    # -- handshake --------------------------------------------------------
    def _on_greeting(self) -> None | NeedData:
        if self._eof and not self._buffer:
            raise RemoteProtocolError("the server closed the connection before its greeting")
        raw = self._take(GREETING.size)
        if raw is None:
            return NEED_DATA
        magic, opt, flags = GREETING.unpack(raw)
        if magic != NBDMAGIC:
            raise RemoteProtocolError("not an NBD server (bad greeting magic)")
        if opt != IHAVEOPT:
            raise HandshakeFailed(
                "the server speaks oldstyle NBD, which dstfuse does not support", errno.EPROTO
            )
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise HandshakeFailed(
                "the server does not speak fixed newstyle NBD, which dstfuse needs", errno.EPROTO
            )
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        self._outbox += CLIENT_FLAGS.pack(client)
        self.phase = Phase.OPTIONS
        if self._want_tls:
            self._send_option(Option.STARTTLS)
        else:
            self._after_tls()
        return None

    def _after_tls(self) -> None:
        if self._want_structured:
            self._send_option(Option.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send_option(self, option: Option, data: bytes = b"") -> None:
        self._outbox += OPTION.pack(IHAVEOPT, option, len(data)) + data
        self._option = option

    def _send_go(self) -> None:
        data = (
            U32_FIELD.pack(len(self._export))
            + self._export
            + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        )
        self._infos = {}
        self._send_option(Option.GO, data)

    def _send_meta_context(self) -> None:
        query = BASE_ALLOCATION.encode()
        data = (
            U32_FIELD.pack(len(self._export))
            + self._export
            + U32_FIELD.pack(1)
            + U32_FIELD.pack(len(query))
            + query
        )
        self._send_option(Option.SET_META_CONTEXT, data)

    def _on_option_reply(self) -> Event | NeedData | None:
        if len(self._buffer) < OPTION_REPLY.size:
            if self._eof:
                raise RemoteProtocolError("the server closed the connection during option haggling")
            return NEED_DATA
        magic, option, kind, length = OPTION_REPLY.unpack_from(self._buffer)
        if magic != OPTION_REPLY_MAGIC:
            raise RemoteProtocolError("bad option reply magic")
        if option != self._option:
            raise RemoteProtocolError(
                f"option reply for option {option}, expected {self._option!r}"
            )
        if length > self.max_option_reply:
            raise RemoteProtocolError(
                f"option reply of {length} bytes exceeds the limit of {self.max_option_reply}"
            )
        raw = self._take(OPTION_REPLY.size + length)
        if raw is None:
            return NEED_DATA
        payload = raw[OPTION_REPLY.size :]
        if kind & REPLY_ERROR_BIT:
            return self._on_option_error(kind, payload)
        if self._option is Option.STARTTLS:
            return self._on_starttls(kind, payload)
        if self._option is Option.STRUCTURED_REPLY:
            self._ack_only(kind, payload)
            self._structured = True
            return self._after_structured()
        if self._option is Option.SET_META_CONTEXT:
            return self._on_meta_context(kind, payload)
        return self._on_go(kind, payload)

    def _ack_only(self, kind: int, payload: bytes) -> None:
        if kind != OptionReply.ACK or payload:
            raise RemoteProtocolError(
                f"unexpected reply {kind:#x} to {self._option_name()} (expected a bare ACK)"
            )

    def _option_name(self) -> str:
        return f"NBD_OPT_{self._option.name}" if self._option is not None else "no option"

    def _on_starttls(self, kind: int, payload: bytes) -> Event:
        self._ack_only(kind, payload)
        if self._buffer:
            raise RemoteProtocolError("plaintext data after the STARTTLS acknowledgement")
        self.phase = Phase.TLS
        self._option = None
        return StartTls()

    def _after_structured(self) -> None:
        if self._want_allocation and self._structured:
            self._send_meta_context()
        else:
            self._send_go()

    def _on_meta_context(self, kind: int, payload: bytes) -> None:
        if kind == OptionReply.ACK:
            if payload:
                raise RemoteProtocolError("ACK to SET_META_CONTEXT carries data")
            self._send_go()
            return
        if kind != OptionReply.META_CONTEXT or len(payload) < 4:
            raise RemoteProtocolError(f"unexpected reply {kind:#x} to NBD_OPT_SET_META_CONTEXT")
        (context,) = U32_FIELD.unpack_from(payload)
        name = _text(payload[4:], "meta context name")
        if name != BASE_ALLOCATION:
            raise RemoteProtocolError(f"the server chose meta context {name!r}, not asked for")
        self._allocation = context

    def _on_go(self, kind: int, payload: bytes) -> Event | None:
        if kind == OptionReply.INFO:
            self._on_info(payload)
            return None
        if kind != OptionReply.ACK or payload:
            raise RemoteProtocolError(f"unexpected reply {kind:#x} to NBD_OPT_GO")
        export = self._infos.get(Info.EXPORT)
        if not isinstance(export, tuple):
            raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        size, flags = export
        minimum, preferred, maximum = DEFAULT_MINIMUM_BLOCK, DEFAULT_PREFERRED_BLOCK, 0
        block = self._infos.get(Info.BLOCK_SIZE)
        if isinstance(block, tuple):
            minimum, preferred, maximum = block
        description = self._infos.get(Info.DESCRIPTION, "")
        assert isinstance(description, str)
        return self._open(size, flags, minimum, preferred, maximum, description)

    def _on_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise RemoteProtocolError("NBD_REP_INFO without a type")
        (kind,) = struct.unpack_from(">H", payload)
        if kind == Info.EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise RemoteProtocolError("NBD_INFO_EXPORT of the wrong length")
            _, size, flags = INFO_EXPORT.unpack(payload)
            self._infos[Info.EXPORT] = (size, flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
            self._infos[Info.BLOCK_SIZE] = INFO_BLOCK_SIZE.unpack(payload)[1:]
        elif kind == Info.DESCRIPTION:
            self._infos[Info.DESCRIPTION] = _text(payload[2:], "export description")
        # NBD_INFO_NAME and unknown types: the spec says a client ignores them.

    def _on_option_error(self, kind: int, payload: bytes) -> None:
        option = self._option
        message = _text(payload, "error message") if payload else ""
        if option is Option.STRUCTURED_REPLY and kind == OptionReply.ERR_UNSUP:
            self._after_structured()  # an old server: simple replies only
            return None
        if option is Option.SET_META_CONTEXT and kind == OptionReply.ERR_UNSUP:
            self._send_go()  # no block status: reads never depend on it
            return None
        if option is Option.GO and kind == OptionReply.ERR_UNSUP:
            # A server older than NBD_OPT_GO: the old way, which ends the
            # option phase (an unknown export is then a closed connection).
            self._outbox += OPTION.pack(IHAVEOPT, Option.EXPORT_NAME, len(self._export))
            self._outbox += self._export
            self._option = None
            self.phase = Phase.EXPORT_NAME
            return None
        what, status = _OPTION_ERRORS.get(kind, (f"error {kind & ~REPLY_ERROR_BIT}", errno.EPROTO))
        if option is Option.STARTTLS and kind in (OptionReply.ERR_UNSUP, OptionReply.ERR_POLICY):
            what = "the server does not offer TLS (use nbd:// for plaintext)"
        if option is Option.GO and kind == OptionReply.ERR_UNKNOWN:
            what = f"the server has no export {self.export!r}"
        detail = f": {message}" if message else ""
        raise HandshakeFailed(f"{self._option_name()} failed: {what}{detail}", status)

    def _on_export_name_reply(self) -> Event | NeedData:
        if self._eof and not self._buffer:
            raise HandshakeFailed(
                f"the server closed the connection on export {self.export!r} "
                "(an old server's way to say it has no such export)",
                errno.ENOENT,
            )
        size = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else EXPORT_NAME_ZEROES)
        raw = self._take(size)
        if raw is None:
            return NEED_DATA
        export_size, flags = EXPORT_NAME_REPLY.unpack_from(raw)
        return self._open(export_size, flags, DEFAULT_MINIMUM_BLOCK, DEFAULT_PREFERRED_BLOCK, 0, "")

    def _open(
        self, size: int, flags: int, minimum: int, preferred: int, maximum: int, description: str
    ) -> Ready:
        if not flags & TransmissionFlag.HAS_FLAGS:
            flags = 0  # the spec: without HAS_FLAGS no other bit means anything
        if not _power_of_two(minimum) or minimum > MAX_MINIMUM_BLOCK:
            raise RemoteProtocolError(f"invalid minimum block size {minimum}")
        if not _power_of_two(preferred) or preferred < minimum:
            raise RemoteProtocolError(f"invalid preferred block size {preferred}")
        if maximum == 0:
            maximum = DEFAULT_MAX_PAYLOAD  # no constraints sent: the spec's 32 MiB
        elif maximum != 0xFFFFFFFF and (maximum < minimum or maximum % minimum):
            raise RemoteProtocolError(f"invalid maximum block size {maximum}")
        maximum = min(maximum, self.max_payload)
        maximum -= maximum % minimum
        if maximum < minimum:
            raise HandshakeFailed(
                f"the server's minimum block size {minimum} exceeds our payload limit "
                f"of {self.max_payload}",
                errno.EOPNOTSUPP,
            )
        self.ready = Ready(
            export=self.export,
            size=size,
            flags=TransmissionFlag(flags),
            minimum=minimum,
            preferred=preferred,
            maximum=maximum,
            structured=self._structured,
            allocation=self._allocation,
            description=description,
        )
        self._option = None
        self.phase = Phase.TRANSMISSION
        return self.ready

    # -- transmission -----------------------------------------------------
    def _next_reply(self) -> Event | NeedData | None:
        if self._chunk is not None:
            return self._chunk_payload(*self._chunk)
        if len(self._buffer) < 4:
            if self._eof:
                if self._buffer:
                    raise RemoteProtocolError("the server closed the connection inside a reply")
                return ConnectionClosed()
            return NEED_DATA
        (magic,) = U32_FIELD.unpack_from(self._buffer)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply()
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise RemoteProtocolError("structured reply without structured replies negotiated")
            return self._chunk_header()
        raise RemoteProtocolError(f"bad reply magic {magic:#x}")

    def _pending(self, cookie: int) -> _Pending:
        pending = self._in_flight.get(cookie)
        if pending is None:
            raise RemoteProtocolError(f"reply for cookie {cookie}, which is not in flight")
        return pending

    def _simple_reply(self) -> Event | NeedData:
        if len(self._buffer) < SIMPLE_REPLY.size:
            return self._short()
        _, error, cookie = SIMPLE_REPLY.unpack_from(self._buffer)
        pending = self._pending(cookie)
        if pending.buffer is not None and pending.covered:
            raise RemoteProtocolError(f"simple reply to cookie {cookie} after structured chunks")
        payload = pending.length if pending.command is Command.READ and not error else 0
        raw = self._take(SIMPLE_REPLY.size + payload)
        if raw is None:
            return NEED_DATA
        del self._in_flight[cookie]
        return NbdReply(cookie, pending.command, error, raw[SIMPLE_REPLY.size :])

    def _short(self) -> NeedData:
        if self._eof:
            raise RemoteProtocolError("the server closed the connection inside a reply")
        return NEED_DATA

    def _chunk_header(self) -> None | NeedData:
        raw = self._take(STRUCTURED_REPLY.size)
        if raw is None:
            return NEED_DATA
        _, flags, kind, cookie, length = STRUCTURED_REPLY.unpack(raw)
        pending = self._pending(cookie)
        limit = self._chunk_limit(pending, kind)
        if length > limit:
            raise RemoteProtocolError(
                f"chunk type {kind} of {length} bytes for {pending.command.name} "
                f"(at most {limit} allowed)"
            )
        self._chunk = (flags, kind, cookie, length)
        return None

    def _chunk_limit(self, pending: _Pending, kind: int) -> int:
        """The largest payload a chunk of `kind` may have for `pending`."""
        if kind == Chunk.NONE:
            return 0
        if kind == Chunk.ERROR:
            return ERROR_CHUNK.size + MAX_STRING
        if kind == Chunk.ERROR_OFFSET:
            return ERROR_CHUNK.size + MAX_STRING + U64_FIELD.size
        if pending.command is Command.READ:
            if kind == Chunk.OFFSET_DATA:
                return U64_FIELD.size + pending.length
            if kind == Chunk.OFFSET_HOLE:
                return HOLE_CHUNK.size
        if pending.command is Command.BLOCK_STATUS and kind == Chunk.BLOCK_STATUS:
            return 4 + EXTENT.size * self.max_extents
        if kind & CHUNK_ERROR_BIT:
            # An error type we do not know: the spec says to treat it as an
            # error, and that it starts like NBD_REPLY_TYPE_ERROR.
            return ERROR_CHUNK.size + MAX_STRING + U64_FIELD.size
        raise RemoteProtocolError(f"chunk type {kind} not valid for {pending.command.name}")

    def _chunk_payload(
        self, flags: int, kind: int, cookie: int, length: int
    ) -> Event | NeedData | None:
        raw = self._take(length)
        if raw is None:
            return NEED_DATA
        self._chunk = None
        pending = self._in_flight[cookie]
        if kind == Chunk.NONE:
            if not flags & ReplyFlag.DONE:
                raise RemoteProtocolError("NBD_REPLY_TYPE_NONE without the DONE flag")
        elif kind & CHUNK_ERROR_BIT:
            self._on_error_chunk(pending, kind, raw)
        elif kind == Chunk.OFFSET_DATA:
            self._on_data_chunk(pending, raw)
        elif kind == Chunk.OFFSET_HOLE:
            self._on_hole_chunk(pending, raw)
        else:
            self._on_status_chunk(pending, raw)
        if not flags & ReplyFlag.DONE:
            return None
        del self._in_flight[cookie]
        return self._finish(cookie, pending)

    def _on_error_chunk(self, pending: _Pending, kind: int, raw: bytes) -> None:
        if len(raw) < ERROR_CHUNK.size:
            raise RemoteProtocolError("error chunk shorter than its header")
        error, size = ERROR_CHUNK.unpack_from(raw)
        end = ERROR_CHUNK.size + size
        if end > len(raw) or (kind == Chunk.ERROR and end != len(raw)):
            raise RemoteProtocolError("error chunk with a bad message length")
        if kind == Chunk.ERROR_OFFSET:
            if len(raw) != end + U64_FIELD.size:
                raise RemoteProtocolError("NBD_REPLY_TYPE_ERROR_OFFSET of the wrong length")
            (offset,) = U64_FIELD.unpack_from(raw, end)
            if not pending.offset <= offset < pending.offset + pending.length:
                raise RemoteProtocolError(f"error offset {offset} outside the request")
        if error == 0:
            raise RemoteProtocolError("error chunk with error value 0")
        if not pending.error:
            pending.error = error
            pending.message = _text(raw[ERROR_CHUNK.size : end], "error message")

    def _place(self, pending: _Pending, offset: int, length: int) -> int:
        """Check [offset, +length) lies inside the READ and overlaps nothing
        sent before; return its position in the buffer."""
        start = offset - pending.offset
        if length < 1 or start < 0 or start + length > pending.length:
            raise RemoteProtocolError(
                f"read chunk [{offset}, +{length}) outside the request "
                f"[{pending.offset}, +{pending.length})"
            )
        # covered is sorted and disjoint: only the neighbours can overlap
        at = bisect.bisect_left(pending.covered, (start, start))
        if (at < len(pending.covered) and pending.covered[at][0] < start + length) or (
            at > 0 and pending.covered[at - 1][1] > start
        ):
            raise RemoteProtocolError(f"read chunk [{offset}, +{length}) overlaps another")
        pending.covered.insert(at, (start, start + length))
        return start

    def _on_data_chunk(self, pending: _Pending, raw: bytes) -> None:
        if len(raw) <= U64_FIELD.size:
            raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_DATA without data")
        (offset,) = U64_FIELD.unpack_from(raw)
        start = self._place(pending, offset, len(raw) - U64_FIELD.size)
        assert pending.buffer is not None
        pending.buffer[start : start + len(raw) - U64_FIELD.size] = raw[U64_FIELD.size :]

    def _on_hole_chunk(self, pending: _Pending, raw: bytes) -> None:
        if len(raw) != HOLE_CHUNK.size:
            raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of the wrong length")
        offset, length = HOLE_CHUNK.unpack(raw)
        self._place(pending, offset, length)  # the buffer holds zeroes already

    def _on_status_chunk(self, pending: _Pending, raw: bytes) -> None:
        if pending.extents:
            raise RemoteProtocolError("a second BLOCK_STATUS chunk for one context")
        if len(raw) < 4 + EXTENT.size or (len(raw) - 4) % EXTENT.size:
            raise RemoteProtocolError("NBD_REPLY_TYPE_BLOCK_STATUS of a bad length")
        (context,) = U32_FIELD.unpack_from(raw)
        if context != self._allocation:
            raise RemoteProtocolError(f"block status for context {context}, not negotiated")
        extents = tuple(Extent(length, flags) for length, flags in EXTENT.iter_unpack(raw[4:]))
        if any(extent.length == 0 for extent in extents):
            raise RemoteProtocolError("block status extent of length 0")
        if sum(extent.length for extent in extents[:-1]) >= pending.length:
            raise RemoteProtocolError("block status extents run past the request")
        pending.extents = extents

    def _finish(self, cookie: int, pending: _Pending) -> NbdReply:
        if pending.error:
            return NbdReply(cookie, pending.command, pending.error, b"", pending.message)
        if pending.command is Command.READ:
            covered = sum(end - begin for begin, end in pending.covered)
            if covered != pending.length:
                raise RemoteProtocolError(f"READ reply covered {covered} of {pending.length} bytes")
            assert pending.buffer is not None
            return NbdReply(cookie, pending.command, 0, bytes(pending.buffer))
        if pending.command is Command.BLOCK_STATUS and not pending.extents:
            raise RemoteProtocolError("BLOCK_STATUS reply without extents")
        return NbdReply(cookie, pending.command, 0, extents=pending.extents)


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise RemoteProtocolError(f"{what} longer than {MAX_STRING} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not UTF-8") from None

"""The server side of the NBD protocol, sans-IO: bytes in, events out;
answers in, bytes out (docs/protocol.md, "NBD").

`NbdServerConnection` is one server side of one NBD stream, fixed newstyle
only. The caller sends `greeting()`, feeds what it receives to
`receive_data`, takes events from `next_event` (server_events.py) and
sends the bytes the answering methods return. It never touches a socket,
a clock or a thread; TLS is the caller's (the codec says when to switch,
`TlsRequested`, and is told when it is done, `tls_started`).

Options: GO, INFO, EXPORT_NAME, LIST and the two META_CONTEXT options come
to the application as events (it knows the exports); STRUCTURED_REPLY,
STARTTLS, ABORT, every option we do not support and every malformed or
oversized option are answered by the codec itself (`OptionAnswered` etc.
carry the bytes). With `tls_required`, everything but STARTTLS and ABORT
gets NBD_REP_ERR_TLS_REQD until TLS is up (EXPORT_NAME ends the handshake:
it cannot be refused with an error).

Transmission: every request is checked here against what was negotiated
(export size, flags, block sizes, meta context) before the application
sees it; what fails comes as `NbdRejected` with the spec's error:

=============================================  =========
unknown command, or one the export does not     EINVAL
advertise (FLUSH, TRIM, WRITE_ZEROES, CACHE,
BLOCK_STATUS without a meta context)
a flag not valid for the command or not         EINVAL
advertised (FUA, FAST_ZERO, DF)
WRITE / TRIM / WRITE_ZEROES, read-only export   EPERM
zero length, or offset/length not a multiple    EINVAL
of the minimum block; FLUSH with offset/length
READ / WRITE longer than the maximum block      EOVERFLOW
WRITE / TRIM / WRITE_ZEROES past the end        ENOSPC
READ / BLOCK_STATUS past the end                EINVAL
=============================================  =========

Errors are split as in our own codec (dstfuse/protocol/errors.py):
`RemoteProtocolError` when the peer broke the protocol (bad magic, unknown
client flags, a stream cut inside a message, bytes after STARTTLS before
the switch); the connection is then in ERROR and the caller drops the
transport. `LocalProtocolError` when the caller misused the codec.

Invariants:
- memory: after `next_event` returned NEED_DATA, at most one message is
  buffered, and a message is bounded before any of it is kept: option data
  by `max_option_data`, WRITE payloads by `max_payload`; longer ones are
  read and dropped as they arrive (answered with ERR_TOO_BIG / EOVERFLOW);
- a WRITE's `data` is the caller's alone: a copy, or (a large payload
  that ends the receive buffer) a view of a buffer the codec has let go;
- while an option event awaits its answer, nothing further is parsed;
- a reply is produced only in TRANSMISSION, READ replies are structured
  once structured replies were negotiated, BLOCK_STATUS only with a meta
  context selected, and no reply ever claims more than its request covers.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Sequence

from ..errors import LocalProtocolError, RemoteProtocolError
from ..need_data import NEED_DATA, NeedData
from .constants import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_DATA,
    MAX_STRING,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U16_FIELD,
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
from .server_events import (
    Buffer,
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
    ServerEvent,
    TlsRequested,
)

#: The id of base:allocation, the one meta context we serve.
BASE_ALLOCATION_ID = 1
#: The smallest payload limit the codec takes (a sector).
_MIN_PAYLOAD = 512
#: WRITE payloads from this size on may be returned as a view of the
#: receive buffer rather than a copy (see _parse_request).
_HANDOVER_MIN = 64 << 10
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_GREETING_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_RANGE_COMMANDS = frozenset(
    {Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES, Command.BLOCK_STATUS}
)
_COMMAND_BY_VALUE = {int(c): c for c in Command}
#: The flag a command needs advertised to be sent at all.
_NEEDS_FLAG = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
    Command.RESIZE: TransmissionFlag.SEND_RESIZE,
}
#: Flags valid per command (FUA is valid on every command once advertised).
_COMMAND_FLAGS = {
    Command.READ: CommandFlag.DF,
    Command.WRITE_ZEROES: CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
}
#: Transmission flags that only make sense on a writable export.
_WRITE_FLAGS = (
    TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)


class ServerState(enum.Enum):
    CLIENT_FLAGS = "client-flags"  # greeting sent, waiting for the client's flags
    OPTIONS = "options"
    ANSWERING = "answering"  # an option event waits for the application's answer
    TLS_PENDING = "tls-pending"  # STARTTLS acknowledged; the transport must switch
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class NbdServerConnection:
    """One server side of an NBD stream.

    `tls_available`: STARTTLS is accepted (the caller can run TLS);
    `tls_required`: every option but STARTTLS and ABORT is refused until
    TLS is up (implies `tls_available`). `max_payload` bounds a WRITE
    payload kept in memory, `max_option_data` the data of one option.
    """

    def __init__(
        self,
        *,
        tls_available: bool = False,
        tls_required: bool = False,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_option_data: int = MAX_OPTION_DATA,
    ) -> None:
        if not _MIN_PAYLOAD <= max_payload < 1 << 32:
            raise LocalProtocolError(f"max_payload must be in {_MIN_PAYLOAD}..2**32-1")
        if not MAX_STRING + 8 <= max_option_data < 1 << 32:
            raise LocalProtocolError(f"max_option_data must be at least {MAX_STRING + 8}")
        self.state = ServerState.CLIENT_FLAGS
        self.tls_available = tls_available or tls_required
        self.tls_required = tls_required
        self.tls_active = False
        self.max_payload = max_payload
        self.max_option_data = max_option_data
        self.no_zeroes = False
        self.structured_replies = False
        #: The export chosen by GO / EXPORT_NAME, and what it was told.
        self.export_name: str | None = None
        self.export: ExportInfo | None = None
        #: base:allocation selected by SET_META_CONTEXT for this export name
        self._meta_export: str | None = None
        self._buffer = bytearray()
        self._start = 0
        self._eof = False
        # Bytes of the current message still to be dropped, and the event
        # to return once they are.
        self._skip = 0
        self._after_skip: ServerEvent | None = None
        self._pending: ServerEvent | None = None
        self._pending_option = 0

    # -- receiving ----------------------------------------------------------
    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def greeting(self) -> bytes:
        """The server's opening bytes (NBDMAGIC, IHAVEOPT, handshake flags)."""
        return GREETING.pack(NBDMAGIC, IHAVEOPT, int(_GREETING_FLAGS))

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the transport; b"" means the peer closed."""
        if self.state is ServerState.ERROR:
            raise LocalProtocolError("connection is in the error state")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data after end of stream")
        if self._start and self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        self._buffer += data

    def next_event(self) -> ServerEvent | NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError (the
        connection is in ERROR then) when the peer broke the protocol."""
        state = self.state
        if state is ServerState.ERROR:
            raise LocalProtocolError("connection is in the error state")
        if state is ServerState.ANSWERING:
            raise LocalProtocolError("answer the pending option first")
        if state is ServerState.TLS_PENDING:
            raise LocalProtocolError("switch to TLS and call tls_started() first")
        try:
            event = self._parse()
        except RemoteProtocolError:
            self.state = ServerState.ERROR
            raise
        if event is NEED_DATA:
            self._compact()
            if self._eof:
                return self._at_end()
        return event

    def tls_started(self) -> None:
        """The transport now runs TLS: option haggling starts again (what
        was negotiated in plaintext is forgotten, as the spec asks).
        RemoteProtocolError if the client sent bytes after STARTTLS before
        the TLS handshake: they were plaintext, and would otherwise be
        taken as if they came through TLS."""
        if self.state is not ServerState.TLS_PENDING:
            raise LocalProtocolError("no STARTTLS was accepted")
        if self.buffered:
            self.state = ServerState.ERROR
            raise RemoteProtocolError("client sent plaintext after STARTTLS")
        self._buffer.clear()
        self._start = 0
        self.tls_active = True
        self.structured_replies = False
        self._meta_export = None
        self.state = ServerState.OPTIONS

    def _compact(self) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0

    def _at_end(self) -> ServerEvent | NeedData:
        if self.buffered or self._skip:
            self.state = ServerState.ERROR
            raise RemoteProtocolError("stream ended inside a message")
        if self.state is not ServerState.CLOSED:
            self.state = ServerState.CLOSED
        return ConnectionClosed()

    def _take(self, size: int) -> bytes | None:
        """The next `size` bytes if they are all buffered (consumed)."""
        start = self._start
        if len(self._buffer) - start < size:
            return None
        self._start = start + size
        return bytes(self._buffer[start : start + size])

    def _parse(self) -> ServerEvent | NeedData:
        if self._skip:
            dropped = min(self._skip, self.buffered)
            self._start += dropped
            self._skip -= dropped
            if self._skip:
                return NEED_DATA
            event, self._after_skip = self._after_skip, None
            assert event is not None
            return self._deliver(event)
        state = self.state
        if state is ServerState.TRANSMISSION:
            return self._parse_request()
        if state is ServerState.OPTIONS:
            return self._parse_option()
        if state is ServerState.CLIENT_FLAGS:
            return self._parse_client_flags()
        # CLOSED: after DISC, ABORT or a refusal the client must send
        # nothing more; whatever it sends anyway is dropped unread.
        self._start = len(self._buffer)
        return NEED_DATA

    def _deliver(self, event: ServerEvent) -> ServerEvent:
        if isinstance(
            event, (ExportNameRequested, InfoRequested, ListRequested, MetaContextRequested)
        ):
            self.state = ServerState.ANSWERING
            self._pending = event
        return event

    # -- handshake ----------------------------------------------------------
    def _parse_client_flags(self) -> ServerEvent | NeedData:
        view = self._take(CLIENT_FLAGS.size)
        if view is None:
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack(view)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        if not flags & ClientFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("client does not speak fixed newstyle negotiation")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.state = ServerState.OPTIONS
        return self._parse_option()

    def _parse_option(self) -> ServerEvent | NeedData:
        start = self._start
        if len(self._buffer) - start < OPTION.size:
            return NEED_DATA
        magic, option, length = OPTION.unpack_from(self._buffer, start)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > self.max_option_data:
            self._start = start + OPTION.size
            self._skip = length
            if option == Option.EXPORT_NAME:
                self.state = ServerState.CLOSED
                self._after_skip = HandshakeEnded("export name too long")
            else:
                self._after_skip = self._answered(
                    option,
                    OptionReply.ERR_TOO_BIG,
                    f"option data over {self.max_option_data} bytes",
                )
            return self._parse()
        if len(self._buffer) - start < OPTION.size + length:
            return NEED_DATA
        self._start = start + OPTION.size + length
        data = bytes(self._buffer[start + OPTION.size : self._start])
        return self._deliver(self._on_option(option, data))

    def _on_option(self, option: int, data: bytes) -> ServerEvent:
        if option == Option.ABORT:
            self.state = ServerState.CLOSED
            return HandshakeEnded(
                "client aborted the handshake", self._option_reply(option, OptionReply.ACK)
            )
        if option == Option.STARTTLS:
            return self._on_starttls(data)
        if self.tls_required and not self.tls_active:
            if option == Option.EXPORT_NAME:
                self.state = ServerState.CLOSED
                return HandshakeEnded("client asked for an export without TLS, which is required")
            return self._answered(option, OptionReply.ERR_TLS_REQD, "TLS is required (STARTTLS)")
        self._pending_option = option
        try:
            if option == Option.EXPORT_NAME:
                return ExportNameRequested(_string(data, "export name"))
            if option in (Option.INFO, Option.GO):
                return self._parse_info(option, data)
            if option == Option.LIST:
                if data:
                    raise _Invalid("LIST carries no data")
                return ListRequested()
            if option == Option.STRUCTURED_REPLY:
                if data:
                    raise _Invalid("STRUCTURED_REPLY carries no data")
                self.structured_replies = True
                return self._answered(option, OptionReply.ACK)
            if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                if not self.structured_replies:
                    raise _Invalid("negotiate structured replies first")
                return self._parse_meta_context(option, data)
        except _Invalid as exc:
            if option == Option.EXPORT_NAME:
                self.state = ServerState.CLOSED
                return HandshakeEnded(f"bad EXPORT_NAME: {exc}")
            return self._answered(option, OptionReply.ERR_INVALID, str(exc))
        return self._answered(option, OptionReply.ERR_UNSUP, "option not supported")

    def _on_starttls(self, data: bytes) -> ServerEvent:
        option = Option.STARTTLS
        if not self.tls_available:
            return self._answered(option, OptionReply.ERR_UNSUP, "TLS is not configured")
        if self.tls_active:
            return self._answered(option, OptionReply.ERR_INVALID, "TLS is already running")
        if data:
            return self._answered(option, OptionReply.ERR_INVALID, "STARTTLS carries no data")
        self.state = ServerState.TLS_PENDING
        return TlsRequested(self._option_reply(option, OptionReply.ACK))

    def _parse_info(self, option: int, data: bytes) -> InfoRequested:
        reader = _Reader(data)
        name = reader.string("export name")
        count = reader.u16()
        requests = tuple(reader.u16() for _ in range(count))
        reader.end()
        return InfoRequested(name, go=option == Option.GO, requests=requests)

    def _parse_meta_context(self, option: int, data: bytes) -> MetaContextRequested:
        reader = _Reader(data)
        name = reader.string("export name")
        count = reader.u32()
        if count * 4 > len(data):
            raise _Invalid("more queries than the option holds")
        queries = tuple(reader.string("query") for _ in range(count))
        reader.end()
        return MetaContextRequested(name, select=option == Option.SET_META_CONTEXT, queries=queries)

    def _answered(self, option: int, reply: int, message: str = "") -> OptionAnswered:
        return OptionAnswered(option, reply, self._option_reply(option, reply, message.encode()))

    @staticmethod
    def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
        return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data

    # -- answering options ----------------------------------------------------
    def _answer(self, kind: type) -> ServerEvent:
        if self.state is not ServerState.ANSWERING or not isinstance(self._pending, kind):
            raise LocalProtocolError(f"no {kind.__name__} is waiting for an answer")
        event = self._pending
        self._pending = None
        self.state = ServerState.OPTIONS
        return event

    def answer_export_name(self, info: ExportInfo) -> bytes:
        """Accept NBD_OPT_EXPORT_NAME with `info`: transmission starts."""
        event = self._answer(ExportNameRequested)
        assert isinstance(event, ExportNameRequested)
        info = self._enter_transmission(event.name, info)
        reply = EXPORT_NAME_REPLY.pack(info.size, int(self._flags(info)))
        return reply if self.no_zeroes else reply + bytes(EXPORT_NAME_ZEROES)

    def refuse_export_name(self) -> None:
        """Refuse NBD_OPT_EXPORT_NAME; the caller closes the connection."""
        self._answer(ExportNameRequested)
        self.state = ServerState.CLOSED

    def answer_info(self, info: ExportInfo, *, canonical_name: str | None = None) -> bytes:
        """Answer NBD_OPT_INFO / NBD_OPT_GO for the export `info` describes:
        NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always, NBD_INFO_NAME and
        NBD_INFO_DESCRIPTION when asked (and there is a description). After
        GO, transmission starts."""
        event = self._answer(InfoRequested)
        assert isinstance(event, InfoRequested)
        option = Option.GO if event.go else Option.INFO
        name = canonical_name if canonical_name is not None else event.name
        if event.go:
            # The name as asked: SET_META_CONTEXT named the export the same way.
            info = self._enter_transmission(event.name, info)
        else:
            self._check_info(info)
        parts = [
            self._info(option, INFO_EXPORT.pack(Info.EXPORT, info.size, int(self._flags(info)))),
            self._info(
                option,
                INFO_BLOCK_SIZE.pack(
                    Info.BLOCK_SIZE, info.minimum_block, info.preferred_block, info.maximum_block
                ),
            ),
        ]
        if Info.NAME in event.requests:
            parts.append(self._info(option, U16_FIELD.pack(Info.NAME) + name.encode()))
        if Info.DESCRIPTION in event.requests and info.description:
            parts.append(
                self._info(option, U16_FIELD.pack(Info.DESCRIPTION) + info.description.encode())
            )
        parts.append(self._option_reply(option, OptionReply.ACK))
        return b"".join(parts)

    def _info(self, option: int, data: bytes) -> bytes:
        return self._option_reply(option, OptionReply.INFO, data)

    def answer_list(self, exports: Sequence[tuple[str, str]]) -> bytes:
        """Answer NBD_OPT_LIST with (name, description) of each export."""
        self._answer(ListRequested)
        parts = []
        for name, description in exports:
            encoded = name.encode()
            parts.append(
                self._option_reply(
                    Option.LIST,
                    OptionReply.SERVER,
                    U32_FIELD.pack(len(encoded)) + encoded + description.encode(),
                )
            )
        parts.append(self._option_reply(Option.LIST, OptionReply.ACK))
        return b"".join(parts)

    def answer_meta_context(self) -> bytes:
        """Answer LIST/SET_META_CONTEXT for an export that exists: the one
        context we have, base:allocation, matches an empty LIST, the query
        "base:" (LIST) and the query "base:allocation"; SET selects it for
        transmission on that export (a SET that matches nothing selects
        nothing)."""
        event = self._answer(MetaContextRequested)
        assert isinstance(event, MetaContextRequested)
        option = Option.SET_META_CONTEXT if event.select else Option.LIST_META_CONTEXT
        if event.select:
            matched = BASE_ALLOCATION in event.queries
            self._meta_export = event.name if matched else None
        else:
            matched = not event.queries or any(
                query in ("base:", BASE_ALLOCATION) for query in event.queries
            )
        parts = []
        if matched:
            context_id = BASE_ALLOCATION_ID if event.select else 0
            parts.append(
                self._option_reply(
                    option,
                    OptionReply.META_CONTEXT,
                    U32_FIELD.pack(context_id) + BASE_ALLOCATION.encode(),
                )
            )
        parts.append(self._option_reply(option, OptionReply.ACK))
        return b"".join(parts)

    def refuse_option(self, reply: OptionReply, message: str) -> bytes:
        """Refuse the pending INFO/GO/LIST/META_CONTEXT option with the
        error reply type `reply` (ERR_UNKNOWN: no such export, ERR_POLICY:
        not for this client, ...) and a message for the user."""
        if not int(reply) & 1 << 31:
            raise LocalProtocolError(f"{reply!r} is not an error reply")
        if self.state is not ServerState.ANSWERING or isinstance(
            self._pending, ExportNameRequested
        ):
            raise LocalProtocolError("no option that can be refused is waiting")
        event = self._pending
        self._pending = None
        self.state = ServerState.OPTIONS
        if isinstance(event, InfoRequested):
            option = Option.GO if event.go else Option.INFO
        elif isinstance(event, MetaContextRequested):
            option = Option.SET_META_CONTEXT if event.select else Option.LIST_META_CONTEXT
        else:
            option = Option.LIST
        return self._option_reply(option, reply, message.encode()[:MAX_STRING])

    def _check_info(self, info: ExportInfo) -> None:
        if info.maximum_block > self.max_payload:
            raise LocalProtocolError(
                f"maximum block {info.maximum_block} exceeds max_payload {self.max_payload}"
            )

    def _flags(self, info: ExportInfo) -> TransmissionFlag:
        flags = info.flags | TransmissionFlag.HAS_FLAGS
        if flags & TransmissionFlag.READ_ONLY:
            flags &= ~_WRITE_FLAGS
        if not self.structured_replies:
            flags &= ~TransmissionFlag.SEND_DF
        return flags

    def _enter_transmission(self, name: str, info: ExportInfo) -> ExportInfo:
        self._check_info(info)
        info = ExportInfo(
            info.size,
            self._flags(info),
            info.minimum_block,
            info.preferred_block,
            info.maximum_block,
            info.description,
        )
        self.export_name = name
        self.export = info
        if self._meta_export != name:
            self._meta_export = None  # selected for another export: not this one's
        self.state = ServerState.TRANSMISSION
        return info

    @property
    def meta_context(self) -> bool:
        """base:allocation is selected for the export in transmission."""
        return self._meta_export is not None and self._meta_export == self.export_name

    # -- transmission ---------------------------------------------------------
    def _parse_request(self) -> ServerEvent | NeedData:
        start = self._start
        buffer = self._buffer
        if len(buffer) - start < REQUEST.size:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = REQUEST.unpack_from(buffer, start)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        command = _COMMAND_BY_VALUE.get(kind)
        if command is Command.WRITE:
            if length > self.max_payload:
                self._start = start + REQUEST.size
                self._skip = length
                self._after_skip = NbdRejected(
                    kind,
                    flags,
                    cookie,
                    offset,
                    length,
                    errno.EOVERFLOW,
                    f"write of {length} bytes exceeds the maximum {self.max_payload}",
                )
                return self._parse()
            end = start + REQUEST.size + length
            if len(buffer) < end:
                return NEED_DATA
            data: Buffer
            if end == len(buffer) and length >= _HANDOVER_MIN:
                # The payload ends the buffer (usual for large writes): hand
                # the buffer itself over as a view instead of copying it,
                # and start a new one.
                data = memoryview(buffer)[start + REQUEST.size : end]
                self._buffer = bytearray()
                self._start = 0
            else:
                data = buffer[start + REQUEST.size : end]
                self._start = end
        else:
            self._start = start + REQUEST.size
            data = b""
        if command is Command.DISC:
            self.state = ServerState.CLOSED
            return Disconnected()
        problem = self._check_request(command, kind, flags, offset, length)
        if problem is not None:
            error, reason = problem
            return NbdRejected(kind, flags, cookie, offset, length, error, reason)
        assert command is not None
        return NbdRequest(command, flags, cookie, offset, length, data)

    def _check_request(
        self, command: Command | None, kind: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        info = self.export
        assert info is not None
        advertised = info.flags
        if command is None:
            return errno.EINVAL, f"unknown command {kind}"
        if command in _WRITE_COMMANDS and advertised & TransmissionFlag.READ_ONLY:
            return errno.EPERM, "the export is read-only"
        needed = _NEEDS_FLAG.get(command)
        if needed is not None and not advertised & needed:
            return errno.EINVAL, f"{command.name} is not supported by this export"
        if command is Command.BLOCK_STATUS and not self.meta_context:
            return errno.EINVAL, "BLOCK_STATUS without a meta context (SET_META_CONTEXT)"
        valid = int(_COMMAND_FLAGS.get(command, 0))
        if advertised & TransmissionFlag.SEND_FUA:
            valid |= CommandFlag.FUA
        if not advertised & TransmissionFlag.SEND_FAST_ZERO:
            valid &= ~CommandFlag.FAST_ZERO
        if not advertised & TransmissionFlag.SEND_DF:
            valid &= ~CommandFlag.DF
        if flags & ~valid:
            return errno.EINVAL, f"flags {flags:#x} are not valid for {command.name}"
        if command is Command.FLUSH:
            if offset or length:
                return errno.EINVAL, "FLUSH with an offset or length"
            return None
        if command not in _RANGE_COMMANDS:
            return None
        if not length:
            return errno.EINVAL, f"{command.name} of zero length"
        minimum = info.minimum_block
        if offset % minimum or length % minimum:
            return errno.EINVAL, f"range not aligned to the minimum block size {minimum}"
        if command in (Command.READ, Command.WRITE) and length > info.maximum_block:
            return (
                errno.EOVERFLOW,
                f"length {length} exceeds the maximum block size {info.maximum_block}",
            )
        if offset + length > info.size:
            error = errno.ENOSPC if command in _WRITE_COMMANDS else errno.EINVAL
            return error, f"range ends at {offset + length}, past the end ({info.size} bytes)"
        return None

    # -- replies ----------------------------------------------------------------
    def _expect_transmission(self) -> None:
        # CLOSED too: requests before DISC are still answered.
        if self.state not in (ServerState.TRANSMISSION, ServerState.CLOSED) or self.export is None:
            raise LocalProtocolError("replies are only sent in transmission")

    def reply_ok(self, request: NbdRequest) -> bytes:
        """Success for any command but READ and BLOCK_STATUS."""
        self._expect_transmission()
        if request.command in (Command.READ, Command.BLOCK_STATUS):
            raise LocalProtocolError(f"{request.command.name} needs its data in the reply")
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie)

    def reply_read(self, request: NbdRequest, data: Buffer) -> list[Buffer]:
        """The READ reply with `data` (exactly the request's length): the
        header and the data as separate buffers, for one writev."""
        self._expect_transmission()
        size = memoryview(data).nbytes
        if request.command is not Command.READ or size != request.length:
            raise LocalProtocolError("a READ reply carries exactly the bytes asked for")
        if not self.structured_replies:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie), data]
        header = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC,
            int(ReplyFlag.DONE),
            int(Chunk.OFFSET_DATA),
            request.cookie,
            8 + size,
        )
        return [header + U64_FIELD.pack(request.offset), data]

    def reply_block_status(self, request: NbdRequest, extents: Sequence[tuple[int, int]]) -> bytes:
        """The BLOCK_STATUS reply: `extents` are (length, base:allocation
        flags) from the request's offset on, at least one, none empty, not
        covering more than the request; with REQ_ONE only the first is sent."""
        self._expect_transmission()
        if request.command is not Command.BLOCK_STATUS:
            raise LocalProtocolError("not a BLOCK_STATUS request")
        if request.flags & CommandFlag.REQ_ONE:
            extents = extents[:1]
        if not extents or any(length <= 0 for length, _ in extents):
            raise LocalProtocolError("block status needs at least one non-empty extent")
        if sum(length for length, _ in extents) > request.length:
            raise LocalProtocolError("extents cover more than the request")
        payload = U32_FIELD.pack(BASE_ALLOCATION_ID) + b"".join(
            EXTENT.pack(length, flags) for length, flags in extents
        )
        return (
            STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                int(ReplyFlag.DONE),
                int(Chunk.BLOCK_STATUS),
                request.cookie,
                len(payload),
            )
            + payload
        )

    def reply_error(
        self, request: NbdRequest | NbdRejected, error: int, message: str = ""
    ) -> bytes:
        """A failed request: an ERROR chunk with `message` once structured
        replies are negotiated, else a simple reply with the error. `error`
        is an errno; those outside the spec's set go out as EIO, and the
        codes the spec names for one meaning (EDQUOT, EFBIG: ENOSPC;
        EROFS: EPERM; EOPNOTSUPP: ENOTSUP) as that code."""
        self._expect_transmission()
        code = _wire_error(error)
        if not self.structured_replies:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, request.cookie)
        text = message.encode()[:MAX_STRING]
        payload = ERROR_CHUNK.pack(code, len(text)) + text
        return (
            STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                int(ReplyFlag.DONE),
                int(Chunk.ERROR),
                request.cookie,
                len(payload),
            )
            + payload
        )


_WIRE_ERRORS = {
    errno.EPERM: errno.EPERM,
    errno.EROFS: errno.EPERM,
    errno.EACCES: errno.EPERM,
    errno.EIO: errno.EIO,
    errno.ENOMEM: errno.ENOMEM,
    errno.EINVAL: errno.EINVAL,
    errno.ENOSPC: errno.ENOSPC,
    errno.EDQUOT: errno.ENOSPC,
    errno.EFBIG: errno.ENOSPC,
    errno.EOVERFLOW: errno.EOVERFLOW,
    errno.ENOTSUP: errno.ENOTSUP,
    errno.ESHUTDOWN: errno.ESHUTDOWN,
}


def _wire_error(error: int) -> int:
    if not error:
        raise LocalProtocolError("an error reply needs a nonzero error")
    return _WIRE_ERRORS.get(error, errno.EIO)


class _Invalid(Exception):
    """Malformed option data: answered with NBD_REP_ERR_INVALID."""


def _string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise _Invalid(f"{what} longer than {MAX_STRING} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _Invalid(f"{what} is not UTF-8") from None
    if "\0" in text:
        raise _Invalid(f"{what} contains NUL")
    return text


class _Reader:
    """Cuts an option's data into fields; `_Invalid` when it does not fit."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def _bytes(self, size: int) -> bytes:
        end = self.position + size
        if end > len(self.data):
            raise _Invalid("option data too short")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def u16(self) -> int:
        return int(U16_FIELD.unpack(self._bytes(2))[0])

    def u32(self) -> int:
        return int(U32_FIELD.unpack(self._bytes(4))[0])

    def string(self, what: str) -> str:
        return _string(self._bytes(self.u32()), what)

    def end(self) -> None:
        if self.position != len(self.data):
            raise _Invalid("trailing bytes in option data")

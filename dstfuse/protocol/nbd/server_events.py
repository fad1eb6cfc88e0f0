"""Events of the NBD server codec (`dstfuse.protocol.nbd.server`) and the
export description the application answers with.

Events are frozen dataclasses. Option events the application must answer
(`ExportNameRequested`, `InfoRequested`, `ListRequested`,
`MetaContextRequested`) are answered by a method of the codec; the others
carry the bytes the codec produced itself (`data`), which the caller sends
as they are. Transmission requests come as `NbdRequest` (checked: the
application may run it) or `NbdRejected` (the codec found it invalid: the
application answers with `reply_error(event, event.error)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from .constants import MAX_STRING, Command, TransmissionFlag

Buffer = bytes | bytearray | memoryview

_U32 = 1 << 32
_U64 = 1 << 64
#: The spec's bound for the minimum block size.
_MAX_MINIMUM_BLOCK = 64 << 10


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class ExportInfo:
    """What a client is told about one export: `size` in bytes, the
    transmission `flags` (HAS_FLAGS is added by the codec), and the block
    size constraints: every request's offset and length must be a multiple
    of `minimum_block`; `preferred_block` is the size clients should use;
    READ and WRITE payloads are at most `maximum_block` bytes."""

    size: int
    flags: TransmissionFlag
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_block: int = 32 << 20
    description: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.size < _U64:
            raise LocalProtocolError("export size out of range")
        if int(self.flags) & ~0xFFFF or int(self.flags) < 0:
            raise LocalProtocolError("transmission flags out of range")
        if not (_power_of_two(self.minimum_block) and self.minimum_block <= _MAX_MINIMUM_BLOCK):
            raise LocalProtocolError("minimum block must be a power of two up to 64 KiB")
        if not (_power_of_two(self.preferred_block) and self.preferred_block >= self.minimum_block):
            raise LocalProtocolError("preferred block must be a power of two >= the minimum")
        if not (
            self.maximum_block < _U32
            and self.maximum_block >= self.minimum_block
            and self.maximum_block % self.minimum_block == 0
        ):
            raise LocalProtocolError("maximum block must be a multiple of the minimum, < 4 GiB")
        if len(self.description.encode()) > MAX_STRING:
            raise LocalProtocolError("description longer than 4096 bytes")
        object.__setattr__(self, "flags", TransmissionFlag(int(self.flags)))


# -- option haggling ------------------------------------------------------


@dataclass(frozen=True)
class ExportNameRequested:
    """NBD_OPT_EXPORT_NAME: answer with `answer_export_name` (transmission
    starts) or `refuse_export_name` (the spec allows no error reply: the
    connection is to be closed)."""

    name: str


@dataclass(frozen=True)
class InfoRequested:
    """NBD_OPT_GO (`go`) or NBD_OPT_INFO for export `name`, asking for the
    NBD_INFO_* items `requests`. Answer with `answer_info` (after GO,
    transmission starts) or `refuse_option`."""

    name: str
    go: bool
    requests: tuple[int, ...] = ()


@dataclass(frozen=True)
class ListRequested:
    """NBD_OPT_LIST: answer with `answer_list` or `refuse_option`."""


@dataclass(frozen=True)
class MetaContextRequested:
    """NBD_OPT_SET_META_CONTEXT (`select`) or NBD_OPT_LIST_META_CONTEXT for
    export `name` with `queries`. Answer with `answer_meta_context` when the
    export exists (the codec matches the queries), else `refuse_option`."""

    name: str
    select: bool
    queries: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptionAnswered:
    """The codec answered an option itself (STRUCTURED_REPLY, an option it
    does not support, a malformed or oversized one, TLS required): send
    `data`. `reply` is the NBD_REP_* type it sent."""

    option: int
    reply: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class TlsRequested:
    """NBD_OPT_STARTTLS was accepted: send `data` (the ACK), run the TLS
    handshake on the transport, then call `tls_started()` and feed what the
    TLS stream delivers."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class HandshakeEnded:
    """The handshake is over without transmission: the client sent
    NBD_OPT_ABORT (send `data`, the ACK, then close), or asked for
    NBD_OPT_EXPORT_NAME while TLS is required (close at once; `data` is
    empty). `reason` is for the log."""

    reason: str
    data: bytes = field(default=b"", repr=False)


# -- transmission ---------------------------------------------------------


@dataclass(frozen=True)
class NbdRequest:
    """A request the codec checked against the negotiated export: a command
    the export advertises, flags valid for it, offset and length aligned to
    the minimum block, within the export and (READ, WRITE) at most
    `maximum_block` long; no write command on a read-only export. `data`
    is the WRITE payload (empty for every other command)."""

    command: Command
    flags: int
    cookie: int
    offset: int
    length: int
    data: Buffer = field(default=b"", repr=False)


@dataclass(frozen=True)
class NbdRejected:
    """A request the codec refused (see `NbdRequest` for what it checks):
    answer it with `reply_error(event, event.error, event.reason)`.
    `command` is the wire value (it may be unknown)."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    error: int
    reason: str


@dataclass(frozen=True)
class Disconnected:
    """NBD_CMD_DISC: finish the requests in flight, then close."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the stream between messages."""


ServerEvent = (
    ExportNameRequested
    | InfoRequested
    | ListRequested
    | MetaContextRequested
    | OptionAnswered
    | TlsRequested
    | HandshakeEnded
    | NbdRequest
    | NbdRejected
    | Disconnected
    | ConnectionClosed
)

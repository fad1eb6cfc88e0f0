"""Protocol events: what `Connection.next_event` returns and `send` takes.

Events are frozen dataclasses validated on construction, so a malformed
event is a `LocalProtocolError` at the point where it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import REQUEST_COMMANDS, Command, Feature, Flag, Permission
from .errors import LocalProtocolError

_U32 = 1 << 32
_U64 = 1 << 64
Buffer = bytes | bytearray | memoryview


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LocalProtocolError(message)


@dataclass(frozen=True)
class HelloReceived:
    """Server side: a client asks for `export` (None = the node's default)."""

    export: str | None
    client_id: bytes
    client_name: str
    versions: tuple[int, ...]
    modes: tuple[str, ...]


@dataclass(frozen=True)
class Challenged:
    """Client side: the node chose `mode` and proved its key (keyed modes).
    The client answers with `Connection.confirm()`."""

    version: int
    mode: str
    node_name: str


@dataclass(frozen=True)
class Confirmed:
    """Server side: the client proved its key; answer with `Connection.ready`."""


@dataclass(frozen=True)
class Ready:
    """The export's parameters for this peer; the connection is open after it."""

    size: int
    permissions: Permission
    block_size: int = 4096
    max_request: int = 1 << 20
    features: Feature = Feature.NONE
    export: str = ""

    def __post_init__(self) -> None:
        _check(0 <= self.size < _U64, "size out of range")
        _check(0 < self.block_size < _U32, "block size out of range")
        _check(0 < self.max_request < _U32, "max request out of range")


@dataclass(frozen=True)
class Refused:
    """The peer refused the handshake: `status` is an errno, `message` says why."""

    status: int
    message: str


@dataclass(frozen=True)
class Request:
    """A client request. `length` is the byte count the request covers; for
    WRITE it must equal len(data), every other command carries no data."""

    command: Command
    handle: int
    offset: int = 0
    length: int = 0
    flags: Flag = Flag.NONE
    data: Buffer = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check(self.command in REQUEST_COMMANDS, f"{self.command!r} is not a request")
        _check(0 <= self.handle < _U64, "handle out of range")
        _check(0 <= self.offset < _U64, "offset out of range")
        _check(0 <= self.length < _U32, "length out of range")
        _check(not self.flags & Flag.REPLY, "requests cannot carry the REPLY flag")
        if self.command is Command.WRITE:
            _check(len(self.data) == self.length, "WRITE length differs from its data")
        else:
            _check(len(self.data) == 0, f"{self.command.name} carries no data")


@dataclass(frozen=True)
class Reply:
    """The node's answer to request `handle`; `status` 0 or an errno. READ
    replies carry the data, CHECKSUM replies the 16-byte digest. `offset` and
    `length` echo the request for logs."""

    command: Command
    handle: int
    status: int = 0
    offset: int = 0
    length: int = 0
    data: Buffer = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check(self.command in REQUEST_COMMANDS, f"{self.command!r} is not a request")
        _check(0 <= self.handle < _U64, "handle out of range")
        _check(0 <= self.status < _U32, "status out of range")
        _check(0 <= self.offset < _U64, "offset out of range")
        _check(0 <= self.length < _U32, "length out of range")


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the stream cleanly between frames."""


Event = HelloReceived | Challenged | Confirmed | Ready | Refused | Request | Reply | ConnectionClosed

"""Protocol events: what `Connection.next_event` returns and `send` takes.

Events are frozen dataclasses validated on construction, so a malformed
event is a `LocalProtocolError` at the point where it is built, never a
bad frame on the wire. Fields given as plain ints are normalised to their
enum types (`Command`, `Flag`, `Permission`, `Feature`).

`Request` and `Reply` are built once per I/O, so their checks start with
one test that accepts the usual fields (a command and flags found in a
table, bytes data, ints in range) and fall back to the field-by-field
checks, which give the error message or normalise an unusual value, for
anything else. `parsed_request` and `parsed_reply` are for the
connection's parser only: they build an event from fields it has already
checked, without checking again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import (
    ALL_FEATURES,
    ALL_PERMISSIONS,
    REQUEST_COMMANDS,
    REQUEST_FLAGS,
    Command,
    Feature,
    Flag,
    HelloFlag,
    Permission,
)
from .errors import LocalProtocolError
from .instance import NodeInstance

_U32 = 1 << 32
_U64 = 1 << 64
Buffer = bytes | bytearray | memoryview


_new = object.__new__
_set = object.__setattr__
#: Request commands by value; a key equal to a Command's value finds the
#: member Command(key) would return.
_REQUEST_COMMAND = {int(command): command for command in REQUEST_COMMANDS}
#: The flags a request may carry, by value, as Flag(value) would return them.
_REQUEST_FLAG = {0: Flag.NONE, int(Flag.FUA): Flag.FUA}
assert int(REQUEST_FLAGS) == int(Flag.FUA)
_WRITE = Command.WRITE


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LocalProtocolError(message)


def _command(event: object, value: int) -> Command:
    try:
        command = Command(value)
    except (ValueError, TypeError):
        raise LocalProtocolError(f"{value!r} is not a command") from None
    if command not in REQUEST_COMMANDS:
        raise LocalProtocolError(f"{command!r} is not a request")
    _set(event, "command", command)
    return command


def _plain_bytes(data: object) -> bool:
    """bytes, or a plain byte view (a mirror's view of a FUSE write, a
    split write's piece): len() is then the size in bytes and nothing needs
    casting, so the constructors' fast test may take it as it is."""
    return type(data) is bytes or (
        type(data) is memoryview
        and data.ndim == 1
        and data.format == "B"
        and data.c_contiguous
    )


def _data(event: object, value: object) -> int:
    """Check the data is a byte buffer; return its size in bytes."""
    if isinstance(value, bytes | bytearray):
        return len(value)
    _check(isinstance(value, memoryview), "data must be a byte buffer")
    assert isinstance(value, memoryview)
    _check(value.c_contiguous, "data must be a contiguous buffer")
    if value.ndim != 1 or value.format != "B":
        # The frame carries bytes; a view of wider items would be sized wrong.
        _set(event, "data", value.cast("B"))
    return value.nbytes


@dataclass(frozen=True)
class HelloReceived:
    """Server side: a client asks for `export` (None = the node's default)."""

    export: str | None
    client_id: bytes
    client_name: str
    versions: tuple[int, ...]
    modes: tuple[str, ...]
    flags: HelloFlag = HelloFlag.NONE


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
    """The export's parameters for this peer; the connection is open after it.

    `max_request` is the largest READ/WRITE payload either side sends: the
    client's event carries the smaller of the node's value and the client's
    own `max_payload`, so splitting requests at it is always safe.
    `instance` is the node's identity (None: the node does not send one)."""

    size: int
    permissions: Permission
    block_size: int = 4096
    max_request: int = 1 << 20
    features: Feature = Feature.NONE
    export: str = ""
    instance: NodeInstance | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.size < _U64, "size out of range")
        _check(0 < self.block_size < _U32, "block size out of range")
        _check(0 < self.max_request < _U32, "max request out of range")
        # int() because IntFlag's ~ drops unknown bits instead of keeping them.
        permissions, features = int(self.permissions), int(self.features)
        _check(
            permissions >= 0 and not permissions & ~int(ALL_PERMISSIONS),
            f"unknown permission bits in {permissions:#x}",
        )
        _check(
            features >= 0 and not features & ~int(ALL_FEATURES),
            f"unknown feature bits in {features:#x}",
        )
        _check(isinstance(self.export, str), "export must be a str")
        _check(
            self.instance is None or isinstance(self.instance, NodeInstance),
            "instance must be a NodeInstance",
        )
        _set(self, "permissions", Permission(self.permissions))
        _set(self, "features", Feature(self.features))


@dataclass(frozen=True)
class Refused:
    """The peer refused the handshake: `status` is an errno, `message` says why."""

    status: int
    message: str


# Request and Reply write their own __init__ (init=False): the generated
# one of a frozen dataclass sets each field through object.__setattr__ and
# then calls __post_init__, which together cost more than the checks. The
# parameters are the fields, in order, with the same defaults.


@dataclass(frozen=True, init=False)
class Request:
    """A client request. `length` is the byte count the request covers; for
    WRITE it must equal len(data), every other command carries no data.
    `flags` may only hold Flag.FUA (REPLY is the wire's mark for replies)."""

    command: Command
    handle: int
    offset: int = 0
    length: int = 0
    flags: Flag = Flag.NONE
    data: Buffer = field(default=b"", repr=False)

    def __init__(
        self,
        command: Command,
        handle: int,
        offset: int = 0,
        length: int = 0,
        flags: Flag = Flag.NONE,
        data: Buffer = b"",
    ) -> None:
        checked_command: Command | None
        try:
            checked_command = _REQUEST_COMMAND[command]
            checked_flags = _REQUEST_FLAG[flags]
        except (KeyError, TypeError):  # not a request command or flags, or unhashable
            checked_command = None
        fields = self.__dict__
        if (
            checked_command is not None
            and 0 <= handle < _U64
            and 0 <= offset < _U64
            and 0 <= length < _U32
            and _plain_bytes(data)  # after the fields: a released view raises
            and len(data) == (length if checked_command is _WRITE else 0)
        ):
            _fill_request(fields, checked_command, handle, offset, length, checked_flags, data)
            return
        fields.update(
            command=command, handle=handle, offset=offset, length=length, flags=flags, data=data
        )
        self._check_fields()

    def _check_fields(self) -> None:
        command = _command(self, self.command)
        _check(0 <= self.handle < _U64, "handle out of range")
        _check(0 <= self.offset < _U64, "offset out of range")
        _check(0 <= self.length < _U32, "length out of range")
        flags = int(self.flags)
        _check(flags >= 0, "flags out of range")
        _check(not flags & Flag.REPLY, "requests cannot carry the REPLY flag")
        _check(not flags & ~int(REQUEST_FLAGS), f"unknown request flags {flags:#x}")
        _set(self, "flags", Flag(self.flags))
        size = _data(self, self.data)
        if command is Command.WRITE:
            _check(size == self.length, "WRITE length differs from its data")
        else:
            _check(size == 0, f"{command.name} carries no data")


@dataclass(frozen=True, init=False)
class Reply:
    """The node's answer to request `handle`; `status` 0 or an errno. READ
    replies carry the data, CHECKSUM replies the 16-byte digest. `offset` and
    `length` echo the request for logs. The protocol does not check a
    reply's data against its request: the client's transaction layer does."""

    command: Command
    handle: int
    status: int = 0
    offset: int = 0
    length: int = 0
    data: Buffer = field(default=b"", repr=False)

    def __init__(
        self,
        command: Command,
        handle: int,
        status: int = 0,
        offset: int = 0,
        length: int = 0,
        data: Buffer = b"",
    ) -> None:
        checked_command: Command | None
        try:
            checked_command = _REQUEST_COMMAND[command]
        except (KeyError, TypeError):  # not a request command, or unhashable
            checked_command = None
        fields = self.__dict__
        if (
            checked_command is not None
            and 0 <= handle < _U64
            and 0 <= status < _U32
            and 0 <= offset < _U64
            and 0 <= length < _U32
            and _plain_bytes(data)  # after the fields: a released view raises
            and len(data) < _U32
        ):
            _fill_reply(fields, checked_command, handle, status, offset, length, data)
            return
        fields.update(
            command=command, handle=handle, status=status, offset=offset, length=length, data=data
        )
        self._check_fields()

    def _check_fields(self) -> None:
        _command(self, self.command)
        _check(0 <= self.handle < _U64, "handle out of range")
        _check(0 <= self.status < _U32, "status out of range")
        _check(0 <= self.offset < _U64, "offset out of range")
        _check(0 <= self.length < _U32, "length out of range")
        _check(_data(self, self.data) < _U32, "reply data too large for one frame")


def parsed_request(
    command: Command, handle: int, offset: int, length: int, flags: Flag, data: Buffer
) -> Request:
    """A Request from a frame the parser checked (a request command, u64
    handle and offset, u32 length, flags 0 or FUA, data of `length` bytes
    for WRITE and none otherwise), built without checking it again."""
    event: Request = _new(Request)
    _fill_request(event.__dict__, command, handle, offset, length, flags, data)
    return event


def parsed_reply(
    command: Command, handle: int, status: int, offset: int, length: int, data: Buffer
) -> Reply:
    """A Reply from a frame the parser checked (a request command, u64
    handle and offset, u32 status and length, data shorter than 2**32),
    built without checking it again."""
    event: Reply = _new(Reply)
    _fill_reply(event.__dict__, command, handle, status, offset, length, data)
    return event


def _fill_request(
    fields: dict[str, object],
    command: Command,
    handle: int,
    offset: int,
    length: int,
    flags: Flag,
    data: Buffer,
) -> None:
    """Set a Request's fields in its `__dict__` (it is frozen), unchecked."""
    fields["command"] = command
    fields["handle"] = handle
    fields["offset"] = offset
    fields["length"] = length
    fields["flags"] = flags
    fields["data"] = data


def _fill_reply(
    fields: dict[str, object],
    command: Command,
    handle: int,
    status: int,
    offset: int,
    length: int,
    data: Buffer,
) -> None:
    """Set a Reply's fields in its `__dict__` (it is frozen), unchecked."""
    fields["command"] = command
    fields["handle"] = handle
    fields["status"] = status
    fields["offset"] = offset
    fields["length"] = length
    fields["data"] = data


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the stream cleanly between frames."""


Event = (
    HelloReceived | Challenged | Confirmed | Ready | Refused | Request | Reply | ConnectionClosed
)

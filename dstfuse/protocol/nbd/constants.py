"""Wire constants of the NBD protocol, fixed newstyle (docs/protocol.md, "NBD").

This module owns every NBD number that appears on the wire; it holds no
state and imports nothing from the rest of dstfuse. Names follow the NBD
specification without its ``NBD_`` prefix.
"""

from __future__ import annotations

import enum
import struct

DEFAULT_PORT = 10809

#: The server's first eight bytes, then IHAVEOPT.
NBDMAGIC = 0x4E42444D41474943
#: Starts every option request (and follows NBDMAGIC in the greeting).
IHAVEOPT = 0x49484156454F5054
#: Starts every option reply.
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: NBDMAGIC, IHAVEOPT, handshake flags (u16).
GREETING = struct.Struct(">QQH")
#: The client's flags (u32) after the greeting.
CLIENT_FLAGS = struct.Struct(">I")
#: IHAVEOPT, option, length of the option data.
OPTION = struct.Struct(">QII")
#: OPTION_REPLY_MAGIC, option, reply type, length of the reply data.
OPTION_REPLY = struct.Struct(">QIII")
#: Reply to OPT_EXPORT_NAME: size, transmission flags (then 124 zeroes unless NO_ZEROES).
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_ZEROES = 124
#: magic, command flags (u16), command type (u16), cookie, offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: magic, flags (u16), type (u16), cookie, length of the chunk data.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: Fields of option data and chunk payloads: u16, u32, u64 (an offset).
U16_FIELD = struct.Struct(">H")
U32_FIELD = struct.Struct(">I")
U64_FIELD = struct.Struct(">Q")
#: An error chunk's head: error, length of the message that follows.
ERROR_CHUNK = struct.Struct(">IH")
#: An OFFSET_HOLE chunk: offset, length.
HOLE_CHUNK = struct.Struct(">QI")
#: One BLOCK_STATUS extent: length, flags.
EXTENT = struct.Struct(">II")

#: The spec lets a server drop a client whose option data exceeds what it
#: is willing to buffer; names and query lists are short.
MAX_OPTION_DATA = 64 << 10
#: The spec's limit for export names and descriptions.
MAX_STRING = 4096
#: What every client may send without NBD_INFO_BLOCK_SIZE (the spec's 32 MiB).
DEFAULT_MAX_PAYLOAD = 32 << 20


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (u16, in the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (u32, the answer to the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (u16)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    """Option haggling requests."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


#: Option reply types with this bit set are errors.
REPLY_ERROR_BIT = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types; the ERR_ ones have REPLY_ERROR_BIT set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REPLY_ERROR_BIT | 1
    ERR_POLICY = REPLY_ERROR_BIT | 2
    ERR_INVALID = REPLY_ERROR_BIT | 3
    ERR_PLATFORM = REPLY_ERROR_BIT | 4
    ERR_TLS_REQD = REPLY_ERROR_BIT | 5
    ERR_UNKNOWN = REPLY_ERROR_BIT | 6
    ERR_SHUTDOWN = REPLY_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REPLY_ERROR_BIT | 8
    ERR_TOO_BIG = REPLY_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REPLY_ERROR_BIT | 10


class Info(enum.IntEnum):
    """NBD_INFO_* items in replies to OPT_INFO / OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


#: Info EXPORT: type, size, transmission flags.
INFO_EXPORT = struct.Struct(">HQH")
#: Info BLOCK_SIZE: type, minimum, preferred, maximum.
INFO_BLOCK_SIZE = struct.Struct(">HIII")


class Command(enum.IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """Transmission request flags (u16)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags (u16)."""

    DONE = 1 << 0


#: Structured reply chunk types with this bit set are errors.
CHUNK_ERROR_BIT = 1 << 15


class Chunk(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = CHUNK_ERROR_BIT | 1
    ERROR_OFFSET = CHUNK_ERROR_BIT | 2


class Error(enum.IntEnum):
    """Error values in replies (they are Linux errno numbers by the spec)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: The one meta context we serve and read.
BASE_ALLOCATION = "base:allocation"


class AllocationFlag(enum.IntFlag):
    """Block status flags of the base:allocation context."""

    HOLE = 1 << 0
    ZERO = 1 << 1

"""Wire constants of dstfuse protocol version 1 (see docs/protocol.md).

This module owns every number that appears on the wire; it must never hold
state or import anything from the rest of dstfuse.
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"DSTF"
VERSION = 1
#: Versions this implementation can speak, oldest first.
SUPPORTED_VERSIONS = (1,)

#: magic, version, command, flags, handle, offset, length, status, payload_len, reserved
HEADER = struct.Struct(">4sBBHQQIIII")
HEADER_SIZE = HEADER.size  # 40
TAG_SIZE = 16
NONCE_SIZE = 32
CLIENT_ID_SIZE = 16
PROOF_SIZE = 32

#: Handshake frames are small; this caps their payload whatever the caller allows.
MAX_HANDSHAKE_PAYLOAD = 4096
DEFAULT_MAX_PAYLOAD = 4 << 20
#: payload_len and length are u32 on the wire.
MAX_PAYLOAD_LIMIT = (1 << 32) - 1
#: Names sent for logs only (client_name, node_name) are cut to this many characters.
MAX_NAME_CHARS = 256
#: REFUSED messages are cut to this many characters.
MAX_MESSAGE_CHARS = 1000
#: A CHECKSUM reply's payload: the xxh3-128 digest of the range.
CHECKSUM_SIZE = 16


class Command(enum.IntEnum):
    """The header's command byte. Handshake commands are 1-15, requests 16+."""

    # handshake
    HELLO = 1
    CHALLENGE = 2
    CONFIRM = 3
    READY = 4
    REFUSED = 5
    # requests (a reply carries the same command with Flag.REPLY)
    READ = 16
    WRITE = 17
    FLUSH = 18
    TRIM = 19
    WRITE_ZEROES = 20
    PING = 21
    CHECKSUM = 22


HANDSHAKE_COMMANDS = frozenset(
    {Command.HELLO, Command.CHALLENGE, Command.CONFIRM, Command.READY, Command.REFUSED}
)
REQUEST_COMMANDS = frozenset(set(Command) - HANDSHAKE_COMMANDS)
#: Requests that change the export's contents.
WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})


class Flag(enum.IntFlag):
    """The header's flags (u16). Unknown bits make the frame invalid."""

    NONE = 0
    FUA = 0x0001
    REPLY = 0x8000


KNOWN_FLAGS = Flag.FUA | Flag.REPLY
#: Flags a request may carry (REPLY marks replies).
REQUEST_FLAGS = Flag.FUA


class Permission(enum.IntFlag):
    """READY's PERMISSIONS attribute: what this peer may do with the export."""

    NONE = 0
    READ = 1
    WRITE = 2


class Feature(enum.IntFlag):
    """Optional request kinds a node serves (READY's FEATURES attribute)."""

    NONE = 0
    FLUSH = 1
    FUA = 2
    TRIM = 4
    WRITE_ZEROES = 8
    CHECKSUM = 16


class HelloFlag(enum.IntFlag):
    """HELLO's HELLO_FLAGS attribute: what the client asks of the export."""

    NONE = 0
    #: grant READ only; such a connection never needs the export's write grant
    READ_ONLY = 1
    #: take the export's write grant from the client identity holding it
    TAKE_OVER = 2
    #: `dstfuse check`: READY reports the grant a mount would get, but this
    #: connection is served read-only and takes no write grant
    PROBE = 4
    # 8 is reserved: COORDINATED (write without the grant) in earlier
    # builds. Masked off like any unknown bit, so a client still sending it
    # claims the grant like every writer (docs/protocol.md, HELLO_FLAGS).


ALL_HELLO_FLAGS = HelloFlag.READ_ONLY | HelloFlag.TAKE_OVER | HelloFlag.PROBE
ALL_FEATURES = Feature.FLUSH | Feature.FUA | Feature.TRIM | Feature.WRITE_ZEROES | Feature.CHECKSUM
ALL_PERMISSIONS = Permission.READ | Permission.WRITE


class Attr(enum.IntEnum):
    """Handshake TLV attribute types. Unknown types are skipped by readers."""

    VERSIONS = 1  # HELLO: list of u8 versions the client speaks
    VERSION = 2  # CHALLENGE: u8 chosen version
    EXPORT = 3  # HELLO: utf-8 export name; READY: name served
    CLIENT_ID = 4  # HELLO: 16 random bytes identifying one client session owner
    CLIENT_NAME = 5  # HELLO: utf-8, for logs (hostname, pid)
    CIPHERS = 6  # HELLO: utf-8 comma-separated integrity modes offered, preferred first
    CIPHER = 7  # CHALLENGE: utf-8 chosen mode
    NONCE = 8  # HELLO/CHALLENGE: 32 random bytes
    PROOF = 9  # CHALLENGE/CONFIRM: HMAC-SHA256 key confirmation (keyed modes only)
    SIZE = 10  # READY: u64 export size in bytes
    PERMISSIONS = 11  # READY: u8 Permission bits granted to this peer
    BLOCK_SIZE = 12  # READY: u32 preferred I/O granularity
    MAX_REQUEST = 13  # READY: u32 largest READ/WRITE payload accepted
    FEATURES = 14  # READY: u32 Feature bits
    MESSAGE = 15  # REFUSED: utf-8 human-readable reason
    NODE_NAME = 16  # CHALLENGE: utf-8 server's name for logs
    INSTANCE = 17  # READY: 48 bytes, the node instance identity (see instance.py)
    # Numbered apart from the attributes above, which other work extends.
    HELLO_FLAGS = 32  # HELLO: u32 HelloFlag bits (absent: none)


#: Integrity/confidentiality modes. "xxh3-128" is unkeyed; the others need a pre-shared key.
UNKEYED_MODES = ("xxh3-128",)
KEYED_MODES = ("aes-256-gcm", "chacha20-poly1305", "blake2b-mac")

"""The node instance identity carried in READY (attribute INSTANCE).

A write the node acknowledged without FUA may live only in its host's page
cache until a FLUSH. Like NFSv3's write verifier, the identity tells the
client whether what was in that cache can still be there: the host's boot
id, the backing file or device, and a nonce fresh for every node process.
This module only encodes, decodes and compares; reading the boot id is the
node's business.

Layout (48 bytes): boot id (16) || device u64 || inode u64 || process (16).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import LocalProtocolError, RemoteProtocolError

_LAYOUT = struct.Struct(">16sQQ16s")
INSTANCE_SIZE = _LAYOUT.size
_U64 = 1 << 64


class Continuity(enum.Enum):
    """What a reconnect found, compared with the instance seen before."""

    SAME = "same"  # the same process: nothing happened to its cache
    RESTARTED = "restarted"  # a new process on the same boot and backing: the cache survived
    NEW = "new"  # another boot or another backing: unflushed writes may be gone
    UNKNOWN = "unknown"  # the node does not say (an older node)


@dataclass(frozen=True)
class NodeInstance:
    """`boot_id`: the host's boot id (16 bytes); `device`, `inode`: the
    backing file's st_dev and st_ino (a block device: its st_rdev and 0);
    `process`: 16 random bytes chosen once per node process."""

    boot_id: bytes
    device: int
    inode: int
    process: bytes

    def __post_init__(self) -> None:
        if len(self.boot_id) != 16 or len(self.process) != 16:
            raise LocalProtocolError("boot id and process nonce must be 16 bytes")
        if not (0 <= self.device < _U64 and 0 <= self.inode < _U64):
            raise LocalProtocolError("device and inode must fit in u64")

    def encode(self) -> bytes:
        return _LAYOUT.pack(self.boot_id, self.device, self.inode, self.process)

    @classmethod
    def decode(cls, value: bytes) -> NodeInstance:
        if len(value) != INSTANCE_SIZE:
            raise RemoteProtocolError(
                f"attribute INSTANCE is {len(value)} bytes, expected {INSTANCE_SIZE}"
            )
        boot_id, device, inode, process = _LAYOUT.unpack(value)
        return cls(boot_id, device, inode, process)

    def __str__(self) -> str:
        return f"boot {self.boot_id.hex()[:8]} backing {self.device}:{self.inode}"


def continuity(previous: NodeInstance | None, current: NodeInstance | None) -> Continuity:
    """How `current` (this connection's instance) follows `previous` (the
    last one seen). A node seen without an identity before but with one now
    counts as NEW: the client cannot prove the cache survived."""
    if current is None:
        return Continuity.UNKNOWN
    if previous is None:
        return Continuity.NEW
    if current == previous:
        return Continuity.SAME
    if (current.boot_id, current.device, current.inode) == (
        previous.boot_id,
        previous.device,
        previous.inode,
    ):
        return Continuity.RESTARTED
    return Continuity.NEW

"""The dstfuse wire protocol, sans-IO: no sockets, no trio, no clocks.

`Connection` turns received bytes into events and events into bytes to
send; see docs/protocol.md for the frame and handshake layout.
"""

from .connection import NEED_DATA, Connection, Role, State
from .constants import (
    CLIENT_ID_SIZE,
    KEYED_MODES,
    UNKEYED_MODES,
    WRITE_COMMANDS,
    Command,
    Feature,
    Flag,
    HelloFlag,
    Permission,
)
from .errors import (
    HandshakeFailed,
    IntegrityError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
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
)
from .handshake import mode_of_cipher, offered_modes
from .instance import Continuity, NodeInstance, continuity

__all__ = [
    "CLIENT_ID_SIZE", "KEYED_MODES", "UNKEYED_MODES", "WRITE_COMMANDS", "Command", "Feature",
    "Flag", "HelloFlag", "Permission", "NEED_DATA", "Connection", "Role", "State",
    "HandshakeFailed",
    "IntegrityError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "Challenged",
    "ConnectionClosed", "Confirmed", "Event", "HelloReceived", "Ready", "Refused", "Reply",
    "Request", "mode_of_cipher", "Continuity", "NodeInstance", "continuity",
    "offered_modes",
]

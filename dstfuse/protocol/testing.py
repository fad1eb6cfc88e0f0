"""Test support for code built on the protocol: in-memory connection pairs
and frame forging. Only tests import this module; it must never be used to
talk to a real peer (fixed nonces repeat keys, forged frames bypass every
check on what we send).
"""

from __future__ import annotations

from typing import Any

from .connection import NEED_DATA, Connection, Role, State
from .constants import (
    ALL_FEATURES,
    HEADER,
    KEYED_MODES,
    MAGIC,
    NONCE_SIZE,
    VERSION,
    Permission,
)
from .errors import LocalProtocolError
from .events import Challenged, Confirmed, ConnectionClosed, Event, HelloReceived, Ready
from .sealing import Buffer

CLIENT_ID = bytes(range(16))
DEFAULT_READY = Ready(
    size=1 << 30,
    permissions=Permission.READ | Permission.WRITE,
    max_request=1 << 16,
    features=ALL_FEATURES,
    export="e",
)


def drain(conn: Connection) -> list[Event]:
    """Every event `conn` can produce from what it has buffered, up to and
    including a ConnectionClosed (which `next_event` repeats forever)."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def feed(conn: Connection, data: bytes, *, chunk: int | None = None) -> list[Event]:
    """Feed `data` to `conn` (whole, or `chunk` bytes at a time, draining
    after each) and return the events it produced."""
    if chunk is None:
        conn.receive_data(data)
        return drain(conn)
    events: list[Event] = []
    for start in range(0, len(data), chunk):
        conn.receive_data(data[start : start + chunk])
        events.extend(drain(conn))
    return events


def make_pair(
    mode: str = "xxh3-128",
    *,
    key: bytes | None = None,
    client_key: bytes | None = None,
    server_key: bytes | None = None,
    client_modes: list[str] | None = None,
    max_payload: int = 1 << 16,
    client_max_payload: int | None = None,
    client_nonce: bytes | None = None,
    server_nonce: bytes | None = None,
) -> tuple[Connection, Connection]:
    """A client and a server, not yet connected. A keyed `mode` without any
    key given uses a fixed test key on both sides. Fixed nonces make the
    whole conversation byte-for-byte reproducible."""
    if mode in KEYED_MODES and key is None and client_key is None and server_key is None:
        key = b"k" * 32
    client = Connection(
        Role.CLIENT,
        key=client_key if client_key is not None else key,
        modes=client_modes or [mode],
        max_payload=client_max_payload or max_payload,
    )
    server = Connection(
        Role.SERVER, key=server_key if server_key is not None else key, max_payload=max_payload
    )
    for conn, nonce in ((client, client_nonce), (server, server_nonce)):
        if nonce is not None:
            if len(nonce) != NONCE_SIZE:
                raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
            conn._nonce = nonce
    return client, server


def handshake(
    client: Connection,
    server: Connection,
    *,
    ready: Ready = DEFAULT_READY,
    export: str | None = None,
    node_name: str = "node",
) -> tuple[list[bytes], list[bytes]]:
    """Run the whole handshake in memory; return the frames each side sent
    (client's, server's). Raises whatever the handshake raises."""
    sent_by_client = [client.hello(export=export, client_id=CLIENT_ID, client_name="client")]
    sent_by_server: list[bytes] = []
    [hello] = feed(server, sent_by_client[-1])
    assert isinstance(hello, HelloReceived)
    sent_by_server.append(server.challenge(node_name=node_name))
    [challenged] = feed(client, sent_by_server[-1])
    assert isinstance(challenged, Challenged)
    sent_by_client.append(client.confirm())
    [confirmed] = feed(server, sent_by_client[-1])
    assert isinstance(confirmed, Confirmed)
    sent_by_server.append(server.ready(ready))
    [opened] = feed(client, sent_by_server[-1])
    assert isinstance(opened, Ready)
    assert client.state is State.OPEN and server.state is State.OPEN
    return sent_by_client, sent_by_server


def open_pair(
    mode: str = "xxh3-128", *, ready: Ready = DEFAULT_READY, **options: Any
) -> tuple[Connection, Connection]:
    """`make_pair(mode, **options)` with the handshake done."""
    client, server = make_pair(mode, **options)
    handshake(client, server, ready=ready)
    return client, server


def forge_frame(
    sender: Connection,
    command: int,
    *,
    flags: int = 0,
    handle: int = 0,
    offset: int = 0,
    length: int = 0,
    status: int = 0,
    payload: Buffer = b"",
    magic: bytes = MAGIC,
    version: int = VERSION,
    reserved: int = 0,
    payload_len: int | None = None,
) -> bytes:
    """A frame with arbitrary header fields, sealed as `sender` would seal
    its next frame (it consumes one of `sender`'s sequence numbers). For
    sending peers what no valid event can express."""
    size = len(payload) if payload_len is None else payload_len
    header = HEADER.pack(
        magic, version, command, flags, handle, offset, length, status, size, reserved
    )
    return header + sender._send_sealer.seal(header, payload)


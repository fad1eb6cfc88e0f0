"""Handshake attributes: a list of TLVs (type u16, length u16, value).

Readers skip types they do not know, so either side can add attributes
without breaking older peers. A type seen twice keeps its first value.
This module only encodes and decodes; it never decides what a handshake
means, and it never raises anything but RemoteProtocolError on bad input
(LocalProtocolError when our own code asks it to encode something too big).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .constants import Attr
from .errors import LocalProtocolError, RemoteProtocolError

_TLV = struct.Struct(">HH")
TLV_HEADER_SIZE = _TLV.size
MAX_ATTRIBUTES = 64
MAX_VALUE_SIZE = 0xFFFF
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def encode(attributes: Iterable[tuple[int, bytes]]) -> bytes:
    """TLV-encode `attributes` in the order given."""
    parts: list[bytes] = []
    for kind, value in attributes:
        if len(value) > MAX_VALUE_SIZE:
            raise LocalProtocolError(
                f"attribute {kind} is {len(value)} bytes; at most {MAX_VALUE_SIZE}"
            )
        parts.append(_TLV.pack(kind, len(value)))
        parts.append(value)
    return b"".join(parts)


def decode(payload: bytes) -> dict[int, bytes]:
    """Parse a TLV list; raise RemoteProtocolError on truncation or when it
    holds more than MAX_ATTRIBUTES attributes (known or not)."""
    found: dict[int, bytes] = {}
    pos, count = 0, 0
    while pos < len(payload):
        if len(payload) - pos < _TLV.size:
            raise RemoteProtocolError("truncated handshake attribute header")
        kind, length = _TLV.unpack_from(payload, pos)
        pos += _TLV.size
        if len(payload) - pos < length:
            raise RemoteProtocolError(f"handshake attribute {kind} truncated")
        count += 1
        if count > MAX_ATTRIBUTES:
            raise RemoteProtocolError(f"more than {MAX_ATTRIBUTES} handshake attributes")
        found.setdefault(kind, payload[pos : pos + length])
        pos += length
    return found


def u8(value: int) -> bytes:
    return _U8.pack(value)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def text(value: str) -> bytes:
    return value.encode("utf-8")


class Reader:
    """Typed access to decoded attributes, with errors naming the attribute.
    Every accessor raises RemoteProtocolError (never struct.error or
    UnicodeDecodeError) for a missing or malformed attribute."""

    def __init__(self, attributes: dict[int, bytes]) -> None:
        self._attrs = attributes

    def has(self, kind: Attr) -> bool:
        return kind in self._attrs

    def raw(self, kind: Attr, *, size: int | None = None, default: bytes | None = None) -> bytes:
        value = self._attrs.get(kind)
        if value is None:
            if default is not None:
                return default
            raise RemoteProtocolError(f"handshake lacks attribute {kind.name}")
        if size is not None and len(value) != size:
            raise RemoteProtocolError(
                f"attribute {kind.name} is {len(value)} bytes, expected {size}"
            )
        return value

    def _int(self, kind: Attr, fmt: struct.Struct, default: int | None) -> int:
        if kind not in self._attrs and default is not None:
            return default
        value: int = fmt.unpack(self.raw(kind, size=fmt.size))[0]
        return value

    def u8(self, kind: Attr, default: int | None = None) -> int:
        return self._int(kind, _U8, default)

    def u32(self, kind: Attr, default: int | None = None) -> int:
        return self._int(kind, _U32, default)

    def u64(self, kind: Attr, default: int | None = None) -> int:
        return self._int(kind, _U64, default)

    def text(self, kind: Attr, default: str | None = None) -> str:
        if kind not in self._attrs and default is not None:
            return default
        try:
            return self.raw(kind).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"attribute {kind.name} is not UTF-8") from None

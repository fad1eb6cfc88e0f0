"""Network addresses as users write them: `HOST:PORT`, `[IPV6]:PORT`, `unix:/PATH`.

Parsing is pure: no name resolution, no sockets, no trio (connecting and
listening live with the network code). Host names are kept as written, IP
literals are normalised (`[FD00::0006]` becomes `fd00::6`) so that `str()` of
an `Address` is its one canonical spelling.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_PORT = 1025

# RFC 1123 host names, plus "_" which real networks use anyway.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class Address:
    """Where a node listens or is reached.

    `kind` is "tcp" (`host`, `port` set; `path` empty) or "unix" (`path` is
    absolute; `host` empty, `port` 0). `host` is a name or an IP literal
    without brackets.
    """

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind == "tcp":
            if not self.host or self.path or not 1 <= self.port <= 65535:
                raise ValueError(f"bad tcp address {self.host!r} port {self.port}")
        elif self.kind == "unix":
            if not self.path.startswith("/") or self.host or self.port:
                raise ValueError(f"bad unix address {self.path!r}")
        else:
            raise ValueError(f"bad address kind {self.kind!r} (use 'tcp' or 'unix')")

    @classmethod
    def tcp(cls, host: str, port: int = DEFAULT_PORT) -> Address:
        return cls("tcp", host=host, port=port)

    @classmethod
    def unix(cls, path: str) -> Address:
        return cls("unix", path=path)

    @property
    def is_ipv6(self) -> bool:
        return self.kind == "tcp" and ":" in self.host

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """The `Address` that `text` spells; `default_port` when it names none.

    Accepts `HOST:PORT`, `HOST`, `[IPV6]:PORT`, `[IPV6]`, a bare IPv6 literal
    (`::1`, no port possible) and `unix:/PATH`. Raises ValueError naming the
    problem for an empty host, a port outside 1..65535 and a relative or
    empty unix path.
    """
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r} (expected HOST:PORT, [IPV6]:PORT or unix:/PATH)")
    spelled = text.strip()
    if not spelled:
        raise ValueError("empty address (expected HOST:PORT, [IPV6]:PORT or unix:/PATH)")
    if spelled.startswith("unix:"):
        path = spelled[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"bad address {text!r}: unix socket path must be absolute")
        return Address.unix(path)

    if spelled.startswith("["):
        close = spelled.find("]")
        if close < 0:
            raise ValueError(f"bad address {text!r}: missing ']' after IPv6 address")
        host = _ipv6_literal(spelled[1:close], text)
        rest = spelled[close + 1 :]
        if not rest:
            return Address.tcp(host, default_port)
        if not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected ':PORT' after ']'")
        return Address.tcp(host, _port(rest[1:], text))

    if spelled.count(":") > 1:
        # Bare IPv6: every colon belongs to the address, so no port.
        return Address.tcp(_ipv6_literal(spelled, text), default_port)

    host, colon, port_text = spelled.partition(":")
    if not host:
        raise ValueError(f"bad address {text!r}: empty host")
    port = _port(port_text, text) if colon else default_port
    return Address.tcp(_host(host, text), port)


def _port(port_text: str, text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"bad address {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"bad address {text!r}: port {port} is outside 1..65535")
    return port


def _ipv6_literal(host: str, text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        raise ValueError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None


def _host(host: str, text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if all(part.isdigit() for part in host.split(".")):
        raise ValueError(f"bad address {text!r}: {host!r} is not an IPv4 address")
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"bad address {text!r}: {host!r} is not a host name or IP address")
    return host

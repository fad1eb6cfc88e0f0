"""NBD URIs as libnbd spells them (nbd_connect_uri), parsed without I/O.

    nbd://HOST[:PORT][/EXPORT]              plaintext TCP (port 10809)
    nbds://HOST[:PORT][/EXPORT]             TLS (STARTTLS) over TCP
    nbd+unix:///EXPORT?socket=PATH          plaintext unix socket
    nbds+unix:///EXPORT?socket=PATH         TLS over a unix socket

The export name is the path without its leading "/", percent-decoded
("" is the server's default export). Query parameters other than `socket`
are refused: TLS certificates come from the node's config keys
(`tls_ca`, `tls_cert`, `tls_key`), not from the URI.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ...address import Address
from .constants import DEFAULT_PORT, MAX_STRING

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
USAGE = "use nbd[s]://HOST[:PORT][/EXPORT] or nbd[s]+unix:///EXPORT?socket=/PATH"


@dataclass(frozen=True)
class NbdUri:
    """A parsed URI: where to connect, which export, and whether with TLS."""

    address: Address
    export: str
    tls: bool
    text: str

    def __str__(self) -> str:
        return self.text


def parse_nbd_uri(text: str) -> NbdUri:
    """The `NbdUri` that `text` spells; ValueError with a one-line reason."""
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"bad NBD URI '{text}' ({USAGE})")
    tcp_usage = f"expected {parts.scheme}://HOST[:PORT][/EXPORT]"
    try:
        port = parts.port  # raises ValueError outside 0..65535
    except ValueError:
        raise ValueError(f"bad NBD URI '{text}' ({tcp_usage})") from None
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if len(export.encode()) > MAX_STRING:
        raise ValueError(f"bad NBD URI '{text}' (export name longer than {MAX_STRING} bytes)")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise ValueError(
            f"bad NBD URI '{text}' (unsupported parameter {unknown[0]!r}; "
            "TLS files are node keys tls_ca/tls_cert/tls_key)"
        )
    tls = parts.scheme.startswith("nbds")
    if parts.scheme.endswith("+unix"):
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0].startswith("/") or parts.netloc:
            raise ValueError(
                f"bad NBD URI '{text}' (expected {parts.scheme}:///EXPORT?socket=/PATH)"
            )
        return NbdUri(Address.unix(sockets[0]), export, tls, text)
    if "socket" in query:
        raise ValueError(f"bad NBD URI '{text}' (socket= is only for {parts.scheme}+unix://)")
    if not parts.hostname or port == 0:
        raise ValueError(f"bad NBD URI '{text}' ({tcp_usage})")
    return NbdUri(Address.tcp(parts.hostname, port or DEFAULT_PORT), export, tls, text)

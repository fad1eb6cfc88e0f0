"""The TLS context of NBD addresses (`nbd_tls:`): the export server's
(export.yaml) and the mount daemon's (storage.yaml), built the same way.

Owns turning the configured PEM files into a server-side `ssl.SSLContext`:
TLS 1.2 at least (the NBD spec's floor), the server's certificate chain and
key, and with a CA bundle, client certificates required and verified
against it. Every unreadable or unusable file is a one-line `UserError`
naming it; nothing here touches sockets.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..config import NbdTls
from ..errors import UserError


def server_context(tls: NbdTls | None) -> ssl.SSLContext | None:
    """The context `tls` describes; None without `nbd_tls:` (plain NBD)."""
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (tls.cert, tls.key, tls.ca):
        if path is not None:
            _readable(path)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        raise UserError(
            f"nbd_tls: {tls.cert} and {tls.key} are not a PEM certificate and its private key "
            f"({exc.reason or exc})"
        ) from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=tls.ca)
        except ssl.SSLError as exc:
            raise UserError(
                f"nbd_tls: ca {tls.ca} is not a PEM CA bundle ({exc.reason or exc})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"nbd_tls: cannot read {path}: {exc.strerror or exc}") from None

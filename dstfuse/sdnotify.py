"""The systemd notify protocol (sd_notify(3)) over $NOTIFY_SOCKET.

It owns sending state lines such as ``READY=1`` and ``STATUS=...`` to the
service manager; it never raises to its caller (a daemon must not die
because systemd is not listening) and does nothing when $NOTIFY_SOCKET is
unset. Socket addresses are a path (``/run/systemd/notify``) or an abstract
name written with a leading ``@``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: A datagram to the service manager never waits longer than this.
SEND_TIMEOUT = 2.0


def socket_address(value: str) -> str | None:
    """The AF_UNIX address `value` ($NOTIFY_SOCKET) names, or None if it is
    not a unix socket address (e.g. systemd's vsock: addresses)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (newline-separated ``KEY=value`` lines); True if sent."""
    environ = os.environ if environ is None else environ
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = socket_address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s is not a unix socket; cannot notify systemd", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", value, exc)
        return False
    log.debug("sd_notify: %s", state.replace("\n", " "))
    return True


def _line(text: str) -> str:
    # A newline would start a new KEY=value assignment.
    return " ".join(text.split())


def ready(status: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Tell the service manager the service is up, with a status line."""
    return notify(f"READY=1\nSTATUS={_line(status)}\nMAINPID={os.getpid()}", environ=environ)


def stopping(status: str, *, environ: Mapping[str, str] | None = None) -> bool:
    return notify(f"STOPPING=1\nSTATUS={_line(status)}", environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    return notify(f"STATUS={_line(text)}", environ=environ)

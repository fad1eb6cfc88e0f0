"""The TCP congestion control of dstfuse's own connections (`tcp_congestion`).

By default every connection uses the host's algorithm
(`net.ipv4.tcp_congestion_control`). Storage traffic can be better served by
another: BBR, a common default of cloud images, paces each connection with
a kernel timer when the interface has no `fq` qdisc, and on a virtual
machine that timer costs the sending process, one thread for all its
connections here, about as much as the copy of the bytes
(docs/performance.md measures it). `tcp_congestion` (storage.yaml) and
`--tcp-congestion` (export node) choose an algorithm for dstfuse's sockets
alone, leaving the host's default to everything else.

`check(name)` runs at start-up, so a name the kernel does not offer, or
does not let this process use, is refused before anything is served.
`install(name)` sets it for the trio run (the mount daemon, the export
server); `apply(sock)` sets it on each TCP socket that run connects or
accepts (a mount's connections to its nodes and those its `nbd_listen`
accepts; an export node's accepted ones, dstfuse and NBD). A socket the
kernel refuses it keeps the host's default, with a warning: a connection
is never lost over this setting.

Invariant: nothing changes unless `install` was given a name.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from pathlib import Path

import trio

from .errors import UserError

log = logging.getLogger(__name__)

_PROC = Path("/proc/sys/net/ipv4")
#: Linux's TCP_CA_NAME_MAX is 16 bytes, its terminating NUL included.
NAME = re.compile(r"[a-z0-9_]{1,15}")

_ALGORITHM: trio.lowlevel.RunVar[str | None] = trio.lowlevel.RunVar("tcp_congestion", None)


def _listed(what: str) -> str:
    try:
        return (_PROC / f"tcp_{what}_congestion_control").read_text().strip() or "none"
    except OSError:
        return "unknown"


def check(name: str, what: str = "tcp_congestion") -> None:
    """Raise UserError (naming the setting as `what`) unless TCP sockets of
    this process can use `name`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise UserError(
                    f"{what} '{name}': this kernel has no such algorithm "
                    f"(available: {_listed('available')}; modprobe tcp_{name} may add it)"
                ) from None
            if exc.errno == errno.EPERM:
                raise UserError(
                    f"{what} '{name}': not allowed for this process (allowed: "
                    f"{_listed('allowed')}; root, or CAP_NET_ADMIN, may use any available)"
                ) from None
            raise UserError(f"{what} '{name}': {exc.strerror}") from None


def install(name: str | None) -> None:
    """Use `name` (None: the host's default) on this run's TCP sockets."""
    _ALGORITHM.set(name)


def apply(sock: socket.socket) -> None:
    """Set the run's algorithm on a TCP socket (nothing when none is installed)."""
    name = _ALGORITHM.get()
    if name is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        try:
            host, port = sock.getpeername()[:2]
            peer = f"{host} port {port}"
        except OSError:
            peer = "a peer"
        log.warning("tcp_congestion '%s' refused on the connection with %s (%s); it uses "
                    "the host's default", name, peer, exc.strerror)

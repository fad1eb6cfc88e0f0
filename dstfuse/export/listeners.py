"""Listening sockets for the export server: TCP (IPv4, IPv6) and unix sockets.

Owns binding and unbinding only. IPv6 sockets are V6ONLY so that `[::]:P`
and `0.0.0.0:P` can both be listened on; a stale unix socket file (nobody
accepts on it) is replaced, a live one or a non-socket file is an error, and
the file is removed again on close if it is still ours. Every failure to
bind is a `UserError` naming the address.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

import trio

from ..address import Address
from ..errors import UserError

log = logging.getLogger(__name__)

#: An `Address`, or (host, port) where port may be 0 for an ephemeral port.
ListenAddress = Address | tuple[str, int]

BACKLOG = 128
#: How long a connection attempt may take to tell a live unix socket from a stale one.
_PROBE_TIMEOUT = 1.0


@dataclass
class BoundListener:
    """A bound, listening socket and the address it actually has."""

    listener: trio.SocketListener
    address: Address
    _unix_inode: tuple[int, int] | None = None

    def close(self) -> None:
        """Close the socket; remove our unix socket file (only if it is
        still the one we created)."""
        self.listener.socket.close()
        if self._unix_inode is None:
            return
        path = self.address.path
        try:
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) == self._unix_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove socket file %s: %s", path, exc.strerror)


def describe(address: ListenAddress) -> str:
    if isinstance(address, Address):
        return str(address)
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_listeners(address: ListenAddress) -> list[BoundListener]:
    """Bind and listen on `address`; a host name that resolves to several
    addresses gets one listener each. Raises UserError on failure."""
    if isinstance(address, Address) and address.kind == "unix":
        return [await _open_unix(address.path)]
    host, port = (address.host, address.port) if isinstance(address, Address) else address
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {describe(address)}: {exc.strerror}") from None
    seen: set[tuple] = set()
    bound: list[BoundListener] = []
    try:
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr) in seen or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            seen.add((family, sockaddr))
            bound.append(await _open_tcp(family, sockaddr, address))
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    return bound


async def _open_tcp(family: int, sockaddr: tuple, address: ListenAddress) -> BoundListener:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(BACKLOG)
        actual = sock.getsockname()
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {describe(address)}: {_reason(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return BoundListener(trio.SocketListener(sock), Address.tcp(actual[0], actual[1]))


async def _open_unix(path: str) -> BoundListener:
    where = f"unix:{path}"
    await _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(BACKLOG)
        info = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {where}: {_reason(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return BoundListener(
        trio.SocketListener(sock), Address.unix(path), _unix_inode=(info.st_dev, info.st_ino)
    )


async def _remove_stale_socket(path: str) -> None:
    """Unlink `path` if it is a unix socket nobody accepts on. A live socket,
    or a file that is not a socket, is the user's to sort out."""
    where = f"unix:{path}"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot listen on {where}: {_reason(exc)}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise UserError(f"cannot listen on {where}: {path} exists and is not a socket")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(_PROBE_TIMEOUT):
            await probe.connect(path)
            raise UserError(f"cannot listen on {where}: another process is listening there")
        # Timed out: something holds it with a full backlog, so it is alive.
        raise UserError(f"cannot listen on {where}: another process is listening there")
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    except OSError as exc:
        raise UserError(f"cannot listen on {where}: {_reason(exc)}") from None
    finally:
        probe.close()
    log.info("removing stale socket file %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    return exc.strerror or str(exc)

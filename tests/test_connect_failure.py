"""A failed connect says which failure it was (refused, no route, timed
out, no socket), not trio's "all attempts to connect to HOST:PORT failed"."""

from __future__ import annotations

import errno

import pytest
import trio

from dstfuse.address import parse_address
from dstfuse.errors import NodeUnavailable
from dstfuse.nodes.session import Session, connect_failure

from .mounts import free_tcp_port


async def establish(address: str) -> None:
    await Session.establish(
        "R: " + address, parse_address(address), export=None, key=None, modes=["xxh3-128"],
        client_id=bytes(16), client_name="test", number=1,
    )


async def test_refused_port_says_connection_refused():
    port = free_tcp_port()
    with pytest.raises(NodeUnavailable) as info:
        await establish(f"127.0.0.1:{port}")
    assert str(info.value) == (
        f"R: 127.0.0.1:{port}: cannot connect: connection refused (nothing listens there)"
    )


async def test_missing_unix_socket_says_no_such_socket(tmp_path):
    with pytest.raises(NodeUnavailable, match="cannot connect: no such socket$"):
        await establish(f"unix:{tmp_path}/absent.sock")


def attempts_failed(*codes: int) -> OSError:
    """What trio's open_tcp_stream raises when every address failed."""
    failure = OSError("all attempts to connect to example:1025 failed")
    failure.__cause__ = ExceptionGroup(
        "all attempts", [OSError(code, "Error connecting: " + str(code)) for code in codes]
    )
    return failure


@pytest.mark.parametrize(
    "codes, expected",
    [
        ((errno.EHOSTUNREACH,), "no route to host"),
        ((errno.ENETUNREACH,), "network unreachable"),
        ((errno.ETIMEDOUT,), "timed out"),
        ((errno.ECONNREFUSED, errno.ECONNREFUSED), "connection refused (nothing listens there)"),
        (
            (errno.ECONNREFUSED, errno.EHOSTUNREACH),
            "connection refused (nothing listens there); no route to host",
        ),
    ],
)
def test_each_attempts_failure_is_named_once(codes, expected):
    assert connect_failure(attempts_failed(*codes)) == expected



class DroppedStream(trio.abc.Stream):
    """A connection the node dropped at once (it was dying, or refused us
    at accept): every send fails as a broken pipe does."""

    async def send_all(self, data) -> None:
        raise trio.BrokenResourceError("socket connection broken: [Errno 32] Broken pipe")

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes=None) -> bytes:
        return b""

    async def aclose(self) -> None:
        pass


async def test_a_connection_dropped_while_greeting_the_node_is_unavailable_not_a_crash():
    async def connector(address):
        return DroppedStream()

    with pytest.raises(NodeUnavailable, match="connection lost in handshake: .*Broken pipe"):
        await Session.establish(
            "R: 127.0.0.1:1", parse_address("127.0.0.1:1"), export=None, key=None,
            modes=["xxh3-128"], client_id=bytes(16), client_name="test", number=1,
            connector=connector,
        )

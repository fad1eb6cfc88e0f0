"""The client `Session` over a real socket pair: what `transmit` cannot
write at once (a full socket) goes to the sender task, which sends whatever
queued meanwhile in one write and waits while the socket is full; frames
still reach the node whole and in transmit order."""

from __future__ import annotations

import socket
from functools import partial

import trio

from dstfuse.nodes.session import Session
from dstfuse.nodes.transactions import Transaction
from dstfuse.protocol import Command, Request
from dstfuse.protocol.testing import DEFAULT_READY, feed, open_pair


async def test_frames_queued_behind_a_full_socket_arrive_whole_and_in_order():
    client_conn, server_conn = open_pair(max_payload=1 << 20)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    ours.setblocking(False)
    theirs.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    session = Session("test node", stream, client_conn, DEFAULT_READY, 1)
    payload = bytes(range(256)) * 256  # 64 KiB: the socket takes a few at most
    received: list[Request] = []

    async def node() -> None:
        peer = trio.socket.from_stdlib_socket(theirs)
        await trio.sleep(0.2)  # let the client's socket fill up first
        while len(received) < 40:
            data = await peer.recv(1 << 16)
            assert data, "client closed early"
            received.extend(e for e in feed(server_conn, data) if isinstance(e, Request))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(session.run, lambda reply: None, keepalive=60.0))
            nursery.start_soon(node)
            await trio.sleep(0)
            for handle in range(1, 41):
                txn = Transaction(Command.WRITE, handle, handle * len(payload), len(payload))
                txn.data = payload
                session.transmit(txn)
                if handle % 8 == 0:
                    await trio.sleep(0.01)  # some frames queue while the sender waits
            while len(received) < 40:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    theirs.close()
    assert [r.handle for r in received] == list(range(1, 41))
    assert all(bytes(r.data) == payload for r in received)

"""A TCP relay that injects network faults between a client and a node.

Tests put it in front of a real export server (in-process or a separate
process) and point the client at it. It can record both directions, flip a
bit in the next chunk going one way, cut every relayed connection, stop
forwarding for a while (a partition), or trickle (a slow link: `slow`).
Bounded: it relays only on loopback and only while its nursery lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

TO_NODE, TO_CLIENT = "to-node", "to-client"


@dataclass
class FaultProxy:
    target_host: str
    target_port: int
    port: int = 0
    recorded: dict[str, bytearray] = field(
        default_factory=lambda: {TO_NODE: bytearray(), TO_CLIENT: bytearray()}
    )
    record: bool = False
    #: direction -> how many more chunks to corrupt (one bit each)
    corrupt: dict[str, int] = field(default_factory=lambda: {TO_NODE: 0, TO_CLIENT: 0})
    corrupted: int = 0
    connections: int = 0
    #: (bytes, seconds): forward at most that many bytes, then pause (a slow link)
    slow: tuple[int, float] | None = None
    _open: set[trio.CancelScope] = field(default_factory=set)
    _flowing: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._flowing.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._relay, listeners)

    def cut(self) -> None:
        """Close every relayed connection now (both sides see it)."""
        for scope in list(self._open):
            scope.cancel()

    def pause(self) -> None:
        """Stop forwarding in both directions until `resume`."""
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    def corrupt_next(self, direction: str, count: int = 1) -> None:
        self.corrupt[direction] += count

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            node = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, node:
            with trio.CancelScope() as scope:
                self._open.add(scope)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, node, TO_NODE, nursery.cancel_scope)
                        nursery.start_soon(
                            self._pump, node, client, TO_CLIENT, nursery.cancel_scope
                        )
                finally:
                    self._open.discard(scope)

    async def _pump(self, source, sink, direction: str, done: trio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive_some(1 << 16)
                if not data:
                    break
                await self._flowing.wait()
                if self.record:
                    self.recorded[direction] += data
                if self.corrupt[direction] and len(data) > 48:
                    self.corrupt[direction] -= 1
                    self.corrupted += 1
                    changed = bytearray(data)
                    changed[len(changed) // 2] ^= 0x10
                    data = bytes(changed)
                if self.slow is None:
                    await sink.send_all(data)
                    continue
                step, pause = self.slow
                for start in range(0, len(data), step):
                    await sink.send_all(data[start : start + step])
                    await trio.sleep(pause)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()

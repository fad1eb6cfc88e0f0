"""Which leg a read asks, and how long it waits for one.

`ReadRouter` orders the readable legs by DST's rule (the leg whose previous
request ended nearest the new one first) and asks them in turn. A leg that
has not answered within `read_timeout` is given up on when another leg could
still answer (reads are safe to abandon: nothing changes on the node), and
is asked last for a while, so a silent leg costs the reads one timeout, not
one each. It never changes a leg's role.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ..errors import NodeError, NodeSlow
from ..nodes.base import ReadData
from .dispatch import LegSlow
from .legs import MirrorLeg

T = TypeVar("T")

#: A leg that let a read wait `read_timeout` is asked last for this many
#: read timeouts (a frozen node costs the reads one timeout, not each one).
SLOW_LEG_HOLD = 5


class ReadRouter:
    def __init__(self, storage_name: str, legs: list[MirrorLeg], read_timeout: float) -> None:
        self.storage_name = storage_name
        self._legs = legs
        self._read_timeout = read_timeout
        self._rotor = 0

    def order(self, regions: range, offset: int = 0) -> list[MirrorLeg]:
        """Readable legs: online ones nearest first (DST), ties broken by
        fewer requests in flight, then in turn; a leg that lately let a read
        wait `read_timeout` after the others; offline ones last. (Every
        read calls this: one pass over the legs, no key function; the
        leg's place in the list is unique, so legs are never compared.)"""
        count = len(self._legs)
        self._rotor += 1
        rotor = self._rotor
        now = trio.current_time()
        ranked: list[tuple[bool, int, int, int, int, MirrorLeg]] = []
        offline: list[MirrorLeg] = []
        for place, leg in enumerate(self._legs):
            if not leg.readable(regions):
                continue
            if leg.online:
                ranked.append(
                    (
                        leg.slow_until > now,
                        abs(leg.position - offset),
                        leg.node.counters.in_flight,
                        (leg.index - rotor) % count,
                        place,
                        leg,
                    )
                )
            else:
                offline.append(leg)
        ranked.sort()
        return [rank[-1] for rank in ranked] + offline

    async def ask(
        self, leg: MirrorLeg, call: Callable[[MirrorLeg], Awaitable[T]], *, last: bool
    ) -> T:
        """`call(leg)`, given up after `read_timeout` (LegSlow) unless it is
        the `last` leg that could answer: a silent leg delays a read by at
        most that much when another leg has the data. Reads are safe to
        abandon (nothing changes on the node)."""
        if last:
            return await call(leg)
        with trio.move_on_after(self._read_timeout):
            return await call(leg)
        raise self._slow(leg)

    async def read(
        self, leg: MirrorLeg, offset: int, length: int, *, last: bool
    ) -> ReadData:
        """`ask` for a read of the leg's data: the node gives it up at
        `read_timeout` itself (`Node.read_within`: a remote node's resend
        timer does, with no cancel scope per read)."""
        if last:
            return await leg.node.read(offset, length)
        try:
            return await leg.node.read_within(offset, length, self._read_timeout)
        except NodeSlow:
            pass
        raise self._slow(leg)

    def _slow(self, leg: MirrorLeg) -> LegSlow:
        """The leg let a read wait read_timeout: asked last for a while, so
        the next reads do not wait for it too."""
        leg.slow_until = trio.current_time() + SLOW_LEG_HOLD * self._read_timeout
        return LegSlow(str(leg), f"no answer within read_timeout ({self._read_timeout:g} s)")

    async def first_answer(
        self, legs: list[MirrorLeg], call: Callable[[MirrorLeg], Awaitable[T]], what: str
    ) -> T:
        """The answer of the first leg (in `legs`' order) that gives one."""
        errors: list[NodeError] = []
        for position, leg in enumerate(legs):
            try:
                return await self.ask(leg, call, last=position == len(legs) - 1)
            except NodeError as exc:
                errors.append(exc)
        raise NodeError(
            f"storage {self.storage_name}",
            f"no leg answered for {what}: {'; '.join(map(str, errors)) or 'no leg holds it'}",
            errno=errors[-1].errno if errors else errno.EIO,
        )

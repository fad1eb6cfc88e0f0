"""What a leg's successful FLUSH proves, when FLUSHes overlap.

A FLUSH that fails on a node may drop the dirty pages it could not write
(a failed fdatasync marks them clean), and a FLUSH running beside it, or
reaching the node after it, then succeeds on a cache that no longer holds
them: Linux reports a writeback error to one fsync only. The mirror's user
flush and its bitmap clearing flush the same leg concurrently, so the
clearing could see "flushed" for writes the user's flush had just lost, and
clear their regions from the bitmap (simulator seed 7017).

`FlushWitness.run` gives a success a meaning: every write the leg
acknowledged before the call is durable on it. It returns only once every
FLUSH to the leg that began before its own ended has ended too, and raises
NodeError if one of them, or any FLUSH ending meanwhile, failed or was
cancelled (its outcome on the node is then unknown). That is conservative:
a FLUSH that failed before reaching the node also counts, which costs the
leg a resync it may not have needed, never data.

A failure is also visible at once, before whoever sent that FLUSH has acted
on it (`MirrorLeg.flush_failure_pending`): the bitmap clearing must not
take that short while to clear regions the failure may have emptied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..errors import NodeError


class FlushWitness:
    """The FLUSHes of one leg: which are running, how many failed."""

    def __init__(self) -> None:
        self._next = 0
        #: serials of the FLUSHes still running
        self._running: set[int] = set()
        #: FLUSHes that failed or were cancelled, ever
        self._failures = 0
        #: set when a FLUSH ends; made only while someone waits
        self._ended: trio.Event | None = None

    @property
    def failures(self) -> int:
        """FLUSHes of the leg that failed or were cancelled, ever."""
        return self._failures

    async def run(self, flush: Callable[[], Awaitable[None]], who: str) -> None:
        """`flush()`, then wait and judge as the module says; `who` names
        the leg in the error."""
        serial = self._next
        self._next += 1
        failures = self._failures
        self._running.add(serial)
        try:
            await flush()
        except BaseException:
            self._failures += 1
            raise
        finally:
            self._running.discard(serial)
            if self._ended is not None:
                self._ended.set()
                self._ended = None
        horizon = self._next
        while any(other < horizon for other in self._running):
            if self._ended is None:
                self._ended = trio.Event()
            await self._ended.wait()
        if self._failures != failures:
            raise NodeError(
                who,
                "a flush that overlapped this one failed: writes acknowledged before it "
                "may be lost although this one succeeded",
            )

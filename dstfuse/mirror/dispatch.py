"""Sending one request to several legs, and when to stop waiting for one.

A mirror must not wait a node's whole resend budget for a leg it can do
without (docs/mirror-metadata.md, "Degraded operation"): a node that is gone
(its connection refused or reset: the node is OFFLINE) is given up at once,
a silent one after `leg_timeout`. `LegDispatch.run(legs, call)` starts
`call(leg)` on every leg and returns each leg's outcome when every call has
ended, or earlier: once an in-sync leg completed the request, a leg whose
call is still running is given up when its node is offline, when it no
longer takes writes, or when `leg_timeout` has passed. Its outcome is then a
`LegGivenUp` error, which the caller treats like any failure of that leg
(it goes stale: the request's regions stay marked for it).

Invariants:
- a leg is given up only when another in-sync leg completed the request, so
  the last in-sync leg always keeps its node's full budget, and a request
  never fails only because it was slow;
- a call given up on is never cancelled (a write already on the wire may
  still land); it runs to its end in the dispatcher's own nursery, and the
  leg counts it in `MirrorLeg.unsettled` until then: a stale leg rejoins
  only once everything sent to it before has settled, so nothing it still
  held can land after its resync copied newer data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..errors import NodeError, NodeUnavailable
from ..fanout import Outcome, gather
from .legs import MirrorLeg

log = logging.getLogger(__name__)

#: While stragglers of a completed request run, how often their nodes'
#: states are looked at (a node going offline is given up within this).
STRAGGLER_POLL = 0.05


class LegGivenUp(NodeUnavailable):
    """The mirror stopped waiting for this leg (offline, or silent for
    `leg_timeout`) after another in-sync leg completed the request."""


class LegSlow(NodeError):
    """A read-only request stopped waiting for this leg after `read_timeout`
    to ask another leg instead (the leg is not blamed for it)."""


class _Round:
    """One request's calls: outcomes in leg order, and an event set at each
    call's end while the request still waits."""

    def __init__(self, count: int) -> None:
        self.outcomes: list[Outcome] = [(None, None)] * count
        self.done = [False] * count
        self.returned = False
        self.progress = trio.Event()


class LegDispatch:
    """Runs requests on several legs (see the module doc). Until
    `run_background` has started, requests wait for every leg (start-up)."""

    def __init__(self, storage_name: str, leg_timeout: float) -> None:
        self._storage_name = storage_name
        self.leg_timeout = leg_timeout
        self._nursery: trio.Nursery | None = None

    async def run_background(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the calls given up on until they end (cancelled at close)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def stop(self) -> None:
        """From now on requests wait for every leg (shutdown: the nursery
        holding calls given up on is being cancelled)."""
        self._nursery = None

    async def run(
        self, legs: Sequence[MirrorLeg], call: Callable[[MirrorLeg], Awaitable[Any]]
    ) -> list[Outcome]:
        nursery = self._nursery
        if nursery is None or len(legs) < 2:
            return await gather([lambda leg=leg: call(leg) for leg in legs])
        state = _Round(len(legs))
        for index, leg in enumerate(legs):
            leg.unsettled += 1
            nursery.start_soon(self._call, state, index, leg, call)
        deadline = trio.current_time() + self.leg_timeout
        try:
            while not all(state.done):
                waiting = self._stragglers(state, legs)
                if waiting is None:
                    wake = math.inf  # no in-sync leg completed it yet: wait for all
                elif all(self._give_up_now(legs[i], deadline) for i in waiting):
                    for i in waiting:
                        state.outcomes[i] = (None, self._given_up(legs[i], deadline))
                    return state.outcomes
                else:
                    wake = min(deadline, trio.current_time() + STRAGGLER_POLL)
                with trio.move_on_at(wake):
                    await state.progress.wait()
                state.progress = trio.Event()
            return state.outcomes
        finally:
            state.returned = True

    @staticmethod
    def _stragglers(state: _Round, legs: Sequence[MirrorLeg]) -> list[int] | None:
        """Legs still running, once an in-sync leg completed the request."""
        completed = any(
            done and outcome[1] is None and leg.in_sync
            for done, outcome, leg in zip(state.done, state.outcomes, legs, strict=True)
        )
        if not completed:
            return None
        return [i for i, done in enumerate(state.done) if not done]

    @staticmethod
    def _give_up_now(leg: MirrorLeg, deadline: float) -> bool:
        return not leg.online or not leg.takes_writes or trio.current_time() >= deadline

    def _given_up(self, leg: MirrorLeg, deadline: float) -> LegGivenUp:
        if not leg.online:
            reason = "its node is offline"
        elif not leg.takes_writes:
            reason = "it left the write targets"
        else:
            reason = f"no answer within leg_timeout ({self.leg_timeout:g} s)"
        return LegGivenUp(str(leg), f"not waited for: {reason}")

    @staticmethod
    async def _call(
        state: _Round, index: int, leg: MirrorLeg, call: Callable[[MirrorLeg], Awaitable[Any]]
    ) -> None:
        outcome: Outcome = (None, LegGivenUp(str(leg), "cancelled (the mirror is closing)"))
        try:
            outcome = (await call(leg), None)
        except Exception as exc:  # noqa: BLE001 - handed back to the request
            outcome = (None, exc)
        finally:
            leg.settle_one()
            if not state.returned:  # even when cancelled: the request must not wait forever
                state.outcomes[index] = outcome
                state.done[index] = True
                state.progress.set()
        if state.returned and outcome[1] is not None:
            log.info("%s: a request given up on ended: %s", leg, outcome[1])

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
  still land); it runs to its end in the dispatcher's own nursery (in a
  runner task, which takes no other call before it ended), and the
  leg counts it in `MirrorLeg.unsettled` until then: a stale leg rejoins
  only once everything sent to it before has settled, so nothing it still
  held can land after its resync copied newer data;
- a write a leg's node sent at once (`Node.begin_write`) is the same call
  in two halves: its answer counts as the leg's outcome the moment it
  arrives; the request settles it when it returns, or, when it returns
  without it (given up on, cancelled), hands the settling to a runner.
  Settling that would wait (a node over its unflushed limit waits for a
  FLUSH) is never done in the request: a runner does it, and the request
  waits for that runner under the same rules as for any leg, so an
  acknowledged write's FLUSH holds it no longer than `leg_timeout` either.
  Settled exactly once either way, and counted in `unsettled` until then.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..errors import NodeError, NodeUnavailable
from ..fanout import Outcome, gather
from ..nodes.base import StartedWrite
from .legs import MirrorLeg

log = logging.getLogger(__name__)

#: Idle call runners kept parked for the next requests (more are started
#: when more calls run at once; beyond this many idle ones end).
IDLE_RUNNERS = 64
#: While stragglers of a completed request run, how often their nodes'
#: states are looked at (a node going offline is given up within this).
STRAGGLER_POLL = 0.05


class LegGivenUp(NodeUnavailable):
    """The mirror stopped waiting for this leg (offline, or silent for
    `leg_timeout`) after another in-sync leg completed the request."""


class _Unsettled(NodeError):
    """A started write ended without success; settling it tells how."""


_UNSETTLED = _Unsettled("mirror leg", "not settled yet")


class LegSlow(NodeError):
    """A read-only request stopped waiting for this leg after `read_timeout`
    to ask another leg instead (the leg is not blamed for it)."""


class _Round:
    """One request's calls: outcomes in leg order, how many still run, and
    the request's task parked until it has something to look at (a bare
    park, like `Transaction.wait_done`: no Event, no cancel scope)."""

    __slots__ = (
        "legs", "outcomes", "done", "running", "returned", "deadline", "started", "_waiter"
    )

    def __init__(self, legs: Sequence[MirrorLeg], deadline: float) -> None:
        self.legs = legs
        self.outcomes: list[Outcome] = [(None, None)] * len(legs)
        #: per leg, its write sent by `begin_write` and not yet settled
        self.started: list[StartedWrite | None] = [None] * len(legs)
        self.done = [False] * len(legs)
        self.running = len(legs)
        self.returned = False
        self.deadline = deadline
        self._waiter: trio.lowlevel.Task | None = None

    def completed(self) -> bool:
        """An in-sync leg completed the request: the others may be given up."""
        for index, done in enumerate(self.done):
            if done and self.outcomes[index][1] is None and self.legs[index].in_sync:
                return True
        return False

    def stragglers(self) -> list[int]:
        return [i for i, done in enumerate(self.done) if not done]

    async def wait(self) -> None:
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None


def _settler(started: StartedWrite) -> Callable[[MirrorLeg], Awaitable[None]]:
    """A runner's call that settles `started` (on the leg it was sent to)."""

    async def settle(_: MirrorLeg) -> None:
        await started.settle()

    return settle


_Job = tuple[_Round, int, MirrorLeg, Callable[[MirrorLeg], Awaitable[Any]]]


class _Runner:
    """A task of the dispatcher's that runs one leg call at a time: `park`
    in the idle list until `hand` gives it the next."""

    __slots__ = ("job", "_task")

    def __init__(self, job: _Job) -> None:
        self.job: _Job | None = job
        self._task: trio.lowlevel.Task | None = None

    async def park(self, idle: list[_Runner]) -> None:
        self._task = trio.lowlevel.current_task()
        idle.append(self)

        def abort(_: object) -> trio.lowlevel.Abort:
            idle.remove(self)
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def hand(self, job: _Job) -> None:
        assert self._task is not None
        self.job = job
        trio.lowlevel.reschedule(self._task)
        self._task = None


class LegDispatch:
    """Runs requests on several legs (see the module doc). Until
    `run_background` has started, requests wait for every leg (start-up).

    Cost per request: a write a node can send at once needs no task at
    all (`run`'s `start`); any other leg's call runs in a runner task of
    the dispatcher's, reused (parked between calls: no task spawned per leg
    per request), and there is no timer: a request whose legs all answer parks
    once and is woken by the last answer. Only a request left waiting for a
    straggler after an in-sync leg completed it is looked at again, by one
    watcher task every STRAGGLER_POLL for all such requests (a cancel scope
    per request costs more, in trio, than the rest of the dispatch).
    docs/performance.md has the figures."""

    def __init__(self, storage_name: str, leg_timeout: float) -> None:
        self._storage_name = storage_name
        self.leg_timeout = leg_timeout
        self._nursery: trio.Nursery | None = None
        #: requests completed by an in-sync leg, still waiting for another
        self._straggling: set[_Round] = set()
        self._watcher: trio.lowlevel.Task | None = None
        #: parked runners, each waiting for its next call
        self._idle: list[_Runner] = []

    async def run_background(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the calls given up on until they end (cancelled at close),
        and watch the requests waiting for stragglers."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_stragglers)
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
        self,
        legs: Sequence[MirrorLeg],
        call: Callable[[MirrorLeg], Awaitable[Any]],
        start: Callable[[MirrorLeg], StartedWrite | None] | None = None,
    ) -> list[Outcome]:
        """Each leg's outcome of `call(leg)` (see the module doc). With
        `start` (a write), a leg whose `start(leg)` sends the request at
        once (`Node.begin_write`) needs no runner: its answer is taken from
        the transaction and the request settles it itself once it returns."""
        nursery = self._nursery
        if nursery is None or len(legs) < 2:
            return await gather([lambda leg=leg: call(leg) for leg in legs])
        state = _Round(legs, trio.current_time() + self.leg_timeout)
        try:
            for index, leg in enumerate(legs):
                leg.unsettled += 1
                try:
                    started = start(leg) if start is not None else None
                except Exception as exc:  # noqa: BLE001 - the leg's outcome, as a failed call's
                    leg.settle_one()
                    self._record(state, index, (None, exc))
                    continue
                if started is None:
                    self._hand(nursery, (state, index, leg, call))
                else:
                    state.started[index] = started
                    if started.done:
                        self._arrived(state, index)
                    else:
                        started.on_done = functools.partial(self._arrived, state, index)
            while True:
                gave_up = await self._wait(state)
                # the outcomes are decided: a late answer must not change them
                for started in state.started:
                    if started is not None and not started.done:
                        started.on_done = None
                if not await self._settle_started(state, nursery, gave_up):
                    return state.outcomes
        finally:
            state.returned = True
            self._straggling.discard(state)
            for index, started in enumerate(state.started):
                if started is not None:  # given up on, or the request was cancelled
                    started.on_done = None
                    self._hand(nursery, (state, index, legs[index], _settler(started)))

    async def _wait(self, state: _Round) -> bool:
        """Until every leg's outcome is in (False), or the legs still
        running may be given up (True: their outcomes are LegGivenUp)."""
        while state.running:
            if state.completed():
                if self._may_give_up(state, trio.current_time()):
                    for i in state.stragglers():
                        state.outcomes[i] = (None, self._given_up(state.legs[i]))
                    return True
                self._watch(state)
            await state.wait()
        return False

    def _hand(self, nursery: trio.Nursery, job: _Job) -> None:
        """Run `job` in a parked runner, or in a new one."""
        if self._idle:
            self._idle.pop().hand(job)
        else:
            nursery.start_soon(self._runner, _Runner(job))

    def _arrived(self, state: _Round, index: int) -> None:
        """A started write's transaction ended (its `on_done`): a success
        is the leg's outcome; anything else (an error, a request the node
        now wants split) is the request's to settle, and until then counts
        as a failure of the leg."""
        started = state.started[index]
        assert started is not None
        self._record(state, index, (None, None) if started.succeeded else (None, _UNSETTLED))

    async def _settle_started(self, state: _Round, nursery: trio.Nursery, gave_up: bool) -> bool:
        """Settle, in the request, the started writes that ended and settle
        at once: their outcomes become final. One that ended but would wait
        (its node is over its unflushed limit, or splits it again) is left
        to a runner and counts as running again, as a call in a runner
        would; True then: the request waits for it like for any leg (given
        up at leg_timeout if another in-sync leg completed it). After
        `gave_up` it is given up instead. Those still running are left to
        the caller (`run` hands them to runners)."""
        rearmed = False
        for index, started in enumerate(state.started):
            if started is None or not started.done:
                continue
            leg = state.legs[index]
            if not started.settles_at_once:
                if gave_up:
                    state.outcomes[index] = (None, self._given_up(leg))
                    continue  # `run` hands it to a runner
                state.started[index] = None
                state.done[index] = False
                state.running += 1
                self._hand(nursery, (state, index, leg, _settler(started)))
                rearmed = True
                continue
            state.started[index] = None
            try:
                await started.settle()
                state.outcomes[index] = (None, None)
            except Exception as exc:  # noqa: BLE001 - the leg's outcome, as from a runner
                state.outcomes[index] = (None, exc)
            finally:
                leg.settle_one()
        return rearmed

    def _watch(self, state: _Round) -> None:
        self._straggling.add(state)
        if self._watcher is not None:
            trio.lowlevel.reschedule(self._watcher)
            self._watcher = None

    async def _watch_stragglers(self) -> None:
        """Every STRAGGLER_POLL while requests wait for stragglers, wake
        those whose stragglers may now be given up (offline, no longer
        taking writes, or past leg_timeout); they decide for themselves."""
        while True:
            if not self._straggling:
                self._watcher = trio.lowlevel.current_task()

                def abort(_: object) -> trio.lowlevel.Abort:
                    self._watcher = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            await trio.sleep(STRAGGLER_POLL)
            now = trio.current_time()
            for state in list(self._straggling):
                if self._may_give_up(state, now):
                    self._straggling.discard(state)
                    state.wake()

    @staticmethod
    def _may_give_up(state: _Round, now: float | None) -> bool:
        """Every leg still running the request may be given up on: its node
        is offline, it no longer takes writes, or (`now` given) leg_timeout
        has passed."""
        late = now is not None and now >= state.deadline
        for index, done in enumerate(state.done):
            if not done:
                leg = state.legs[index]
                if leg.online and leg.takes_writes and not late:
                    return False
        return True

    def _given_up(self, leg: MirrorLeg) -> LegGivenUp:
        if not leg.online:
            reason = "its node is offline"
        elif not leg.takes_writes:
            reason = "it left the write targets"
        else:
            reason = f"no answer within leg_timeout ({self.leg_timeout:g} s)"
        return LegGivenUp(str(leg), f"not waited for: {reason}")

    async def _runner(self, runner: _Runner) -> None:
        """Run calls one after another, parked in between (a trip through
        the scheduler instead of a new task per leg per request)."""
        while runner.job is not None:
            job, runner.job = runner.job, None
            await self._call(*job)
            # parked, it must not keep the request alive (its call closes
            # over the write's data: up to IDLE_RUNNERS buffers held)
            del job
            if len(self._idle) < IDLE_RUNNERS:
                await runner.park(self._idle)

    async def _call(
        self, state: _Round, index: int, leg: MirrorLeg, call: Callable[[MirrorLeg], Awaitable[Any]]
    ) -> None:
        outcome: Outcome | None = None
        try:
            outcome = (await call(leg), None)
        except Exception as exc:  # noqa: BLE001 - handed back to the request
            outcome = (None, exc)
        finally:
            leg.settle_one()
            if outcome is None:  # cancelled: the mirror is closing
                outcome = (None, LegGivenUp(str(leg), "cancelled (the mirror is closing)"))
            if not state.returned:  # even when cancelled: the request must not wait forever
                self._record(state, index, outcome)
        if state.returned and outcome[1] is not None:
            log.info("%s: a request given up on ended: %s", leg, outcome[1])

    def _record(self, state: _Round, index: int, outcome: Outcome) -> None:
        """One leg's outcome. The request is woken when it has all of them,
        or when the others may be given up; otherwise, once an in-sync leg
        completed it, the watcher looks at it from now on."""
        state.outcomes[index] = outcome
        state.done[index] = True
        state.running -= 1
        if not state.running:
            state.wake()
        elif state.completed():
            # leg_timeout is the watcher's to notice: no clock read per call
            if self._may_give_up(state, None):
                state.wake()
            else:
                self._watch(state)

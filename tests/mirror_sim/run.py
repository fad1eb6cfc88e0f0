"""Running a simulation: one `trio.run` on a MockClock per scenario.

`simulate(steps_of)` opens the simulation's nursery, runs every step that
`steps_of(sim)` yields (a fixed list for the targeted tests, steps drawn by
hypothesis for the random ones), kills whatever is still mounted, and
re-raises a `Violation` outside the nursery so that it reaches the test as
itself, not inside an exception group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import trio
import trio.testing

from .harness import Simulation, Stats, Violation
from .steps import Step, run_step


def simulate(
    steps_of: Callable[[Simulation], Iterable[Step]],
    *,
    legs: int = 2,
    resync_rate: int = 0,
    read_check: bool = True,
    scheduling_seed: int | None = None,
) -> Stats:
    """Run the scenario; returns its statistics, raises Violation.
    `scheduling_seed` fixes the order trio runs ready tasks in (hypothesis
    does it itself for the tests it drives)."""
    if scheduling_seed is not None:
        # trio shuffles each batch of ready tasks with this generator when
        # hypothesis is installed (pytest-trio enables it); seeding it makes
        # a fixed scenario replay the same interleaving every time.
        trio._core._run._r.seed(scheduling_seed)
    found: list[Violation] = []
    stats: list[Stats] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sim = Simulation(nursery, legs, resync_rate=resync_rate, read_check=read_check)
            stats.append(sim.stats)
            try:
                for step in steps_of(sim):
                    await run_step(sim, step)
            except Violation as exc:
                found.append(exc)
            finally:
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if found:
        raise found[0]
    return stats[0]


def fixed(steps: list[Step]) -> Callable[[Simulation], Iterator[Step]]:
    def steps_of(sim: Simulation) -> Iterator[Step]:
        yield from steps

    return steps_of

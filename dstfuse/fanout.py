"""Run several node requests at once and wait for every one of them.

Storage requests that touch several nodes (a linear request crossing a
boundary, a mirror write to every leg) must not cancel their siblings when
one fails: a write already on the wire may still land, and the caller needs
to know the outcome of each. `gather` therefore runs every call to its end
and returns results and exceptions side by side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

Outcome = tuple[Any, BaseException | None]


async def gather(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Outcome]:
    """Await every call concurrently; return (result, error) per call, in
    order. Only `Exception`s are captured; cancellation propagates."""
    outcomes: list[Outcome] = [(None, None)] * len(calls)

    async def run(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            outcomes[index] = (await call(), None)
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            outcomes[index] = (None, exc)

    if len(calls) == 1:
        await run(0, calls[0])
        return outcomes
    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(run, index, call)
    return outcomes


async def gather_or_raise(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Like `gather`, then raise the first error (all calls have finished)."""
    outcomes = await gather(calls)
    for _, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _ in outcomes]

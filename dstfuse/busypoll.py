"""Bounded busy-polling: the mount daemon does not sleep between I/O events.

At queue depth 1 most of a request's time is wake-ups, not work: the daemon
sleeps in epoll while the node answers, and again while the kernel hands the
reply to the application and the next request comes, and on a VM a sleeping
vCPU takes tens of microseconds to wake (docs/performance.md, "Busy-polling":
4 KiB writes at QD1 1737 -> 3370 IOPS). While I/O is under way, the
`BusyPoll` task keeps trio's run loop polling its descriptors with a zero
timeout instead of sleeping, so a node's reply or the next FUSE request is
picked up as soon as it is there.

Invariants:
- it spins only within `window` seconds of the last I/O event (`poke`: a
  read from a node's connection, a FUSE request read); after `window` with
  none it parks, and the process sleeps in epoll as it would without it. An
  idle mount, or one whose nodes all went silent, costs no CPU beyond one
  window after the last event;
- each spin step is a checkpoint (every other runnable task runs first), so
  under load it costs one task step per pass of the run loop, never a
  request's turn;
- one poller per trio run (a RunVar, installed by the mount daemon); where
  none is installed (the export node, tests), `poke` does nothing. A window
  of 0 installs none.
"""

from __future__ import annotations

import time

import trio

#: The default window (config key `busy_poll`): longer than a node's reply
#: and the application's next request take at QD1 on loopback.
DEFAULT_WINDOW = 200e-6
#: The longest window allowed: beyond it the daemon would spin while idle.
MAX_WINDOW = 10e-3

_POLLER: trio.lowlevel.RunVar[BusyPoll | None] = trio.lowlevel.RunVar("busy_poll", None)


class BusyPoll:
    """The spinning task of one trio run and the deadline it spins to."""

    __slots__ = ("window", "_until", "_parked", "_started")

    def __init__(self, window: float) -> None:
        if not 0 < window <= MAX_WINDOW:
            raise ValueError(f"busy-poll window {window!r} s is not in (0, {MAX_WINDOW}]")
        self.window = window
        self._until = 0.0
        self._parked: trio.lowlevel.Task | None = None
        self._started = False

    @property
    def spinning(self) -> bool:
        """The task is running (not parked)."""
        return self._started and self._parked is None

    def poke(self) -> None:
        """An I/O event happened: spin until `window` after now."""
        self._until = time.perf_counter() + self.window
        if self._parked is not None:
            trio.lowlevel.reschedule(self._parked)
            self._parked = None
        elif not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._spin, name="busy-poll")

    async def _spin(self) -> None:
        while True:
            if time.perf_counter() < self._until:
                await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            self._parked = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._parked = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)


def install(window: float) -> BusyPoll | None:
    """Busy-poll this trio run for `window` seconds after each I/O event
    (0: not at all). Call from inside the run, once."""
    poller = BusyPoll(window) if window else None
    _POLLER.set(poller)
    return poller


def poke() -> None:
    """An I/O event: the installed poller, if any, spins a window from now."""
    poller = _POLLER.get()
    if poller is not None:
        poller.poke()

"""Sampling what a job costs: CPU time and peak RSS per process from /proc,
and the whole machine's CPU time split into ours, kernel threads and other
people's work (the box is shared).

Invariants: only /proc is read (never a FUSE mount), and a process that is
gone reads as None, never as an error.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import KiB
from .processes import log

#: Cores of load that is not ours above which a figure is marked disturbed.
IDLE_LOAD = 0.25
RSS_INTERVAL = 0.2
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is state (field 3); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class LoadSnapshot:
    """The machine's CPU time (/proc/stat) and every process's, at one time,
    to tell how much of the machine was ours during a job and how much went
    to other people's work (this box is shared: tests, builds)."""

    stat: tuple[int, ...]
    tasks: dict[int, tuple[int, float]]  # pid -> (ppid, CPU seconds)

    @classmethod
    def take(cls) -> LoadSnapshot:
        with open("/proc/stat") as file:
            stat = tuple(int(value) for value in file.readline().split()[1:])
        tasks: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            tasks[int(entry.name)] = (
                int(fields[1]),
                (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
            )
        return cls(stat, tasks)


def load_between(before: LoadSnapshot, after: LoadSnapshot, roots: set[int]) -> dict[str, float]:
    """CPU seconds between two snapshots: `busy` (the whole machine), `ours`
    (`roots` and their descendants), `kernel` (kernel threads: loop and
    FUSE workers, softirq threads) and `other` (everything else: load that
    is not the benchmark's)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in after.tasks.items():
        children.setdefault(ppid, []).append(pid)
    ours: set[int] = set()
    pending = [pid for pid in roots if pid in after.tasks]
    while pending:
        pid = pending.pop()
        if pid not in ours:
            ours.add(pid)
            pending.extend(children.get(pid, ()))
    used = {"ours": 0.0, "kernel": 0.0}
    for pid, (ppid, seconds) in after.tasks.items():
        spent = seconds - before.tasks.get(pid, (0, 0.0))[1]
        if pid in ours:
            used["ours"] += spent
        elif pid == 2 or ppid == 2:
            used["kernel"] += spent
    delta = [b - a for a, b in zip(before.stat, after.stat, strict=False)]
    # user nice system idle iowait irq softirq steal ...
    in_tasks = sum(delta[0:3]) / _CLOCK_TICKS
    busy = (sum(delta[0:3]) + sum(delta[5:8])) / _CLOCK_TICKS
    return {
        "busy": busy,
        "ours": used["ours"],
        "kernel": used["kernel"],
        "other": max(0.0, in_tasks - used["ours"] - used["kernel"]),
    }


def machine_load(seconds: float) -> dict[str, float]:
    """Cores busy on the machine over the next `seconds` (nothing of ours
    running yet, so `other` is other people's load)."""
    before = LoadSnapshot.take()
    time.sleep(seconds)
    after = LoadSnapshot.take()
    return {
        key: value / seconds for key, value in load_between(before, after, {os.getpid()}).items()
    }


class RssSampler:
    """Peak VmRSS of a set of pids, sampled every RSS_INTERVAL seconds in a
    thread while the `with` block runs (and once at each end). With `kept`
    (the bytes of acknowledged writes the client keeps for replay, read
    from its control tree), also the client's peak of RSS less those, as
    sampled together, and the peak of those bytes: the replay buffer's
    high-water mark, which the heap keeps for the next kept writes while
    the job goes on (a FLUSH releases them, the next ones reuse it)."""

    def __init__(
        self, pids: dict[str, int], kept: Callable[[], int | None] | None = None
    ) -> None:
        self.pids = pids
        self.peak: dict[str, int] = {}
        self.peak_client_less_kept: int | None = None
        self.peak_kept: int | None = None
        self._kept = kept
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss sampler", daemon=True)

    def _sample(self) -> None:
        for role, pid in self.pids.items():
            value = rss_bytes(pid)
            if value is not None and value > self.peak.get(role, 0):
                self.peak[role] = value
            if role == "client" and value is not None and self._kept is not None:
                kept = self._kept()
                if kept is not None:
                    self.peak_kept = max(self.peak_kept or 0, kept)
                    less = value - kept
                    self.peak_client_less_kept = max(self.peak_client_less_kept or 0, less)

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def wait_for_idle(max_seconds: float) -> dict[str, float]:
    """The machine's load over 3 s (5 s windows while waiting, up to
    `max_seconds`, for one with less than IDLE_LOAD cores busy)."""
    end = time.monotonic() + max_seconds
    load = machine_load(3 if max_seconds <= 0 else 5)
    while load["busy"] >= IDLE_LOAD and time.monotonic() < end:
        log(f"machine busy ({load['busy']:.2f} cores); waiting for it to be idle")
        load = machine_load(5)
    return load

"""The run's plan, from the command line: sizes and times, the jobs, the
peers to start and the comparisons to print (subject against baseline).
A saved run (--json) is replayed through the same plan, so the report is
the same whether it is printed live or again later.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from . import GiB, MiB
from .jobs import JOBS, KEY_JOBS, Job

#: Encrypted sequential writes may be at most this much slower than plain ones.
KEY_SLOWDOWN_TARGET = 0.15


@dataclass
class Plan:
    """What one run does; `comparisons` are (title, subject, baseline, jobs)."""

    size: int
    runtime: int
    ramp: int
    fill_cap: int
    repeat: int
    jobs: tuple[Job, ...]
    peers: list[tuple[str, str, dict[str, Any]]]  # (label, kind, options)
    comparisons: list[tuple[str, str, str, tuple[Job, ...]]]  # title, subject, baseline, jobs

    def jobs_for(self, label: str) -> tuple[Job, ...]:
        if label == "dstfuse-aes":
            return tuple(job for job in self.jobs if job.name in KEY_JOBS)
        return self.jobs

    def estimate(self) -> float:
        per_job = self.ramp + self.runtime + 4
        setup = 20 + 10  # start + tear down, per peer
        total = 0.0
        for label, _, _ in self.peers:
            jobs = len(self.jobs_for(label)) * self.repeat
            total += setup + self.fill_cap / 2 + per_job * jobs
        return total


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan for parsed arguments; a bad --jobs or --repeat exits with one line."""
    size = args.size or (256 * MiB if args.quick else GiB)
    runtime = args.runtime or (3 if args.quick else 20)
    ramp = args.ramp if args.ramp is not None else (1 if args.quick else 2)
    fill_cap = args.fill_cap or (60 if args.quick else 180)
    jobs = JOBS
    if args.jobs:
        wanted = [name.strip() for name in args.jobs.split(",") if name.strip()]
        known = {job.name: job for job in JOBS}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(
                f"run.py: unknown job(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        jobs = tuple(known[name] for name in wanted)
    subject = "nbdfuse-b" if args.self_test else "dstfuse"
    peers: list[tuple[str, str, dict[str, Any]]] = [("nbdfuse", "nbdfuse", {})]
    if args.self_test:
        peers.append((subject, "nbdfuse", {}))
    else:
        peers.append((subject, "dstfuse", {}))
    comparisons: list[tuple[str, str, str, tuple[Job, ...]]] = [
        (
            f"{subject} vs nbdfuse (ratio = {subject} / nbdfuse, higher is better)",
            subject,
            "nbdfuse",
            jobs,
        )
    ]
    if args.mirror and not args.self_test:
        peers.append(("dstfuse-mirror", "dstfuse", {"legs": 2}))
        comparisons.append(
            (
                "two-node mirror vs one node (ratio = mirror / single)",
                "dstfuse-mirror",
                "dstfuse",
                jobs,
            )
        )
        comparisons.append(
            (
                "two-node mirror vs nbdfuse (ratio = mirror / nbdfuse)",
                "dstfuse-mirror",
                "nbdfuse",
                jobs,
            )
        )
    if args.floor and not args.self_test:
        peers.append(("nullfs", "nullfs", {}))
        comparisons.append(
            (
                "null file system vs nbdfuse (ratio = nullfs / nbdfuse: the ceiling of a "
                "pyfuse3 client with nothing behind it)",
                "nullfs",
                "nbdfuse",
                jobs,
            )
        )
        comparisons.append(
            (
                "dstfuse vs the null file system (ratio = dstfuse / nullfs)",
                "dstfuse",
                "nullfs",
                jobs,
            )
        )
    if args.key and not args.self_test:
        peers.append(("dstfuse-aes", "dstfuse", {"key": True}))
        key_jobs = tuple(job for job in jobs if job.name in KEY_JOBS)
        comparisons.append(
            (
                "aes-256-gcm vs plain (ratio = encrypted / plain; "
                f"target: writes at most {KEY_SLOWDOWN_TARGET:.0%} slower)",
                "dstfuse-aes",
                "dstfuse",
                key_jobs,
            )
        )
    if args.repeat < 1:
        raise SystemExit("run.py: --repeat must be at least 1")
    return Plan(size, runtime, ramp, fill_cap, args.repeat, jobs, peers, comparisons)

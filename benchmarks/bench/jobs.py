"""The fio jobs and their results: the job files in `benchmarks/jobs/`,
one fio run with everything measured around it, the rounds of all jobs on
every peer, and `Results`, which picks the figures to quote.

Invariants: every peer sees the same job with the same offsets
(`randrepeat=1` in the job files); the order of the peers alternates from
job to job; every job starts with nothing dirty in the page cache (sync);
fio is bounded by the run's hard limit, and a fio killed there
is the limit (DeadlineExceeded), not a broken peer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import JOB_DIR, MiB
from .peers import REQUIRED_PEERS, Peer, Tools
from .processes import BenchmarkError, DeadlineExceeded, log, run
from .sampling import IDLE_LOAD, LoadSnapshot, RssSampler, cpu_seconds, load_between

if TYPE_CHECKING:
    from .plan import Plan


@dataclass(frozen=True)
class Job:
    """One fio job file: which side of fio's report holds it and whether it
    is quoted in bandwidth or IOPS."""

    name: str
    title: str
    direction: str  # "read" | "write": which side of fio's JSON holds it
    metric: str  # "bw" | "iops"

    @property
    def file(self) -> Path:
        return JOB_DIR / f"{self.name}.fio"


JOBS: tuple[Job, ...] = (
    Job("seq-write", "seq write 1 MiB QD4", "write", "bw"),
    Job("seq-read", "seq read 1 MiB QD4", "read", "bw"),
    Job("rand-write-qd1", "rand write 4 KiB QD1", "write", "iops"),
    Job("rand-read-qd1", "rand read 4 KiB QD1", "read", "iops"),
    Job("rand-write-qd32", "rand write 4 KiB QD32", "write", "iops"),
    Job("rand-read-qd32", "rand read 4 KiB QD32", "read", "iops"),
)
FILL = Job("fill", "fill pass (seq write 1 MiB QD4)", "write", "bw")
KEY_JOBS = ("seq-write", "seq-read")


@dataclass
class Result:
    peer: str
    job: str
    bw_bytes: float
    iops: float
    lat_mean_ns: float
    lat_p99_ns: float
    io_bytes: int
    seconds: float
    cpu_cores: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    #: The client's peak RSS less the writes it kept for replay (dstfuse)
    peak_client_less_kept: int | None = None
    #: The most the client kept for replay at once during the job (dstfuse)
    peak_kept: int | None = None
    fio_cpu: float = 0.0
    round: int = 0
    #: Per storage node, how much its counters grew during the job.
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Seconds fio ran, ramp included (the counters' and CPU figures' span).
    wall: float = 0.0
    #: Cores busy during the job: whole machine, ours, kernel threads, other.
    load: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        return self.bw_bytes if metric == "bw" else self.iops

    @property
    def quiet(self) -> bool:
        """Whether other people's work stayed under IDLE_LOAD cores."""
        return self.load.get("other", 0.0) <= IDLE_LOAD


Pair = tuple[Result, Result]


class Results:
    """Every measurement by (peer, job), one per round, in the order taken.
    Figures are quoted as the median over the quiet rounds (other load under
    IDLE_LOAD), or over all rounds when none was quiet; `round_ratios` pairs
    the rounds of two peers, which ran back to back under the same
    conditions (quiet pairs preferred in the same way)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], list[Result]] = {}

    def add(self, result: Result) -> None:
        self._runs.setdefault((result.peer, result.job), []).append(result)

    def runs(self, peer: str, job: str) -> list[Result]:
        return self._runs.get((peer, job), [])

    def all(self) -> list[Result]:
        return [result for runs in self._runs.values() for result in runs]

    def median(self, peer: str, job: str, metric: str = "bw") -> Result | None:
        """The run with the median figure (the lower one of an even count)
        among the quiet runs, or among all runs when none was quiet."""
        runs = self.runs(peer, job)
        pool = sorted([r for r in runs if r.quiet] or runs, key=lambda r: r.value(metric))
        return pool[(len(pool) - 1) // 2] if pool else None

    def pairs(self, subject: str, baseline: str, job: Job) -> tuple[list[Pair], bool]:
        """The rounds in which both peers ran `job`, as (subject, baseline)
        pairs: the quiet pairs if there are any (then True), else all."""
        theirs = {result.round: result for result in self.runs(baseline, job.name)}
        pairs = [
            (mine, theirs[mine.round])
            for mine in self.runs(subject, job.name)
            if mine.round in theirs and theirs[mine.round].value(job.metric) > 0
        ]
        quiet = [(a, b) for a, b in pairs if a.quiet and b.quiet]
        return (quiet, True) if quiet else (pairs, False)


def run_fio(
    job: Job,
    peer: Peer,
    *,
    size: int,
    runtime: float,
    ramp: float,
    tools: Tools,
    round_number: int = 0,
    tag: str = "",
) -> Result:
    """Run one fio job on `peer`'s loop device and measure around it."""
    assert peer.loop is not None
    suffix = f"-r{round_number}" if round_number else ""
    out = tools.logdir / f"{peer.label}-{job.name}{tag}{suffix}.json"
    # Never read a report an earlier run of the same job left.
    out.unlink(missing_ok=True)
    env = dict(
        tools.env,
        DEVICE=peer.loop.path,
        SIZE=str(size),
        RUNTIME=str(int(runtime)),
        RAMP=str(int(ramp)),
    )
    argv = ["fio", "--output-format=json", f"--output={out}", str(job.file)]
    # Start with nothing dirty in the page cache: otherwise a job pays for
    # the writeback of the job before it, often another peer's (1 GiB
    # files rewritten at up to 1.2 GiB/s leave gigabytes for the disk).
    run(["sync"], tools.deadline.timeout(180))
    counters_before = peer.counters()
    before = {role: cpu_seconds(pid) for role, pid in peer.roles.items()}
    machine_before = LoadSnapshot.take()
    started = time.monotonic()
    with RssSampler(peer.roles, peer.kept_bytes) as rss:
        try:
            result = run(argv, tools.deadline.timeout(ramp + runtime + 60), check=False, env=env)
        except BenchmarkError:
            # fio killed at the hard limit is the limit, not a broken peer.
            tools.deadline.timeout(0)
            raise
    elapsed = time.monotonic() - started
    after = {role: cpu_seconds(pid) for role, pid in peer.roles.items()}
    machine = load_between(machine_before, LoadSnapshot.take(), tools.own_pids)
    counters_after = peer.counters()
    nodes = {
        node: {
            name: value - counters_before[node].get(name, 0)
            for name, value in values.items()
            if name in counters_before.get(node, {})
        }
        for node, values in counters_after.items()
        if node in counters_before
    }
    try:
        report = json.loads(out.read_text())
        stats = report["jobs"][0]
        side = stats[job.direction]
    except (OSError, ValueError, KeyError, IndexError):
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BenchmarkError(
            f"fio {job.name} on {peer.label} gave no report ({result.returncode}): "
            + (detail[-1] if detail else "")
        ) from None
    if result.returncode != 0 or stats.get("error"):
        raise BenchmarkError(
            f"fio {job.name} on {peer.label} failed: error {stats.get('error')} "
            f"({os.strerror(stats['error']) if stats.get('error') else result.returncode})"
        )
    clat = side.get("clat_ns", {})
    percentiles = clat.get("percentile", {})
    cores = {}
    for role in peer.roles:
        start, end = before.get(role), after.get(role)
        if start is not None and end is not None:
            cores[role] = (end - start) / elapsed
    return Result(
        peer=peer.label,
        job=job.name,
        bw_bytes=float(side["bw_bytes"]),
        iops=float(side["iops"]),
        lat_mean_ns=float(side.get("lat_ns", clat).get("mean", 0.0)),
        lat_p99_ns=float(percentiles.get("99.000000", 0.0)),
        io_bytes=int(side["io_bytes"]),
        seconds=stats.get("job_runtime", 0) / 1000,
        cpu_cores=cores,
        peak_rss=dict(rss.peak),
        peak_client_less_kept=rss.peak_client_less_kept,
        peak_kept=rss.peak_kept,
        fio_cpu=(float(stats.get("usr_cpu", 0)) + float(stats.get("sys_cpu", 0))) / 100,
        load={key: value / elapsed for key, value in machine.items()},
        nodes=nodes,
        wall=elapsed,
        round=round_number,
    )


def figure(value: float, metric: str) -> str:
    """A job's figure as the report prints it: MiB/s or IOPS."""
    if metric == "bw":
        return f"{value / MiB:8.1f} MiB/s"
    return f"{value:8.0f} IOPS "


def measure(
    plan: Plan,
    peers: list[Peer],
    tools: Tools,
    results: Results,
    failures: list[str],
) -> None:
    """The fill pass on every peer, then `plan.repeat` rounds of every job
    on every peer; a failed optional peer is dropped (and listed in
    `failures`), a failed required one stops the run."""
    # One size for everyone: a mirror keeps its metadata at the end of the
    # legs, so its storage is a little smaller than the backing files.
    assert all(peer.loop is not None for peer in peers)
    size = min(peer.loop.size for peer in peers if peer.loop) // MiB * MiB
    broken: set[str] = set()
    for peer in peers:
        log(f"{peer.label}: fill pass over {size / MiB:.0f} MiB (at most {plan.fill_cap} s)")
        try:
            peer.settle()
            result = run_fio(FILL, peer, size=size, runtime=plan.fill_cap, ramp=0, tools=tools)
            peer.settle()
        except DeadlineExceeded:
            raise
        except BenchmarkError as exc:
            if peer.label in REQUIRED_PEERS:
                raise
            failures.append(f"{peer.label}: {exc}")
            broken.add(peer.label)
            continue
        results.add(result)
        if result.io_bytes < size:
            peer.notes.append(
                f"fill pass wrote {result.io_bytes / MiB:.0f} of {size / MiB:.0f} "
                "MiB before its time cap: later reads partly hit holes"
            )
    for round_number in range(1, plan.repeat + 1):
        for index, job in enumerate(plan.jobs):
            # Alternate the order so that no peer always runs right after the
            # fill or right after the other peer's writes.
            order = peers if (index + round_number) % 2 else list(reversed(peers))
            for peer in order:
                if job not in plan.jobs_for(peer.label) or peer.label in broken:
                    continue
                where = f"round {round_number}: " if plan.repeat > 1 else ""
                log(f"{where}{peer.label}: {job.name}")
                try:
                    result = run_fio(
                        job,
                        peer,
                        size=size,
                        runtime=plan.runtime,
                        ramp=plan.ramp,
                        tools=tools,
                        round_number=round_number,
                    )
                except DeadlineExceeded:
                    raise
                except BenchmarkError as exc:
                    failures.append(str(exc))
                    broken.add(peer.label)
                    continue
                results.add(result)
                shown = figure(result.value(job.metric), job.metric)
                log(f"{where}{peer.label}: {job.name}: {shown}")


@dataclass(frozen=True)
class JobRatio:
    """One job of a comparison: the rounds used (quiet ones if any), the
    median round of each peer among them, and the per-round ratios
    subject / baseline, sorted."""

    job: Job
    pairs: list[Pair]
    quiet: bool
    subject: Result
    baseline: Result
    ratios: list[float]

    @property
    def median(self) -> float:
        """The median of the per-round ratios (the mean of the middle two
        of an even count)."""
        middle = len(self.ratios) // 2
        if len(self.ratios) % 2:
            return self.ratios[middle]
        return (self.ratios[middle - 1] + self.ratios[middle]) / 2


def job_ratio(results: Results, subject: str, baseline: str, job: Job) -> JobRatio | None:
    """The ratio of `job` between two peers, or None when they have no round
    of it in common."""
    pairs, quiet = results.pairs(subject, baseline, job)
    if not pairs:
        return None
    return JobRatio(
        job=job,
        pairs=pairs,
        quiet=quiet,
        subject=median_by(job, [pair[0] for pair in pairs]),
        baseline=median_by(job, [pair[1] for pair in pairs]),
        ratios=sorted(a.value(job.metric) / b.value(job.metric) for a, b in pairs),
    )


def median_by(job: Job, runs: list[Result]) -> Result:
    """The run with the median figure of `job` (the lower one of an even count)."""
    ordered = sorted(runs, key=lambda result: result.value(job.metric))
    return ordered[(len(ordered) - 1) // 2]

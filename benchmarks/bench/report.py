"""The report: the text printed at the end of a run (and again by
--replay), and the --json file that keeps everything.

Invariants: the report is computed from the plan, the peers and the
results alone, so a saved run prints the same text as the live one; the
--json layout is read back by `load_json` (old files included: keys added
later have defaults).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import KiB, MiB
from .jobs import FILL, JOBS, Job, Result, Results, figure, job_ratio
from .peers import PeerRecord
from .processes import duration
from .sampling import IDLE_LOAD

if TYPE_CHECKING:
    from .peers import Peer
    from .plan import Plan

#: The dstfuse client daemon's RSS must stay under this during the QD32 runs.
RSS_FLOOR = 200 * MiB
#: ... and, on one plain node, at most this without the replay buffer of
#: writes it keeps (issue 12): its peak in the job less the buffer's peak.
RSS_TARGET = 64 * MiB
#: Ratios against the C peer below this are pointed out for profiling.
PROFILE_BELOW = 0.3


def _latency(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.0f} us"


def comparison_table(
    title: str,
    subject: str,
    baseline: str,
    results: Results,
    jobs: tuple[Job, ...],
) -> list[str]:
    """One row per job. With several rounds, the rounds quoted are those in
    which neither peer was disturbed (all rounds when there is none: the
    ratio gets a '*'); figures and latencies are the median round of each
    peer among them, the ratio is the median of the per-round ratios, and
    `rounds` shows how many rounds were used and the ratio's range."""
    rounds = max((len(results.runs(subject, job.name)) for job in jobs), default=0)
    spread = rounds > 1
    lines = [
        title,
        f"  {'job':<24} {subject:>15} {baseline:>15} {'ratio':>7} "
        + (" rounds  range       " if spread else "")
        + f"  {'lat mean / p99 (' + subject + ')':<28} lat mean / p99 ({baseline})",
    ]
    starred = False
    slow: list[str] = []
    for job in jobs:
        row = job_ratio(results, subject, baseline, job)
        if row is None:
            continue
        mine, theirs, ratios, ratio = row.subject, row.baseline, row.ratios, row.median
        cells = f"{figure(mine.value(job.metric), job.metric)} "
        cells += f"{figure(theirs.value(job.metric), job.metric)} {ratio:6.2f}x"
        cells += " " if row.quiet else "*"
        if spread:
            cells += f" {len(row.pairs)}/{rounds:<5} {ratios[0]:4.2f}-{ratios[-1]:4.2f}x"
        lat = [f"{_latency(r.lat_mean_ns)} / {_latency(r.lat_p99_ns)}" for r in (mine, theirs)]
        lines.append(f"  {job.title:<24} {cells}  {lat[0]:<28} {lat[1]}")
        starred = starred or not row.quiet
        if baseline == "nbdfuse" and ratio < PROFILE_BELOW:
            slow.append(job.name)
    if starred:
        lines.append(
            f"  * every round of this job had more than {IDLE_LOAD:.2f} cores of other load "
            "(see the notes)"
        )
    if slow:
        lines.append(
            f"  below {PROFILE_BELOW:.1f}x: {', '.join(slow)} (see where the time goes with "
            "--profile DIR)"
        )
    return lines


def node_table(results: Results, peers: list[Peer]) -> list[str]:
    """What each storage node saw per job (the median round): requests per
    second, average request size, resends and errors."""
    lines: list[str] = []
    for peer in peers:
        for job in (FILL, *JOBS):
            result = results.median(peer.label, job.name, job.metric)
            if result is None or not result.nodes or not result.wall:
                continue
            if not lines:
                lines.append(
                    "storage nodes (control tree counters over each job, ramp included; "
                    "the median round)"
                )
            cells = []
            for node, counters in result.nodes.items():
                requests = counters.get("requests", 0)
                moved = counters.get("bytes_read", 0) + counters.get("bytes_written", 0)
                size = f"{moved / requests / KiB:.0f} KiB" if requests else "-"
                cells.append(
                    f"{node} {requests / result.wall:6.0f} req/s of {size:>8}, "
                    f"{counters.get('resends', 0)} resends, {counters.get('errors', 0)} errors"
                )
            lines.append(f"  {peer.label:<15} {job.title:<32} " + "; ".join(cells))
    return lines


def cpu_table(results: Results, peers: list[Peer]) -> list[str]:
    """Per peer and job (the median round): cores busy per process and the machine."""
    lines = [
        f"CPU: cores busy during each job (the machine has {os.cpu_count()}): the whole machine "
        "(kernel threads, other people's work), fio, and per process with its peak RSS "
        "(the median round)"
    ]
    for peer in peers:
        roles = sorted(peer.roles)
        lines.append(
            f"  {peer.label}: " + ", ".join(f"{role} pid {peer.roles[role]}" for role in roles)
        )
        for job in (FILL, *JOBS):
            result = results.median(peer.label, job.name, job.metric)
            if result is None:
                continue
            cells = "  ".join(
                f"{role} {result.cpu_cores.get(role, 0):4.2f} / "
                f"{result.peak_rss.get(role, 0) / MiB:5.0f} MiB"
                for role in roles
            )
            load = result.load
            lines.append(
                f"    {job.title:<32} machine {load.get('busy', 0):4.2f} (kernel "
                f"{load.get('kernel', 0):4.2f}, other {load.get('other', 0):4.2f})  "
                f"fio {result.fio_cpu:4.2f}  {cells}"
            )
    return lines


def report(
    plan: Plan,
    peers: list[Peer],
    results: Results,
    failures: list[str],
    profiles: dict[str, Any],
    elapsed: float,
    before_run: dict[str, float],
) -> None:
    """Print the whole report of a run (or of a saved one) on stdout."""
    out: list[str] = [
        "",
        f"results ({plan.size / MiB:.0f} MiB backing files, "
        f"{plan.ramp} s ramp + {plan.runtime} s per job, "
        f"{os.cpu_count()} CPUs, TCP loopback; run took {duration(elapsed)}; "
        f"other load before the run {before_run['busy']:.2f} cores)",
    ]
    for title, subject, baseline, jobs in plan.comparisons:
        out += ["", *comparison_table(title, subject, baseline, results, jobs)]
    fills = [result for peer in peers for result in results.runs(peer.label, FILL.name)]
    if fills:
        out += [
            "",
            "fill pass: " + ", ".join(f"{r.peer} {r.bw_bytes / MiB:.0f} MiB/s" for r in fills),
        ]
    out += ["", *rss_lines(peers, results)]
    out += ["", *cpu_table(results, peers)]
    nodes = node_table(results, peers)
    if nodes:
        out += ["", *nodes]
    for name, outcome in profiles.items():
        result: Result = outcome["result"]
        job = next(job for job in JOBS if job.name == name)
        out += [
            "",
            f"profile {result.peer} {name} (under py-spy: "
            f"{figure(result.value(job.metric), job.metric).strip()}; other load "
            f"{result.load.get('other', 0):.2f} cores)",
        ]
        for role, summary in outcome["profiles"].items():
            out.append(
                f"  {role}: {result.cpu_cores.get(role, 0):.2f} cores, {summary['samples']} "
                f"samples ({summary['worker']} in worker threads), trio thread active "
                f"{summary['main_active']:.0%}"
            )
            layers = ", ".join(f"{name} {pct:.0f}%" for name, pct in summary.get("layers", []))
            out.append(f"    by layer: {layers}")
            out.append("    top functions by own samples | dstfuse functions with callees:")
            for (own, own_pct), (inc, inc_pct) in zip(
                summary["self"][:12], summary["dstfuse"][:12], strict=False
            ):
                out.append(f"    {own_pct:5.1f}% {own:<58.58} | {inc_pct:5.1f}% {inc:.58}")
    notes = [f"{peer.label}: {note}" for peer in peers for note in peer.notes]
    for result in results.all():
        if result.load.get("other", 0) > IDLE_LOAD:
            where = f" (round {result.round})" if plan.repeat > 1 and result.round else ""
            notes.append(
                f"{result.peer} {result.job}{where}: disturbed by other load on the machine "
                f"({result.load['other']:.2f} cores)"
            )
    if notes:
        out += ["", "notes:", *(f"  {note}" for note in notes)]
    if failures:
        out += ["", "FAILED:", *(f"  {failure}" for failure in failures)]
    print("\n".join(out), flush=True)


def rss_lines(peers: list[Peer], results: Results) -> list[str]:
    """Per peer, its client's peak RSS during QD32 and over the run."""
    lines = []
    qd32 = [job.name for job in JOBS if job.name.endswith("qd32")]
    for peer in peers:
        if "client" not in peer.roles:
            continue
        peaks = [
            result.peak_rss.get("client", 0)
            for name in qd32
            for result in results.runs(peer.label, name)
        ]
        overall = [r.peak_rss.get("client", 0) for r in results.all() if r.peer == peer.label]
        if not overall:
            continue
        during = f"{max(peaks) / MiB:.0f} MiB during QD32" if peaks else "no QD32 run"
        verdict = ""
        if peer.kind == "dstfuse" and peaks:
            ok = max(peaks) < RSS_FLOOR
            verdict = f"; {'within' if ok else 'OVER'} the {RSS_FLOOR / MiB:.0f} MiB limit"
            runs = [run for name in qd32 for run in results.runs(peer.label, name)]
            less_kept = [
                run.peak_client_less_kept for run in runs if run.peak_client_less_kept is not None
            ]
            if less_kept:
                verdict += f"; {max(less_kept) / MiB:.0f} MiB less what it kept at the same moment"
            # The heap keeps the replay buffer's high-water mark for the next
            # kept writes while the job goes on: what the rest of the daemon
            # needs is its peak less the replay buffer's.
            less_replay = [
                (run.peak_rss.get("client", 0) - run.peak_kept, run.peak_kept)
                for run in runs
                if run.peak_kept is not None
            ]
            if less_replay:
                rest, replay = max(less_replay)
                verdict += (
                    f", {rest / MiB:.0f} MiB less the replay buffer's peak in the job "
                    f"({replay / MiB:.0f} MiB)"
                )
                if peer.label == "dstfuse":  # the target is one plain node's
                    ok = rest <= RSS_TARGET
                    verdict += (
                        f", {'within' if ok else 'OVER'} the {RSS_TARGET / MiB:.0f} MiB target"
                    )
        lines.append(
            f"peak RSS of the {peer.label} client (pid {peer.roles['client']}): "
            f"{during}, {max(overall) / MiB:.0f} MiB over the run{verdict}"
        )
    return lines


def write_json(
    path: Path,
    plan: Plan,
    peers: list[Peer],
    results: Results,
    failures: list[str],
    profiles: dict[str, Any],
    before_run: dict[str, float],
    elapsed: float,
) -> None:
    """Print the whole report of a run (or of a saved one) on stdout."""
    data = {
        "elapsed": elapsed,
        "machine_load_before": before_run,
        "size": plan.size,
        "runtime": plan.runtime,
        "ramp": plan.ramp,
        "cpus": os.cpu_count(),
        "peers": {
            peer.label: {
                "kind": peer.kind,
                "roles": peer.roles,
                "notes": peer.notes,
                "loop": peer.loop.path if peer.loop else None,
                "direct_io": peer.direct_io,
            }
            for peer in peers
        },
        "repeat": plan.repeat,
        "results": [vars(result) for result in results.all()],
        "profiles": {
            name: {"result": vars(outcome["result"]), "profiles": outcome["profiles"]}
            for name, outcome in profiles.items()
        },
        "failures": failures,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    """A run saved with --json, with its peers as PeerRecords, its results
    as Results and its profiles' results as Result (keys `peers`,
    `results`, `profiles`); the rest as saved."""
    data = json.loads(path.read_text())
    results = Results()
    for record in data["results"]:
        results.add(Result(**record))
    return {
        **data,
        "peers": [
            PeerRecord(label, info["kind"], info["roles"], info["notes"])
            for label, info in data["peers"].items()
        ],
        "results": results,
        "profiles": {
            name: {"result": Result(**outcome["result"]), "profiles": outcome["profiles"]}
            for name, outcome in data.get("profiles", {}).items()
        },
    }

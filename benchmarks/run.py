#!/usr/bin/env python3
"""dstfuse benchmark: fio through a loop device on a dstfuse storage file,
against the same fio job on `nbdkit file` + `nbdfuse` (the C peer doing the
same job) in the same run, both over TCP loopback (DESIGN.md section 9).

It owns the whole life of what it measures: it makes the backing files (one
size, one backing file system), starts the export nodes and the NBD server,
mounts, attaches loop devices with `losetup --direct-io=on`, fills every
device with one write pass, runs the fio jobs in `benchmarks/jobs/` on every
peer in turn, samples the dstfuse client daemon's RSS and every server's CPU
time, and prints each figure with the ratio dstfuse / nbdfuse (higher is
better). With `--mirror` and `--key` it also compares a two-node mirror and
an encrypted (aes-256-gcm) storage against the plain single-node storage.

Invariants:
- every mount, loop device, process and file it creates is registered for
  tear-down the moment it exists, and torn down in reverse order in a
  `finally`, whatever failed (Ctrl-C and SIGTERM included); each tear-down
  step is bounded in time and a failed one never stops the others;
- it never touches a mount, loop device or process it did not create: loop
  devices are found by `--show`, processes are killed by the pid we started
  (or the pid the mount published), never by name;
- the run is bounded: the planned time and the hard limit are printed before
  anything starts, and no step may run past the limit (fio is killed; the
  tear-down still runs);
- nothing in this process touches a FUSE mount except through a probe with
  a timeout, so a hung daemon cannot hang the benchmark.

It must never be imported by dstfuse itself, and never edits the tree.
The parts live in `benchmarks/bench/` (see its docstring); this file is the
command line: arguments, the run's order, and --replay.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import MiB
from bench.chart import ChartUnavailable, require_plotting, write_chart
from bench.jobs import FILL, JOBS, KEY_JOBS, Results, measure
from bench.peers import Peer, Tools, start_peers
from bench.plan import Plan, make_plan
from bench.processes import (
    BenchmarkError,
    Deadline,
    Interrupted,
    Teardown,
    child_env,
    duration,
    log,
    remove_workdir,
)
from bench.profiling import find_py_spy, run_profiles
from bench.report import load_json, report, write_json
from bench.sampling import IDLE_LOAD, wait_for_idle


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 512M, 1G)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="fio on a dstfuse storage vs nbdkit file + nbdfuse, both over TCP loopback, "
        "through losetup --direct-io=on. Needs root."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 256 MiB files, 3 s per job after 1 s of ramp",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="also a mirror of two export nodes against the single node",
    )
    parser.add_argument(
        "--key",
        action="store_true",
        help=f"also an aes-256-gcm storage against the plain one ({', '.join(KEY_JOBS)} only)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the null file system (bench/nullfs.py: dstfuse's FUSE front end "
        "with no storage behind it), against nbdfuse and dstfuse",
    )
    parser.add_argument("--size", type=parse_size, help="backing file size (default 1G)")
    parser.add_argument("--runtime", type=int, help="measured seconds per job (default 20)")
    parser.add_argument("--ramp", type=int, help="seconds before measuring (default 2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every job N times (interleaved rounds); quote medians and the ratio range",
    )
    parser.add_argument(
        "--jobs",
        help="comma-separated job names (default: all): " + ", ".join(job.name for job in JOBS),
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the backing files go, one file system for all peers (default /var/tmp)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="hard limit in seconds for the whole run (default: planned "
        "time + 50%%, at least + 2 min)",
    )
    parser.add_argument(
        "--fill-cap", type=int, help="longest a fill pass may take, seconds (default 180; quick 60)"
    )
    parser.add_argument(
        "--nbd-connections",
        type=int,
        help="nbdfuse --connections (default: nbdfuse's own, multi-conn 4)",
    )
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="measure the method, no dstfuse needed: a second nbdfuse stack "
        "takes dstfuse's place (ratios should be about 1.00x)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after measuring, run each dstfuse job again under py-spy "
        "(client daemon and export nodes) and keep the raw stacks in DIR",
    )
    parser.add_argument(
        "--profile-peer",
        default="dstfuse",
        metavar="LABEL",
        help="the peer --profile profiles: dstfuse (default), dstfuse-mirror, dstfuse-aes",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results here")
    parser.add_argument(
        "--chart",
        type=Path,
        metavar="FILE",
        help="draw every job's ratio with its range over the rounds into this PNG "
        "(default with --json: FILE.png beside it; with --replay: only when given); "
        "needs matplotlib",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        metavar="FILE",
        help="print the report of a run saved with --json again, and exit",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the processes' logs and fio's JSON reports here",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the machine to be idle (other load under "
        f"{IDLE_LOAD:.2f} cores for 5 s)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="python that runs dstfuse (default: this one)"
    )
    return parser


def check_environment(args: argparse.Namespace) -> None:
    """Root, the tools and job files, and a dstfuse that imports; else exit with one line."""
    if os.geteuid() != 0:
        raise SystemExit("run.py: needs root (losetup, FUSE mounts)")
    tools = ["fio", "losetup", "fusermount3", "umount", "nbdkit", "nbdfuse"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"run.py: not installed: {', '.join(missing)}")
    for job in (FILL, *JOBS):
        if not job.file.exists():
            raise SystemExit(f"run.py: missing job file {job.file}")
    if not args.self_test:
        probe_import = subprocess.run(
            [args.python, "-m", "dstfuse", "mount", "--help"],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd="/",
            timeout=60,
        )
        if probe_import.returncode != 0:
            last = probe_import.stderr.strip().splitlines()[-1:] or [""]
            raise SystemExit(
                f"run.py: dstfuse mount/export are not usable with {args.python}: "
                f"{last[0]} (try --self-test to check the method alone)"
            )


def replay(path: Path, chart: Path | None) -> int:
    """Print the report of a run saved with `--json` again (e.g. after the
    report changed), and draw its chart when `chart` is given; measures
    nothing."""
    data = load_json(path)
    results: Results = data["results"]
    labels = {peer.label for peer in data["peers"]}
    known = {job.name for job in JOBS}
    # The jobs in the order the run took them (its --jobs order): results
    # are saved in the order taken.
    names = [name for name in dict.fromkeys(r.job for r in results.all()) if name in known]
    args = build_parser().parse_args(
        [
            "--size", str(data["size"]),
            "--runtime", str(data["runtime"]),
            "--ramp", str(data["ramp"]),
            "--repeat", str(data.get("repeat", 1)),
            "--jobs", ",".join(names),
        ]
        + (["--mirror"] if "dstfuse-mirror" in labels else [])
        + (["--key"] if "dstfuse-aes" in labels else [])
        + (["--self-test"] if "nbdfuse-b" in labels else [])
    )  # fmt: skip
    plan = make_plan(args)
    peers: list[Any] = data["peers"]
    before_run = data.get("machine_load_before", {"busy": 0.0})
    report(
        plan, peers, results, data["failures"], data["profiles"], data.get("elapsed", 0), before_run
    )
    if chart is not None:
        try:
            write_chart(chart, plan, results, _chart_subtitle(plan, data.get("cpus")))
        except ChartUnavailable as exc:
            raise SystemExit(f"run.py: {exc}") from None
        print(f"chart: {chart}", file=sys.stderr)
    return 1 if data["failures"] else 0


def _chart_subtitle(plan: Plan, cpus: int | None) -> str:
    return (
        f"{plan.size / MiB:.0f} MiB files, {plan.ramp} s ramp + {plan.runtime} s per job, "
        f"{plan.repeat} round{'s' if plan.repeat > 1 else ''}, {cpus or os.cpu_count()} CPUs"
    )


def _chart_path(args: argparse.Namespace) -> Path | None:
    """--chart, else FILE.png beside --json FILE, else None."""
    if args.chart is not None:
        return args.chart
    return args.json.with_suffix(".png") if args.json is not None else None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or --replay a saved one); 0 only when every job on
    every peer ran and the tear-down was clean."""
    args = build_parser().parse_args(argv)
    if args.replay:
        return replay(args.replay, args.chart)
    plan = make_plan(args)
    check_environment(args)
    chart = _chart_path(args)
    if args.chart is not None:
        # Asked for by name: say now, not after the run, that it cannot be.
        try:
            require_plotting()
        except ChartUnavailable as exc:
            raise SystemExit(f"run.py: {exc}") from None
    py_spy = None
    if args.profile:
        py_spy = find_py_spy(args.python)
        if py_spy is None:
            raise SystemExit("run.py: --profile needs py-spy (pip install py-spy into the venv)")

    estimate = plan.estimate()
    if py_spy:
        estimate += len(plan.jobs) * (plan.ramp + plan.runtime + 8)
    limit = args.timeout or estimate + max(120.0, estimate / 2)
    print(
        f"dstfuse benchmark: {len(plan.peers)} peers "
        f"({', '.join(label for label, _, _ in plan.peers)}), {len(plan.jobs)} jobs, "
        f"{plan.size / MiB:.0f} MiB files, {plan.ramp} s ramp + {plan.runtime} s per job"
    )
    waiting = f" (after waiting up to {duration(args.wait_idle)} for an idle machine)"
    print(
        f"planned time about {duration(estimate)}; hard limit {duration(limit)}"
        + (waiting if args.wait_idle else ""),
        flush=True,
    )
    before_run = wait_for_idle(args.wait_idle)
    print(
        f"machine before the run: {before_run['busy']:.2f} of {os.cpu_count()} cores busy "
        f"with other work",
        flush=True,
    )

    signal.signal(signal.SIGTERM, _on_sigterm)
    args.dir.mkdir(parents=True, exist_ok=True)
    # realpath now, before anything is mounted below it: resolving later
    # would stat the mounts.
    workdir = Path(os.path.realpath(tempfile.mkdtemp(prefix="dstfuse-bench-", dir=args.dir)))
    logdir = workdir / "logs"
    logdir.mkdir()
    teardown = Teardown()
    teardown.add(f"remove {workdir}", lambda: remove_workdir(workdir))
    if args.keep_logs:
        teardown.add("keep logs", lambda: _keep_logs(logdir, args.keep_logs))
    tools = Tools(
        args.python, child_env(), workdir, logdir, Deadline(limit), teardown, args.nbd_connections
    )
    started = time.monotonic()
    results = Results()
    failures: list[str] = []
    peers: list[Peer] = []
    profiles: dict[str, Any] = {}
    try:
        peers = start_peers(plan, tools, failures)
        if len(peers) >= 2:
            measure(plan, peers, tools, results, failures)
            if py_spy and args.profile:
                target = next((p for p in peers if p.label == args.profile_peer), None)
                if target is None:
                    failures.append(f"--profile-peer {args.profile_peer}: no such peer running")
                else:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profiles = run_profiles(plan, target, tools, py_spy, args.profile, failures)
    except KeyboardInterrupt:
        failures.append("interrupted")
    except Interrupted:
        failures.append("terminated (SIGTERM)")
    except BenchmarkError as exc:
        failures.append(str(exc))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("tearing down")
        clean = teardown.run_all()
        if not clean:
            failures.append("tear-down incomplete: see the messages above")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    elapsed = time.monotonic() - started
    report(plan, peers, results, failures, profiles, elapsed, before_run)
    if args.json:
        write_json(args.json, plan, peers, results, failures, profiles, before_run, elapsed)
    if chart is not None and results.all():
        try:
            write_chart(chart, plan, results, _chart_subtitle(plan, os.cpu_count()))
            log(f"chart: {chart}")
        except (ChartUnavailable, OSError) as exc:
            log(f"no chart: {exc}")
    return 1 if failures else 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted()


def _keep_logs(logdir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in logdir.iterdir():
        shutil.copy2(item, target / item.name)
    log(f"logs copied to {target}")


if __name__ == "__main__":
    sys.exit(main())

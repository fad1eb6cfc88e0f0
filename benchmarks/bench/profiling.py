"""Profiling with py-spy (`--profile DIR`): every job once more on one
dstfuse peer with py-spy recording the mount daemon and every export node,
the raw stacks kept, and a summary per process (own and inclusive shares,
by layer, how busy the trio thread was).

Invariants: profiled figures are never mixed with the measured ones (their
fio reports are tagged `-profiled`), and every py-spy is registered with
the tear-down and bounded by the run's hard limit.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import MiB
from .jobs import Job, run_fio
from .peers import Peer, Tools
from .processes import BenchmarkError, DeadlineExceeded, log

if TYPE_CHECKING:
    from .plan import Plan


def find_py_spy(python: str) -> str | None:
    """py-spy beside `python` (the venv), else on $PATH, else None."""
    beside = Path(python).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def summarize_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw
    (collapsed stack) output: lines of `frame;frame;... count`."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text(errors="replace").splitlines()
    except OSError:
        return {
            "samples": 0,
            "main": 0,
            "worker": 0,
            "self": [],
            "inclusive": [],
            "dstfuse": [],
            "layers": [],
        }
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        # Worker threads start in threading's bootstrap; the rest is the
        # main thread, which runs the trio loop.
        threads["worker" if frames[0].startswith("Thread._bootstrap") else "main"] += count
        total += count
        own[frames[-1]] += count
        layers[_layer(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * n / total) for name, n in counter.most_common(top)] if total else []

    # Inclusive shares of the project's own functions (the outer frames
    # every sample has, like main and trio.run, say nothing).
    ours = Counter(
        {
            name: n
            for name, n in inclusive.items()
            if "(dstfuse/" in name and n < 0.8 * total and not name.endswith(_OUTER_FRAMES)
        }
    )
    return {
        "samples": total,
        "main": threads["main"],
        "worker": threads["worker"],
        "self": share(own),
        "inclusive": share(inclusive),
        "dstfuse": share(ours),
        "layers": share(layers),
    }


def _layer(frame: str) -> str:
    """Which layer a (shortened) frame belongs to, for the by-layer split of
    the own samples."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if name.startswith("EpollIOManager.") and ("get_events" in name or "_epoll_wait" in name):
        return "epoll (incl. waiting)"
    if where in ("trio/_socket.py", "trio/_highlevel_socket.py"):
        return "socket calls"
    if (
        where.startswith(("trio/_core/_thread_cache", "trio/_threads", "trio/_core/_entry_queue"))
        or "WakeupSocketpair" in name
    ):
        return "thread handoff"
    if where.startswith("trio/"):
        return "trio scheduler"
    if "pyfuse3" in where:
        return "pyfuse3 (/dev/fuse)"
    if where.startswith("dstfuse/protocol/"):
        return "dstfuse protocol"
    if where.startswith("dstfuse/"):
        return "dstfuse other"
    return "stdlib and other"


#: Frames that only start the program (`main`, a command's `run`): every
#: complete stack has them, so their inclusive share says nothing.
_OUTER_FRAMES = (
    "(dstfuse/__main__.py)",
    "(dstfuse/cli.py)",
    "(dstfuse/daemon.py)",
    "(dstfuse/commands/export.py)",
    "(dstfuse/commands/mount.py)",
)


def _short_frame(frame: str) -> str:
    """`func (/long/path/pkg/mod.py:123)` -> `func (pkg/mod.py)`: lines
    differ per call site, and aggregation wants one row per function."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if not match:
        return frame.strip()
    name, path = match.groups()
    parts = Path(path).parts
    for anchor in ("dstfuse", "trio", "pyfuse3", "cryptography", "xxhash"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{name} ({'/'.join(parts[index:])})"
    return f"{name} ({'/'.join(parts[-2:])})"


def profile_job(
    job: Job,
    peer: Peer,
    *,
    size: int,
    runtime: float,
    ramp: float,
    tools: Tools,
    py_spy: str,
    outdir: Path,
) -> dict[str, Any]:
    """Run `job` once more on `peer` with py-spy recording every Python role
    (client daemon, export nodes); return the result and the summaries."""
    recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    rate = 100
    duration = int(ramp + runtime)
    for role, pid in peer.roles.items():
        raw = outdir / f"{peer.label}-{job.name}-{role}.txt"
        argv = [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(raw),
        ]
        log_file = open(tools.logdir / f"py-spy-{peer.label}-{job.name}-{role}.log", "wb")
        with log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        tools.teardown.add(f"stop py-spy {role}", functools.partial(_stop_popen, proc))
        recorders[role] = (proc, raw)
    try:
        result = run_fio(
            job, peer, size=size, runtime=runtime, ramp=ramp, tools=tools, tag="-profiled"
        )
    finally:
        for proc, _ in recorders.values():
            try:
                proc.wait(tools.deadline.timeout(30))
            except subprocess.TimeoutExpired:
                _stop_popen(proc)
    summaries = {}
    for role, (_, raw) in recorders.items():
        summary = summarize_profile(raw)
        # Share of the run the main thread (the trio loop) was seen running:
        # near 100% means the event loop is the bottleneck.
        summary["main_active"] = summary["main"] / (rate * duration) if duration else 0.0
        summaries[role] = summary
    return {"result": result, "profiles": summaries}


def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_profiles(
    plan: Plan, peer: Peer, tools: Tools, py_spy: str, outdir: Path, failures: list[str]
) -> dict[str, Any]:
    """Every job of `peer` once more under py-spy; job name -> outcome."""
    assert peer.loop is not None
    size = peer.loop.size // MiB * MiB
    profiles: dict[str, Any] = {}
    for job in plan.jobs_for(peer.label):
        log(f"{peer.label}: {job.name} under py-spy")
        try:
            outcome = profile_job(
                job,
                peer,
                size=size,
                runtime=plan.runtime,
                ramp=plan.ramp,
                tools=tools,
                py_spy=py_spy,
                outdir=outdir,
            )
        except DeadlineExceeded:
            raise
        except BenchmarkError as exc:
            failures.append(f"profile {job.name}: {exc}")
            continue
        profiles[job.name] = outcome
    return profiles

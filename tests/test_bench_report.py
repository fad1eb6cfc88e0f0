"""The benchmark's report and chart from a small synthetic results file (the
`--json` layout), without measuring anything: the ratios the table quotes
(median of the per-round ratios, their range, quiet rounds preferred),
`--replay` through the real command line, and the PNG chart (skipped when
matplotlib, the optional `bench` extra, is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench.chart import chart_rows, write_chart
from benchmarks.bench.jobs import JOBS, job_ratio
from benchmarks.bench.plan import Plan
from benchmarks.bench.report import comparison_table, load_json, rss_lines

from .mounts import REPO

RUN_PY = REPO / "benchmarks" / "run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Per round: (dstfuse IOPS, nbdfuse IOPS, other load during dstfuse's run).
ROUNDS = {1: (400.0, 1000.0, 0.0), 2: (600.0, 1000.0, 0.0), 3: (500.0, 1000.0, 0.0)}
#: seq-read rounds; round 2 was disturbed by other load, so it is not quoted.
SEQ_READ = {1: (80.0, 100.0, 0.0), 2: (10.0, 100.0, 1.5), 3: (90.0, 100.0, 0.0)}


def _result(peer: str, job: str, round_number: int, value: float, other: float) -> dict:
    return {
        "peer": peer,
        "job": job,
        "bw_bytes": value * (1 << 20),
        "iops": value,
        "lat_mean_ns": 250_000.0,
        "lat_p99_ns": 2_500_000.0,
        "io_bytes": 1 << 30,
        "seconds": 3.0,
        "cpu_cores": {"client": 0.5, "server": 0.25},
        "peak_rss": {"client": 50 << 20, "server": 20 << 20},
        "fio_cpu": 0.1,
        "round": round_number,
        "nodes": {},
        "wall": 4.0,
        "load": {"busy": 1.0, "ours": 0.9, "kernel": 0.05, "other": other},
    }


def _saved_run(path: Path) -> Path:
    """A --json file of a 3-round run of two jobs on nbdfuse and dstfuse."""
    results = [_result("nbdfuse", "fill", 0, 500.0, 0.0), _result("dstfuse", "fill", 0, 250.0, 0.0)]
    for job, rounds in (("rand-read-qd1", ROUNDS), ("seq-read", SEQ_READ)):
        for number, (mine, theirs, other) in rounds.items():
            results.append(_result("dstfuse", job, number, mine, other))
            results.append(_result("nbdfuse", job, number, theirs, 0.0))
    peers = {
        label: {"kind": label, "roles": {"client": pid, "server": pid + 1}, "notes": []}
        for label, pid in (("nbdfuse", 100), ("dstfuse", 200))
    }
    data = {
        "elapsed": 95.0,
        "machine_load_before": {"busy": 0.1},
        "size": 256 << 20,
        "runtime": 3,
        "ramp": 1,
        "cpus": 2,
        "peers": peers,
        "repeat": 3,
        "results": results,
        "profiles": {},
        "failures": [],
    }
    path.write_text(json.dumps(data))
    return path


def _job(name: str):
    return next(job for job in JOBS if job.name == name)


def _replay(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_PY), "--replay", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_the_ratio_is_the_median_of_the_rounds_with_their_range(tmp_path):
    results = load_json(_saved_run(tmp_path / "run.json"))["results"]
    row = job_ratio(results, "dstfuse", "nbdfuse", _job("rand-read-qd1"))
    assert row is not None and row.quiet
    assert row.ratios == [0.4, 0.5, 0.6]
    assert row.median == pytest.approx(0.5)
    assert row.subject.iops == 500.0 and row.baseline.iops == 1000.0


def test_a_disturbed_round_is_left_out_of_the_ratio(tmp_path):
    results = load_json(_saved_run(tmp_path / "run.json"))["results"]
    row = job_ratio(results, "dstfuse", "nbdfuse", _job("seq-read"))
    assert row is not None
    assert [a.round for a, _ in row.pairs] == [1, 3]
    # The even count's median is the mean of the middle two: (0.8 + 0.9) / 2.
    assert row.median == pytest.approx(0.85)
    assert job_ratio(results, "dstfuse", "nbdfuse", _job("seq-write")) is None


def test_the_table_quotes_the_median_ratio_rounds_and_range(tmp_path):
    results = load_json(_saved_run(tmp_path / "run.json"))["results"]
    jobs = (_job("seq-read"), _job("rand-read-qd1"))
    lines = comparison_table("dstfuse vs nbdfuse", "dstfuse", "nbdfuse", results, jobs)
    rows = {line.split("  ")[1].strip(): line for line in lines[2:]}
    assert "0.85x" in rows["seq read 1 MiB QD4"]
    assert "2/3" in rows["seq read 1 MiB QD4"]
    assert "0.80-0.90x" in rows["seq read 1 MiB QD4"]
    assert "0.50x" in rows["rand read 4 KiB QD1"]
    assert "0.40-0.60x" in rows["rand read 4 KiB QD1"]


def test_the_memory_target_counts_the_rss_peak_less_the_replay_buffers_peak(tmp_path):
    """A QD32 job whose replay buffer peaked at 40 MiB, released by a FLUSH
    just before the RSS peak (100 MiB, 2 MiB kept then): 60 MiB without the
    replay buffer, within the target; 98 MiB less what was kept at the
    moment is reported too."""
    saved = json.loads(_saved_run(tmp_path / "run.json").read_text())
    qd32 = _result("dstfuse", "rand-write-qd32", 1, 500.0, 0.0)
    qd32.update(
        peak_rss={"client": 100 << 20, "server": 20 << 20},
        peak_client_less_kept=98 << 20,
        peak_kept=40 << 20,
    )
    saved["results"].append(qd32)
    (tmp_path / "run.json").write_text(json.dumps(saved))
    run = load_json(tmp_path / "run.json")
    line = next(line for line in rss_lines(run["peers"], run["results"]) if "dstfuse" in line)
    assert "100 MiB during QD32" in line
    assert "98 MiB less what it kept at the same moment" in line
    assert "60 MiB less the replay buffer's peak in the job (40 MiB)" in line
    assert "within the 64 MiB target" in line


def test_replay_prints_the_report_and_the_disturbed_round(tmp_path):
    done = _replay(_saved_run(tmp_path / "run.json"))
    assert done.returncode == 0, done.stderr
    assert "dstfuse vs nbdfuse (ratio = dstfuse / nbdfuse, higher is better)" in done.stdout
    assert "fill pass: nbdfuse 500 MiB/s, dstfuse 250 MiB/s" in done.stdout
    assert "dstfuse seq-read (round 2): disturbed by other load" in done.stdout
    # In the order the run took them (its --jobs), not the default order.
    assert done.stdout.index("rand read 4 KiB QD1") < done.stdout.index("seq read 1 MiB QD4")
    assert not list(tmp_path.glob("*.png")), "replay draws a chart only when asked"


def test_replay_without_matplotlib_says_so_in_one_line(tmp_path):
    # A matplotlib that cannot be imported stands in for one not installed.
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {"PYTHONPATH": f"{blocker}:{REPO}", "PATH": "/usr/bin:/bin"}
    done = _replay(_saved_run(tmp_path / "run.json"), "--chart", tmp_path / "c.png", env=env)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "run.py: the chart needs matplotlib (pip install matplotlib, or the 'bench' extra)"
    ]
    assert not (tmp_path / "c.png").exists()


def test_the_chart_has_one_bar_series_per_comparison(tmp_path):
    pytest.importorskip("matplotlib")
    jobs = (_job("seq-read"), _job("rand-read-qd1"))
    comparisons = [
        ("dstfuse vs nbdfuse", "dstfuse", "nbdfuse", jobs),
        ("mirror vs one node", "dstfuse-mirror", "dstfuse", jobs),  # not measured
    ]
    peers = [("nbdfuse", "nbdfuse", {}), ("dstfuse", "dstfuse", {})]
    plan = Plan(256 << 20, 3, 1, 60, 3, jobs, peers, comparisons)
    results = load_json(_saved_run(tmp_path / "run.json"))["results"]
    rows = chart_rows(plan, results)
    assert [label for label, _ in rows] == ["dstfuse / nbdfuse"]
    assert [ratio.median for ratio in rows[0][1]] == pytest.approx([0.85, 0.5])
    chart = tmp_path / "chart.png"
    write_chart(chart, plan, results, "synthetic")
    assert chart.read_bytes().startswith(PNG_MAGIC)


def test_replay_draws_the_chart_of_a_saved_run(tmp_path):
    pytest.importorskip("matplotlib")
    chart = tmp_path / "saved.png"
    done = _replay(_saved_run(tmp_path / "run.json"), "--chart", chart)
    assert done.returncode == 0, done.stderr
    assert chart.read_bytes().startswith(PNG_MAGIC)

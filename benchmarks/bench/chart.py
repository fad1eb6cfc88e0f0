"""The chart (`--chart FILE.png`): every job's ratio per comparison of the
run (dstfuse / nbdfuse, and mirror and aes-256-gcm when measured) as a
bar at the median of the per-round ratios, with an error bar over their
range (min..max over the rounds used), a line at 1.0x and the issue's
targets against nbdfuse (0.8x every job, 0.9x sequential and QD32).

The figures are the report's (`jobs.job_ratio`), so chart and table never
disagree. matplotlib is an optional extra (`pip install '.[bench]'`),
imported only when a chart is drawn; without it `ChartUnavailable` says so
in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .jobs import JobRatio, Results, job_ratio

if TYPE_CHECKING:
    from .plan import Plan

#: The issue's targets for the ratio against nbdfuse: (ratio, label, style).
TARGETS = (
    (0.9, "target vs nbdfuse 0.9x: seq and QD32 jobs", ":"),
    (0.8, "target vs nbdfuse 0.8x: every job", "--"),
)


class ChartUnavailable(Exception):
    """No plotting library: the chart cannot be drawn (one line)."""


def chart_rows(plan: Plan, results: Results) -> list[tuple[str, list[JobRatio | None]]]:
    """Per comparison of the plan, its label ("subject / baseline") and one
    JobRatio per job of the plan (None where the pair has no common round
    of it); comparisons without any ratio are left out."""
    rows = []
    for _, subject, baseline, jobs in plan.comparisons:
        ratios = [
            job_ratio(results, subject, baseline, job) if job in jobs else None for job in plan.jobs
        ]
        if any(ratio is not None for ratio in ratios):
            rows.append((f"{subject} / {baseline}", ratios))
    return rows


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ChartUnavailable(
            "the chart needs matplotlib (pip install matplotlib, or the 'bench' extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def require_plotting() -> None:
    """Raise ChartUnavailable now (before a long run) if no chart can be drawn."""
    _pyplot()


def write_chart(path: Path, plan: Plan, results: Results, subtitle: str = "") -> None:
    """Draw the grouped bar chart of `chart_rows` into the PNG `path`."""
    rows = chart_rows(plan, results)
    if not rows:
        raise ChartUnavailable("no job has a ratio to chart")
    pyplot = _pyplot()
    jobs = plan.jobs
    width = 0.8 / len(rows)
    figure, axes = pyplot.subplots(figsize=(max(7.0, 1.6 * len(jobs) + 2), 5.0), dpi=120)
    tallest = 1.0
    for index, (label, ratios) in enumerate(rows):
        xs, medians, below, above = [], [], [], []
        for position, ratio in enumerate(ratios):
            if ratio is None:
                continue
            xs.append(position - 0.4 + width * (index + 0.5))
            medians.append(ratio.median)
            below.append(ratio.median - ratio.ratios[0])
            above.append(ratio.ratios[-1] - ratio.median)
            tallest = max(tallest, ratio.ratios[-1])
        bars = axes.bar(xs, medians, width * 0.9, label=label, zorder=2)
        axes.errorbar(
            xs, medians, yerr=[below, above], fmt="none", ecolor="black", capsize=3, zorder=3
        )
        for x, median, up in zip(xs, medians, above, strict=True):
            # Above the error bar's cap, so that the two never overlap.
            axes.annotate(
                f"{median:.2f}",
                (x, median + up),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color=bars.patches[0].get_facecolor(),
            )
    axes.axhline(1.0, color="black", linewidth=1.0, zorder=1)
    for value, text, style in TARGETS:
        axes.axhline(value, color="tab:red", linestyle=style, linewidth=1.0, zorder=1, label=text)
    axes.set_xticks(range(len(jobs)), [job.title for job in jobs], rotation=20, ha="right")
    axes.set_ylabel("ratio (higher is better; 1.0 = same speed)")
    axes.set_ylim(0, tallest * 1.12 + 0.05)
    axes.grid(axis="y", alpha=0.3, zorder=0)
    title = "dstfuse benchmark: median ratio per job, error bars = min..max over the rounds"
    axes.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)

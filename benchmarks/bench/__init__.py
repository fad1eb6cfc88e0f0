"""The dstfuse benchmark's parts; `benchmarks/run.py` is its command line.

One module per concern: `system` (mount table, pids, loop devices, ports:
shared with tests/mounts.py), `processes` (commands, children, probes,
mounts and the tear-down), `sampling` (CPU time, RSS, machine load),
`peers` (the stacks under test), `jobs` (fio jobs, results, the measured
rounds, the ratios), `plan` (what a run does, from its arguments),
`profiling` (py-spy), `report` (the text report and --json),
`chart` (the PNG of the ratios). Importing this package imports none of
them, so tests/mounts.py can use `system` alone.

It must never be imported by dstfuse itself, and never edits the tree.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
REPO = HERE.parent
JOB_DIR = HERE / "jobs"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

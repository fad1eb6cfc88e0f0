"""The command line as a user types it: `--version`, and global options
before or after the subcommand."""

from __future__ import annotations

import dstfuse
from dstfuse import cli

from .mounts import run_dstfuse


def test_version_prints_the_package_version_and_exits_0():
    done = run_dstfuse("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dstfuse {dstfuse.__version__}"


def test_verbose_counts_before_and_after_the_subcommand_add_up(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "configure_logging", lambda base, verbosity: seen.append(verbosity))
    config = tmp_path / "missing.yaml"
    for argv, expected in (
        (["check", str(config)], 0),
        (["-v", "check", str(config)], 1),
        (["check", "-v", str(config)], 1),
        (["check", str(config), "-vv"], 2),
        (["-v", "check", "--verbose", str(config)], 2),
    ):
        assert cli.main(argv) == 1  # the config does not exist: one user-error line
        assert seen.pop() == expected, argv


def test_check_dash_v_after_the_command_logs_at_info(tmp_path):
    config = tmp_path / "storage.yaml"
    image = tmp_path / "a.img"
    image.write_bytes(bytes(1 << 20))
    config.write_text(
        f"storages:\n  vol0:\n    algorithm: linear\n    nodes:\n      - local: {image}\n"
    )
    quiet = run_dstfuse("check", config)
    verbose = run_dstfuse("check", "-v", config)
    assert quiet.returncode == verbose.returncode == 0, verbose.stderr
    assert " INFO " not in quiet.stderr
    assert any(" INFO " in line for line in verbose.stderr.splitlines()), verbose.stderr

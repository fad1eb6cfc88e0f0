"""`dstfuse keygen [-o FILE]`: a new key on stdout, or in a new 0600 file."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import stat
import subprocess
import sys

import pytest

from dstfuse.cli import COMMANDS
from dstfuse.commands import keygen
from dstfuse.errors import UserError
from dstfuse.keys import KEY_SIZE, load_key


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    keygen.add_arguments(parser)
    return parser.parse_args(argv)


def test_keygen_prints_a_fresh_base64_key_line(capsys):
    assert keygen.run(parse([])) == 0
    first = capsys.readouterr().out
    assert keygen.run(parse([])) == 0
    second = capsys.readouterr().out
    for text in (first, second):
        assert text.endswith("\n") and text.count("\n") == 1
        assert len(base64.b64decode(text.strip(), validate=True)) == KEY_SIZE
    assert first != second


def test_printed_key_saved_by_the_user_loads(tmp_path, capsys):
    keygen.run(parse([]))
    text = capsys.readouterr().out
    path = tmp_path / "cluster.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    assert load_key(path) == base64.b64decode(text.strip())


def test_keygen_output_file_is_mode_0600_and_nothing_is_printed(tmp_path, capsys):
    path = tmp_path / "cluster.key"
    old_umask = os.umask(0)
    try:
        assert keygen.run(parse(["-o", str(path)])) == 0
    finally:
        os.umask(old_umask)
    assert capsys.readouterr().out == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(load_key(path)) == KEY_SIZE


def test_keygen_refuses_to_overwrite_an_existing_file(tmp_path):
    path = tmp_path / "cluster.key"
    keygen.run(parse(["--output", str(path)]))
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        keygen.run(parse(["-o", str(path)]))
    assert path.read_bytes() == before


def test_keygen_into_a_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot create key file"):
        keygen.run(parse(["-o", str(tmp_path / "no" / "such" / "dir.key")]))


# The command line imports every command module; until all are written it
# cannot start.
MISSING_COMMANDS = [
    name for name in COMMANDS if importlib.util.find_spec(f"dstfuse.commands.{name}") is None
]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING_COMMANDS),
    reason=f"dstfuse command modules not written yet: {', '.join(MISSING_COMMANDS)}",
)
def test_keygen_command_line_exit_codes(tmp_path):
    path = tmp_path / "k"
    command = [sys.executable, "-m", "dstfuse", "keygen", "-o", str(path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"dstfuse keygen: key file {path} already exists; refusing to overwrite it"
    ]
    printed = subprocess.run(
        [sys.executable, "-m", "dstfuse", "keygen"], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0
    assert len(base64.b64decode(printed.stdout.strip(), validate=True)) == KEY_SIZE

"""Pre-shared key files (dstfuse.keys): mode 0600, strict loading, no leaks."""

from __future__ import annotations

import base64
import logging
import os
import stat

import pytest

from dstfuse.errors import UserError
from dstfuse.keys import KEY_SIZE, generate_key, key_text, load_key, write_key_file


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generate_key_is_32_fresh_random_bytes():
    keys = {generate_key() for _ in range(16)}
    assert len(keys) == 16
    assert all(len(key) == KEY_SIZE == 32 for key in keys)


def test_keygen_file_is_created_with_mode_0600_even_with_a_lax_umask(tmp_path):
    path = tmp_path / "cluster.key"
    old_umask = os.umask(0)
    try:
        assert write_key_file(path) is None
    finally:
        os.umask(old_umask)
    assert mode_of(path) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(base64.b64decode(text.strip(), validate=True)) == 32


def test_key_round_trips_through_the_file(tmp_path):
    path = tmp_path / "cluster.key"
    write_key_file(str(path))
    key = load_key(path)
    assert len(key) == 32
    assert key_text(key) == path.read_text()
    assert load_key(str(path)) == key


def test_keygen_without_a_path_returns_the_text_for_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = write_key_file(None)
    assert text is not None and len(base64.b64decode(text.strip(), validate=True)) == 32
    assert os.listdir(tmp_path) == []


def test_keygen_refuses_to_overwrite_an_existing_file(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_text("precious\n")
    with pytest.raises(UserError) as info:
        write_key_file(path)
    assert str(info.value) == f"key file {path} already exists; refusing to overwrite it"
    assert path.read_text() == "precious\n"


def test_keygen_refuses_a_planted_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "cluster.key"
    link.symlink_to(target)
    with pytest.raises(UserError, match="already exists"):
        write_key_file(link)
    assert not target.exists()


def test_keygen_into_a_missing_directory_names_the_file(tmp_path):
    path = tmp_path / "no" / "cluster.key"
    with pytest.raises(UserError) as info:
        write_key_file(path)
    assert str(info.value) == f"cannot create key file {path}: No such file or directory"


def test_raw_32_byte_key_file_is_accepted(tmp_path):
    path = tmp_path / "raw.key"
    raw = bytes(range(32))
    path.write_bytes(raw)
    path.chmod(0o600)
    assert load_key(path) == raw


def test_base64_without_newline_and_with_spaces_around_is_accepted(tmp_path):
    key = generate_key()
    path = tmp_path / "k"
    path.write_text("  " + base64.b64encode(key).decode() + " \n\n")
    path.chmod(0o400)
    assert load_key(path) == key


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        (0o644, "readable by group/other (mode 0644)"),
        (0o640, "readable by group/other (mode 0640)"),
        (0o604, "readable by group/other (mode 0604)"),
        (0o666, "readable by group/other (mode 0666)"),
        (0o620, "writable by group/other (mode 0620)"),
        (0o602, "writable by group/other (mode 0602)"),
    ],
)
def test_key_file_open_to_group_or_other_is_refused(tmp_path, mode, problem):
    path = tmp_path / "cluster.key"
    write_key_file(path)
    path.chmod(mode)
    with pytest.raises(UserError) as info:
        load_key(path)
    assert str(info.value) == f"key file {path} is {problem}; chmod 600 it"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        base64.b64encode(bytes(31)) + b"\n",
        base64.b64encode(bytes(33)) + b"\n",
        b"not base64 at all!\n",
        bytes(31),
        bytes(33),
        bytes(10_000),
    ],
    ids=["empty", "newline", "31-bytes", "33-bytes", "garbage", "raw-31", "raw-33", "huge"],
)
def test_key_file_without_a_32_byte_key_is_refused(tmp_path, content):
    path = tmp_path / "cluster.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(UserError) as info:
        load_key(path)
    assert str(info.value) == (
        f"key file {path} does not hold a 32-byte key "
        "(expected base64 text as written by 'dstfuse keygen')"
    )


def test_missing_key_file_is_named(tmp_path):
    path = tmp_path / "missing.key"
    with pytest.raises(UserError) as info:
        load_key(path)
    assert str(info.value) == f"key file {path} not found (create one with 'dstfuse keygen')"


def test_directory_is_not_a_key_file(tmp_path):
    path = tmp_path / "dir"
    path.mkdir(mode=0o700)
    with pytest.raises(UserError) as info:
        load_key(path)
    assert str(info.value) == f"key file {path} is not a regular file"


def test_key_material_never_reaches_messages_or_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "cluster.key"
    write_key_file(path)
    text = path.read_text().strip()
    key = load_key(path)
    path.chmod(0o644)
    messages = []
    with pytest.raises(UserError) as info:
        load_key(path)
    messages.append(str(info.value))
    # A 31-byte key with the same prefix: the error must not echo it either.
    bad = tmp_path / "bad.key"
    bad.write_text(base64.b64encode(key[:31]).decode())
    bad.chmod(0o600)
    with pytest.raises(UserError) as info:
        load_key(bad)
    messages.append(str(info.value))
    for message in [*messages, caplog.text]:
        assert text not in message
        assert text[:16] not in message
        assert key.hex()[:16] not in message

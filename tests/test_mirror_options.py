"""Mirror settings from config options and `-o` mount options, and the
`dstfuse verify` command's user errors (no mount, no storage, not a mirror)."""

from __future__ import annotations

import argparse

import pytest

from dstfuse.commands import verify as verify_command
from dstfuse.errors import UserError
from dstfuse.mirror.options import MirrorOptions

MiB = 1 << 20


def test_config_options_and_mount_options_merge():
    options = MirrorOptions.parse(
        "vol0",
        {
            "region_size": 8 * MiB,
            "resync_rate": 50 * MiB,
            "resync_size": MiB,
            "client_name": "host:1",
            "client_id": b"x" * 16,
            "force": False,
            "mount_options": {
                "force": True, "assume_clean": True, "read_check": "off",
                "resync_rate": "10M/s", "heartbeat_interval": "500ms", "allow_other": True,
                "bitmap_hot": "256M",
            },
        },
    )
    assert options.region_size == 8 * MiB and options.resync_size == MiB
    assert options.resync_rate == 10 * MiB  # -o wins over the config
    assert options.force and options.assume_clean and not options.read_check
    assert options.heartbeat_interval == 0.5 and options.holder_timeout == 2.5
    assert options.client_name == "host:1" and options.client_id == b"x" * 16
    assert options.bitmap_hot == 256 * MiB
    assert MirrorOptions.parse("vol0", {}).bitmap_hot == 1 << 30


def test_primary_may_name_the_storage():
    assert MirrorOptions.parse("vol0", {"mount_options": {"primary": "1"}}).primary == 1
    assert MirrorOptions.parse("vol0", {"mount_options": {"primary": "vol0:2"}}).primary == 2
    assert MirrorOptions.parse("vol0", {"mount_options": {"primary": "vol1:2"}}).primary is None
    with pytest.raises(UserError, match="primary"):
        MirrorOptions.parse("vol0", {"mount_options": {"primary": "left"}})
    with pytest.raises(UserError, match="primary"):
        MirrorOptions.parse("vol0", {"mount_options": {"primary": True}})


@pytest.mark.parametrize(
    "key, value",
    [("read_check", "maybe"), ("resync_rate", "fast"), ("heartbeat_interval", "0"),
     ("check_cache_pages", "-3"), ("resync_size", "0"), ("bitmap_hot", "lots")],
)
def test_bad_option_values_are_one_line_user_errors(key, value):
    with pytest.raises(UserError, match=f"storage vol0: option {key}="):
        MirrorOptions.parse("vol0", {"mount_options": {key: value}})


def run_verify(mountpoint, storage="vol0", repair=False):
    args = argparse.Namespace(mountpoint=str(mountpoint), storage=storage, repair=repair,
                              timeout=5.0)
    return verify_command.run(args)


def test_verify_command_refuses_a_path_that_is_not_a_mount(tmp_path):
    with pytest.raises(UserError, match="is not a dstfuse mount"):
        run_verify(tmp_path)


def test_verify_command_refuses_an_unknown_storage_and_a_linear_one(tmp_path):
    storage = tmp_path / ".dst" / "big"
    storage.mkdir(parents=True)
    (storage / "alg").write_text("linear\n")
    with pytest.raises(UserError, match="has no storage 'vol0'"):
        run_verify(tmp_path)
    with pytest.raises(UserError, match="storage big is not a mirror \\(algorithm linear\\)"):
        run_verify(tmp_path, "big")


def test_verify_command_reports_ranges_and_exits_1(tmp_path, capsys):
    """Against a stand-in control file that answers like a finished pass."""
    storage = tmp_path / ".dst" / "vol0"
    storage.mkdir(parents=True)
    control = storage / "verify"
    control.write_text("done: 1 differing ranges\n4096 8192\n")
    # writing "verify" replaces the text as the real file would not; put the
    # result back before the command polls it
    original_start = verify_command.start

    def start(path, name, repair):
        original_start(path, name, repair)
        assert path.read_text() == ("repair\n" if repair else "verify\n")
        path.write_text("done: 1 differing ranges, 1 repaired\n4096 8192 repaired\n"
                        if repair else "done: 1 differing ranges\n4096 8192\n")

    verify_command.start = start
    try:
        assert run_verify(tmp_path) == 1
        assert capsys.readouterr().out.splitlines()[1:] == ["4096 8192"]
        assert run_verify(tmp_path, repair=True) == 1
        assert capsys.readouterr().out.splitlines()[1:] == ["4096 8192 repaired"]
        control.write_text("done: 0 differing ranges\n")
        verify_command.start = lambda path, name, repair: None
        assert run_verify(tmp_path) == 0
    finally:
        verify_command.start = original_start

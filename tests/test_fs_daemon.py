"""Mount daemon helpers without a mount: -o parsing, mount point checks,
runtime file names, readiness reporting, and the systemd notify protocol
(path and abstract sockets)."""

from __future__ import annotations

import os
import socket

import pytest

from dstfuse import sdnotify
from dstfuse.config import split_mount_options
from dstfuse.daemon import Readiness, check_mountpoint, escape_path
from dstfuse.errors import UserError

from .mounts import notify_socket


def test_mount_options_are_keys_or_key_values_across_repeated_flags():
    assert split_mount_options(["force,allow_other", "resync=off", " debug , "]) == {
        "force": True,
        "allow_other": True,
        "resync": "off",
        "debug": True,
    }
    assert split_mount_options([]) == {}
    with pytest.raises(UserError, match="bad mount option '=x'"):
        split_mount_options(["force,=x"])


def test_escape_path_spells_a_mount_point_as_one_file_name():
    assert escape_path("/mnt/vol0") == "mnt-vol0"
    assert escape_path("/mnt//a b/") == "mnt-a\\x20b"
    assert escape_path("/srv/x-y") == "srv-x\\x2dy"
    assert escape_path("/.hidden") == "\\x2ehidden"
    assert escape_path("/") == "-"


def test_check_mountpoint_wants_an_empty_directory_that_is_no_mount(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_mountpoint(empty) == empty
    with pytest.raises(UserError, match="does not exist"):
        check_mountpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        check_mountpoint(tmp_path / "file")
    with pytest.raises(UserError, match=r"is not empty \(2 entries\)"):
        check_mountpoint(tmp_path)
    with pytest.raises(UserError, match="is already a mount"):
        check_mountpoint("/proc")


def test_readiness_reports_live_once_over_the_pipe():
    read_end, write_end = os.pipe()
    readiness = Readiness(write_end, notify=False)
    assert not os.get_inheritable(write_end)
    readiness.live("mounted at /mnt: vol0 (1.0 GiB, degraded)", ["storage vol0 is\ndegraded"])
    readiness.failed("too late")  # after live, nothing more is said
    readiness.close()
    assert os.read(read_end, 200) == (
        b"live mounted at /mnt: vol0 (1.0 GiB, degraded)\nwarning storage vol0 is degraded\n"
    )
    assert os.read(read_end, 100) == b""  # closed
    os.close(read_end)


def test_readiness_reports_one_error_line():
    read_end, write_end = os.pipe()
    readiness = Readiness(write_end, notify=False)
    readiness.failed("storage vol0: node R: 10.0.0.5:1025: refused\nby ACL")
    readiness.close()
    assert os.read(read_end, 200) == b"error storage vol0: node R: 10.0.0.5:1025: refused by ACL\n"
    os.close(read_end)


def test_readiness_closing_unreported_gives_eof():
    read_end, write_end = os.pipe()
    Readiness(write_end, notify=False).close()
    assert os.read(read_end, 100) == b""
    os.close(read_end)


def test_notify_sends_to_a_path_socket():
    with notify_socket() as (sock, path):
        sock.settimeout(5)
        assert sdnotify.ready("mounted at /mnt: vol0\nextra", environ={"NOTIFY_SOCKET": path})
        lines = sock.recv(4096).decode().splitlines()
    assert lines == ["READY=1", "STATUS=mounted at /mnt: vol0 extra", f"MAINPID={os.getpid()}"]


def test_notify_sends_to_an_abstract_socket():
    name = f"dstfuse-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.stopping("bye", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_notify_without_a_socket_does_nothing_and_never_raises(tmp_path, caplog):
    assert not sdnotify.notify("READY=1", environ={})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "none")})
    assert "cannot notify systemd" in caplog.text

"""What a user sees on the terminal and in the mount's log when a mount is
degraded, fails, or is used wrongly: real `dstfuse mount` daemons over real
export processes and local files."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dstfuse.control import DaemonInfo
from dstfuse.daemon import runtime_file

from .mounts import (
    exported,
    force_unmount,
    free_tcp_port,
    is_mounted,
    mounted,
    os_error,
    remove_runtime_files,
    require_fuse,
    run_dstfuse,
    stop_pid,
    write_config,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20


def leg_files(tmp_path: Path, *sizes: int) -> list[Path]:
    paths = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"leg{index}.img"
        path.write_bytes(b"")
        os.truncate(path, size)
        paths.append(path)
    return paths


def local_mirror(tmp_path: Path, *sizes: int) -> Path:
    legs = leg_files(tmp_path, *sizes)
    return write_config(
        tmp_path / "storage.yaml",
        {"vol0": {"algorithm": "mirror", "nodes": [{"local": str(leg)} for leg in legs]}},
    )


def test_a_zero_byte_leg_is_refused_as_too_small_not_as_unreachable(tmp_path):
    require_fuse()
    config = local_mirror(tmp_path, 0, 64 * MiB)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        done = run_dstfuse("mount", config, mountpoint)
    finally:
        remove_runtime_files(mountpoint)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "unreachable" not in line, line
    assert "leg 0" in line and "too small for the mirror's metadata" in line, line


def test_a_refused_control_file_write_is_logged_under_its_path_in_dst(tmp_path):
    config = local_mirror(tmp_path, 64 * MiB, 64 * MiB)
    with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
        control = mount.mountpoint / ".dst" / "vol0" / "n-0-0" / "resync_size"

        def write_bad_size() -> None:
            with open(control, "w") as file:
                file.write("a lot\n")

        assert os_error(write_bad_size) == errno.EINVAL
        assert mount.umount().returncode == 0
    log = mount.log.read_text()
    assert "control file .dst/vol0/n-0-0/resync_size: " in log, mount.log_tail()
    assert ".dst/.dst" not in log


def test_a_background_mount_that_fails_logs_why_once_and_says_it_on_the_terminal(tmp_path):
    require_fuse()
    port = free_tcp_port()  # nothing listens there
    config = write_config(
        tmp_path / "storage.yaml",
        {"vol0": {"algorithm": "linear", "nodes": [{"remote": f"127.0.0.1:{port}"}]}},
        timeouts={"connect": "1s"},
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = runtime_file(mountpoint, ".log")
    try:
        done = run_dstfuse("mount", config, mountpoint)
        assert done.returncode == 1
        (line,) = done.stderr.splitlines()
        assert line.startswith("dstfuse mount: storage vol0: node R: 127.0.0.1:"), line
        reason = line.removeprefix("dstfuse mount: ")
        lines = log.read_text().splitlines()
        failed = [text for text in lines if reason in text]
        assert len(failed) == 1, lines
        assert " ERROR dstfuse.daemon: " in failed[0], failed
    finally:
        remove_runtime_files(mountpoint)


def test_a_mirror_mounting_degraded_says_so_on_the_terminal_naming_the_leg_and_error(tmp_path):
    (leg0,) = leg_files(tmp_path, 64 * MiB)
    port = free_tcp_port()  # the second leg's port is wrong: nothing listens there
    with exported(leg0, tmp_path) as export:
        config = write_config(
            tmp_path / "storage.yaml",
            {
                "vol0": {
                    "algorithm": "mirror",
                    "nodes": [{"remote": export.address}, {"remote": f"127.0.0.1:{port}"}],
                }
            },
            timeouts={"connect": "1s"},
        )
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        pid = None
        try:
            # a new mirror with a leg away: refused unless forced (the
            # missing leg may already hold the storage)
            refused = run_dstfuse("mount", "-o", "mount_wait=1s", config, mountpoint)
            assert refused.returncode != 0
            assert "unreachable may hold the storage's data" in refused.stderr, refused.stderr
            done = run_dstfuse("mount", "-o", "force", config, mountpoint)
            assert done.returncode == 0, done.stderr
            pid = DaemonInfo.parse((mountpoint / ".dst" / ".daemon").read_text()).pid
            lines = done.stderr.splitlines()
            mounted_lines = [line for line in lines if f"mounted at {mountpoint}" in line]
            assert len(mounted_lines) == 1 and "vol0 (" in mounted_lines[0], lines
            assert ", degraded)" in mounted_lines[0], lines
            why = [line for line in lines if " WARNING " in line and "degraded" in line]
            assert len(why) == 1, lines
            prefix = f"storage vol0 is degraded: node 1 (R: 127.0.0.1:{port}) offline: "
            assert prefix in why[0], why
            assert why[0].split(prefix, 1)[1].strip(), why  # the connect error
            assert run_dstfuse("umount", mountpoint).returncode == 0
        finally:
            force_unmount(mountpoint)
            if pid is not None:
                stop_pid(pid, None)
            remove_runtime_files(mountpoint)


def wait_disconnected(mountpoint: Path, timeout: float = 10.0) -> None:
    """Until `mountpoint` answers ENOTCONN: its FUSE daemon is gone."""
    deadline = time.monotonic() + timeout
    while os_error(os.stat, mountpoint) != errno.ENOTCONN:
        assert time.monotonic() < deadline, f"{mountpoint} still answers"
        time.sleep(0.05)


def test_umount_of_a_mount_whose_daemon_died_unmounts_it_and_says_so(tmp_path):
    config = local_mirror(tmp_path, 64 * MiB, 64 * MiB)
    with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
        os.kill(mount.pid, signal.SIGKILL)
        mount.wait()
        wait_disconnected(mount.mountpoint)
        done = run_dstfuse("umount", mount.mountpoint, timeout=60)
        assert done.returncode == 1  # the final flush never ran
        (line,) = done.stderr.splitlines()
        assert line.startswith(
            f"dstfuse umount: the daemon of {mount.mountpoint} was gone; unmounted it with "
            f"'fusermount3 -u {mount.mountpoint}'"
        ), line
        assert not is_mounted(mount.mountpoint)


#: A FUSE filesystem that is not dstfuse, to be killed.
OTHER_FS = textwrap.dedent(
    """
    import sys, pyfuse3, trio
    pyfuse3.init(pyfuse3.Operations(), sys.argv[1], set())
    print("mounted", flush=True)
    trio.run(pyfuse3.main)
    """
)


def test_umount_leaves_a_dead_fuse_mount_that_is_not_dstfuse_alone(tmp_path):
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", OTHER_FS, str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "mounted"
        process.kill()
        process.wait(10)
        wait_disconnected(mountpoint)
        done = run_dstfuse("umount", mountpoint, timeout=60)
        assert done.returncode == 1
        (line,) = done.stderr.splitlines()
        assert "not a dstfuse mount" in line, line
        assert is_mounted(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
        force_unmount(mountpoint)
    assert not is_mounted(mountpoint)

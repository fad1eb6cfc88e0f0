"""`dstfuse mount` failing cleanly (one line, exit 1, nothing left behind),
and `--foreground` readiness under a fake systemd $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from dstfuse.daemon import runtime_file

from .mounts import (
    DSTFUSE,
    dstfuse_env,
    free_tcp_port,
    is_mounted,
    mounted,
    notify_socket,
    require_fuse,
    run_dstfuse,
    stop_pid,
    write_config,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture
def local_config(tmp_path):
    image = tmp_path / "a.img"
    image.write_bytes(b"")
    os.truncate(image, 4 * MiB)
    return write_config(
        tmp_path / "storage.yaml",
        {"vol0": {"algorithm": "linear", "nodes": [{"local": str(image)}]}},
    )


def no_daemon_for(mountpoint) -> bool:
    """No process has `mountpoint` on its command line (the daemon is gone)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                arguments = file.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as file:
                zombie = file.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and os.fsencode(str(mountpoint)) in arguments:
            return False
    return True


def test_bad_config_is_one_line_naming_file_line_and_key(tmp_path):
    require_fuse()
    config = tmp_path / "storage.yaml"
    config.write_text("storages:\n  vol0:\n    algorithm: linear\n    nodes:\n      - lokal: x\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = run_dstfuse("mount", config, mountpoint)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"dstfuse mount: {config}:5: storages.vol0.nodes[0].lokal: ")
    assert not is_mounted(mountpoint)


def test_unreachable_node_fails_fast_naming_the_node(tmp_path):
    require_fuse()
    port = free_tcp_port()  # nothing listens there
    config = write_config(
        tmp_path / "storage.yaml",
        {"vol0": {"algorithm": "linear", "nodes": [{"remote": f"127.0.0.1:{port}"}]}},
        timeouts={"connect": "2s", "resend": "1s", "max_resends": 30},
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    started = time.monotonic()
    done = run_dstfuse("mount", config, mountpoint, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"dstfuse mount: storage vol0: node R: 127.0.0.1:{port}")
    # within the connect timeout plus process start-up, not the resend budget
    assert elapsed < 2 + 8
    assert not is_mounted(mountpoint)
    assert no_daemon_for(mountpoint)
    assert os.listdir(mountpoint) == []
    log = runtime_file(mountpoint, ".log")
    if log is not None:  # the daemon's log says the same, then is removed
        assert f"node R: 127.0.0.1:{port}" in log.read_text()
        log.unlink()


def test_non_empty_mountpoint_is_refused(local_config, tmp_path):
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    (mountpoint / "stray").write_text("x")
    for foreground in ([], ["--foreground"]):
        done = run_dstfuse("mount", *foreground, local_config, mountpoint)
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"dstfuse mount: mount point {mountpoint} is not empty (1 entries)"
        ]
    assert not is_mounted(mountpoint)


def test_missing_mountpoint_and_existing_mount_are_refused(local_config, tmp_path):
    require_fuse()
    done = run_dstfuse("mount", local_config, tmp_path / "nope")
    assert done.returncode == 1
    assert done.stderr.strip() == f"dstfuse mount: mount point {tmp_path / 'nope'} does not exist"
    with mounted(local_config, tmp_path / "mnt") as mount:
        again = run_dstfuse("mount", local_config, mount.mountpoint)
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"dstfuse mount: mount point {mount.mountpoint} is already a mount; unmount it first"
        )
        assert mount.umount().returncode == 0


def test_foreground_sends_ready_only_once_the_storage_file_exists(local_config, tmp_path):
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "daemon.log"
    with notify_socket() as (sock, path), open(log, "ab") as output:
        process = subprocess.Popen(
            [*DSTFUSE, "mount", "--foreground", str(local_config), str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            env=dstfuse_env({"NOTIFY_SOCKET": path}),
        )
        try:
            sock.settimeout(60)
            message = sock.recv(4096).decode()
            # checked the moment READY=1 arrives
            exists = os.path.exists(mountpoint / "vol0")
            size = os.stat(mountpoint / "vol0").st_size
            lines = message.splitlines()
            assert "READY=1" in lines, message
            assert exists and size == 4 * MiB
            assert f"MAINPID={process.pid}" in lines
            status = next(line for line in lines if line.startswith("STATUS="))
            assert f"mounted at {mountpoint}" in status and "vol0" in status
            done = run_dstfuse("umount", mountpoint)
            assert done.returncode == 0, done.stderr
            assert process.wait(60) == 0
        finally:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
            stop_pid(process.pid, process, 10)


def test_foreground_notifies_an_abstract_socket(local_config, tmp_path):
    require_fuse()
    import socket

    name = f"dstfuse-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        # A detached mount does not notify: systemd started the parent.
        env = {"NOTIFY_SOCKET": "@" + name}
        with mounted(local_config, tmp_path / "mnt", foreground=False, env=env) as mount:
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(4096)
            assert mount.umount().returncode == 0
        sock.settimeout(60)
        process = subprocess.Popen(
            [*DSTFUSE, "mount", "--foreground", str(local_config), str(tmp_path / "mnt")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dstfuse_env({"NOTIFY_SOCKET": "@" + name}),
        )
        try:
            assert "READY=1" in sock.recv(4096).decode().splitlines()
            assert run_dstfuse("umount", tmp_path / "mnt").returncode == 0
            assert process.wait(60) == 0
        finally:
            subprocess.run(["fusermount3", "-uz", str(tmp_path / "mnt")], capture_output=True)
            stop_pid(process.pid, process, 10)

"""Real mounts, export processes, loop devices and ext4 mounts for tests,
each removed in `finally` even when the test fails.

Every helper is a context manager; nest them so that what was set up last
is torn down first (ext4 inside loop device inside mount inside export)::

    from .mounts import exported, ext4_mounted, loop_device, mounted, write_config

    with exported(tmp_path / "disk", tmp_path) as export:            # dstfuse export
        config = write_config(tmp_path / "storage.yaml",
                              {"vol": {"algorithm": "linear",
                                       "nodes": [{"remote": export.address}]}})
        with mounted(config, tmp_path / "mnt") as mount:                # dstfuse mount
            with loop_device(mount.file("vol")) as device:              # losetup
                with ext4_mounted(device, tmp_path / "ext4"):           # mkfs + mount
                    ...
            assert mount.umount().returncode == 0                      # dstfuse umount

Guarantees (the cleanup order when the block is left, by exception or not):

- `mounted`: if the mount is still there, `fusermount3 -u`, then
  `fusermount3 -uz`, then `umount -l` as the last resort (a stale FUSE
  mount hangs whoever touches it); then the daemon must exit within
  `STOP_TIMEOUT` s, or it gets SIGTERM, then SIGKILL. The daemon's log is in
  `Mount.log` (a file in the test's directory, or under /run/dstfuse for
  `foreground=False`); failures include its tail.
- `exported`: SIGTERM, then SIGKILL after `STOP_TIMEOUT` s.
- `loop_device`: `losetup -d`, retried while the device is busy.
- `ext4_mounted`: `umount`, then `umount -l`.

The mount-table, pid, unmount-order and loop-device helpers are shared with
the benchmark (`benchmarks/bench/system.py`): both tear down the same way.

Processes are started as `python -m dstfuse` from this checkout, so no
install is needed. Requirements are checked with `require_fuse()`,
`require_loop()` and `require_root()`, which skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from benchmarks.bench.system import (
    detach_loop,
    force_unmount,
    free_tcp_port,
    is_mounted,
    pid_exited,
    stop_pid,
)

REPO = Path(__file__).resolve().parent.parent
DSTFUSE = [sys.executable, "-m", "dstfuse"]

#: How long a mount or an export may take to come up.
START_TIMEOUT = 60.0
#: How long a daemon or export may take to exit once told to.
STOP_TIMEOUT = 60.0
#: Any single helper command (losetup, mkfs, fusermount3, ...).
COMMAND_TIMEOUT = 120.0


class SetupFailed(AssertionError):
    """A mount or an export did not come up; the message holds its log tail."""


# ------------------------------------------------------------ requirements


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: FUSE is not available here")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is not installed (package fuse3)")


def require_loop() -> None:
    require_root()
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: loop devices are not available here")


# ------------------------------------------------------------------ basics


def dstfuse_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for dstfuse processes: this checkout first on the
    path, no systemd socket unless `extra` sets one."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env.update(extra or {})
    return env


def run_dstfuse(
    *args: str | os.PathLike[str],
    timeout: float = COMMAND_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`dstfuse ARGS...` to completion; stdout/stderr captured as text."""
    return subprocess.run(
        [*DSTFUSE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dstfuse_env(env),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run(*command: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT, check: bool = True):
    """A system command (losetup, mkfs, ...) to completion, output captured."""
    done = subprocess.run(
        list(map(str, command)), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {done.returncode}: {done.stderr.strip()}"
        )
    return done


def write_config(path: Path, storages: Mapping[str, object], **settings: object) -> Path:
    """Write a storage.yaml with `storages` (name -> {algorithm, nodes, ...})
    and top-level `settings` (key_file, timeouts, ...); returns `path`."""
    document = {**settings, "storages": dict(storages)}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


# -------------------------------------------------------------------- mount


@dataclass
class Mount:
    """A live `dstfuse mount`. `process` is set for --foreground mounts (our
    child); `pid` is the daemon's pid either way."""

    mountpoint: Path
    config: Path
    pid: int
    log: Path | None
    process: subprocess.Popen | None = None
    notifications: list[str] = field(default_factory=list)

    def file(self, storage: str) -> Path:
        return self.mountpoint / storage

    def control(self, *parts: str) -> str:
        """The text of `.dst/<parts...>`."""
        return self.mountpoint.joinpath(".dst", *parts).read_text()

    def wait_state(self, storage: str, state: str, timeout: float = 90.0) -> None:
        """Until `.dst/<storage>/state` reads `state` (e.g. a new mirror's
        first resync has ended), failing with the log after `timeout`."""
        deadline = time.monotonic() + timeout
        while (current := self.control(storage, "state").strip()) != state:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"storage {storage} is {current}, not {state}, after {timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def umount(self, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """`dstfuse umount`: returns once the daemon has flushed and exited."""
        return run_dstfuse("umount", self.mountpoint, timeout=timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status of a --foreground daemon."""
        assert self.process is not None, "only --foreground mounts are our child"
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket standing in for systemd's
    $NOTIFY_SOCKET: (socket, path). The path is short (sun_path limit)."""
    directory = tempfile.mkdtemp(prefix="dstn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def _mount_foreground(
    config: Path,
    mountpoint: Path,
    options: Sequence[str],
    log: Path,
    timeout: float,
    env: Mapping[str, str] | None,
    stack: contextlib.ExitStack,
) -> Mount:
    sock, path = stack.enter_context(notify_socket())
    output = stack.enter_context(open(log, "ab"))
    process = subprocess.Popen(
        [*DSTFUSE, "mount", "--foreground", *_option_args(options), str(config), str(mountpoint)],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env=dstfuse_env({**(env or {}), "NOTIFY_SOCKET": path}),
    )
    # Runs after `mounted`'s own cleanup; stops a daemon that never came up.
    stack.callback(stop_pid, process.pid, process, 10.0)
    mount = Mount(mountpoint, config, process.pid, log, process)
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while True:
        try:
            message = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            message = ""
        if message:
            mount.notifications.append(message)
            if "READY=1" in message.splitlines():
                return mount
        if process.poll() is not None:
            raise SetupFailed(
                f"dstfuse mount exited {process.returncode} before READY=1:\n{tail(log)}"
            )
        if time.monotonic() > deadline:
            raise SetupFailed(f"dstfuse mount sent no READY=1 within {timeout} s:\n{tail(log)}")


def _option_args(options: Sequence[str]) -> list[str]:
    return ["-o", ",".join(options)] if options else []


def _mount_daemon(
    config: Path,
    mountpoint: Path,
    options: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None,
) -> Mount:
    done = run_dstfuse(
        "mount", *_option_args(options), config, mountpoint, timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise SetupFailed(f"dstfuse mount exited {done.returncode}: {done.stderr.strip()}")
    from dstfuse.control import DaemonInfo
    from dstfuse.daemon import runtime_file

    info = DaemonInfo.parse((mountpoint / ".dst" / ".daemon").read_text())
    return Mount(mountpoint, config, info.pid, runtime_file(mountpoint, ".log"))


@contextlib.contextmanager
def mounted(
    config: Path,
    mountpoint: Path,
    *,
    options: Sequence[str] = (),
    foreground: bool = True,
    timeout: float = START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Iterator[Mount]:
    """Mount `config` at `mountpoint` (created if missing) and yield the
    `Mount`; on exit, the mount and its daemon are gone whatever happened.

    `foreground=True` runs `dstfuse mount --foreground` as our child and
    waits for READY=1 on a fake $NOTIFY_SOCKET (its log is
    `<mountpoint>.log`); `foreground=False` runs the detaching
    `dstfuse mount`, which returns once the mount is live."""
    require_fuse()
    mountpoint = Path(mountpoint).absolute()
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.with_name(mountpoint.name + ".log")
    mount: Mount | None = None
    failed = False
    with contextlib.ExitStack() as stack:
        try:
            if foreground:
                mount = _mount_foreground(
                    Path(config), mountpoint, options, log, timeout, env, stack
                )
            else:
                mount = _mount_daemon(Path(config), mountpoint, options, timeout, env)
            yield mount
        except BaseException:
            failed = True
            raise
        finally:
            force_unmount(mountpoint)
            if mount is not None:
                stop_pid(mount.pid, mount.process)
            # A detached daemon's log (under /run/dstfuse) is kept only when
            # the test failed, for its report.
            _remove_runtime_files(mountpoint, keep_log=failed)


def remove_runtime_files(mountpoint: Path) -> None:
    """What a detached `dstfuse mount` of `mountpoint` left under
    /run/dstfuse (its log and result file), for tests that run it directly."""
    _remove_runtime_files(mountpoint, keep_log=False)


def _remove_runtime_files(mountpoint: Path, *, keep_log: bool) -> None:
    """The daemon's result file (and the detached daemon's log, unless kept
    for a failing test to show) under /run/dstfuse."""
    from dstfuse.daemon import runtime_file

    for suffix in (".result",) if keep_log else (".result", ".log"):
        path = runtime_file(mountpoint, suffix)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


# ------------------------------------------------------------------ exports


@dataclass
class Export:
    """A running `dstfuse export`; `address` is what a config's `remote:` takes."""

    address: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)


@contextlib.contextmanager
def exported(
    path: Path,
    directory: Path,
    *,
    tcp: bool = False,
    port: int | None = None,
    args: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Iterator[Export]:
    """Serve `path` with `dstfuse export` on a unix socket (or, with `tcp`,
    on 127.0.0.1:`port`, a free port by default) until the block ends.
    `args` are extra flags (--read-only, --key-file F, --name N, ...);
    `env` extra environment variables (DSTFUSE_BOOT_ID, ...).
    `directory` holds the log (and the socket when it is short enough for
    sun_path); a node restarted on the same port needs another directory."""
    socket_directory = None
    if tcp or port is not None:
        listen = f"127.0.0.1:{port or free_tcp_port()}"
        address = listen
    else:
        socket_directory = tempfile.mkdtemp(prefix="dste-")
        listen = f"unix:{socket_directory}/export.sock"
        address = listen
    log = directory / f"export-{Path(path).name}.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [*DSTFUSE, "export", str(path), "--listen", listen, *args],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=dstfuse_env(env),
        )
    try:
        deadline = time.monotonic() + timeout
        while f"listening on {listen}" not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise SetupFailed(f"dstfuse export exited {process.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise SetupFailed(f"dstfuse export not listening within {timeout} s:\n{tail(log)}")
            time.sleep(0.05)
        yield Export(address, process, log)
    finally:
        if process.poll() is None:
            process.terminate()
        stop_pid(process.pid, process)
        if socket_directory is not None:
            shutil.rmtree(socket_directory, ignore_errors=True)


# ------------------------------------------------- loop devices and ext4


@contextlib.contextmanager
def loop_device(file: Path, *, direct_io: bool = True) -> Iterator[str]:
    """Attach `file` to a free loop device (with --direct-io=on by default)
    and yield its path, e.g. "/dev/loop3"; detached on exit."""
    require_loop()
    command = ["losetup", "--find", "--show"]
    if direct_io:
        command.append("--direct-io=on")
    device = run(*command, file).stdout.strip()
    try:
        yield device
    finally:
        detach_loop(device)


@contextlib.contextmanager
def ext4_mounted(device: str, directory: Path, *, mkfs: bool = True) -> Iterator[Path]:
    """(mkfs.ext4 -q and) mount `device` at `directory`; unmounted on exit."""
    require_root()
    directory.mkdir(parents=True, exist_ok=True)
    if mkfs:
        run("mkfs.ext4", "-q", "-F", device)
    run("mount", "-t", "ext4", device, directory)
    try:
        yield directory
    finally:
        for command in (["umount", str(directory)], ["umount", "-l", str(directory)]):
            if not is_mounted(directory):
                break
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(command, capture_output=True, timeout=60, check=False)


def os_error(function, *args) -> int | None:
    """The errno `function(*args)` fails with, or None if it succeeds."""
    try:
        function(*args)
    except OSError as exc:
        return exc.errno
    return None


__all__ = [
    "DSTFUSE",
    "Export",
    "Mount",
    "SetupFailed",
    "detach_loop",
    "exported",
    "ext4_mounted",
    "force_unmount",
    "free_tcp_port",
    "is_mounted",
    "loop_device",
    "mounted",
    "notify_socket",
    "os_error",
    "pid_exited",
    "remove_runtime_files",
    "require_fuse",
    "require_loop",
    "require_root",
    "run",
    "run_dstfuse",
    "stop_pid",
    "write_config",
]

"""The peers: the stacks under test, each presenting `size` bytes of a
backing file as one file that a loop device is attached to. `nbdkit file`
+ `nbdfuse` (the C baseline), dstfuse (export nodes + `dstfuse mount`,
plain, mirrored or encrypted) and the null file system (`nullfs.py`:
dstfuse's FUSE front end with nothing behind it, the ceiling of any
pyfuse3 client).

Invariants: every process, mount and loop device a peer makes is registered
with the run's Teardown the moment it exists (the unmount after the process
it needs, so it runs first); the mount is read only through `probe`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import MiB
from .processes import (
    BenchmarkError,
    Deadline,
    DeadlineExceeded,
    LoopDevice,
    Process,
    Teardown,
    free_port,
    kill_pid,
    listening,
    log,
    pid_alive,
    probe,
    run,
    unmount_fuse,
    wait_until,
)
from .system import is_mounted

if TYPE_CHECKING:
    from .plan import Plan

STORAGE_NAME = "bench"
#: Without these there is nothing to compare; the --mirror/--key peers are optional.
REQUIRED_PEERS = ("nbdfuse", "dstfuse", "nbdfuse-b")


@dataclass
class Tools:
    """What every peer and job needs from the run: the python that runs
    dstfuse, the children's environment, where files and logs go, the hard
    limit and the tear-down."""

    python: str
    env: dict[str, str]
    workdir: Path
    logdir: Path
    deadline: Deadline
    teardown: Teardown
    nbd_connections: int | None
    #: Pids whose process trees are the benchmark's (for the load figures).
    own_pids: set[int] = field(default_factory=lambda: {os.getpid()})

    def dstfuse(self, *args: str) -> list[str]:
        return [self.python, "-m", "dstfuse", *args]


class Peer:
    """One stack under test: something that presents `size` bytes of a
    backing file as a file the loop device is attached to. `roles` maps
    "client"/"server..." to the pids whose CPU time and RSS we watch."""

    kind = "peer"

    def __init__(self, label: str, tools: Tools, size: int) -> None:
        self.label = label
        self.tools = tools
        self.size = size
        self.dir = tools.workdir / label
        self.dir.mkdir()
        self.roles: dict[str, int] = {}
        self.loop: LoopDevice | None = None
        self.direct_io: bool | None = None
        self.notes: list[str] = []

    def backing_file(self, name: str) -> Path:
        """A sparse file of `size` bytes in this peer's directory."""
        path = self.dir / name
        with open(path, "wb") as file:
            file.truncate(self.size)
        return path

    def start_process(self, name: str, argv: list[str]) -> Process:
        proc = Process(
            f"{self.label} {name}",
            argv,
            self.tools.logdir / f"{self.label}-{name}.log",
            self.tools.env,
        )
        self.tools.teardown.add(f"stop {proc.name} (pid {proc.pid})", proc.stop)
        return proc

    def start(self) -> Path:
        """Bring the stack up; return the file to attach (on the mount)."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait until the stack is steady (a mirror's resync done), before
        and after the fill pass; default: nothing to wait for."""

    def counters(self) -> dict[str, dict[str, int]]:
        """Per node of the storage, its I/O counters now; {} when the stack
        has none to show."""
        return {}

    def kept_bytes(self) -> int | None:
        """Bytes of acknowledged writes the client keeps for replay now;
        None when the stack keeps none or cannot say."""
        return None

    def attach(self) -> LoopDevice:
        # Runs after the unmount and the process stops: a loop device that
        # was busy before them is free after them.
        self.tools.teardown.add(f"detach the loop device of {self.label}", self._detach_again)
        target = self.start()
        size = probe(f"stat {target}", lambda: target.stat().st_size, 30)
        if size <= 0:
            raise BenchmarkError(f"{target} is empty")
        loop = LoopDevice(target)
        self.tools.teardown.add(f"detach {loop.path} ({self.label})", loop.detach)
        self.loop = loop
        self.direct_io = loop.direct_io
        self.tools.own_pids.update(self.roles.values())
        if not self.direct_io:
            self.notes.append(f"{loop.path}: losetup could not enable direct I/O")
        return loop

    def _detach_again(self) -> None:
        if self.loop is not None:
            self.loop.detach()


class NbdfusePeer(Peer):
    """`nbdkit file FILE` on a free 127.0.0.1 port and `nbdfuse MNT nbd://...`
    on it: the file is MNT/nbd."""

    kind = "nbdfuse"

    def start(self) -> Path:
        backing = self.backing_file("backing.img")
        port = free_port()
        nbdkit_pid = self.dir / "nbdkit.pid"
        nbdkit = self.start_process(
            "nbdkit",
            [
                "nbdkit",
                "--foreground",
                "--exit-with-parent",
                "--pidfile",
                str(nbdkit_pid),
                "--port",
                str(port),
                "--ipaddr",
                "127.0.0.1",
                "file",
                str(backing),
            ],
        )
        wait_until("starting nbdkit", nbdkit_pid.exists, 30, nbdkit)
        self.roles["server"] = nbdkit.pid

        mountpoint = self.dir / "mnt"
        mountpoint.mkdir()
        fuse_pid = self.dir / "nbdfuse.pid"
        argv = ["nbdfuse", "--pidfile", str(fuse_pid)]
        if self.tools.nbd_connections is not None:
            argv += ["--connections", str(self.tools.nbd_connections)]
        argv += [str(mountpoint), f"nbd://127.0.0.1:{port}"]
        nbdfuse = self.start_process("nbdfuse", argv)
        # Registered after the process, so it runs before the process stop:
        # nbdfuse exits by itself once unmounted.
        self.tools.teardown.add(f"unmount {mountpoint}", lambda: unmount_fuse(mountpoint, []))
        wait_until("mounting nbdfuse", fuse_pid.exists, 30, nbdfuse)
        wait_until("mounting nbdfuse", lambda: is_mounted(mountpoint), 10, nbdfuse)
        self.roles["client"] = nbdfuse.pid
        return mountpoint / "nbd"


class NullfsPeer(Peer):
    """`nullfs.py MNT SIZE`: dstfuse's FUSE session with no storage behind
    it (reads are zeros, writes are discarded); the file is MNT/bench."""

    kind = "nullfs"

    def start(self) -> Path:
        mountpoint = self.dir / "mnt"
        mountpoint.mkdir()
        script = Path(__file__).with_name("nullfs.py")
        pid_file = self.dir / "nullfs.pid"
        nullfs = self.start_process(
            "nullfs", [self.tools.python, str(script), str(mountpoint), str(self.size)]
        )
        # Registered after the process, so it runs before the process stop.
        self.tools.teardown.add(f"unmount {mountpoint}", lambda: unmount_fuse(mountpoint, []))
        wait_until("mounting the null file system", pid_file.exists, 30, nullfs)
        wait_until("mounting the null file system", lambda: is_mounted(mountpoint), 10, nullfs)
        self.roles["client"] = nullfs.pid
        return mountpoint / "bench"


class DstfusePeer(Peer):
    """`dstfuse export` per leg on free 127.0.0.1 ports, a storage.yaml with
    one storage (`linear` over one remote node, or `mirror` over several),
    `dstfuse mount`; the file is MNT/bench. With `key`, both sides use a
    fresh `dstfuse keygen` key and aes-256-gcm."""

    kind = "dstfuse"

    def __init__(self, label: str, tools: Tools, size: int, *, legs: int = 1, key: bool = False):
        super().__init__(label, tools, size)
        self.legs = legs
        self.key = key
        self.mountpoint = self.dir / "mnt"

    def start(self) -> Path:
        tools = self.tools
        key_file = None
        if self.key:
            key_file = self.dir / "bench.key"
            run(tools.dstfuse("keygen", "-o", str(key_file)), 60)
        nodes = []
        for leg in range(self.legs):
            backing = self.backing_file(f"leg{leg}.img")
            port = free_port()
            argv = tools.dstfuse("export", str(backing), "--listen", f"127.0.0.1:{port}")
            if key_file is not None:
                argv += ["--key-file", str(key_file)]
            export = self.start_process(f"export{leg}", argv)
            wait_until(
                f"starting dstfuse export {leg}", functools.partial(listening, port), 60, export
            )
            self.roles[f"server{leg}" if self.legs > 1 else "server"] = export.pid
            nodes.append(f"      - remote: 127.0.0.1:{port}")

        config = self.dir / "storage.yaml"
        lines = []
        if key_file is not None:
            lines += [f"key_file: {key_file}", "cipher: aes-256-gcm"]
        lines += [
            "storages:",
            f"  {STORAGE_NAME}:",
            f"    algorithm: {'mirror' if self.legs > 1 else 'linear'}",
            "    nodes:",
            *nodes,
        ]
        config.write_text("\n".join(lines) + "\n")

        mountpoint = self.mountpoint
        mountpoint.mkdir()
        self.tools.teardown.add(f"unmount {mountpoint}", self._unmount)
        mount_log = tools.logdir / f"{self.label}-mount.log"
        with open(mount_log, "ab") as log_file:
            try:
                # Its own session, like the servers: Ctrl-C must not reach
                # the daemon before the loop device is detached.
                result = subprocess.run(
                    tools.dstfuse("mount", str(config), str(mountpoint)),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=tools.env,
                    timeout=tools.deadline.timeout(120),
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired:
                raise BenchmarkError("dstfuse mount did not return within 120 s") from None
        if result.returncode != 0 or not is_mounted(mountpoint):
            tail = mount_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BenchmarkError(f"dstfuse mount failed ({result.returncode}): " + " | ".join(tail))
        self.roles["client"] = self._find_daemon()
        return mountpoint / STORAGE_NAME

    def _find_daemon(self) -> int:
        """The mount daemon's pid: MOUNTPOINT/.dst/.daemon, else the process
        whose command line names our mount point and that holds /dev/fuse."""
        published = self.mountpoint / ".dst" / ".daemon"
        try:
            text = probe(f"read {published}", published.read_text, 10)
            match = re.search(r"\d+", text)
            if match and pid_alive(int(match.group())):
                return int(match.group())
        except (OSError, BenchmarkError):
            pass
        pid = self._scan_for_daemon()
        if pid is None:
            raise BenchmarkError(f"cannot find the daemon serving {self.mountpoint}")
        self.notes.append(f"daemon pid {pid} found in /proc (no .dst/.daemon)")
        return pid

    def _scan_for_daemon(self) -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if str(self.mountpoint).encode() not in argv:
                    continue
                fds = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            except OSError:
                continue
            if "/dev/fuse" in fds:
                return int(entry.name)
        return None

    def _unmount(self) -> None:
        # A mount that failed or timed out may still have left a daemon.
        daemon = self.roles.get("client") or self._scan_for_daemon()
        try:
            unmount_fuse(self.mountpoint, [self.tools.dstfuse("umount", str(self.mountpoint))], 120)
        finally:
            if daemon is not None and pid_alive(daemon):
                # Unmounted (or not) but still running: it is ours to end.
                kill_pid(f"{self.label} daemon", daemon, grace=20)
            self._collect_runtime_files()

    def _collect_runtime_files(self) -> None:
        """Move the daemon's log and result file (`dstfuse mount` keeps them
        in /run/dstfuse, named after the escaped mount point) into our logs,
        so they are kept with --keep-logs and do not pile up in /run."""
        if is_mounted(self.mountpoint):
            return
        # The mount point is unique through the temporary directory's random
        # suffix; '-' is escaped as \x2d in the file names.
        token = self.tools.workdir.name.rsplit("-", 1)[-1]
        ending = "-" + self.label.replace("-", "\\x2d") + "-mnt"
        places = {Path("/run/dstfuse"), Path(os.environ.get("XDG_RUNTIME_DIR", "/run")) / "dstfuse"}
        for place in places:
            for path in place.glob(f"*{token}*"):
                if path.is_file() and path.stem.endswith(ending):
                    shutil.move(path, self.tools.logdir / f"{self.label}-daemon{path.suffix}")

    COUNTERS = ("requests", "bytes_read", "bytes_written", "resends", "reconnects", "errors")

    def counters(self) -> dict[str, dict[str, int]]:
        """The counters of every node directory in the control tree
        (MOUNTPOINT/.dst/bench/n-*/), read through a probe."""
        storage_dir = self.mountpoint / ".dst" / STORAGE_NAME

        def read_all() -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {}
            for node_dir in sorted(storage_dir.glob("n-*")):
                values = {}
                for name in self.COUNTERS:
                    with contextlib.suppress(OSError, ValueError):
                        values[name] = int((node_dir / name).read_text().split()[0])
                found[node_dir.name] = values
            return found

        try:
            return probe(f"read {storage_dir}", read_all, 10)
        except (OSError, BenchmarkError) as exc:
            if not any("control tree" in note for note in self.notes):
                self.notes.append(f"cannot read node counters from the control tree: {exc}")
            return {}

    def kept_bytes(self) -> int | None:
        """The `unflushed` files of every node directory, summed."""
        storage_dir = self.mountpoint / ".dst" / STORAGE_NAME

        def read_all() -> int:
            return sum(
                int((node_dir / "unflushed").read_text().split()[0])
                for node_dir in storage_dir.glob("n-*")
            )

        try:
            return probe(f"read {storage_dir}/n-*/unflushed", read_all, 5)
        except (OSError, ValueError, BenchmarkError):
            return None

    def status(self) -> dict[str, Any] | None:
        result = run(self.tools.dstfuse("status", "--json", str(self.mountpoint)), 30, check=False)
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            return None

    def settle(self) -> None:
        if self.legs < 2:
            return
        end = time.monotonic() + self.tools.deadline.timeout(600)
        state = None
        while time.monotonic() < end:
            status = self.status()
            if status is None:
                self.notes.append("dstfuse status --json failed; mirror state unknown")
                return
            state = status.get("storages", {}).get(STORAGE_NAME, {}).get("state")
            if state == "clean":
                return
            time.sleep(1)
        self.notes.append(f"mirror not clean before the measured jobs (state {state})")


@dataclass
class PeerRecord:
    """A peer as `--json` saved it: what the report needs to print it again."""

    label: str
    kind: str
    roles: dict[str, int]
    notes: list[str]


def start_peers(plan: Plan, tools: Tools, failures: list[str]) -> list[Peer]:
    """Every peer that comes up, attached to a loop device and filled. The
    nbdfuse baseline and the main subject are required; the others are
    dropped (and reported) when they fail."""
    peers: list[Peer] = []
    for label, kind, options in plan.peers:
        tools.deadline.timeout(1)
        log(f"starting {label}")
        peer: Peer
        if kind == "nbdfuse":
            peer = NbdfusePeer(label, tools, plan.size)
        elif kind == "nullfs":
            peer = NullfsPeer(label, tools, plan.size)
        else:
            peer = DstfusePeer(label, tools, plan.size, **options)
        try:
            loop = peer.attach()
        except BenchmarkError as exc:
            if isinstance(exc, DeadlineExceeded) or label in REQUIRED_PEERS:
                raise
            failures.append(f"{label}: {exc}")
            continue
        log(
            f"{label}: {loop.path} on {loop.backing} ({loop.size / MiB:.0f} MiB, "
            f"direct I/O {'on' if loop.direct_io else 'OFF'})"
        )
        peers.append(peer)
    return peers

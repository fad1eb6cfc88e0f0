"""One frozen node never freezes the mount: with a node stopped (SIGSTOP)
and 64 requests waiting on it, a real mount still answers `stat` of the
control tree, reads of `.dst/<storage>/state`, `dstfuse status`, and (linear)
I/O to the other node; once the node continues, every waiting request
completes. A mirror's read sent to its frozen leg is served by the other
leg after the mirror's read_timeout.

The 64 waiting requests are either fio's (libaio, iodepth 64, O_DIRECT:
asynchronous FUSE requests, as a loop device sends them) or 64 threads'
O_DIRECT preads (synchronous ones). Not 64 threads' pwrites: the kernel
serialises direct writes to one FUSE file on its inode lock (libfuse 3.14
cannot ask for FOPEN_PARALLEL_DIRECT_WRITES), so they would be one request.

Each probe runs in its own process under a 5 s bound: far below the 30 s
resend budget, far above what an answering mount needs. A probe that does
not answer is left to finish once the node continues (a process waiting on
FUSE or on an inode lock may not be killable). The frozen node is always
continued, and every process the test started reaped, in `finally`.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstfuse.allocator import IDLE_PERIOD

from .mounts import dstfuse_env, exported, mounted, write_config

pytestmark = pytest.mark.slow

MiB = 1 << 20
NODE = 16 * MiB
BLOCK = 64 * 1024
WAITING = 64
#: What a probe may take; a frozen mount would take the whole resend budget.
ANSWER_WITHIN = 5.0
#: How long a request waiting on the frozen node may take once it continues.
FINISH_WITHIN = 60.0
#: A 30 s budget: the freeze (a few seconds) never fails a waiting request.
TIMEOUTS = {"resend": "2s", "max_resends": 15, "keepalive": "1s", "connect": "2s"}


def make_disk(path: Path, size: int = NODE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(offset: int) -> bytes:
    """The BLOCK of data the tests write at `offset`."""
    return offset.to_bytes(8, "big") * (BLOCK // 8)


class WaitingReads:
    """`WAITING` threads doing O_DIRECT preads of BLOCK bytes on `file`
    until `stop()`, each at offsets of its own from `start` (its first, then
    on through `span` bytes), checking each read against `pattern`. A
    thread whose read goes to a frozen node stays in it until the node
    continues; `wait_for` may take time until every thread is in one."""

    def __init__(self, file: Path, start: int, span: int) -> None:
        self.file = file
        self.start_offsets = [start + index * BLOCK for index in range(WAITING)]
        self.span = span
        self.reads = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._read, args=(offset,), daemon=True)
            for offset in self.start_offsets
        ]

    def _read(self, first: int) -> None:
        try:
            fd = os.open(self.file, os.O_RDONLY | os.O_DIRECT)
            try:
                with mmap.mmap(-1, BLOCK) as aligned:
                    offset = first
                    while not self._stop.is_set():
                        assert os.preadv(fd, [aligned], offset) == BLOCK
                        assert bytes(aligned) == pattern(offset), f"wrong data at {offset}"
                        self.reads += 1
                        offset = (offset + WAITING * BLOCK) % self.span
            finally:
                os.close(fd)
        except BaseException as exc:  # handed to the test thread
            self.errors.append(exc)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def running(self) -> int:
        return sum(thread.is_alive() for thread in self.threads)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Processes:
    """The processes a test starts (probes, fio): `answers` bounds a probe;
    `reap` waits for every one of them (they finish once the frozen node
    continues), killing those still there after FINISH_WITHIN."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dstfuse_env(),
        )
        self.started.append(process)
        return process

    def answers(self, what: str, command: list[str]) -> str:
        """`command`'s output; fails the test unless it exits 0 within
        ANSWER_WITHIN seconds."""
        start = time.monotonic()
        process = self.start(command)
        try:
            stdout, stderr = process.communicate(timeout=ANSWER_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: no answer within {ANSWER_WITHIN} s while a node is frozen")
        assert process.returncode == 0, f"{what}: exited {process.returncode}: {stderr.strip()}"
        print(f"{what}: {time.monotonic() - start:.3f} s")
        return stdout

    def reap(self) -> None:
        deadline = time.monotonic() + FINISH_WITHIN
        for process in self.started:
            try:
                process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


@contextlib.contextmanager
def frozen(process: subprocess.Popen) -> Iterator[None]:
    """The export process stopped (SIGSTOP) for the block; continued after,
    whatever happened."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def direct_io_probe(file: Path, offset: int, *, write: bool) -> list[str]:
    """A command that (writes `pattern(offset)` and) reads it back at
    `offset` with O_DIRECT, failing unless the data matches."""
    script = (
        "import mmap, os, sys\n"
        "path, offset, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
        "expected = offset.to_bytes(8, 'big') * (block // 8)\n"
        "fd = os.open(path, os.O_RDWR | os.O_DIRECT)\n"
        "buffer = mmap.mmap(-1, block)\n"
        "if sys.argv[4] == 'write':\n"
        "    buffer.write(expected)\n"
        "    assert os.pwritev(fd, [buffer], offset) == block\n"
        "    buffer.seek(0)\n"
        "    buffer.write(bytes(block))\n"
        "assert os.preadv(fd, [buffer], offset) == block\n"
        "assert bytes(buffer) == expected, 'read back other data'\n"
    )
    mode = "write" if write else "read"
    return [sys.executable, "-c", script, str(file), str(offset), str(BLOCK), mode]


def fio_writes(file: Path, offset: int, size: int, depth: int) -> list[str]:
    """fio writing `depth` BLOCKs within `size` bytes at `offset` of `file`,
    all in flight at once, then reading them back verified."""
    return [
        "fio", "--name=frozen", f"--filename={file}", "--rw=randwrite", f"--bs={BLOCK}",
        f"--iodepth={depth}", "--ioengine=libaio", "--direct=1", f"--offset={offset}",
        f"--size={size}", f"--io_size={depth * BLOCK}", "--verify=crc32c",
        "--do_verify=1", "--verify_state_save=0", "--output-format=terse",
    ]  # fmt: skip


def fio_warm_up(file: Path) -> list[str]:
    """Enough small reads at depth 8 to start every FUSE worker a mount
    ever starts at that depth (before the fix, 64 of them, which then never
    retired: the state in which 3 waiting requests froze the mount)."""
    return [
        "fio", "--name=warm-up", f"--filename={file}", "--rw=randread", "--bs=4k",
        "--iodepth=8", "--ioengine=libaio", "--direct=1", f"--size={NODE}", "--io_size=4M",
        "--output-format=terse",
    ]  # fmt: skip


def probe_control_tree(
    processes: Processes, mountpoint: Path, storage: str, states: set[str]
) -> None:
    """stat of .dst, the storage's state and `dstfuse status` all answer."""
    processes.answers("stat .dst", ["stat", str(mountpoint / ".dst")])
    state = processes.answers(
        f"cat .dst/{storage}/state", ["cat", str(mountpoint / ".dst" / storage / "state")]
    )
    assert state.strip() in states
    status = processes.answers(
        "dstfuse status --json",
        [sys.executable, "-m", "dstfuse", "status", "--json", str(mountpoint)],
    )
    assert storage in json.loads(status)["storages"]


def node_counter(processes: Processes, mountpoint: Path, storage: str, node: str, name: str):
    """The counter `name` of the storage's node `node` (its directory name)."""
    path = mountpoint / ".dst" / storage / node / name
    return int(processes.answers(f"{node}/{name}", ["cat", str(path)]))


@pytest.mark.parametrize("depth", [3, WAITING])
def test_linear_node_frozen_with_requests_waiting_blocks_nothing_else(tmp_path, depth):
    """Depth 3 is the issue's report, on a mount that has served some I/O;
    64 is more requests waiting than the mount had workers before the fix.
    The probes come after two quiet periods, in which the daemon retires
    the idle handler tasks beyond the few it keeps (fs.py): the ones kept
    still read the probes."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    first, second = make_disk(tmp_path / "first.img"), make_disk(tmp_path / "second.img")
    with exported(first, tmp_path) as first_node, exported(second, tmp_path) as second_node:
        config = write_config(
            tmp_path / "storage.yaml",
            {
                "vol": {
                    "algorithm": "linear",
                    "nodes": [{"remote": first_node.address}, {"remote": second_node.address}],
                }
            },
            timeouts=TIMEOUTS,
        )
        with mounted(config, tmp_path / "mnt") as mount:
            processes = Processes()
            try:
                warm_up = processes.start(fio_warm_up(mount.file("vol")))
                assert warm_up.wait(FINISH_WITHIN) == 0, warm_up.stderr.read()
                with frozen(first_node.process):
                    fio = processes.start(fio_writes(mount.file("vol"), 0, NODE, depth))
                    # fio's requests reach the daemon; with them all waiting
                    # it is quiet, and retires its surplus idle handler tasks.
                    time.sleep(2 * IDLE_PERIOD + 1)
                    probe_control_tree(processes, mount.mountpoint, "vol", {"clean"})
                    for index in range(4):
                        offset = NODE + index * BLOCK
                        processes.answers(
                            f"direct I/O to the second node at {offset}",
                            direct_io_probe(mount.file("vol"), offset, write=True),
                        )
                    # The probes were not answered by the frozen node
                    # continuing: fio's requests are all still waiting on it.
                    in_flight = node_counter(
                        processes, mount.mountpoint, "vol", "n-0-0", "in_flight"
                    )
                    assert in_flight == depth
                    assert fio.poll() is None
                assert fio.wait(FINISH_WITHIN) == 0, fio.stderr.read()
            finally:
                processes.reap()
            assert mount.umount().returncode == 0
    with open(second, "rb") as f:
        for index in range(4):
            f.seek(index * BLOCK)
            assert f.read(BLOCK) == pattern(NODE + index * BLOCK)


def mirror_of_two_legs(tmp_path: Path, first: str, second: str) -> Path:
    return write_config(
        tmp_path / "storage.yaml",
        {"vol": {"algorithm": "mirror", "nodes": [{"remote": first}, {"remote": second}]}},
        timeouts=TIMEOUTS,
    )


def write_patterns(processes: Processes, file: Path, offsets: list[int]) -> None:
    for offset in offsets:
        processes.answers(f"write at {offset}", direct_io_probe(file, offset, write=True))


def test_mirror_leg_frozen_with_64_reads_waiting_on_it_blocks_neither_tree_nor_status(tmp_path):
    legs = [make_disk(tmp_path / f"leg{index}.img", 64 * MiB) for index in range(2)]
    span = 2 * WAITING * BLOCK
    with exported(legs[0], tmp_path) as first_leg, exported(legs[1], tmp_path) as second_leg:
        config = mirror_of_two_legs(tmp_path, first_leg.address, second_leg.address)
        # A read waits read_timeout for a leg before it asks the other: a
        # long one keeps every reader's read on the frozen leg once sent there.
        with mounted(config, tmp_path / "mnt", options=["read_timeout=60s"]) as mount:
            # A new mirror's first resync copies leg 0 to leg 1; until it
            # ends only leg 0 holds the data, and a read must wait for it.
            mount.wait_state("vol", "clean")
            processes = Processes()
            readers = WaitingReads(mount.file("vol"), 0, span)
            try:
                write_patterns(processes, mount.file("vol"), list(range(0, span, BLOCK)))
                with frozen(first_leg.process):
                    readers.start()
                    deadline = time.monotonic() + 10
                    while True:  # every reader ends up in a read of the frozen leg
                        in_flight = node_counter(
                            processes, mount.mountpoint, "vol", "n-0-0", "in_flight"
                        )
                        if in_flight == WAITING or time.monotonic() > deadline:
                            break
                        time.sleep(0.2)
                    assert in_flight == WAITING
                    reads = readers.reads
                    probe_control_tree(processes, mount.mountpoint, "vol", {"clean", "degraded"})
                    assert readers.reads == reads  # nothing got through the frozen leg
            finally:
                readers.stop(FINISH_WITHIN)
                processes.reap()
            assert readers.running() == 0
            assert readers.errors == []


def test_mirror_reads_sent_to_a_frozen_leg_are_served_by_the_other_leg(tmp_path):
    """Reads alternating between two far-apart offsets settle one on each
    leg (the mirror reads from the leg whose last request ended nearest), so
    with leg 0 frozen one of the next two reads is sent to it."""
    legs = [make_disk(tmp_path / f"leg{index}.img", 64 * MiB) for index in range(2)]
    near, far = 0, 32 * MiB
    with exported(legs[0], tmp_path) as first_leg, exported(legs[1], tmp_path) as second_leg:
        config = mirror_of_two_legs(tmp_path, first_leg.address, second_leg.address)
        with mounted(config, tmp_path / "mnt") as mount:
            # A new mirror's first resync copies leg 0 to leg 1; until it
            # ends only leg 0 holds the data, and a read must wait for it.
            mount.wait_state("vol", "clean")
            processes = Processes()
            try:
                write_patterns(processes, mount.file("vol"), [near, far])
                for offset in (near, far, near, far):
                    processes.answers(
                        f"read at {offset}", direct_io_probe(mount.file("vol"), offset, write=False)
                    )
                with frozen(first_leg.process):
                    for offset in (near, far):
                        processes.answers(
                            f"read at {offset} while leg 0 is frozen",
                            direct_io_probe(mount.file("vol"), offset, write=False),
                        )
            finally:
                processes.reap()


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


#: What a daemon that polls nothing may use of the 2 s it is watched: a
#: spinning one uses all of it.
IDLE_CPU = 0.25


def test_the_daemon_busy_polls_only_while_io_goes_on(tmp_path):
    """busy_poll (the longest window, 10 ms, so that a poller that never
    parks would show): after I/O at queue depth 1 the idle daemon uses
    almost no CPU, nor while its node is frozen with requests waiting on it
    (no reply comes: the poller parks a window after the last one), and
    the requests complete once the node continues."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    disk = make_disk(tmp_path / "node.img")
    with exported(disk, tmp_path) as node:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"remote": node.address}]}},
            timeouts=TIMEOUTS,
            busy_poll="10ms",
        )
        with mounted(config, tmp_path / "mnt") as mount:
            processes = Processes()
            try:
                qd1 = processes.start([
                    "fio", "--name=qd1", f"--filename={mount.file('vol')}", "--rw=randwrite",
                    "--bs=4k", "--iodepth=1", "--ioengine=libaio", "--direct=1",
                    f"--size={NODE}", "--io_size=8M", "--output-format=terse",
                ])  # fmt: skip
                assert qd1.wait(FINISH_WITHIN) == 0, qd1.stderr.read()
                idle = cpu_over(mount.pid, 2.0)
                assert idle < IDLE_CPU, f"idle daemon used {idle:.2f} s of CPU in 2 s"
                with frozen(node.process):
                    fio = processes.start(fio_writes(mount.file("vol"), 0, NODE, 3))
                    time.sleep(1.0)  # fio's requests reach the daemon
                    waiting = cpu_over(mount.pid, 2.0)
                    assert fio.poll() is None
                assert waiting < IDLE_CPU, f"daemon used {waiting:.2f} s of CPU in 2 s frozen"
                assert fio.wait(FINISH_WITHIN) == 0, fio.stderr.read()
            finally:
                processes.reap()
            assert mount.umount().returncode == 0

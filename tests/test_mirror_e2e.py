"""The mirror end to end: real `dstfuse export` processes as legs, a real
`dstfuse mount`, and faults done to them for real (kill -9 of an export or of
the client, SIGSTOP of an export, bytes changed in a leg's file).

Each export listens on a unix socket at a fixed path, so a killed export can
be started again where the mount's config expects it. Timeouts are short
(resend 0.5 s, 4 resends) so a dead leg is given up in about 2.5 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstfuse.mirror.algorithm import Mirror
from dstfuse.mirror.bitmap import MARK_AHEAD
from dstfuse.mirror.metadata import BLOCK, leg_layout, newest_header
from dstfuse.nodes.local import LocalNode

from .mounts import (
    DSTFUSE,
    detach_loop,
    dstfuse_env,
    ext4_mounted,
    loop_device,
    mounted,
    require_loop,
    run,
    run_dstfuse,
    stop_pid,
    tail,
    write_config,
)
from .test_mirror_nodes import MemoryNode

pytestmark = pytest.mark.slow

MiB = 1 << 20
GiB = 1 << 30
REGION = 4 * MiB
FAST_TIMEOUTS = {"resend": "500ms", "max_resends": 4, "keepalive": "500ms", "connect": "2s"}
#: Mount options for a mount after a client was killed (kill -9): the dead
#: holder's heartbeat is watched standing still for 3 s, not the default 7
#: (this mount's own lease keeps its margin: 0.5 s heartbeats, 1.5 s).
#: Only after a kill: the killed holder had the default 4 s lease, which a
#: live (frozen) holder could still be writing in after 3 s.
QUICK_TAKEOVER = ["heartbeat_interval=500ms", "holder_timeout=3s"]


class LegExport:
    """One `dstfuse export` of a leg file, restartable on the same socket."""

    def __init__(self, path: Path, listen: str, log: Path) -> None:
        self.path = path
        self.listen = listen
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        """`env`: extra environment (e.g. DSTFUSE_BOOT_ID, a simulated reboot)."""
        seen = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(
                [*DSTFUSE, "export", str(self.path), "--listen", self.listen],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=dstfuse_env(env),
            )
        deadline = time.monotonic() + timeout
        while f"listening on {self.listen}" not in self.log.read_bytes()[seen:].decode(
            errors="replace"
        ):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"export of {self.path} did not start:\n{tail(self.log)}")
            time.sleep(0.05)

    def signal(self, number: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, number)
        if number == signal.SIGKILL:
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            stop_pid(self.process.pid, self.process, 20)


@contextlib.contextmanager
def leg_exports(tmp_path: Path, count: int = 2, size: int = 256 * MiB) -> Iterator[list[LegExport]]:
    sockets = tempfile.mkdtemp(prefix="dstm-")
    legs = []
    try:
        for index in range(count):
            path = tmp_path / f"leg{index}.img"
            path.write_bytes(b"")
            os.truncate(path, size)
            leg = LegExport(path, f"unix:{sockets}/leg{index}.sock", tmp_path / f"leg{index}.log")
            legs.append(leg)
            leg.start()
        yield legs
    finally:
        for leg in legs:
            leg.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def mirror_config(tmp_path: Path, legs: list[LegExport], **options: object) -> Path:
    storage = {"algorithm": "mirror", "nodes": [{"remote": leg.listen} for leg in legs]}
    storage.update(options)
    return write_config(tmp_path / "storage.yaml", {"vol0": storage}, timeouts=FAST_TIMEOUTS)


def status(mount) -> dict:
    done = run_dstfuse("status", "--json", mount.mountpoint, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["storages"]["vol0"]


def wait_state(mount, state: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = status(mount)
        if current["state"] == state:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"state {current['state']}, not {state}:\n{mount.log_tail()}")
        time.sleep(0.25)


def marked_regions(mount) -> int:
    """Regions marked in the write-intent bitmap (`.dst/vol0/bitmap`)."""
    return int(mount.control("vol0", "bitmap").split()[1])


def wait_marked(mount, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while marked_regions(mount) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{mount.control('vol0', 'bitmap')}, not {count} marked")
        time.sleep(0.2)


def counter(mount, node: int, name: str) -> int:
    return int(mount.control("vol0", f"n-0-{node}", name))


def storage_size(mount) -> int:
    return int(mount.control("vol0", "size"))


def data_area(leg: LegExport, size: int) -> bytes:
    with open(leg.path, "rb") as file:
        return file.read(size)


def differing_regions(a: bytes, b: bytes) -> set[int]:
    return {
        offset // REGION
        for offset in range(0, len(a), REGION)
        if a[offset : offset + REGION] != b[offset : offset + REGION]
    }


def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and "lost+found" not in path.parts
    }


def pwrite_direct(fd: int, offset: int, data: bytes) -> None:
    buffer = mmap.mmap(-1, len(data))
    buffer[:] = data
    assert os.pwritev(fd, [buffer], offset) == len(data)


def pread_direct(fd: int, offset: int, length: int) -> bytes:
    buffer = mmap.mmap(-1, length)
    assert os.preadv(fd, [buffer], offset) == length
    return bytes(buffer)


@contextlib.contextmanager
def loop_of_leg_file(path: Path, size: int) -> Iterator[str]:
    """One leg's file alone, read-only, cut at the storage size."""
    require_loop()
    device = run("losetup", "--find", "--show", "-r", f"--sizelimit={size}", path).stdout.strip()
    try:
        yield device
    finally:
        detach_loop(device)


# -- a leg dies under ext4 and comes back --------------------------------------
def test_a_leg_killed_under_ext4_writes_resyncs_only_what_it_missed(tmp_path):
    require_loop()
    with leg_exports(tmp_path, size=512 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        options = ["assume_clean", "bitmap_idle=1s"]
        with mounted(config, tmp_path / "mnt", options=options) as mount:
            size = storage_size(mount)
            with loop_device(mount.file("vol0")) as device:
                # no lazy initialisation: nothing writes behind the test's back
                run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    device)
                with ext4_mounted(device, tmp_path / "ext4", mkfs=False) as ext4:
                    for index in range(8):
                        (ext4 / f"before{index}").write_bytes(os.urandom(MiB))
                    os.sync()
                    wait_marked(mount, 0)  # every region idle and cleared
                    legs[1].signal(signal.SIGKILL)
                    # no write error reaches the filesystem while the leg is gone
                    (ext4 / "during").mkdir()
                    for index in range(12):
                        (ext4 / "during" / f"f{index}").write_bytes(os.urandom(700_000))
                    os.sync()
                    degraded = status(mount)
                    assert degraded["state"] == "degraded"
                    assert degraded["nodes"][1]["state"] == "offline"
                    behind = differing_regions(data_area(legs[0], size), data_area(legs[1], size))
                    assert behind, "the writes during the outage changed nothing?"
                    marked = marked_regions(mount)
                    legs[1].start()
                    clean = wait_state(mount, "clean")
                    total = clean["nodes"][1]["resync_total"]
                    assert clean["nodes"][1]["resync_done"] == total
                    # exactly the regions marked while it was away were copied
                    # (the storage's last region may be partial): every region
                    # it missed, and few more (ext4 rewrote some blocks with the
                    # bytes they had; a sequential stream marks MARK_AHEAD more)
                    assert (marked - 1) * REGION < total <= marked * REGION, (marked, total)
                    assert len(behind) <= marked <= len(behind) + 4 + MARK_AHEAD, (
                        len(behind), marked,
                    )
                    assert total < size // 8
                    written = file_digests(ext4)
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)
        with loop_of_leg_file(legs[1].path, size) as device:
            fsck = run("fsck.ext4", "-fn", device, check=False)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            (tmp_path / "leg1").mkdir()
            run("mount", "-o", "ro,noload", device, tmp_path / "leg1")
            try:
                assert file_digests(tmp_path / "leg1") == written
            finally:
                run("umount", tmp_path / "leg1", check=False)


# -- the client dies during random writes ----------------------------------------
def test_after_the_client_is_killed_only_marked_regions_resync(tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    with leg_exports(tmp_path, size=512 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            size = storage_size(mount)
            fio = subprocess.Popen(
                [
                    "fio", "--name=crash", f"--filename={mount.file('vol0')}", "--rw=randwrite",
                    "--bs=4k", "--iodepth=16", "--ioengine=libaio", "--direct=1",
                    "--size=48M", "--offset=64M", "--time_based", "--runtime=20",
                    "--randrepeat=0",
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(3)
                os.kill(mount.pid, signal.SIGKILL)
                mount.process.wait(30)
            finally:
                fio.kill()
                fio.wait(30)
        header = newest_header(_slots(legs[0].path))
        assert not header.clean and header.held
        started = time.monotonic()
        with mounted(config, tmp_path / "mnt", options=QUICK_TAKEOVER) as mount:
            # the holder's heartbeat had stopped: taken over without -o force
            assert time.monotonic() - started < 30
            clean = wait_state(mount, "clean")
            total = clean["nodes"][1]["resync_total"]
            assert 0 < total <= 48 * MiB + 2 * REGION, total
            assert "taking over" in mount.log.read_text()
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)


def _slots(path: Path) -> list[bytes]:
    """The two header slots: the last two whole blocks of the leg."""
    end = path.stat().st_size // BLOCK * BLOCK
    with open(path, "rb") as file:
        file.seek(end - 2 * BLOCK)
        return [file.read(BLOCK), file.read(BLOCK)]


# -- a block changed behind the mirror's back ----------------------------------------
def test_verify_finds_a_changed_block_repair_fixes_it_and_reads_repair_it(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            payload = os.urandom(8 * MiB)
            fd = os.open(mount.file("vol0"), os.O_RDWR | os.O_DIRECT)
            try:
                pwrite_direct(fd, 0, payload)
                os.fsync(fd)
                target = 5 * MiB + 8192
                with open(legs[1].path, "r+b") as leg:
                    leg.seek(target)
                    leg.write(b"\xa5" * BLOCK)
                found = run_dstfuse("verify", mount.mountpoint, "vol0")
                assert found.returncode == 1, found.stderr
                assert found.stdout.splitlines()[1:] == [f"{target} {BLOCK}"]
                repaired = run_dstfuse("verify", "--repair", mount.mountpoint, "vol0")
                assert repaired.returncode == 1
                assert repaired.stdout.splitlines()[1:] == [f"{target} {BLOCK} repaired"]
                assert data_area(legs[1], 8 * MiB) == payload
                again = run_dstfuse("verify", mount.mountpoint, "vol0")
                assert again.returncode == 0, again.stdout
                # changed again: a read of the block is served right and repaired
                with open(legs[1].path, "r+b") as leg:
                    leg.seek(target)
                    leg.write(b"\x5a" * BLOCK)
                for _ in range(20):
                    # a write just before the block puts both legs at the same
                    # position, so the tie-break alternates the leg that reads
                    pwrite_direct(fd, target - BLOCK, payload[target - BLOCK : target])
                    assert pread_direct(fd, target, BLOCK) == payload[target : target + BLOCK]
                    if counter(mount, 1, "read_repairs"):
                        break
                assert counter(mount, 1, "read_repairs") == 1
                assert data_area(legs[1], 8 * MiB) == payload
            finally:
                os.close(fd)
            assert mount.umount().returncode == 0


# -- a paused leg -------------------------------------------------------------------------
def test_a_leg_paused_for_less_than_its_budget_loses_no_writes(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs, region_size="1M")
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            expected = bytearray(32 * MiB)
            fd = os.open(mount.file("vol0"), os.O_RDWR | os.O_DIRECT)
            stop_writing = threading.Event()
            errors: list[BaseException] = []

            def writer() -> None:
                rng = random.Random(3)
                try:
                    while not stop_writing.is_set():
                        offset = rng.randrange(0, 32 * MiB // BLOCK - 16) * BLOCK
                        data = rng.randbytes(rng.choice([1, 4, 16]) * BLOCK)
                        pwrite_direct(fd, offset, data)
                        expected[offset : offset + len(data)] = data
                except BaseException as exc:  # handed to the test thread
                    errors.append(exc)

            thread = threading.Thread(target=writer)
            thread.start()
            try:
                time.sleep(1)
                legs[1].signal(signal.SIGSTOP)
                time.sleep(1.5)
                legs[1].signal(signal.SIGCONT)
                time.sleep(2)
            finally:
                stop_writing.set()
                thread.join(60)
            os.fsync(fd)
            os.close(fd)
            assert not errors, errors
            wait_state(mount, "clean")
            assert mount.umount().returncode == 0
        assert data_area(legs[0], 32 * MiB) == bytes(expected)
        assert data_area(legs[1], 32 * MiB) == bytes(expected)


# -- one writer -----------------------------------------------------------------------------
def test_a_second_mount_of_a_held_storage_is_refused(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            (tmp_path / "mnt2").mkdir()
            second = run_dstfuse("mount", config, tmp_path / "mnt2", timeout=60)
            assert second.returncode != 0
            message = second.stderr.strip()
            assert "storage vol0 is mounted by" in message and "-o force" in message, message
            assert len(message.splitlines()) == 1
            assert mount.umount().returncode == 0


# -- split brain --------------------------------------------------------------------------
async def _write_alone(paths: list[Path], alive: int, offset: int, payload: bytes) -> None:
    """A mount that sees only leg `alive` (the other is unreachable) and
    writes: real Mirror code on the legs' files, outside `dstfuse mount`,
    whose assembly refuses to start with an unreachable node."""
    import trio

    async with trio.open_nursery() as nursery:
        nodes = []
        for index, path in enumerate(paths):
            if index == alive:
                node = LocalNode(path)
                await node.start(nursery)
            else:
                node = MemoryNode(f"unreachable{index}", 0)  # never started: offline
            nodes.append((node, None))
        # forced: the other leg may be newer for all this leg knows
        mirror = Mirror("vol0", nodes, {"client_name": "alone:1", "force": True})
        await mirror.start(nursery)
        assert mirror.state == "degraded"
        await mirror.write(offset, payload)
        await mirror.aclose()
        await nodes[alive][0].aclose()
        nursery.cancel_scope.cancel()


def test_split_brain_is_detected_and_primary_chooses_the_survivor(tmp_path):
    import trio

    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            assert mount.umount().returncode == 0
        for leg in legs:
            leg.stop()
        paths = [leg.path for leg in legs]
        trio.run(_write_alone, paths, 0, 0, b"A" * BLOCK)
        trio.run(_write_alone, paths, 1, REGION, b"B" * BLOCK)
        for leg in legs:
            leg.start()
        (tmp_path / "mnt").mkdir(exist_ok=True)
        refused = run_dstfuse("mount", config, tmp_path / "mnt", timeout=60)
        assert refused.returncode != 0
        assert "split brain" in refused.stderr and "-o primary=0 or -o primary=1" in refused.stderr
        with mounted(config, tmp_path / "mnt", options=["primary=1"]) as mount:
            wait_state(mount, "clean")
            size = storage_size(mount)
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)
        assert data_area(legs[0], REGION + BLOCK)[REGION:] == b"B" * BLOCK
        assert data_area(legs[0], BLOCK) == bytes(BLOCK)  # leg 0's write was given up


# -- reads spread, memory bounded --------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_reads_spread_over_both_legs_and_memory_stays_bounded(tmp_path):
    """8 GiB legs, random 4 KiB writes and reads over all of them: both
    legs serve reads, and the client stays far below 200 MiB."""
    with leg_exports(tmp_path, size=8 * GiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            size = storage_size(mount)
            before = [counter(mount, node, "bytes_read") for node in (0, 1)]
            fd = os.open(mount.file("vol0"), os.O_RDWR | os.O_DIRECT)
            rng = random.Random(5)
            written = {}
            try:
                for _ in range(600):
                    offset = rng.randrange(0, size // BLOCK) * BLOCK
                    written[offset] = rng.randbytes(BLOCK)
                    pwrite_direct(fd, offset, written[offset])
                for offset, data in rng.sample(sorted(written.items()), 300):
                    assert pread_direct(fd, offset, BLOCK) == data
            finally:
                os.close(fd)
            grown = [counter(mount, node, "bytes_read") - before[node] for node in (0, 1)]
            assert all(amount >= 50 * BLOCK for amount in grown), grown
            assert rss_bytes(mount.pid) < 200 * MiB
            assert mount.umount().returncode == 0


# -- a full resync under the rate limit --------------------------------------------------
def test_a_full_resync_of_1g_keeps_to_the_rate_limit_and_shows_progress(tmp_path):
    with leg_exports(tmp_path, size=GiB) as legs:
        with open(legs[0].path, "r+b") as leg:
            for offset in range(0, GiB - 64 * MiB, 128 * MiB):  # data in 8 places
                leg.seek(offset)
                leg.write(os.urandom(4 * MiB))
        # 8 s of resync: each `dstfuse status` is a process start (0.3-1 s
        # on a loaded machine), so progress is seen several times
        rate = 128 * MiB
        config = mirror_config(tmp_path, legs, resync_rate=f"{rate}")
        with mounted(config, tmp_path / "mnt") as mount:
            started = time.monotonic()
            seen = []
            while (current := status(mount))["state"] != "clean":
                seen.append(current["nodes"][1]["resync_done"])
                assert time.monotonic() - started < 60, mount.log_tail()
                time.sleep(0.3)
            elapsed = time.monotonic() - started
            total = current["nodes"][1]["resync_total"]
            size = storage_size(mount)
            assert total == size > GiB - 8 * MiB
            assert elapsed >= total / rate - 1.5, elapsed
            assert len(set(seen)) >= 4, seen  # progress moved while we watched
            assert seen == sorted(seen)
            assert rss_bytes(mount.pid) < 200 * MiB
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)


def test_leg_layout_matches_what_the_mount_reports(tmp_path):
    """The storage size a mount reports is the leg's data capacity."""
    with leg_exports(tmp_path, size=96 * MiB + 12345) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            assert storage_size(mount) == leg_layout(96 * MiB + 12345, REGION).data_capacity
            assert status(mount)["nodes"][0]["read_repairs"] == 0
            assert mount.umount().returncode == 0
        assert newest_header(_slots(legs[0].path)).clean


def test_a_mirror_mounts_degraded_with_a_leg_down_and_resyncs_it_when_it_comes(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            size = storage_size(mount)
            assert mount.umount().returncode == 0
        legs[1].stop()
        # Leg 0 cannot prove leg 1 missed nothing: a plain mount waits for
        # leg 1 and refuses; the user says go on without it.
        refused = run_dstfuse("mount", "-o", "mount_wait=1s", config, tmp_path / "mnt", timeout=60)
        assert refused.returncode != 0
        assert "leg 1" in refused.stderr and "may hold newer data" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        with mounted(config, tmp_path / "mnt", options=["force"]) as mount:
            degraded = status(mount)
            assert degraded["state"] == "degraded"
            assert degraded["nodes"][1]["state"] == "offline"
            payload = os.urandom(3 * MiB)
            with open(mount.file("vol0"), "r+b", buffering=0) as f:
                f.write(payload)
            legs[1].start()
            clean = wait_state(mount, "clean")
            assert 0 < clean["nodes"][1]["resync_total"] <= REGION
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)
        assert data_area(legs[1], size)[: len(payload)] == payload

"""`dstfuse reload` adds and removes mirror legs online: real `dstfuse
export` legs, a real mount, ext4 on its loop device under fio verify load
(a leg added, then an old one removed from the front); a client killed
(kill -9) while a new leg is copied, or in the middle of removing a middle
leg; the last up-to-date leg cannot be removed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dstfuse.mirror.metadata import MEMBER_FULL_RESYNC, newest_header

from .mounts import (
    ext4_mounted,
    force_unmount,
    loop_device,
    mounted,
    require_loop,
    run,
    run_dstfuse,
    write_config,
)
from .test_mirror_e2e import (
    QUICK_TAKEOVER,
    LegExport,
    _slots,
    data_area,
    leg_exports,
    mirror_config,
    status,
    storage_size,
    wait_marked,
    wait_state,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: fio segments of the load: each writes this much at random, then verifies it
SEGMENT = "24M"
SEGMENT_TIMEOUT = 120.0
MAX_SEGMENTS = 40


def reload(mountpoint: Path) -> subprocess.CompletedProcess:
    return run_dstfuse("reload", mountpoint, timeout=90)


def legs_config(tmp_path: Path, legs: list[LegExport], **options: object) -> Path:
    return mirror_config(tmp_path, legs, **options)


class FioLoad:
    """fio verify segments one after another on a file in the ext4 until
    stopped (at most MAX_SEGMENTS, each bounded by SEGMENT_TIMEOUT): each
    writes SEGMENT at random with crc32c verify headers, then reads it all
    back and checks it (verify_fatal). `failures` lists what went wrong."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segments = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fio-load", daemon=True)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> FioLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(SEGMENT_TIMEOUT + 30)
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(30)

    def _run(self) -> None:
        while not self._stop.is_set() and self.segments < MAX_SEGMENTS and not self.failures:
            number = self.segments
            self._process = subprocess.Popen(
                [
                    "fio", f"--name=load{number}",
                    f"--filename={self.directory / f'load-{number % 2}.dat'}",
                    f"--size={SEGMENT}", "--rw=randwrite", "--bsrange=4k-64k",
                    "--direct=1", "--ioengine=libaio", "--iodepth=8",
                    "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                    f"--randseed={4242 + number}", "--verify_state_save=0",
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                _, errors = self._process.communicate(timeout=SEGMENT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(30)
                self.failures.append(f"fio segment {number} stalled past {SEGMENT_TIMEOUT} s")
                return
            if self._process.returncode != 0:
                self.failures.append(
                    f"fio segment {number} exited {self._process.returncode}: "
                    f"{errors.decode(errors='replace')[-2000:]}"
                )
                return
            self.segments += 1


def wait_copying(mount, leg: int, timeout: float = 60.0) -> dict:
    """Until leg `leg` resyncs and has copied something: its status row."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = status(mount)["nodes"]
        if len(nodes) > leg and nodes[leg]["state"] == "resyncing":
            if 0 < nodes[leg]["resync_done"] < nodes[leg]["resync_total"]:
                return nodes[leg]
        if time.monotonic() > deadline:
            raise AssertionError(f"leg {leg} is not being copied: {nodes}\n{mount.log_tail()}")
        time.sleep(0.1)


def wait_nodes(mount, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(status(mount)["nodes"]) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"not {count} nodes: {status(mount)}\n{mount.log_tail()}")
        time.sleep(0.1)


def single_line_refusal(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].endswith("; nothing applied"), lines[0]
    return lines[0]


def test_a_leg_added_under_fio_load_is_brought_up_to_date_then_an_old_leg_removed(tmp_path):
    require_loop()
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    with leg_exports(tmp_path, count=3, size=128 * MiB) as legs:
        # The rate makes the copy of the new leg overlap the load.
        config = legs_config(tmp_path, legs[:2], resync_rate="24M")
        mountpoint = tmp_path / "mnt"
        with mounted(config, mountpoint, options=["assume_clean"]) as mount:
            size = storage_size(mount)
            with loop_device(mount.file("vol0")) as device:
                with ext4_mounted(device, tmp_path / "ext4") as ext4, FioLoad(ext4) as load:
                    time.sleep(2)
                    legs_config(tmp_path, legs, resync_rate="24M")
                    done = reload(mountpoint)
                    assert done.returncode == 0, done.stderr
                    assert "leg 2 (" in done.stdout and "added, not up to date" in done.stdout
                    copying = wait_copying(mount, 2)
                    assert copying["resync_total"] >= size
                    assert status(mount)["state"] == "resyncing"
                    assert mount.control("vol0", "n-0-2", "disk").strip() == "inconsistent"
                    clean = wait_state(mount, "clean", timeout=180)
                    assert [node["state"] for node in clean["nodes"]] == ["clean"] * 3
                    segments = load.segments
                    while load.segments < segments + 1 and not load.failures:
                        time.sleep(0.2)  # one whole segment on three legs
                    # The old leg 0 goes (replace a node), under the same load:
                    # the others are renumbered.
                    legs_config(tmp_path, legs[1:], resync_rate="24M")
                    done = reload(mountpoint)
                    assert done.returncode == 0, done.stderr
                    assert "leg 0 (" in done.stdout and "removed" in done.stdout, done.stdout
                    assert "renumbered" in done.stdout, done.stdout
                    wait_nodes(mount, 2)
                    assert wait_state(mount, "clean")["state"] == "clean"
                    for position, leg in enumerate(legs[1:]):
                        shown = mount.control("vol0", f"n-0-{position}", "type")
                        assert leg.listen.removeprefix("unix:") in shown, shown
                        assert mount.control("vol0", f"n-0-{position}", "disk").strip() == (
                            "up_to_date"
                        )
                    segments = load.segments
                    while load.segments < segments + 1 and not load.failures:
                        time.sleep(0.2)  # one whole segment on two legs
                assert load.failures == [], load.failures
                assert load.segments >= 2
                run("fsck.ext4", "-f", "-n", device)
            log = mount.log_tail(400)
            assert "vol0 leg 2" in log and "added at generation" in log
            assert "renumbered at generation" in log and "leg 1 is now leg 0" in log
            assert mount.umount().returncode == 0
        first = data_area(legs[1], size)
        assert data_area(legs[2], size) == first
        # The removed leg says it is not up to date; the others renumbered.
        assert not _header(legs[0]).self_record.in_sync
        for position, leg in enumerate(legs[1:]):
            header = _header(leg)
            assert header.leg_index == position and len(header.members) == 2
            assert header.renumbered is not None and header.renumbered.removed == 0b1
        # The new config mounts clean at once: nothing to copy.
        with mounted(legs_config(tmp_path, legs[1:]), mountpoint) as mount:
            shown = status(mount)
            assert shown["state"] == "clean", shown
            assert [node["state"] for node in shown["nodes"]] == ["clean", "clean"]
            assert all(node["resync_total"] == 0 for node in shown["nodes"]), shown
            with loop_device(mount.file("vol0")) as device:
                run("fsck.ext4", "-f", "-n", device)
            assert mount.umount().returncode == 0
        assert data_area(legs[2], size) == data_area(legs[1], size) == first


def write_spread(mount, payload: bytes, end: int, step: int) -> None:
    """`payload` at every `step` bytes of [0, end) of vol0, then fsync."""
    fd = os.open(mount.file("vol0"), os.O_WRONLY)
    try:
        for offset in range(0, end, step):
            os.pwrite(fd, payload, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(leg: LegExport):
    return newest_header(_slots(leg.path))


def test_a_client_killed_while_a_new_leg_is_copied_ends_clean_with_either_config(tmp_path):
    with leg_exports(tmp_path, count=3, size=64 * MiB) as legs:
        old = legs_config(tmp_path, legs[:2], resync_rate="4M")
        mountpoint = tmp_path / "mnt"
        with mounted(old, mountpoint, options=["assume_clean"]) as mount:
            size = storage_size(mount)
            payload = os.urandom(MiB)
            write_spread(mount, payload, 64 * MiB, 4 * MiB)
            new = legs_config(tmp_path, legs, resync_rate="4M")
            done = reload(mountpoint)
            assert done.returncode == 0, done.stderr
            wait_copying(mount, 2)
            os.kill(mount.pid, signal.SIGKILL)
            mount.process.wait(30)
        # The new leg is recorded nowhere as up to date.
        added = _header(legs[2])
        assert not added.self_record.in_sync
        for leg in legs[:2]:
            row = _header(leg).member(2)
            assert row is not None and not row.in_sync and row.flags & MEMBER_FULL_RESYNC
        # The old config: the two legs agree, the third is not looked at.
        old = legs_config(tmp_path, legs[:2])
        with mounted(old, mountpoint, options=QUICK_TAKEOVER) as mount:
            wait_state(mount, "clean")
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)
        # The new config: the third leg is copied in full and ends identical.
        new = legs_config(tmp_path, legs)
        with mounted(new, mountpoint) as mount:
            clean = wait_state(mount, "clean", timeout=120)
            assert clean["nodes"][2]["resync_total"] >= size
            fd = os.open(mount.file("vol0"), os.O_RDONLY)
            try:
                assert os.pread(fd, MiB, 60 * MiB) == payload
            finally:
                os.close(fd)
            assert mount.umount().returncode == 0
        first = data_area(legs[0], size)
        assert data_area(legs[1], size) == first
        assert data_area(legs[2], size) == first
        assert _header(legs[2]).self_record.in_sync


def test_a_leg_holding_another_storage_is_refused_and_nothing_is_applied(tmp_path):
    with leg_exports(tmp_path, count=4, size=64 * MiB) as legs:
        # Legs 2 and 3 hold a storage of their own first.
        with mounted(
            legs_config(tmp_path, legs[2:]), tmp_path / "mnt", options=["assume_clean"]
        ) as mount:
            assert mount.umount().returncode == 0
        foreign = _header(legs[2]).storage_id
        mountpoint = tmp_path / "mnt"
        with mounted(
            legs_config(tmp_path, legs[:2]), mountpoint, options=["assume_clean"]
        ) as mount:
            legs_config(tmp_path, legs[:3])
            line = single_line_refusal(reload(mountpoint))
            assert f"holds another mirror storage (id {foreign.hex()[:8]})" in line, line
            assert len(status(mount)["nodes"]) == 2
            assert mount.control(".reload").startswith("refused ")
            assert mount.umount().returncode == 0
        assert _header(legs[2]).storage_id == foreign
        assert _header(legs[0]).member(2) is None


def test_the_last_up_to_date_leg_cannot_be_removed(tmp_path):
    with leg_exports(tmp_path, count=3, size=64 * MiB) as legs:
        # Slow enough that legs 0 and 1 are still copied (16 s each) at the reload.
        config = legs_config(tmp_path, legs, resync_rate="4M")
        mountpoint = tmp_path / "mnt"
        with mounted(config, mountpoint, options=["assume_clean"]) as mount:
            for leg in (0, 1):
                (mountpoint / ".dst" / "vol0" / f"n-0-{leg}" / "dirty").write_text("1\n")
            wait_copying(mount, 0)
            assert [node["state"] for node in status(mount)["nodes"]][2] == "clean"
            legs_config(tmp_path, legs[:2], resync_rate="4M")
            line = single_line_refusal(reload(mountpoint))
            assert "cannot remove leg(s) 2: no remaining leg is up to date" in line, line
            assert len(status(mount)["nodes"]) == 3
            assert mount.control("vol0", "n-0-2", "disk").strip() == "up_to_date"
            assert mount.control(".reload").startswith("refused ")
            assert "removal started" not in mount.log_tail(400)


def test_a_removed_leg_is_never_taken_as_up_to_date_by_the_old_config(tmp_path):
    """The last leg is removed, the storage written without it, the client
    killed: a mount of the old config (with the leg) copies it back in full
    and ends with three identical legs holding the new data."""
    with leg_exports(tmp_path, count=3, size=64 * MiB) as legs:
        old = legs_config(tmp_path, legs)
        mountpoint = tmp_path / "mnt"
        with mounted(old, mountpoint, options=["assume_clean", "bitmap_idle=1s"]) as mount:
            size = storage_size(mount)
            legs_config(tmp_path, legs[:2])
            done = reload(mountpoint)
            assert done.returncode == 0, done.stderr
            wait_nodes(mount, 2)
            payload = os.urandom(MiB)
            write_spread(mount, payload, 32 * MiB, 2 * MiB)
            # The two legs went on: the bitmap no longer says what leg 2 missed.
            wait_marked(mount, 0)
            os.kill(mount.pid, signal.SIGKILL)
            mount.process.wait(30)
        assert not _header(legs[2]).self_record.in_sync
        old = legs_config(tmp_path, legs)
        with mounted(old, mountpoint, options=QUICK_TAKEOVER) as mount:
            clean = wait_state(mount, "clean", timeout=120)
            assert clean["nodes"][2]["resync_total"] >= size
            assert mount.umount().returncode == 0
        first = data_area(legs[0], size)
        assert first[2 * MiB : 3 * MiB] == payload
        assert data_area(legs[1], size) == first
        assert data_area(legs[2], size) == first


def test_a_leg_back_in_a_longer_config_while_offline_is_copied_in_full(tmp_path):
    """A leg left out of the config, the storage written without it (the
    bitmap cleared), then a config with it again mounted with -o force
    while it is unreachable: when it comes online it is copied in full,
    although its own header still says in sync."""
    with leg_exports(tmp_path, count=3, size=64 * MiB) as legs:
        mountpoint = tmp_path / "mnt"
        with mounted(legs_config(tmp_path, legs), mountpoint, options=["assume_clean"]) as mount:
            size = storage_size(mount)
            assert mount.umount().returncode == 0
        short = legs_config(tmp_path, legs[:2])
        with mounted(short, mountpoint, options=["bitmap_idle=1s"]) as mount:
            payload = os.urandom(MiB)
            write_spread(mount, payload, 32 * MiB, 2 * MiB)
            wait_marked(mount, 0)
            assert mount.umount().returncode == 0
        assert _header(legs[2]).self_record.in_sync
        legs[2].stop()
        config = legs_config(tmp_path, legs)
        with mounted(config, mountpoint, options=["force"]) as mount:
            legs[2].start()
            clean = wait_state(mount, "clean", timeout=120)
            assert clean["nodes"][2]["resync_total"] >= size
            assert mount.umount().returncode == 0
        first = data_area(legs[0], size)
        assert first[2 * MiB : 3 * MiB] == payload
        assert data_area(legs[2], size) == first


def wait_header(leg: LegExport, what: str, test, mount, timeout: float = 60.0):
    """Until `test(header)` holds for leg's newest header on disk."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            header = _header(leg)
        except Exception:  # a slot being written: read again
            header = None
        if header is not None and test(header):
            return header
        if time.monotonic() > deadline:
            raise AssertionError(f"{leg.path}: never {what}: {header}\n{mount.log_tail()}")
        time.sleep(0.05)


#: A frozen export (SIGSTOP) keeps its connection and its requests pending
#: for a minute: the client is held at a chosen step of a removal.
PATIENT_TIMEOUTS = {"resend": "10s", "max_resends": 6, "keepalive": "30s", "connect": "2s"}


def patient_config(tmp_path: Path, legs: list[LegExport]) -> Path:
    storage = {"algorithm": "mirror", "nodes": [{"remote": leg.listen} for leg in legs]}
    return write_config(tmp_path / "storage.yaml", {"vol0": storage}, timeouts=PATIENT_TIMEOUTS)


@pytest.mark.parametrize("crash", ["half_renumbered", "recorded_not_renumbered"])
def test_a_client_killed_while_removing_a_middle_leg_ends_clean(tmp_path, crash):
    """Leg 1 of three is removed and the client killed (kill -9) at one of
    two points, held there by freezing exports (SIGSTOP): after every leg
    recorded the removal but before any renumbered header
    (`recorded_not_renumbered`: leg 1's own header write hangs), or after
    leg 0 took the renumbered header and leg 2 not (`half_renumbered`: leg
    2's export is frozen then). The new config mounts and ends clean with
    the data intact and the legs identical; the old config, once any leg is
    renumbered, is refused with one line (it lists the removed leg before
    a remaining one: mounting it would renumber the legs back)."""
    with leg_exports(tmp_path, count=3, size=64 * MiB) as legs:
        old = patient_config(tmp_path, legs)
        mountpoint = tmp_path / "mnt"
        # leg_timeout long enough that a frozen leg is not given up in the window
        options = ["assume_clean", "leg_timeout=60s", "bitmap_idle=600s"]
        with mounted(old, mountpoint, options=options) as mount:
            size = storage_size(mount)
            payload = os.urandom(MiB)
            write_spread(mount, payload, 32 * MiB, 2 * MiB)
            legs[1].signal(signal.SIGSTOP)  # its own header write (step 2) hangs
            patient_config(tmp_path, [legs[0], legs[2]])
            done = reload(mountpoint)
            assert done.returncode == 0, done.stderr
            assert "leg 1 (" in done.stdout and "renumbered" in done.stdout, done.stdout
            for leg in (legs[0], legs[2]):
                wait_header(leg, "recording the removal", lambda h: h.removing == 0b010, mount)
            if crash == "half_renumbered":
                legs[2].signal(signal.SIGSTOP)
                legs[1].signal(signal.SIGCONT)
                wait_header(legs[0], "renumbered", lambda h: h.renumbered is not None, mount)
            os.kill(mount.pid, signal.SIGKILL)
            mount.process.wait(30)
        # Frozen exports are killed, so nothing queued to them lands later.
        for leg in legs[1:]:
            leg.signal(signal.SIGKILL)
            leg.start()
        left = _header(legs[2])
        assert left.renumbered is None and left.leg_index == 2 and left.removing == 0b010
        old = legs_config(tmp_path, legs)
        if crash == "half_renumbered":
            first = _header(legs[0])
            assert first.renumbered is not None and first.renumbered.removed == 0b010
            assert len(first.members) == 2
            try:
                done = run_dstfuse(
                    "mount", "-o", ",".join(QUICK_TAKEOVER), old, mountpoint, timeout=60
                )
            finally:
                force_unmount(mountpoint)
            assert done.returncode != 0
            lines = done.stderr.splitlines()
            assert len(lines) == 1, done.stderr
            assert "node(s) 1 of the config were removed from this mirror" in lines[0], lines
        else:
            assert _header(legs[0]).renumbered is None
        new = legs_config(tmp_path, [legs[0], legs[2]])
        with mounted(new, mountpoint, options=QUICK_TAKEOVER) as mount:
            clean = wait_state(mount, "clean", timeout=120)
            assert len(clean["nodes"]) == 2
            fd = os.open(mount.file("vol0"), os.O_RDONLY)
            try:
                for offset in range(0, 32 * MiB, 2 * MiB):
                    assert os.pread(fd, MiB, offset) == payload, offset
            finally:
                os.close(fd)
            assert mount.umount().returncode == 0
        first = data_area(legs[0], size)
        assert data_area(legs[2], size) == first
        for position, leg in enumerate((legs[0], legs[2])):
            header = _header(leg)
            assert header.leg_index == position and len(header.members) == 2
            assert header.renumbered is not None and header.renumbered.removed == 0b010
            assert header.self_record.in_sync and header.clean
        # The next mount of the new config is clean at once.
        with mounted(new, mountpoint) as mount:
            shown = status(mount)
            assert shown["state"] == "clean", shown
            assert mount.umount().returncode == 0

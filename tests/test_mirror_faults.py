"""The mirror under compound faults, for real (issue 9): real `dstfuse
export` processes as legs, a real mount, faults done to the processes.

- a leg the others left behind is never served: the mount waits for the
  newer leg, then refuses with one line that names it and the way out;
- a holder frozen past its lease never writes over the next holder, not
  even with writes it had in flight when it froze: the taker takes every
  leg's write grant, so the nodes refuse the old holder (node-side fencing);
- a second mount never displaces a holder whose heartbeat moves;
- a killed or frozen leg stalls writes for about `leg_timeout`, not for the
  whole resend budget (the default config, as a user runs it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from .mounts import force_unmount, free_tcp_port, mounted, run_dstfuse, write_config
from .soak import Relay
from .test_mirror_e2e import (
    BLOCK,
    FAST_TIMEOUTS,
    QUICK_TAKEOVER,
    REGION,
    LegExport,
    MiB,
    counter,
    data_area,
    leg_exports,
    mirror_config,
    pread_direct,
    pwrite_direct,
    status,
    storage_size,
    wait_state,
)

pytestmark = pytest.mark.slow


def write_block(mount, offset: int, payload: bytes) -> None:
    fd = os.open(mount.file("vol0"), os.O_RDWR | os.O_DIRECT)
    try:
        pwrite_direct(fd, offset, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_block(mount, offset: int) -> bytes:
    fd = os.open(mount.file("vol0"), os.O_RDONLY | os.O_DIRECT)
    try:
        return pread_direct(fd, offset, BLOCK)
    finally:
        os.close(fd)


def refused_mount(config, mountpoint, options: str) -> str:
    """`dstfuse mount -o options` at a new `mountpoint`, which must be
    refused; its message (unmounted at once if it mounted: the bug)."""
    mountpoint.mkdir()
    try:
        refused = run_dstfuse("mount", "-o", options, config, mountpoint, timeout=120)
    finally:
        force_unmount(mountpoint)
    assert refused.returncode != 0, "the mount was not refused"
    return refused.stderr.strip()


def assert_mounts_with(config, mountpoint, block0: bytes, legs, options=()) -> None:
    """A mount with every leg back reads `block0` at offset 0, gets clean,
    unmounts, and leaves the legs' data identical."""
    with mounted(config, mountpoint, options=options) as mount:
        assert read_block(mount, 0) == block0
        wait_state(mount, "clean")
        size = storage_size(mount)
        assert mount.umount().returncode == 0
    assert data_area(legs[0], size) == data_area(legs[1], size)


# -- 1. no silent rollback ------------------------------------------------------------
@pytest.mark.parametrize("ending", ["umount", "client crash"])
def test_a_leg_left_behind_is_never_mounted_as_the_newest(tmp_path, ending):
    new = os.urandom(BLOCK)
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            write_block(mount, 0, b"o" * BLOCK)
            legs[1].signal(signal.SIGKILL)
            write_block(mount, 0, new)  # degraded: leg 0 alone has it
            assert status(mount)["nodes"][1]["disk"] == "outdated"
            if ending == "umount":
                assert mount.umount().returncode == 0
            else:
                os.kill(mount.pid, signal.SIGKILL)
                mount.process.wait(30)
        legs[0].stop()
        legs[1].start()
        started = time.monotonic()
        message = refused_mount(config, tmp_path / "mnt2", "mount_wait=3s,holder_timeout=2s")
        assert len(message.splitlines()) == 1, message
        assert "leg 0" in message and "may hold newer data" in message, message
        assert "-o primary=1" in message and "force" in message, message
        assert time.monotonic() - started >= 3
        # with the newer leg back, the mount takes it as the source
        legs[0].start()
        # after a crash, the dead holder's heartbeat is watched for 3 s, not 7
        options = QUICK_TAKEOVER if ending == "client crash" else []
        assert_mounts_with(config, tmp_path / "mnt2", new, legs, options)


def wait_disk(mount, leg: int, disk: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (current := status(mount)["nodes"][leg]["disk"]) != disk:
        assert time.monotonic() < deadline, f"leg {leg} is {current}, not {disk}"
        time.sleep(0.2)


def test_a_leg_declared_clean_while_the_source_is_frozen_never_leaves_the_source_behind(
    tmp_path,
):
    """Found by the simulator (seed 7001): a leg becoming in sync (its
    resync done, or the user's `clean`) counted as in sync before the
    source's header recorded it. If the source was frozen just then, it
    was given up after `leg_timeout` (another in-sync leg had completed
    the header) and writes went on with the new leg alone, while the
    source's own header still recorded that leg as being copied: mounted
    alone later, it served the data of before them. Now the new leg is in
    sync only once the source recorded it: the write waits for the source
    (frozen for less than its budget), and a mount of the source alone is
    refused."""
    old, new = b"o" * BLOCK, os.urandom(BLOCK)
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        # the default timeouts (a 32 s budget); a resync too slow to end
        storage = {
            "algorithm": "mirror",
            "nodes": [{"remote": leg.listen} for leg in legs],
            "resync_rate": "64k",
        }
        config = write_config(tmp_path / "storage.yaml", {"vol0": storage})
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            write_block(mount, 0, old)
            (mount.mountpoint / ".dst" / "vol0" / "n-0-1" / "dirty").write_text("1\n")
            wait_disk(mount, 1, "inconsistent")
            writer = None
            legs[0].signal(signal.SIGSTOP)
            try:
                (mount.mountpoint / ".dst" / "vol0" / "n-0-1" / "clean").write_text("1\n")
                # past leg_timeout (4 s): leg 0 would be given up; the whole
                # freeze stays below holder_timeout (7 s) and the budget
                time.sleep(5)
                writer = threading.Thread(target=write_block, args=(mount, 0, new))
                writer.start()
                time.sleep(1)
            finally:
                legs[0].signal(signal.SIGCONT)
            if writer is not None:
                writer.join(60)
                assert not writer.is_alive()
            wait_disk(mount, 1, "up_to_date")
            assert status(mount)["nodes"][0]["disk"] == "up_to_date"
            os.kill(mount.pid, signal.SIGKILL)
            mount.process.wait(30)
        legs[1].stop()
        message = refused_mount(config, tmp_path / "mnt2", "mount_wait=2s,holder_timeout=2s")
        assert "leg 1" in message and "may hold newer data" in message, message
        legs[1].start()
        del storage["resync_rate"]  # the mount with both resyncs at full speed
        config = write_config(tmp_path / "storage.yaml", {"vol0": storage})
        assert_mounts_with(config, tmp_path / "mnt2", new, legs, QUICK_TAKEOVER)


# -- 2. one writer ----------------------------------------------------------------------
def test_a_frozen_holder_never_writes_over_the_next_one(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as first:
            write_block(first, 0, b"1" * BLOCK)
            # (no descriptor of the first mount stays open while it is
            # frozen: the children started meanwhile would close it, and a
            # close waits for the frozen daemon's FLUSH answer)
            os.kill(first.pid, signal.SIGSTOP)
            try:
                with mounted(config, tmp_path / "mnt2", options=["force"]) as second:
                    write_block(second, 0, b"2" * BLOCK)
                    time.sleep(6)  # longer than the first holder's lease (4 s)
                    os.kill(first.pid, signal.SIGCONT)
                    with pytest.raises(OSError) as fenced:
                        write_block(first, 0, b"X" * BLOCK)
                    assert fenced.value.errno == errno.EIO
                    assert status(first)["state"] == "fenced"
                    assert "fenced" in first.log.read_text()
                    write_block(second, BLOCK, b"3" * BLOCK)
                    assert read_block(second, 0) == b"2" * BLOCK
                    assert second.umount().returncode == 0
            finally:
                os.kill(first.pid, signal.SIGCONT)
        for leg in legs:
            assert data_area(leg, BLOCK) == b"2" * BLOCK


#: Writes 4 KiB of one letter at each offset given, with O_DIRECT, from one
#: thread per offset (so they are in flight together); prints one line per
#: write: "written" or "errno N". A process of its own: a descriptor of the
#: frozen mount must not be open in the test process, whose children would
#: close it at exec and wait for the frozen daemon's FLUSH answer.
CONCURRENT_WRITER = """
import mmap, os, sys, threading
path, letter, offsets = sys.argv[1], sys.argv[2].encode(), [int(a) for a in sys.argv[3:]]
results = {}
def write(offset):
    buffer = mmap.mmap(-1, 4096)
    buffer[:] = letter * 4096
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        results[offset] = f"errno {exc.errno}"
        return
    try:
        os.pwritev(fd, [buffer], offset)
        results[offset] = "written"
    except OSError as exc:
        results[offset] = f"errno {exc.errno}"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
threads = [threading.Thread(target=write, args=(offset,)) for offset in offsets]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for offset in offsets:
    print(results[offset])
"""

#: Client 1 of the in-flight test: nothing of it times out while its frames
#: are held and it is frozen (no resend, no keepalive reconnect, no leg
#: timeout, no bitmap clearing), so only fencing can stop its writes.
PATIENT_TIMEOUTS = {"resend": "30s", "max_resends": 2, "keepalive": "30s", "connect": "2s"}
PATIENT_MIRROR = ["leg_timeout=90s", "read_timeout=60s", "bitmap_idle=120s"]


@contextlib.contextmanager
def tcp_leg_exports(tmp_path, count: int = 2, size: int = 64 * MiB):
    """Legs served on 127.0.0.1 (a Relay can stand in front of TCP only)."""
    legs = []
    try:
        for index in range(count):
            path = tmp_path / f"leg{index}.img"
            path.write_bytes(b"")
            os.truncate(path, size)
            leg = LegExport(path, f"127.0.0.1:{free_tcp_port()}", tmp_path / f"leg{index}.log")
            legs.append(leg)
            leg.start()
        yield legs
    finally:
        for leg in legs:
            leg.stop()


def relay_to(leg: LegExport):
    host, port = leg.listen.split(":")
    return Relay(host, int(port)).running()


def wait_in_flight(mount, at_least: int, timeout: float = 20.0) -> None:
    """Until every leg of `mount` has `at_least` transactions in flight."""
    deadline = time.monotonic() + timeout
    while True:
        flights = [counter(mount, leg, "in_flight") for leg in (0, 1)]
        if min(flights) >= at_least:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"in flight per leg: {flights}\n{mount.log_tail()}")
        time.sleep(0.02)


@pytest.mark.parametrize("takeover", ["force", "holder timeout"])
def test_writes_in_flight_when_the_holder_froze_never_land_after_a_takeover(tmp_path, takeover):
    """Client 1 reaches the legs through relays that hold its frames: its
    writes are in flight on both legs when it is frozen. Client 2 takes the
    storage over and writes; then the relays let client 1's frames go and
    client 1 wakes. None of its writes may land: the nodes refuse it."""
    offsets = [BLOCK * n for n in range(1, 5)]  # region 0, marked by the first write
    with tcp_leg_exports(tmp_path) as legs:
        with relay_to(legs[0]) as relay0, relay_to(legs[1]) as relay1:
            relays = [relay0, relay1]
            first_config = write_config(
                tmp_path / "client1.yaml",
                {"vol0": {"algorithm": "mirror",
                          "nodes": [{"remote": relay.address} for relay in relays]}},
                timeouts=PATIENT_TIMEOUTS,
            )
            second_config = write_config(
                tmp_path / "client2.yaml",
                {"vol0": {"algorithm": "mirror",
                          "nodes": [{"remote": leg.listen} for leg in legs]}},
                timeouts=FAST_TIMEOUTS,
            )
            with mounted(
                first_config, tmp_path / "mnt", options=["assume_clean", *PATIENT_MIRROR]
            ) as first:
                write_block(first, 0, b"1" * BLOCK)
                for relay in relays:
                    relay.pause()
                writer = subprocess.Popen(
                    [sys.executable, "-c", CONCURRENT_WRITER, str(first.file("vol0")), "X",
                     *map(str, offsets)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
                try:
                    # two in flight on each leg: at least one is a data write
                    # (a heartbeat has at most one request out per leg)
                    wait_in_flight(first, 2)
                    os.kill(first.pid, signal.SIGSTOP)
                    try:
                        options = ["force"] if takeover == "force" else []
                        with mounted(second_config, tmp_path / "mnt2", options=options) as second:
                            for offset in offsets:
                                write_block(second, offset, b"2" * BLOCK)
                            for relay in relays:
                                relay.resume()  # whatever they held goes on to the nodes
                            time.sleep(1)
                            os.kill(first.pid, signal.SIGCONT)
                            out, err = writer.communicate(timeout=120)
                            assert out.split() == ["errno", "5"] * len(offsets), (out, err)
                            assert status(first)["state"] == "fenced"
                            assert "fenced" in first.log.read_text()
                            for offset in offsets:
                                assert read_block(second, offset) == b"2" * BLOCK
                            wait_state(second, "clean")
                            size = storage_size(second)
                            assert second.umount().returncode == 0
                    finally:
                        os.kill(first.pid, signal.SIGCONT)
                finally:
                    if writer.poll() is None:
                        writer.kill()
                        writer.wait(30)
        expected = b"1" * BLOCK + b"2" * BLOCK * len(offsets)
        for leg in legs:
            assert data_area(leg, len(expected)) == expected, f"{leg.path}: client 1 wrote"
        assert data_area(legs[0], size) == data_area(legs[1], size)


def test_a_second_mount_never_displaces_a_holder_whose_heartbeat_moves(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as first:
            write_block(first, 0, b"1" * BLOCK)
            (tmp_path / "mnt2").mkdir()
            try:
                refused = run_dstfuse(
                    "mount", "-o", "holder_timeout=3s", config, tmp_path / "mnt2", timeout=60
                )
            finally:
                force_unmount(tmp_path / "mnt2")
            assert refused.returncode != 0
            assert "is mounted by" in refused.stderr, refused.stderr
            # the first holder's grants were not touched: it writes on, on
            # the connections it had
            write_block(first, BLOCK, b"2" * BLOCK)
            assert read_block(first, 0) == b"1" * BLOCK
            assert status(first)["state"] == "clean"
            assert [counter(first, leg, "reconnects") for leg in (0, 1)] == [0, 0]
            assert "fenced" not in first.log.read_text()
            assert first.umount().returncode == 0
        for leg in legs:
            assert data_area(leg, 2 * BLOCK) == b"1" * BLOCK + b"2" * BLOCK


def test_a_read_only_mount_of_a_mirror_is_refused_before_it_reaches_a_leg(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        config = mirror_config(tmp_path, legs)
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as first:
            sessions = [leg.log.read_text().count(": connected (") for leg in legs]
            (tmp_path / "mnt2").mkdir()
            try:
                refused = run_dstfuse("mount", "-o", "ro", config, tmp_path / "mnt2", timeout=60)
            finally:
                force_unmount(tmp_path / "mnt2")
            assert refused.returncode != 0
            assert "-o ro: storage vol0 is a mirror" in refused.stderr, refused.stderr
            assert [leg.log.read_text().count(": connected (") for leg in legs] == sessions
            write_block(first, 0, b"1" * BLOCK)
            assert status(first)["state"] == "clean"
            assert first.umount().returncode == 0


# -- 5. a dead or frozen leg stalls writes for leg_timeout, not the budget --------------
class StallMeter:
    """Writes 4 KiB with O_DIRECT (and an fsync every 16 writes) in a loop
    and records the longest time one call took."""

    def __init__(self, path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self._stop = threading.Event()
        self.longest = 0.0
        self.writes = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                pwrite_direct(self._fd, (self.writes % 4096) * BLOCK, os.urandom(BLOCK))
                if self.writes % 16 == 0:
                    os.fsync(self._fd)
                self.longest = max(self.longest, time.monotonic() - started)
                self.writes += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> StallMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(120)
        os.close(self._fd)


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_lost_leg_stalls_writes_for_the_leg_timeout_not_the_budget(tmp_path, fault):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        # the default timeouts: 2 s resend, 15 resends (a 32 s budget)
        storage = {"algorithm": "mirror", "nodes": [{"remote": leg.listen} for leg in legs]}
        config = write_config(tmp_path / "storage.yaml", {"vol0": storage})
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            try:
                with StallMeter(mount.file("vol0")) as meter:
                    time.sleep(1)
                    before = meter.writes
                    legs[1].signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                    # past the stall; one that lasted the budget still ends in
                    # `longest` (the meter's exit waits for its write)
                    time.sleep(8)
                assert meter.error is None, meter.error
                assert meter.writes > before + 100
                # leg_timeout (4 s) plus one read_timeout (2 s), with room
                assert meter.longest < 9, meter.longest
                assert status(mount)["nodes"][1]["disk"] == "outdated"
                print(f"longest write stall ({fault}): {meter.longest:.2f} s")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(legs[1].process.pid, signal.SIGCONT)
            if fault == "kill":
                legs[1].start()
            wait_state(mount, "clean", timeout=120)
            size = storage_size(mount)
            assert mount.umount().returncode == 0
        assert data_area(legs[0], size) == data_area(legs[1], size)


# -- a leg's host reboots and loses what it had not flushed -----------------------------
def test_a_leg_whose_host_rebooted_resyncs_what_it_lost(tmp_path):
    with leg_exports(tmp_path, size=64 * MiB) as legs:
        storage = {"algorithm": "mirror", "nodes": [{"remote": leg.listen} for leg in legs]}
        config = write_config(
            tmp_path / "storage.yaml", {"vol0": storage}, timeouts=FAST_TIMEOUTS,
            unflushed_limit=0,  # the client keeps nothing: the mirror must resync it
        )
        with mounted(config, tmp_path / "mnt", options=["assume_clean"]) as mount:
            write_block(mount, 0, b"F" * BLOCK)  # with fsync: durable on both legs
            saved = legs[1].path.read_bytes()  # what a power loss leaves on its disk
            lost = os.urandom(BLOCK)
            fd = os.open(mount.file("vol0"), os.O_RDWR | os.O_DIRECT)
            try:
                pwrite_direct(fd, 2 * REGION, lost)  # acknowledged, not flushed
                legs[1].signal(signal.SIGKILL)
                legs[1].path.write_bytes(saved)
                legs[1].start(env={"DSTFUSE_BOOT_ID": str(uuid.uuid4())})
                os.fsync(fd)  # the mirror has the write on leg 0: no error
            finally:
                os.close(fd)
            assert read_block(mount, 2 * REGION) == lost
            wait_state(mount, "clean", timeout=120)
            size = storage_size(mount)
            assert mount.umount().returncode == 0
        assert data_area(legs[1], size) == data_area(legs[0], size)
        assert data_area(legs[1], 2 * REGION + BLOCK)[2 * REGION :] == lost

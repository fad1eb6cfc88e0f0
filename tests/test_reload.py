"""`dstfuse reload MOUNTPOINT` on real mounts: a linear storage grows under
a mounted, busy ext4 (losetup -c, online resize2fs, fsck clean, data
intact); refused reloads change nothing and say why; a new timeout takes
effect on the running node; a directory that is no mount gets one line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dstfuse.units import format_size

from .mounts import (
    exported,
    ext4_mounted,
    is_mounted,
    loop_device,
    mounted,
    require_loop,
    run,
    run_dstfuse,
    write_config,
)

MiB = 1 << 20


def image(path: Path, size: int) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def checksums(directory: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(directory))
        if (directory / name).is_file()
    }


def open_files(pid: int) -> set[str]:
    """The paths process `pid` has open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def df_size(directory: Path) -> int:
    """The filesystem's size in bytes, as `df` shows it."""
    return int(run("df", "-B1", "--output=size", directory).stdout.split()[-1])


def reload(mountpoint: Path):
    return run_dstfuse("reload", mountpoint, timeout=90)


def status_json(mountpoint: Path) -> dict:
    done = run_dstfuse("status", "--json", mountpoint, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def layout(mountpoint: Path) -> dict:
    """What a reload may change in `status --json` (not the counters)."""
    return {
        name: (
            storage["state"],
            storage["algorithm"],
            storage["size"],
            [(n["name"], n["type"], n["start"], n["size"], n["state"]) for n in storage["nodes"]],
        )
        for name, storage in status_json(mountpoint)["storages"].items()
    }


class Writer:
    """Writes 1 MiB files into `directory` in a thread until stopped (at
    most `limit` files); `written` holds each file's checksum."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.written: dict[str, str] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for number in range(self.limit):
                if self._stop.is_set():
                    return
                data = os.urandom(MiB)
                name = f"during{number:03d}"
                with open(self.directory / name, "wb") as file:
                    file.write(data)
                    os.fsync(file.fileno())
                self.written[name] = hashlib.sha256(data).hexdigest()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(60)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the writer hangs"
        assert self.error is None, f"write failed: {self.error!r}"


def has_capability(number: int) -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> number & 1)
    return False


CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Filesystem:
    """How to make, grow and check one filesystem kind on a loop device;
    `first` and `second` are the node sizes (xfs needs 300 MiB at least)."""

    kind: str
    first: int
    second: int
    mkfs: tuple[str, ...]
    fsck: tuple[str, ...]

    def grow(self, device: str, directory: Path) -> None:
        if self.kind == "ext4":
            run("resize2fs", device)
        else:
            run("xfs_growfs", directory)


EXT4 = Filesystem("ext4", 32 * MiB, 48 * MiB, ("mkfs.ext4", "-q", "-F"), ("fsck.ext4", "-fn"))
XFS = Filesystem("xfs", 320 * MiB, 64 * MiB, ("mkfs.xfs", "-q", "-f"), ("xfs_repair", "-n"))


@contextlib.contextmanager
def filesystem_mounted(fs: Filesystem, device: str, directory: Path, *, mkfs: bool = True):
    if fs.kind == "ext4":
        with ext4_mounted(device, directory, mkfs=mkfs) as mounted_at:
            yield mounted_at
        return
    directory.mkdir(parents=True, exist_ok=True)
    if mkfs:
        run(*fs.mkfs, device)
    run("mount", "-t", fs.kind, device, directory)
    try:
        yield directory
    finally:
        for command in (["umount", str(directory)], ["umount", "-l", str(directory)]):
            if not is_mounted(directory):
                break
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(command, capture_output=True, timeout=60, check=False)


def require_online_grow(fs: Filesystem) -> None:
    require_loop()
    if fs.kind == "ext4" and not has_capability(CAP_SYS_RESOURCE):
        # ext4's EXT4_IOC_RESIZE_FS demands it; containers often drop it.
        pytest.skip("online resize2fs needs CAP_SYS_RESOURCE, which this process lacks")
    if shutil.which(fs.mkfs[0]) is None:
        pytest.skip(f"{fs.mkfs[0]} is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("fs", [EXT4, XFS], ids=lambda fs: fs.kind)
def test_linear_grows_online_under_a_mounted_filesystem_being_written(tmp_path, fs):
    require_online_grow(fs)
    first = image(tmp_path / "first.img", fs.first)
    second = image(tmp_path / "second.img", fs.second)
    total = fs.first + fs.second
    with exported(first, tmp_path) as one, exported(second, tmp_path) as two:
        nodes = [{"remote": one.address}]
        config = write_config(
            tmp_path / "storage.yaml", {"vol": {"algorithm": "linear", "nodes": nodes}}
        )
        mountpoint = tmp_path / "mnt"
        with mounted(config, mountpoint) as mount:
            with loop_device(mount.file("vol")) as device:
                with filesystem_mounted(fs, device, tmp_path / "fs") as directory:
                    before = os.urandom(8 * MiB)
                    (directory / "before").write_bytes(before)
                    small = df_size(directory)
                    with Writer(directory, limit=12) as writer:
                        grown_nodes = [*nodes, {"remote": two.address}]
                        write_config(config, {"vol": {"algorithm": "linear", "nodes": grown_nodes}})
                        done = reload(mountpoint)
                        assert done.returncode == 0, done.stderr
                        assert done.stdout == (
                            f"applied: storage vol grew from {format_size(fs.first)} to "
                            f"{format_size(total)} (R: {two.address} appended)\n"
                        )
                        assert os.stat(mount.file("vol")).st_size == total
                        assert mount.control("vol", "size") == f"{total}\n"
                        run("losetup", "-c", device)
                        assert int(run("blockdev", "--getsize64", device).stdout) == total
                        fs.grow(device, directory)
                        writer.stop()
                    # df shows (nearly all of) the appended node as new room.
                    assert df_size(directory) - small >= fs.second * 3 // 4
                    # With ext4, more than the old filesystem could ever hold.
                    after = os.urandom((fs.second * 3 // 4) if fs.kind == "ext4" else 8 * MiB)
                    (directory / "after").write_bytes(after)
                    written = checksums(directory)
                    assert written["before"] == hashlib.sha256(before).hexdigest()
                    assert written["after"] == hashlib.sha256(after).hexdigest()
                    assert writer.written, "nothing was written during the reload"
                    for name, digest in writer.written.items():
                        assert written[name] == digest
                check = run(*fs.fsck, device, check=False)
                assert check.returncode == 0, check.stdout + check.stderr
                with filesystem_mounted(fs, device, tmp_path / "fs", mkfs=False) as directory:
                    assert checksums(directory) == written
            state = status_json(mountpoint)
            assert state["reload"]["outcome"] == "applied"
            sizes = [node["size"] for node in state["storages"]["vol"]["nodes"]]
            assert sizes == [fs.first, fs.second]
            human = run_dstfuse("status", mountpoint, timeout=30).stdout
            assert "last reload: applied " in human
            done = mount.umount()
            assert done.returncode == 0, done.stderr


def test_an_idle_loop_device_sees_the_grown_size_when_reload_returns(tmp_path):
    """Nothing else touches the file: the reload itself must have made the
    kernel drop its cached size (attributes are cached for 60 s)."""
    require_loop()
    a, b = image(tmp_path / "a.img", 8 * MiB), image(tmp_path / "b.img", 4 * MiB)
    config = write_config(
        tmp_path / "storage.yaml", {"vol": {"algorithm": "linear", "nodes": [{"local": str(a)}]}}
    )
    mountpoint = tmp_path / "mnt"
    with mounted(config, mountpoint) as mount:
        assert os.stat(mount.file("vol")).st_size == 8 * MiB
        with loop_device(mount.file("vol")) as device:
            nodes = [{"local": str(a)}, {"local": str(b)}]
            write_config(config, {"vol": {"algorithm": "linear", "nodes": nodes}})
            done = reload(mountpoint)
            assert done.returncode == 0, done.stderr
            run("losetup", "-c", device)
            assert int(run("blockdev", "--getsize64", device).stdout) == 12 * MiB
            # The appended node is where the new bytes go.
            data = os.urandom(MiB)
            fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
            try:
                buffer = mmap.mmap(-1, MiB)
                buffer.write(data)
                assert os.pwrite(fd, buffer, 10 * MiB) == MiB
                os.fsync(fd)
            finally:
                os.close(fd)
        assert mount.umount().returncode == 0
    with open(b, "rb") as file:
        file.seek(2 * MiB)
        assert file.read(MiB) == data


def local_storages(a: Path, b: Path, c: Path, d: Path, vol_nodes=None, mirror_nodes=None, **vol):
    return {
        "vol": {
            "algorithm": "linear",
            "nodes": [{"local": str(p)} for p in (vol_nodes or (a, b))],
            **vol,
        },
        "m": {
            "algorithm": "mirror",
            "nodes": [{"local": str(p)} for p in (mirror_nodes or (c, d))],
        },
    }


def test_a_refused_reload_changes_nothing_and_says_why(tmp_path):
    a, b, c, d, e = (image(tmp_path / f"{name}.img", 8 * MiB) for name in "abcde")
    config = write_config(tmp_path / "storage.yaml", local_storages(a, b, c, d))
    original = config.read_text()
    mountpoint = tmp_path / "mnt"
    with mounted(config, mountpoint) as mount:
        baseline = layout(mountpoint)
        bad = {
            "unknown key": (
                original.replace("algorithm: linear", "algorithm: linear\n    stripe: 4"),
                "storages.vol.stripe: unknown key 'stripe'",
            ),
            "shrinking": (
                write_config(
                    tmp_path / "x.yaml", local_storages(a, b, c, d, vol_nodes=(a,))
                ).read_text(),
                "storage vol: node(s) removed from the end (L: "
                + str(b)
                + "): shrinking a linear storage would drop their data",
            ),
            "reordering": (
                write_config(
                    tmp_path / "x.yaml", local_storages(a, b, c, d, vol_nodes=(b, a))
                ).read_text(),
                "storage vol: nodes reordered: linear nodes can only be appended at the end",
            ),
            "algorithm": (
                original.replace("algorithm: linear", "algorithm: mirror"),
                "storage vol: algorithm cannot change online (linear -> mirror)",
            ),
            "mirror leg": (
                write_config(
                    tmp_path / "x.yaml", local_storages(a, b, c, d, mirror_nodes=(c, e))
                ).read_text(),
                f"storage m: leg(s) removed (L: {d}) while others are added: add the new legs "
                "first, then remove the old ones in a reload of their own",
            ),
        }
        for what, (text, reason) in bad.items():
            config.write_text(text)
            done = reload(mountpoint)
            assert done.returncode == 1, what
            assert done.stdout == "", what
            lines = done.stderr.splitlines()
            assert len(lines) == 1, (what, done.stderr)
            assert lines[0].startswith("dstfuse reload: "), what
            assert reason in lines[0], (what, lines[0])
            assert lines[0].endswith("; nothing applied"), what
            assert layout(mountpoint) == baseline, what
            assert os.stat(mount.file("vol")).st_size == 16 * MiB, what
            assert mount.control(".reload").startswith("refused "), what
        # The old config is still the one in effect: reloading it changes nothing.
        config.write_text(original)
        done = reload(mountpoint)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"nothing to change: {config} is what the mount runs\n"
        assert mount.control(".reload").startswith("unchanged ")
        done = mount.umount()
        assert done.returncode == 0, done.stderr


def test_a_reloaded_timeout_is_what_the_running_node_waits(tmp_path):
    disk = image(tmp_path / "disk.img", 8 * MiB)
    with exported(disk, tmp_path) as export:
        storages = {"vol": {"algorithm": "linear", "nodes": [{"remote": export.address}]}}
        config = write_config(
            tmp_path / "storage.yaml", storages, timeouts={"resend": "1s", "max_resends": 40}
        )
        mountpoint = tmp_path / "mnt"
        with mounted(config, mountpoint) as mount:
            write_config(config, storages, timeouts={"resend": "200ms", "max_resends": 2})
            done = reload(mountpoint)
            assert done.returncode == 0, done.stderr
            assert done.stdout == (
                "applied: timeouts.resend 1 -> 0.2; timeouts.max_resends 40 -> 2\n"
            )
            assert "timeouts now resend 0.2s, max_resends 2" in mount.log_tail(200)
            # A frozen node: the old budget (41 s) would still be waiting
            # long after the new one (0.6 s, plus one old interval) is spent.
            outcome: list[int | None] = []

            def read() -> None:
                fd = os.open(mount.file("vol"), os.O_RDONLY)
                try:
                    os.pread(fd, 4096, MiB)
                    outcome.append(None)
                except OSError as exc:
                    outcome.append(exc.errno)
                finally:
                    os.close(fd)

            os.kill(export.process.pid, signal.SIGSTOP)
            try:
                reader = threading.Thread(target=read, daemon=True)
                reader.start()
                reader.join(20)
                assert outcome == [errno.EIO], "the read did not fail within the new budget"
            finally:
                os.kill(export.process.pid, signal.SIGCONT)
            done = mount.umount()
            assert done.returncode == 0, done.stderr


def test_a_storage_added_by_reload_appears_as_a_file_and_takes_writes(tmp_path):
    a, b, c = (image(tmp_path / f"{name}.img", 4 * MiB) for name in "abc")
    vol = {"algorithm": "linear", "nodes": [{"local": str(a)}]}
    config = write_config(tmp_path / "storage.yaml", {"vol": vol})
    mountpoint = tmp_path / "mnt"
    with mounted(config, mountpoint) as mount:
        # A node that cannot be opened: nothing of the new storage stays,
        # not even its node that did open.
        missing = {
            "algorithm": "linear",
            "nodes": [{"local": str(b)}, {"local": str(tmp_path / "missing.img")}],
        }
        write_config(config, {"vol": vol, "more": missing})
        done = reload(mountpoint)
        assert done.returncode == 1
        assert "storage more: node L: " in done.stderr and "nothing applied" in done.stderr
        assert str(a) in open_files(mount.pid)
        assert str(b) not in open_files(mount.pid)
        assert sorted(os.listdir(mountpoint)) == [".dst", "vol"]
        assert sorted(os.listdir(mountpoint / ".dst")) == [".daemon", ".reload", "vol"]

        more = {"algorithm": "linear", "nodes": [{"local": str(b)}, {"local": str(c)}]}
        write_config(config, {"vol": vol, "more": more})
        done = reload(mountpoint)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "applied: storage more added (linear, 8.0 MiB, a new file)\n"
        assert os.stat(mount.file("more")).st_size == 8 * MiB
        assert mount.control("more", "size") == f"{8 * MiB}\n"
        assert [n["type"] for n in status_json(mountpoint)["storages"]["more"]["nodes"]] == [
            f"L: {b}",
            f"L: {c}",
        ]
        data = os.urandom(MiB)
        with open(mount.file("more"), "r+b", buffering=0) as file:
            file.seek(4 * MiB - 4096)  # across the two nodes
            file.write(data)
        done = mount.umount()
        assert done.returncode == 0, done.stderr
    assert b.read_bytes()[-4096:] + c.read_bytes()[: MiB - 4096] == data


def test_an_appended_read_only_node_is_refused_and_closed_again(tmp_path):
    disk = image(tmp_path / "disk.img", 4 * MiB)
    first = image(tmp_path / "first.img", 4 * MiB)
    with exported(disk, tmp_path, args=["--read-only"]) as export:
        vol = {"algorithm": "linear", "nodes": [{"local": str(first)}]}
        config = write_config(tmp_path / "storage.yaml", {"vol": vol})
        mountpoint = tmp_path / "mnt"
        with mounted(config, mountpoint) as mount:
            grown = {"algorithm": "linear", "nodes": [*vol["nodes"], {"remote": export.address}]}
            write_config(config, {"vol": grown})
            done = reload(mountpoint)
            assert done.returncode == 1
            assert done.stderr.startswith(f"dstfuse reload: storage vol: node R: {export.address}")
            assert done.stderr.endswith(
                ") is read-only; appending it would make the whole storage read-only; "
                "nothing applied\n"
            )
            assert os.stat(mount.file("vol")).st_size == 4 * MiB
            assert os.access(mount.file("vol"), os.W_OK)
            # The node that did start was closed again.
            deadline = time.monotonic() + 10
            while "client closed the connection" not in export.log_tail(20):
                assert time.monotonic() < deadline, export.log_tail(20)
                time.sleep(0.1)
            assert mount.umount().returncode == 0


def test_reload_of_a_directory_that_is_no_dstfuse_mount_says_so_in_one_line(tmp_path):
    done = reload(tmp_path)
    assert done.returncode == 1
    assert (
        done.stderr
        == f"dstfuse reload: {tmp_path} is not a dstfuse mount (no {tmp_path}/.dst/.daemon)\n"
    )

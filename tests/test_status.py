"""`dstfuse status`: reading the control tree (dstfuse.statusview) and the
command's output, from fake trees written to a temp directory, from a tree
rendered by dstfuse.control over real nodes, and from a real dead FUSE mount."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from dstfuse.algorithms import Algorithm, ControlFile, Placement
from dstfuse.algorithms.linear import Linear
from dstfuse.cli import COMMANDS
from dstfuse.commands import status as status_command
from dstfuse.control import DAEMON_FILE, ControlDirectory, ControlTree, DaemonInfo
from dstfuse.errors import UserError
from dstfuse.nodes.local import LocalNode
from dstfuse.statusview import (
    ResyncSampler,
    format_duration,
    read_mount_status,
    read_mount_status_within,
    render_status,
    status_json,
)
from dstfuse.storage import Storage

MiB, GiB = 1 << 20, 1 << 30

ZERO_COUNTERS = {
    "requests": 0,
    "bytes_read": 0,
    "bytes_written": 0,
    "resends": 0,
    "reconnects": 0,
    "errors": 0,
    "in_flight": 0,
    "unflushed": 0,
}


# ------------------------------------------------------------ fake trees


def write_tree(directory: Path, tree: dict) -> None:
    """Files as the control tree shows them: text plus a newline."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in tree.items():
        if isinstance(value, dict):
            write_tree(directory / name, value)
        else:
            (directory / name).write_text(f"{value}\n")


def node_files(
    type_: str,
    *,
    start: int,
    size: int,
    status: str = "clean",
    resync: tuple[int, int] = (0, 0),
    online: bool = True,
    **extra: object,
) -> dict:
    files: dict = {
        "type": type_,
        "start": start,
        "size": size,
        "state": "sync" if status == "clean" else "notsync",
        "status": status,
        "flags": f"{'online' if online else 'offline'} rw",
        "resync_done": resync[0],
        "resync_total": resync[1],
        **ZERO_COUNTERS,
    }
    files.update(extra)
    return files


def mirror_extras(read_repairs: int = 0, resync_rate: int = 100 * MiB) -> dict:
    # clean/dirty are write triggers in the real tree; status never reads them.
    return {
        "clean": "",
        "dirty": "",
        "resync_size": 4 * MiB,
        "resync_timeout": 100,
        "read_repairs": read_repairs,
        "resync_rate": resync_rate,
    }


def clean_linear() -> dict:
    return {
        "alg": "linear",
        "name": "lin",
        "size": 3 * GiB,
        "state": "clean",
        "nodes": f"n-0-0 0 {GiB} R: 127.0.0.1:1025\nn-{GiB}-1 {GiB} {2 * GiB} L: /dev/sdb1",
        "n-0-0": node_files(
            "R: 127.0.0.1:1025",
            start=0,
            size=GiB,
            requests=10,
            bytes_read=4096,
            bytes_written=8192,
            resends=2,
            reconnects=1,
            errors=0,
            in_flight=3,
            unflushed=65536,
        ),
        f"n-{GiB}-1": node_files("L: /dev/sdb1", start=GiB, size=2 * GiB),
    }


def degraded_mirror() -> dict:
    return {
        "alg": "mirror",
        "name": "vol0",
        "size": GiB,
        "state": "degraded",
        "nodes": f"n-0-0 0 {GiB} R: 10.0.0.5:1025\nn-0-1 0 {GiB} R: [fd00::6]:1025 disk1",
        "n-0-0": node_files("R: 10.0.0.5:1025", start=0, size=GiB, **mirror_extras(read_repairs=2)),
        "n-0-1": node_files(
            "R: [fd00::6]:1025 disk1",
            start=0,
            size=GiB,
            status="offline",
            online=False,
            resync=(0, 64 * MiB),
            reconnects=7,
            errors=4,
            **mirror_extras(),
        ),
    }


def resyncing_mirror(done: int = 420 * MiB, rate: int = 35 * MiB) -> dict:
    return {
        "alg": "mirror",
        "name": "vol1",
        "size": GiB,
        "state": "resyncing",
        "nodes": f"n-0-0 0 {GiB} L: /srv/a.img\nn-0-1 0 {GiB} R: 127.0.0.1:2000",
        "n-0-0": node_files("L: /srv/a.img", start=0, size=GiB, **mirror_extras()),
        "n-0-1": node_files(
            "R: 127.0.0.1:2000",
            start=0,
            size=GiB,
            status="resyncing",
            resync=(done, GiB),
            resends=5,
            **mirror_extras(resync_rate=rate),
        ),
    }


def make_mount(tmp_path: Path, **storages: dict) -> Path:
    mountpoint = tmp_path / "mnt"
    control = mountpoint / ".dst"
    write_tree(control, storages)
    (control / ".daemon").write_text("pid 1\nconfig /etc/x.yaml\nmountpoint /mnt\nresult -\n")
    return mountpoint


# ------------------------------------------------------------------ JSON


def test_clean_linear_json_has_every_node_field_and_counter(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())
    result = status_json(read_mount_status(mountpoint))
    assert result == {
        "storages": {
            "lin": {
                "state": "clean",
                "algorithm": "linear",
                "size": 3 * GiB,
                "nodes": [
                    {
                        "name": "n-0-0",
                        "type": "R: 127.0.0.1:1025",
                        "state": "clean",
                        "sync": "sync",
                        "flags": "online rw",
                        "start": 0,
                        "size": GiB,
                        "resync_done": 0,
                        "resync_total": 0,
                        "requests": 10,
                        "bytes_read": 4096,
                        "bytes_written": 8192,
                        "resends": 2,
                        "reconnects": 1,
                        "errors": 0,
                        "in_flight": 3,
                        "unflushed": 65536,
                    },
                    {
                        "name": f"n-{GiB}-1",
                        "type": "L: /dev/sdb1",
                        "state": "clean",
                        "sync": "sync",
                        "flags": "online rw",
                        "start": GiB,
                        "size": 2 * GiB,
                        "resync_done": 0,
                        "resync_total": 0,
                        **ZERO_COUNTERS,
                    },
                ],
            }
        }
    }


def test_degraded_mirror_json_shows_the_offline_leg_and_mirror_values(tmp_path):
    mountpoint = make_mount(tmp_path, vol0=degraded_mirror())
    storage = status_json(read_mount_status(mountpoint))["storages"]["vol0"]
    assert storage["state"] == "degraded"
    assert storage["algorithm"] == "mirror"
    assert [node["state"] for node in storage["nodes"]] == ["clean", "offline"]
    offline = storage["nodes"][1]
    assert offline == {
        "name": "n-0-1",
        "type": "R: [fd00::6]:1025 disk1",
        "state": "offline",
        "sync": "notsync",
        "flags": "offline rw",
        "start": 0,
        "size": GiB,
        "resync_done": 0,
        "resync_total": 64 * MiB,
        **ZERO_COUNTERS,
        "reconnects": 7,
        "errors": 4,
        "read_repairs": 0,
        "resync_rate": 100 * MiB,
        "resync_size": 4 * MiB,
        "resync_timeout": 100,
    }
    # Write triggers are never read into the report.
    assert "clean" not in offline and "dirty" not in offline
    assert storage["nodes"][0]["read_repairs"] == 2


def test_hidden_entries_of_the_control_tree_are_not_storages(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())
    (mountpoint / ".dst" / ".hidden-dir").mkdir()
    (mountpoint / ".dst" / "README").write_text("a file, not a storage\n")
    assert list(read_mount_status(mountpoint).storages) == ["lin"]


def test_nodes_are_listed_in_storage_order_not_name_order(tmp_path):
    # n-10-... sorts before n-2-... as text; the map order is by start.
    tree = clean_linear()
    tree["n-2147483648-2"] = node_files("L: /dev/sdc", start=2 * GiB, size=GiB)
    mountpoint = make_mount(tmp_path, lin=tree)
    nodes = read_mount_status(mountpoint).storages["lin"].nodes
    assert [n.start for n in nodes] == [0, GiB, 2 * GiB]


def test_a_node_file_with_garbage_is_a_user_error_naming_the_file(tmp_path):
    tree = clean_linear()
    tree["n-0-0"]["size"] = "lots"
    mountpoint = make_mount(tmp_path, lin=tree)
    with pytest.raises(UserError, match=r"n-0-0/size: expected a number.*'lots'"):
        read_mount_status(mountpoint)


def test_storage_state_is_derived_when_the_tree_has_no_state_file(tmp_path):
    tree = degraded_mirror()
    del tree["state"]
    mountpoint = make_mount(tmp_path, vol0=tree)
    assert read_mount_status(mountpoint).storages["vol0"].state == "degraded"


# ----------------------------------------------------------------- human


def test_human_table_shows_one_block_per_storage_with_node_states(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear(), vol0=degraded_mirror())
    text = render_status(read_mount_status(mountpoint))
    blocks = text.split("\n\n")
    assert len(blocks) == 2
    lin, vol0 = blocks
    assert lin.splitlines()[0] == "lin: clean, linear, 3.0 GiB"
    assert vol0.splitlines()[0] == "vol0: degraded, mirror, 1.0 GiB"
    header = vol0.splitlines()[1].split()
    assert header == "NODE TYPE STATE DISK SIZE RESYNC ERRORS RESENDS RECONNECTS".split()
    clean_row, offline_row = vol0.splitlines()[2:4]
    assert "R: 10.0.0.5:1025" in clean_row and " clean " in clean_row
    assert offline_row.split()[-3:] == ["4", "0", "7"]
    assert " offline " in offline_row and "64.0 MiB to resync" in offline_row
    lin_row = lin.splitlines()[2]
    assert lin_row.split()[-3:] == ["0", "2", "1"]


def test_without_samples_the_resync_rate_limit_bounds_rate_and_eta(tmp_path):
    mountpoint = make_mount(tmp_path, vol1=resyncing_mirror())
    text = render_status(read_mount_status(mountpoint))
    assert text.splitlines()[0] == "vol1: resyncing, mirror, 1.0 GiB"
    row = next(line for line in text.splitlines() if "n-0-1" in line)
    # 604 MiB left at the limit of 35 MiB/s: 17.3 s at best.
    assert " resyncing " in row
    assert "41% 420.0 MiB/1.0 GiB, <=35.0 MiB/s, ETA >=0:17" in row
    other = next(line for line in text.splitlines() if "n-0-0" in line)
    assert " clean " in other and "%" not in other


def test_resync_without_any_rate_shows_progress_only(tmp_path):
    mountpoint = make_mount(tmp_path, vol1=resyncing_mirror(rate=0))
    row = next(
        line
        for line in render_status(read_mount_status(mountpoint)).splitlines()
        if "n-0-1" in line
    )
    assert "41% 420.0 MiB/1.0 GiB" in row and "ETA" not in row and "/s" not in row


def test_sampled_rate_wins_over_the_file_and_restarts_when_progress_goes_back(tmp_path):
    mountpoint = make_mount(tmp_path, vol1=resyncing_mirror(done=100 * MiB))
    sampler = ResyncSampler()
    sampler.add(read_mount_status(mountpoint), now=10.0)
    write_tree(mountpoint / ".dst" / "vol1", resyncing_mirror(done=300 * MiB))
    sampler.add(read_mount_status(mountpoint), now=12.0)
    assert sampler.rate("vol1", "n-0-1") == pytest.approx(100 * MiB)
    text = render_status(read_mount_status(mountpoint), sampler)
    assert "29% 300.0 MiB/1.0 GiB, 100.0 MiB/s, ETA 0:07" in text
    # A new resync (progress went back) starts the average over.
    write_tree(mountpoint / ".dst" / "vol1", resyncing_mirror(done=10 * MiB))
    sampler.add(read_mount_status(mountpoint), now=13.0)
    assert sampler.rate("vol1", "n-0-1") is None


def test_format_duration():
    assert format_duration(17.3) == "0:17"
    assert format_duration(725) == "12:05"
    assert format_duration(3723) == "1:02:03"


# ---------------------------------------------------------------- errors


def test_a_plain_directory_is_not_a_dstfuse_mount(tmp_path):
    with pytest.raises(UserError, match=r"is not a dstfuse mount \(no \.dst") as info:
        read_mount_status(tmp_path)
    assert "\n" not in str(info.value)


def test_a_missing_mountpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        read_mount_status(tmp_path / "nowhere")


def test_a_file_is_not_a_mountpoint(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        read_mount_status(tmp_path / "file")


def test_enotconn_says_the_daemon_is_gone_and_how_to_clean_up(tmp_path, monkeypatch):
    mountpoint = make_mount(tmp_path, lin=clean_linear())
    real_open = open

    def dead_open(path, *args, **kwargs):
        if str(path).startswith(str(mountpoint)):
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", dead_open)
    with pytest.raises(UserError) as info:
        read_mount_status(mountpoint)
    message = str(info.value)
    assert "daemon serving this mount is gone" in message
    assert f"dstfuse umount {mountpoint}" in message
    assert "\n" not in message


def test_a_daemon_that_does_not_answer_is_given_up_on(tmp_path, monkeypatch):
    import threading

    import dstfuse.statusview as statusview

    release = threading.Event()

    def stuck(mountpoint):
        release.wait(10)
        raise AssertionError("not reached in time")

    monkeypatch.setattr(statusview, "read_mount_status", stuck)
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=r"does not answer within 0.2s.*\.dst/\.daemon"):
            statusview.read_mount_status_within(tmp_path, 0.2)
        assert time.monotonic() - started < 2
    finally:
        release.set()


def test_bounded_read_returns_the_status_and_passes_errors_through(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())
    assert list(read_mount_status_within(mountpoint, 10).storages) == ["lin"]
    with pytest.raises(UserError, match="not a dstfuse mount"):
        read_mount_status_within(tmp_path, 10)


DEAD_FS = textwrap.dedent(
    """
    import sys, pyfuse3, trio
    pyfuse3.init(pyfuse3.Operations(), sys.argv[1], set())
    print("mounted", flush=True)
    trio.run(pyfuse3.main)
    """
)


def _is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_a_real_fuse_mount_whose_daemon_was_killed_reports_daemon_gone(tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", DEAD_FS, str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        if line.strip() != "mounted":
            process.kill()
            pytest.fail(f"test filesystem did not mount: {process.stderr.read()}")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.stat(mountpoint)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    break
            time.sleep(0.05)
        with pytest.raises(UserError, match="daemon serving this mount is gone"):
            read_mount_status(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if _is_mounted(mountpoint):
            done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        process.stdout.close()
        process.stderr.close()
    assert not _is_mounted(mountpoint)


# ---------------------------------------------------------- the command


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_status_json_command_prints_the_contract_object(tmp_path, capsys):
    mountpoint = make_mount(tmp_path, lin=clean_linear(), vol0=degraded_mirror())
    assert status_command.run(parse(["--json", str(mountpoint)])) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"storages"}
    assert {name: s["state"] for name, s in printed["storages"].items()} == {
        "lin": "clean",
        "vol0": "degraded",
    }
    for storage in printed["storages"].values():
        for node in storage["nodes"]:
            assert {"name", "type", "state", "resync_done", "resync_total"} <= set(node)
            assert node["state"] in ("clean", "dirty", "resyncing", "offline")


def test_status_command_prints_the_table(tmp_path, capsys):
    mountpoint = make_mount(tmp_path, vol1=resyncing_mirror())
    assert status_command.run(parse([str(mountpoint)])) == 0
    out = capsys.readouterr().out
    assert out.startswith("vol1: resyncing, mirror, 1.0 GiB\n")
    assert "<=35.0 MiB/s, ETA >=0:17" in out


class FakeTime:
    """A clock whose sleep advances it and lets the test change the tree."""

    def __init__(self, on_sleep) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self._on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self._on_sleep(len(self.sleeps))


def test_watch_redraws_with_measured_rate_for_a_bounded_number_of_frames(tmp_path):
    mountpoint = make_mount(tmp_path, vol1=resyncing_mirror(done=100 * MiB, rate=0))

    def progress(step: int) -> None:
        write_tree(mountpoint / ".dst" / "vol1", resyncing_mirror(done=(100 + 50 * step) * MiB))

    fake = FakeTime(progress)
    out = io.StringIO()
    result = status_command.watch(
        str(mountpoint),
        as_json=False,
        out=out,
        iterations=3,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert result == 0
    assert fake.sleeps == [1.0, 1.0]
    frames = out.getvalue().split(f"dstfuse status {mountpoint}")
    assert len(frames) == 4  # text before the first title is empty
    assert "ETA" not in frames[1]  # one sample: no rate yet, and the file says 0
    assert "14% 150.0 MiB/1.0 GiB, 50.0 MiB/s, ETA 0:17" in frames[2]
    assert "19% 200.0 MiB/1.0 GiB, 50.0 MiB/s, ETA 0:16" in frames[3]


def test_watch_json_prints_one_object_per_frame_and_ctrl_c_exits_zero(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())

    def interrupt(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    fake = FakeTime(interrupt)
    out = io.StringIO()
    result = status_command.watch(
        str(mountpoint), as_json=True, out=out, clock=fake.clock, sleep=fake.sleep
    )
    assert result == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["storages"]["lin"]["state"] == "clean" for line in lines)


def test_watch_ends_with_the_error_when_the_mount_goes_away(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())

    def vanish(step: int) -> None:
        import shutil

        shutil.rmtree(mountpoint / ".dst")

    fake = FakeTime(vanish)
    with pytest.raises(UserError, match="not a dstfuse mount"):
        status_command.watch(
            str(mountpoint),
            as_json=False,
            out=io.StringIO(),
            iterations=5,
            clock=fake.clock,
            sleep=fake.sleep,
        )


# ------------------------------------- against the real control tree model


def materialize(directory: ControlDirectory, path: Path) -> None:
    """Write what the control tree model shows as plain files."""
    path.mkdir(parents=True, exist_ok=True)
    for name, entry in directory.entries().items():
        if isinstance(entry, ControlDirectory):
            materialize(entry, path / name)
        else:
            (path / name).write_text(entry.read())


class ScriptedMirror(Algorithm):
    """An algorithm that reports mirror-like states chosen by the test."""

    name = "mirror"

    def __init__(self, storage_name, nodes, options) -> None:
        super().__init__(storage_name, nodes, options)
        size = min(node.size for node, _ in nodes)
        self._placements = [
            Placement(
                node=node,
                start=0,
                size=size,
                cookie=cookie,
                controls={
                    "read_repairs": ControlFile(read=lambda: "3\n"),
                    "resync_rate": ControlFile(read=lambda: f"{8 * MiB}\n"),
                    "dirty": ControlFile(read=lambda: "", write=lambda text: None),
                },
            )
            for cookie, (node, _) in enumerate(nodes)
        ]
        self._size = size
        self.node_states = {0: "clean", 1: "resyncing"}

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return True

    @property
    def state(self) -> str:
        return "resyncing"

    def placements(self):
        return list(self._placements)

    def node_state(self, placement):
        return self.node_states[placement.cookie]

    def resync_progress(self, placement):
        return (MiB, 4 * MiB) if placement.cookie == 1 else (0, 0)

    async def read(self, offset, length):
        raise NotImplementedError

    async def write(self, offset, data, *, fua=False):
        raise NotImplementedError

    async def flush(self):
        raise NotImplementedError

    async def trim(self, offset, length):
        raise NotImplementedError

    async def write_zeroes(self, offset, length, *, fua=False):
        raise NotImplementedError

    async def checksum(self, offset, length):
        raise NotImplementedError


async def test_status_reads_the_tree_that_dstfuse_control_renders(tmp_path):
    files = []
    for index, size in enumerate((MiB, 2 * MiB, 3 * MiB, 3 * MiB)):
        path = tmp_path / f"disk{index}.img"
        path.write_bytes(b"\0" * size)
        files.append(path)
    nodes = [LocalNode(path) for path in files]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await node.start(nursery)
        try:
            await nodes[0].write(0, b"x" * 4096)
            linear = Storage("lin", Linear("lin", [(nodes[0], None), (nodes[1], None)], {}))
            mirror = Storage(
                "vol0", ScriptedMirror("vol0", [(nodes[2], None), (nodes[3], None)], {})
            )
            info = DaemonInfo(pid=os.getpid(), config=tmp_path / "c.yaml", mountpoint=tmp_path)
            tree = ControlTree(
                {"lin": linear, "vol0": mirror},
                hidden={DAEMON_FILE: ControlFile(read=info.render)},
            )
            mountpoint = tmp_path / "mnt"
            materialize(tree.root, mountpoint / ".dst")
        finally:
            for node in nodes:
                await node.aclose()

    result = status_json(read_mount_status(mountpoint))
    assert set(result["storages"]) == {"lin", "vol0"}
    lin = result["storages"]["lin"]
    assert (lin["state"], lin["algorithm"], lin["size"]) == ("clean", "linear", 3 * MiB)
    assert [(n["name"], n["type"], n["start"], n["size"]) for n in lin["nodes"]] == [
        ("n-0-0", f"L: {files[0]}", 0, MiB),
        (f"n-{MiB}-1", f"L: {files[1]}", MiB, 2 * MiB),
    ]
    first = lin["nodes"][0]
    assert (first["state"], first["sync"], first["flags"]) == ("clean", "sync", "online rw")
    assert (first["requests"], first["bytes_written"]) == (1, 4096)
    vol0 = result["storages"]["vol0"]
    assert vol0["state"] == "resyncing"
    resyncing = vol0["nodes"][1]
    assert (resyncing["state"], resyncing["sync"]) == ("resyncing", "notsync")
    assert (resyncing["resync_done"], resyncing["resync_total"]) == (MiB, 4 * MiB)
    assert (resyncing["read_repairs"], resyncing["resync_rate"]) == (3, 8 * MiB)
    assert "dirty" not in resyncing
    text = render_status(read_mount_status(mountpoint))
    assert "25% 1.0 MiB/4.0 MiB, <=8.0 MiB/s, ETA >=0:00" in text


# ------------------------------------------------ against a real mount

# The command line imports every command module; until all are written it
# cannot start.
MISSING_COMMANDS = [
    name for name in COMMANDS if importlib.util.find_spec(f"dstfuse.commands.{name}") is None
]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING_COMMANDS),
    reason=f"dstfuse command modules not written yet: {', '.join(MISSING_COMMANDS)}",
)
def test_status_of_a_real_mount_then_of_its_killed_daemon(tmp_path):
    from .mounts import exported, mounted, run_dstfuse, write_config

    remote_image = tmp_path / "remote.img"
    local_image = tmp_path / "local.img"
    for path, size in ((remote_image, 4 * MiB), (local_image, 2 * MiB)):
        with open(path, "wb") as file:
            file.truncate(size)
    with exported(remote_image, tmp_path) as export:
        config = write_config(
            tmp_path / "storage.yaml",
            {
                "lin": {
                    "algorithm": "linear",
                    "nodes": [{"remote": export.address}, {"local": str(local_image)}],
                }
            },
        )
        with mounted(config, tmp_path / "mnt") as mount:
            with open(mount.file("lin"), "r+b") as file:
                file.write(b"y" * 8192)
                os.fsync(file.fileno())
            done = run_dstfuse("status", "--json", mount.mountpoint, timeout=60)
            assert done.returncode == 0, done.stderr
            lin = json.loads(done.stdout)["storages"]["lin"]
            assert (lin["state"], lin["algorithm"], lin["size"]) == ("clean", "linear", 6 * MiB)
            assert [(n["name"], n["type"], n["state"], n["size"]) for n in lin["nodes"]] == [
                ("n-0-0", f"R: {export.address}", "clean", 4 * MiB),
                (f"n-{4 * MiB}-1", f"L: {local_image}", "clean", 2 * MiB),
            ]
            assert lin["nodes"][0]["bytes_written"] >= 8192
            human = run_dstfuse("status", mount.mountpoint, timeout=60)
            assert human.returncode == 0, human.stderr
            assert human.stdout.startswith("lin: clean, linear, 6.0 MiB\n")

            # A stopped daemon answers nothing: status gives up, it does not hang.
            os.kill(mount.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(UserError, match="does not answer within 1s"):
                    read_mount_status_within(mount.mountpoint, 1.0)
                assert time.monotonic() - started < 5
            finally:
                os.kill(mount.pid, signal.SIGCONT)

            os.kill(mount.pid, signal.SIGKILL)
            mount.process.wait(timeout=30)
            gone = run_dstfuse("status", mount.mountpoint, timeout=60)
            assert gone.returncode == 1
            (line,) = gone.stderr.splitlines()
            assert "daemon serving this mount is gone" in line
            assert f"dstfuse umount {mount.mountpoint}" in line


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING_COMMANDS),
    reason=f"dstfuse command modules not written yet: {', '.join(MISSING_COMMANDS)}",
)
def test_watch_process_exits_0_on_ctrl_c_and_a_closed_pipe_is_not_an_error(tmp_path):
    from .mounts import DSTFUSE, dstfuse_env

    mountpoint = make_mount(tmp_path, lin=clean_linear())
    watching = subprocess.Popen(
        [*DSTFUSE, "status", "--watch", str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dstfuse_env(),
    )
    try:
        first = watching.stdout.readline()
        assert first.startswith(f"dstfuse status {mountpoint}")
        frame = [watching.stdout.readline() for _ in range(3)]
        assert frame[1:] == ["lin: clean, linear, 3.0 GiB\n", frame[2]]
        assert frame[2].split()[0] == "NODE"
        watching.send_signal(signal.SIGINT)
        _, err = watching.communicate(timeout=30)
        assert watching.returncode == 0, err
        assert err == ""
    finally:
        if watching.poll() is None:
            watching.kill()
            watching.wait(timeout=10)

    # `dstfuse status | head -0`: the reader is gone before anything is written.
    reader_gone = subprocess.Popen(
        [*DSTFUSE, "status", "--json", str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dstfuse_env(),
    )
    reader_gone.stdout.close()
    try:
        _, err = reader_gone.communicate(timeout=30)
    finally:
        if reader_gone.poll() is None:
            reader_gone.kill()
            reader_gone.wait(timeout=10)
    assert reader_gone.returncode == 0
    assert err == b""


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING_COMMANDS),
    reason=f"dstfuse command modules not written yet: {', '.join(MISSING_COMMANDS)}",
)
def test_status_of_a_real_mirror_shows_a_resync_with_measured_rate(tmp_path):
    from .mounts import mounted, write_config

    legs = [tmp_path / "a.img", tmp_path / "b.img"]
    for path in legs:
        with open(path, "wb") as file:
            # 32 s of resync at 2 MiB/s: still running when the watch ends,
            # however slow a loaded machine makes the status reads
            file.truncate(64 * MiB)
    config = write_config(
        tmp_path / "storage.yaml",
        {
            "mir": {
                "algorithm": "mirror",
                "region_size": "1M",
                "resync_rate": "2M",
                "nodes": [{"local": str(path)} for path in legs],
            }
        },
    )
    with mounted(config, tmp_path / "mnt") as mount:
        # Whatever the mirror did at start, this makes leg 1 copy everything.
        (mount.mountpoint / ".dst" / "mir" / "n-0-1" / "dirty").write_text("1\n")
        deadline = time.monotonic() + 20
        while True:
            storage = status_json(read_mount_status(mount.mountpoint))["storages"]["mir"]
            leg = storage["nodes"][1]
            if leg["state"] == "resyncing" and 0 < leg["resync_done"] < leg["resync_total"]:
                break
            assert time.monotonic() < deadline, f"no resync in progress: {storage}"
            time.sleep(0.1)
        assert storage["state"] == "resyncing"
        assert storage["nodes"][0]["state"] == "clean"
        assert leg["resync_rate"] == 2 * MiB

        out = io.StringIO()
        assert (
            status_command.watch(
                str(mount.mountpoint), as_json=False, out=out, interval=0.5, iterations=4
            )
            == 0
        )
        last = out.getvalue().split(f"dstfuse status {mount.mountpoint}")[-1]
        row = next(line for line in last.splitlines() if line.lstrip().startswith("n-0-1"))
        # Measured over 1.5 s (a rate, no "<=" bound); the limit is 2 MiB/s.
        match = re.search(r"(\d+)% [\d.]+ [KM]iB/63\.9 MiB, ([\d.]+) ([KM])iB/s, ETA \d+:\d\d", row)
        assert match, row
        rate = float(match.group(2)) * (MiB if match.group(3) == "M" else 1024)
        assert 0 < rate <= 4 * MiB
        assert mount.umount().returncode == 0


# ------------------------------------------------------------ last reload


def test_the_last_reload_is_in_json_and_ends_the_human_report(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())
    assert "reload" not in status_json(read_mount_status(mountpoint))
    line = (
        "refused 2026-12-01T12:30:05Z: storage lin: algorithm cannot change online; "
        "nothing applied\n"
    )
    (mountpoint / ".dst" / ".reload").write_text(line)
    status = read_mount_status(mountpoint)
    assert status_json(status)["reload"] == {
        "outcome": "refused",
        "time": "2026-12-01T12:30:05Z",
        "message": "storage lin: algorithm cannot change online; nothing applied",
    }
    assert render_status(status).endswith(f"\nlast reload: {line}")
    assert status.reload is not None and status.reload.render() == line


def test_a_reload_file_saying_none_or_garbage_shows_no_reload(tmp_path):
    mountpoint = make_mount(tmp_path, lin=clean_linear())
    for text in ("none\n", "half a line\n"):
        (mountpoint / ".dst" / ".reload").write_text(text)
        assert read_mount_status(mountpoint).reload is None

"""Multi-host tests on `tests/hosts.py`: export nodes in network namespaces
behind veth pairs (IPv4 and IPv6 addresses that exist only there), the
client in the root namespace. The fixture itself: nodes reachable over
both families, a link down answers "no route" at once (never the default
route), nothing left behind. Then a linear storage over an IPv4 and an IPv6
host keeps every write across a link down shorter than the resend budget.
Skipped, with the reason, where namespaces cannot be made."""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from .hosts import hosts, namespaces_and_links_of_this_run
from .mounts import mounted, run, run_dstfuse, write_config

pytestmark = pytest.mark.slow

MiB = 1 << 20
NODE = 8 * MiB
BLOCK = 256 * 1024
#: An 11 s budget; the link is down for 3 s.
TIMEOUTS = {"resend": "1s", "max_resends": 10, "keepalive": "500ms", "connect": "1s"}
LINK_DOWN = 3.0


def make_disk(path: Path, size: int = NODE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def linear_config(path: Path, *addresses: str) -> Path:
    return write_config(
        path,
        {"vol": {"algorithm": "linear", "nodes": [{"remote": a} for a in addresses]}},
        timeouts=TIMEOUTS,
    )


def connect_error(host: str, port: int) -> int | None:
    """The errno of a TCP connect to (host, port) from the root namespace,
    or None if it connects."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except OSError as exc:
            return exc.errno
    return None


def unreachable_routes(prefix: str) -> int:
    family = "-6" if ":" in prefix else "-4"
    routes = json.loads(run("ip", "-j", family, "route", "show", "type", "unreachable").stdout)
    return sum(route.get("dst") == prefix for route in routes)


def test_hosts_serve_over_their_own_prefixes_and_a_link_down_never_uses_the_default_route(
    tmp_path,
):
    with hosts(2, tmp_path) as (first, second):
        nodes = [
            first.export(make_disk(tmp_path / "first.img")),
            second.export(make_disk(tmp_path / "second.img"), ipv6=True),
        ]
        assert nodes[1].address.startswith("[fd00:213:")
        # The hosts' own addresses exist only inside their namespaces.
        root_addresses = run("ip", "-j", "addr", "show").stdout
        assert f'"{first.address4}"' not in root_addresses
        assert f'"{second.address6}"' not in root_addresses
        config = linear_config(tmp_path / "storage.yaml", *(node.address for node in nodes))
        done = run_dstfuse("check", config)
        assert done.returncode == 0, done.stderr
        assert connect_error(first.address4, 1025) is None
        assert connect_error(second.address6, 1025) is None
        with first.link_down():
            # Refused by the unreachable route at once, not sent out by the
            # default route, for both families.
            started = time.monotonic()
            assert connect_error(first.address4, 1025) == errno.EHOSTUNREACH
            assert connect_error(first.address6, 1025) == errno.EHOSTUNREACH
            assert time.monotonic() - started < 1
            assert run("ip", "route", "get", first.address4, check=False).returncode != 0
            assert connect_error(second.address6, 1025) is None  # other hosts unaffected
        assert connect_error(first.address4, 1025) is None
        prefixes = [str(first.ipv4), str(first.ipv6), str(second.ipv4), str(second.ipv6)]
        assert all(unreachable_routes(prefix) == 1 for prefix in prefixes)
        exports = [node.process for node in nodes]
    assert all(process.poll() is not None for process in exports)
    assert namespaces_and_links_of_this_run() == []
    assert all(unreachable_routes(prefix) == 0 for prefix in prefixes)


class Writer:
    """A thread writing every BLOCK of the storage file in rounds (O_DIRECT),
    each round its own data, until `stop()`; `expected` is the file's
    content as last written."""

    def __init__(self, file: Path, size: int) -> None:
        self.file = file
        self.offsets = range(0, size, BLOCK)
        self.expected = {offset: b"" for offset in self.offsets}
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        try:
            fd = os.open(self.file, os.O_WRONLY | os.O_DIRECT)
            try:
                with mmap.mmap(-1, BLOCK) as aligned:
                    while not self._stop.is_set():
                        for offset in self.offsets:
                            data = f"{self.rounds:08d}:{offset:012d}|".encode() * (BLOCK // 22)
                            data += bytes(BLOCK - len(data))
                            aligned.seek(0)
                            aligned.write(data)
                            assert os.pwritev(fd, [aligned], offset) == BLOCK
                            self.expected[offset] = data
                        self.rounds += 1
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # handed to the test thread
            self.errors.append(exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """True once the writer has finished within `timeout` seconds."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def test_linear_over_an_ipv4_and_an_ipv6_host_keeps_writing_across_a_link_down(tmp_path):
    with hosts(2, tmp_path) as (first, second):
        disks = [make_disk(tmp_path / "first.img"), make_disk(tmp_path / "second.img")]
        nodes = [first.export(disks[0]), second.export(disks[1], ipv6=True)]
        config = linear_config(tmp_path / "storage.yaml", *(node.address for node in nodes))
        with mounted(config, tmp_path / "mnt") as mount:
            writer = Writer(mount.file("vol"), 2 * NODE)
            writer.start()
            try:
                time.sleep(0.5)
                rounds_before = writer.rounds
                with first.link_down():
                    time.sleep(LINK_DOWN)
                time.sleep(1.0)
            finally:
                finished = writer.stop(60)
            assert finished and writer.errors == []
            assert writer.rounds > rounds_before + 1  # it wrote through and after the outage
            assert int(mount.control("vol", "n-0-0", "reconnects")) >= 1
            assert "connection lost" in mount.log_tail(200)
            with open(mount.file("vol"), "rb", buffering=0) as f:
                image = f.read(2 * NODE)
            assert image == b"".join(writer.expected[offset] for offset in writer.offsets)
            status = json.loads(run_dstfuse("status", "--json", mount.mountpoint).stdout)
            assert status["storages"]["vol"]["state"] == "clean"
            assert mount.umount().returncode == 0
    expected = b"".join(writer.expected[offset] for offset in writer.offsets)
    assert disks[0].read_bytes() + disks[1].read_bytes() == expected


def test_an_export_started_after_a_mount_does_not_keep_it_after_its_unmount(tmp_path):
    """An export shares the root mount namespace: a mount the test made
    before starting it (a FUSE mount, ext4 on a loop device) is gone for
    good when the test unmounts it, so the loop device can be detached."""
    mountpoint = tmp_path / "scratch"
    mountpoint.mkdir()
    with hosts(1, tmp_path) as (host,):
        run("mount", "-t", "tmpfs", "-o", "size=1M", "soaktmp", mountpoint)
        try:
            node = host.export(make_disk(tmp_path / "disk.img"))
        finally:
            run("umount", mountpoint)
        held = Path(f"/proc/{node.process.pid}/mountinfo").read_text()
        assert str(mountpoint) not in held

"""`tcp_congestion`: the congestion control of dstfuse's own TCP connections.

Seen from outside on real processes: `ss` shows the chosen algorithm on
both ends of a mount's connection to a `dstfuse export`, on our end of a
mount's connection to nbdkit and of one its `nbd_listen` accepted, while
the host's default is another one;
a name the kernel lacks stops the mount before anything is served. The
refusals that need no kernel are unit tests at the end.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from dstfuse import congestion
from dstfuse.errors import UserError

from .mounts import exported, free_tcp_port, mounted, run_dstfuse, write_config
from .nbdservers import nbdkit, require

MiB = 1 << 20
PROC = Path("/proc/sys/net/ipv4")


def host_default() -> str:
    return (PROC / "tcp_congestion_control").read_text().strip()


def not_the_hosts() -> str:
    """An algorithm this process may use that the host does not use by default."""
    for name in ("reno", "cubic", "bbr"):
        if name == host_default():
            continue
        try:
            congestion.check(name)
        except UserError:
            continue
        return name
    pytest.skip("no congestion control other than the host's default is usable")


def algorithms_on(port: int) -> list[str]:
    """The congestion control of each established TCP socket with `port` at
    one end (`ss -ti`: an info line per socket, which names it)."""
    known = set((PROC / "tcp_available_congestion_control").read_text().split())
    listing = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    found = []
    for line in listing.splitlines():
        if line[:1].isspace():  # a socket's info line
            found += [token for token in line.split() if token in known]
    return found


def write_through(file: Path) -> None:
    fd = os.open(file, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(MiB), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def mounted_over_a_node(tmp_path: Path, export_args: list[str], **settings: object):
    """A linear storage over one `dstfuse export` on TCP, mounted, with 1 MiB
    written through it; yields the node's port."""
    disk = tmp_path / "node.img"
    disk.write_bytes(bytes(16 * MiB))
    with exported(disk, tmp_path, tcp=True, args=export_args) as node:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"remote": node.address}]}},
            **settings,
        )
        with mounted(config, tmp_path / "mnt") as mount:
            write_through(mount.file("vol"))
            yield int(node.address.rsplit(":", 1)[1])
            assert mount.umount().returncode == 0


def test_a_mount_and_its_export_node_use_the_configured_algorithm(tmp_path):
    name = not_the_hosts()
    with mounted_over_a_node(tmp_path, ["--tcp-congestion", name], tcp_congestion=name) as port:
        # both ends: the daemon's connection and the node's accepted one
        assert algorithms_on(port) == [name, name], (name, host_default())


def test_without_the_setting_connections_keep_the_hosts_default(tmp_path):
    with mounted_over_a_node(tmp_path, []) as port:
        assert algorithms_on(port) == [host_default()] * 2


def test_a_mount_uses_it_towards_an_nbd_server_too(tmp_path):
    require("nbdkit")
    name = not_the_hosts()
    with nbdkit(tmp_path, ["memory", "size=16M"]) as server:
        port = int(server.uri.rsplit(":", 1)[1].split("/")[0])
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"nbd": server.uri}]}},
            tcp_congestion=name,
        )
        with mounted(config, tmp_path / "mnt") as mount:
            write_through(mount.file("vol"))
            # nbdkit's end keeps the host's default: only ours is chosen
            assert sorted(algorithms_on(port)) == sorted([name, host_default()])
            assert mount.umount().returncode == 0


def test_a_mount_uses_it_on_connections_its_nbd_listen_accepts(tmp_path):
    name = not_the_hosts()
    port = free_tcp_port()
    with mounted_over_a_node(
        tmp_path, [], tcp_congestion=name, nbd_listen=f"127.0.0.1:{port}"
    ), socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert client.recv(8) == b"NBDMAGIC"  # the daemon's end is set up by now
        # the daemon's accepted end only: this test's end keeps the host's
        assert sorted(algorithms_on(port)) == sorted([name, host_default()])


def test_a_mount_naming_an_algorithm_the_kernel_lacks_fails_with_the_reason(tmp_path):
    config = write_config(
        tmp_path / "storage.yaml",
        {"vol": {"algorithm": "linear", "nodes": [{"remote": "127.0.0.1:9"}]}},
        tcp_congestion="nosuchcc",
    )
    (tmp_path / "mnt").mkdir()
    result = run_dstfuse("mount", config, tmp_path / "mnt")
    assert result.returncode != 0
    assert "tcp_congestion 'nosuchcc': this kernel has no such algorithm" in result.stderr
    assert "available:" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


# -- without a kernel ---------------------------------------------------------
def test_a_refused_algorithm_names_the_allowed_ones(monkeypatch):
    def refuse(self, *args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(socket.socket, "setsockopt", refuse)
    with pytest.raises(UserError, match=r"--tcp-congestion 'cubic': not allowed for this "
                                        r"process \(allowed: "):  # fmt: skip
        congestion.check("cubic", "--tcp-congestion")


def test_apply_changes_nothing_unless_installed_and_never_fails(caplog):
    calls = []

    class Recorder:
        def setsockopt(self, *args):
            calls.append(args)
            raise OSError(errno.ENOENT, "No such file or directory")

        def getpeername(self):
            return ("192.0.2.7", 1025)

    async def main():
        congestion.apply(Recorder())  # nothing installed: untouched
        assert calls == []
        congestion.install("cubic")
        with caplog.at_level(logging.WARNING, logger="dstfuse.congestion"):
            congestion.apply(Recorder())  # refused: a warning, the socket kept
        assert calls == [(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")]
        assert "with 192.0.2.7 port 1025" in caplog.text
        assert "uses the host's default" in caplog.text

    trio.run(main)

"""Security against live `dstfuse export` processes: key and cipher
mismatches fail the mount with a clear line and write nothing; a flood of
garbage, huge length fields and idle connections neither crashes the node
nor grows its memory, and a real client is served normally afterwards."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from dstfuse.address import parse_address
from dstfuse.keys import write_key_file
from dstfuse.protocol import Command
from dstfuse.protocol.constants import HEADER, MAGIC, VERSION

from .mounts import (
    exported,
    require_fuse,
    run_dstfuse,
    write_config,
)
from .rawclient import RawClient

pytestmark = pytest.mark.slow

SIZE = 16 << 20
#: What the node may use after the flood; its idle RSS is about 40 MiB.
RSS_BOUND_KIB = 120 * 1024
CLIENT = b"flood-test-ident"


def disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def key_file(path: Path) -> Path:
    write_key_file(path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


CASES = {
    # name: (node flags, client settings, words the one-line error must contain)
    "wrong key": (["--key-file", "{node_key}"], {"key_file": "{client_key}"}, ["key"]),
    "key on the node only": (["--key-file", "{node_key}"], {}, ["key"]),
    "key on the client only": ([], {"key_file": "{client_key}"}, ["key"]),
    "mismatched cipher": (
        ["--key-file", "{node_key}", "--cipher", "aes-256-gcm"],
        {"key_file": "{node_key}", "cipher": "chacha20-poly1305"},
        ["cipher", "chacha20-poly1305", "aes-256-gcm"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_key_and_cipher_mismatches_fail_the_mount_with_a_clear_line(tmp_path, case):
    require_fuse()
    node_flags, client, words = CASES[case]
    keys = {
        "node_key": key_file(tmp_path / "node.key"),
        "client_key": key_file(tmp_path / "client.key"),
    }
    image = disk(tmp_path / "disk.img")
    before = digest(image)
    flags = [flag.format(**keys) for flag in node_flags]
    settings = {name: value.format(**keys) for name, value in client.items()}
    with exported(image, tmp_path, tcp=True, args=flags) as export:
        config = write_config(
            tmp_path / "storage.yaml",
            {"vol": {"algorithm": "linear", "nodes": [{"remote": export.address}]}},
            **settings,
        )
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        done = run_dstfuse("mount", config, mountpoint, timeout=60)
        assert done.returncode == 1, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        for word in words:
            assert word in lines[0], lines[0]
        assert export.address in lines[0]
        assert not os.path.ismount(mountpoint)
        # the node logged the refusal with the peer's address
        assert "127.0.0.1" in export.log_tail(50)
    assert digest(image) == before


async def test_flood_of_garbage_huge_lengths_and_idle_connections_leaves_node_serving(tmp_path):
    image = disk(tmp_path / "disk.img")
    with exported(image, tmp_path, tcp=True, args=["--handshake-timeout", "2s"]) as export:
        address = parse_address(export.address)
        pid = export.process.pid
        idle = []
        try:
            # 120 connections that never say anything
            for _ in range(120):
                idle.append(await trio.open_tcp_stream(address.host, address.port))
            # garbage and frames announcing huge payloads, 200 of each
            for round_ in range(200):
                stream = await trio.open_tcp_stream(address.host, address.port)
                try:
                    if round_ % 2:
                        await stream.send_all(os.urandom(4096))
                    else:
                        header = HEADER.pack(
                            MAGIC, VERSION, Command.HELLO, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0
                        )
                        await stream.send_all(header + os.urandom(1024))
                    with trio.move_on_after(5):
                        while await stream.receive_some(65536):
                            pass  # the node must close it
                finally:
                    await stream.aclose()
            # a handshaken client sending oversized and out-of-range requests
            # (one client identity: the node keeps the write grant of a
            # connection it closed for the client's reconnect)
            async with await RawClient.connect(address, client_id=CLIENT) as client:
                reply = await client.read(SIZE - 4096, 8192)
                assert reply.status != 0
                reply = await client.write(SIZE, b"x" * 512)
                assert reply.status != 0
                await client.send_bytes(
                    HEADER.pack(MAGIC, VERSION, Command.WRITE, 0, 9, 0, 16, 0, 0x7FFFFFFF, 0)
                )
                assert await client.wait_closed(5)
            assert os.path.exists(f"/proc/{pid}") and export.process.poll() is None
            assert rss_kib(pid) < RSS_BOUND_KIB
        finally:
            for stream in idle:
                await stream.aclose()
        # a real client is served normally
        async with await RawClient.connect(address, client_id=CLIENT) as client:
            data = os.urandom(65536)
            assert (await client.write(4096, data)).status == 0
            reply = await client.read(4096, len(data))
            assert reply.status == 0 and bytes(reply.data) == data
        assert rss_kib(pid) < RSS_BOUND_KIB
        assert "handshake" in export.log_tail(400)  # idle peers were closed by the deadline


def test_key_file_readable_by_others_is_refused_without_showing_the_key(tmp_path):
    key = key_file(tmp_path / "cluster.key")
    secret = key.read_text().strip()
    key.chmod(0o644)
    done = run_dstfuse(
        "export", disk(tmp_path / "disk.img"), "--listen", "127.0.0.1:1", "--key-file", key
    )
    assert done.returncode == 1
    assert "group/other" in done.stderr and secret not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1

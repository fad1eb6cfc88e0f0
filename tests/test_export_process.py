"""`dstfuse export` as a real process: serve, shut down on SIGTERM, and one
clean line for every user mistake."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest
import trio

from dstfuse.address import Address

from .mounts import DSTFUSE, dstfuse_env, free_tcp_port, notify_socket, stop_pid
from .rawclient import RawClient, RawRefused

pytestmark = pytest.mark.slow

MiB = 1 << 20
STARTUP_TIMEOUT = 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk1"
    path.write_bytes(os.urandom(4 * MiB))
    return path


@pytest.fixture
def sockdir():
    path = tempfile.mkdtemp(prefix="dstf-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class ExportProcess:
    """A running `dstfuse export`; `stderr` collects everything it logs."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = ""
        self.ended = False
        self._changed = trio.Event()

    async def collect(self) -> None:
        try:
            while chunk := await self.process.stderr.receive_some(65536):
                self.stderr += chunk.decode(errors="replace")
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self.ended = True
            self._changed.set()

    async def wait_for(self, text: str, timeout: float = STARTUP_TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while text not in self.stderr:
                if self.ended:
                    raise AssertionError(f"{text!r} never appeared:\n{self.stderr}")
                await self._changed.wait()


async def run_export(nursery, *args: str) -> ExportProcess:
    process = await trio.lowlevel.open_process(
        [*DSTFUSE, "export", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    running = ExportProcess(process)
    nursery.start_soon(running.collect)
    return running


async def stop(running: ExportProcess) -> None:
    """Always called in `finally`: the process never outlives its test."""
    if running.process.returncode is None:
        running.process.kill()
    with trio.CancelScope(shield=True):
        await running.process.wait()


async def test_serves_over_tcp_and_exits_cleanly_on_sigterm(image, nursery):
    port = free_tcp_port()
    running = await run_export(nursery, str(image), "--listen", f"127.0.0.1:{port}")
    try:
        await running.wait_for(f"export disk1 (4.0 MiB, rw) listening on 127.0.0.1:{port}")
        data = os.urandom(256 * 1024)
        async with await RawClient.connect(("127.0.0.1", port)) as client:
            assert client.ready.export == "disk1" and client.ready.size == 4 * MiB
            assert (await client.write(MiB, data)).status == 0
            assert bytes((await client.read(MiB, len(data))).data) == data
            running.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await running.process.wait() == 0
        await running.wait_for("exports disk1: flushed and closed", timeout=5)
        assert "Traceback" not in running.stderr
    finally:
        await stop(running)
    assert image.read_bytes()[MiB : MiB + len(data)] == data


async def test_serves_read_only_on_a_unix_socket(image, sockdir, nursery):
    path = os.path.join(sockdir, "export.sock")
    before = image.read_bytes()
    running = await run_export(
        nursery, str(image), "--listen", f"unix:{path}", "--read-only", "--name", "golden"
    )
    try:
        await running.wait_for(f"export golden (4.0 MiB, ro) listening on unix:{path}")
        async with await RawClient.connect(Address.unix(path)) as client:
            assert client.ready.export == "golden"
            assert (await client.write(0, b"nope")).status == errno.EPERM
            assert bytes((await client.read(0, 4096)).data) == before[:4096]
        running.process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            assert await running.process.wait() == 0
        assert not os.path.exists(path)
    finally:
        await stop(running)
    assert image.read_bytes() == before


async def test_serves_several_exports_from_a_config_file(tmp_path, sockdir, nursery):
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    (tmp_path / "b.img").write_bytes(b"b" * (2 * MiB))
    path = os.path.join(sockdir, "s")
    port = free_tcp_port()
    config = tmp_path / "export.yaml"
    config.write_text(
        f"""listen:
  - 127.0.0.1:{port}
  - unix:{path}
handshake_timeout: 2s
exports:
  - name: a
    path: a.img
    allow:
      - 127.0.0.0/8: rw
  - name: b
    path: b.img
    read_only: true
"""
    )
    running = await run_export(nursery, "--config", str(config))
    try:
        await running.wait_for(f"exports a (1.0 MiB, rw), b (2.0 MiB, ro) listening on unix:{path}")
        async with await RawClient.connect(("127.0.0.1", port), export="a") as client:
            assert client.ready.size == MiB
            assert (await client.write(0, b"hello")).status == 0
        async with await RawClient.connect(Address.unix(path), export="b") as client:
            assert client.ready.size == 2 * MiB
            assert (await client.write(0, b"x")).status == errno.EPERM
        with pytest.raises(RawRefused) as caught:
            await RawClient.connect(Address.unix(path))
        assert "several exports (a, b)" in caught.value.message
        running.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await running.process.wait() == 0
    finally:
        await stop(running)
    assert (tmp_path / "a.img").read_bytes()[:5] == b"hello"
    assert (tmp_path / "b.img").read_bytes()[:1] == b"b"


async def test_key_file_is_required_of_clients(image, tmp_path, nursery):
    from dstfuse.keys import load_key, write_key_file

    key_file = tmp_path / "cluster.key"
    write_key_file(key_file)
    port = free_tcp_port()
    running = await run_export(
        nursery, str(image), "--listen", f"127.0.0.1:{port}", "--key-file", str(key_file)
    )
    try:
        await running.wait_for("listening on")
        key = load_key(key_file)
        async with await RawClient.connect(("127.0.0.1", port), key=key) as client:
            assert (await client.ping()).status == 0
        with pytest.raises(RawRefused) as caught:
            await RawClient.connect(("127.0.0.1", port))
        assert "key required" in caught.value.message
    finally:
        await stop(running)


def bad_invocations(tmp_path, image):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    missing_key = tmp_path / "none.key"
    return busy, [
        ([str(tmp_path / "missing.img")], "missing.img"),
        ([str(image), "--listen", "127.0.0.1:99999"], "99999"),
        ([str(image), "--listen", "not a host:1"], "not a host"),
        ([str(image), "--allow", "10.0.0.0/33"], "10.0.0.0/33"),
        ([str(image), "--allow", "10.0.0.0/8=rx"], "rw"),
        ([str(image), "--nbd-listen", "unix:relative.sock"], "--nbd-listen"),
        ([str(image), "--listen", f"127.0.0.1:{free_tcp_port()}", "--nbd-listen",
          f"127.0.0.1:{busy.getsockname()[1]}"], "address already in use"),
        ([str(image), "--listen", f"127.0.0.1:{busy.getsockname()[1]}"], "address already in use"),
        ([str(image), "--config", str(tmp_path / "export.yaml")], "PATH or --config"),
        ([], "PATH or --config"),
        ([str(image), "--key-file", str(missing_key)], "none.key"),
        ([str(image), "--max-connections", "lots"], "--max-connections"),
        ([str(image), "--handshake-timeout=-1s"], "--handshake-timeout"),
        ([str(image), "--tcp-congestion", "Bad!"], "--tcp-congestion: bad TCP congestion"),
        ([str(image), "--tcp-congestion", "nosuchcc"], "--tcp-congestion 'nosuchcc': this kernel"),
        ([str(tmp_path)], "Is a directory"),
        (["/dev/null"], "neither a regular file nor a block device"),
    ]


def test_user_mistakes_print_one_line_without_a_traceback(tmp_path, image):
    busy, cases = bad_invocations(tmp_path, image)
    try:
        for args, expected in cases:
            result = subprocess.run(
                [*DSTFUSE, "export", *args],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
            lines = result.stderr.strip().splitlines()
            assert result.returncode != 0, args
            assert len(lines) == 1, (args, result.stderr)
            assert "Traceback" not in result.stderr
            assert expected in lines[0], (args, lines[0])
            assert lines[0].startswith("dstfuse export: "), lines[0]
    finally:
        busy.close()


def test_export_tells_systemd_ready_only_once_it_accepts_connections(image):
    port = free_tcp_port()
    with notify_socket() as (sock, path):
        sock.settimeout(30)
        process = subprocess.Popen(
            [*DSTFUSE, "export", str(image), "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dstfuse_env({"NOTIFY_SOCKET": path}),
        )
        try:
            message = sock.recv(4096).decode()
            assert "READY=1" in message.splitlines()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # accepting when READY=1 arrived
            process.terminate()
            assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
            assert process.wait(30) == 0
        finally:
            stop_pid(process.pid, process)

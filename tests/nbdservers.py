"""Real NBD servers nobody here wrote, for the nbd: node tests: nbdkit and
qemu-nbd as child processes on loopback TCP or a unix socket.

Every server runs in the foreground as our child (nbdkit also with
--exit-with-parent), is waited for until it accepts connections, and is
killed by pid when the block ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mounts import SetupFailed, free_tcp_port, stop_pid, tail

START_TIMEOUT = 20.0


def require(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


@dataclass
class NbdServer:
    """A running NBD server. `uri` is what an `nbd:` node takes; `restart`
    starts the same command again on the same address (after `kill`)."""

    command: list[str]
    uri: str
    log: Path
    ready_check: tuple[str, object]
    process: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        self.pids.append(self.process.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts():
            if self.process.poll() is not None:
                raise SetupFailed(
                    f"{self.command[0]} exited {self.process.returncode}:\n{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise SetupFailed(
                    f"{self.command[0]} not ready within {START_TIMEOUT} s:\n{tail(self.log)}"
                )
            time.sleep(0.05)

    def _accepts(self) -> bool:
        kind, where = self.ready_check
        family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
        with socket.socket(family) as probe:
            try:
                probe.connect(where)
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """kill -9 of the server (our child, by pid), and reap it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            stop_pid(self.process.pid, self.process, timeout=10)


@contextlib.contextmanager
def _serving(server: NbdServer, cleanup: Sequence[Path] = ()) -> Iterator[NbdServer]:
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def nbdkit(
    directory: Path,
    plugin: Sequence[str],
    *,
    filters: Sequence[str] = (),
    unix: bool = False,
    port: int | None = None,
    args: Sequence[str] = (),
    export: str = "",
) -> Iterator[NbdServer]:
    """`nbdkit [--filter=F]... PLUGIN ARGS...` on 127.0.0.1:`port` (a free
    one by default) or a unix socket; `args` are extra server options
    (-r, --tls ...), plugin parameters go in `plugin`."""
    require("nbdkit")
    cleanup: list[Path] = []
    if unix:
        sockdir = Path(tempfile.mkdtemp(prefix="nbdk-"))
        cleanup.append(sockdir)
        path = sockdir / "nbd.sock"
        where: list[str] = ["-U", str(path)]
        uri = f"nbd+unix:///{export}?socket={path}"
        ready: tuple[str, object] = ("unix", str(path))
    else:
        port = port or free_tcp_port()
        where = ["-i", "127.0.0.1", "-p", str(port)]
        uri = f"nbd://127.0.0.1:{port}/{export}"
        ready = ("tcp", ("127.0.0.1", port))
    command = [
        "nbdkit",
        "--foreground",
        "--exit-with-parent",
        *where,
        *args,
        *(f"--filter={name}" for name in filters),
        *plugin,
    ]
    log = directory / f"nbdkit-{len(list(directory.glob('nbdkit-*.log')))}.log"
    with _serving(NbdServer(command, uri, log, ready), cleanup) as server:
        yield server


@contextlib.contextmanager
def qemu_nbd(
    directory: Path, image: Path, *, image_format: str = "qcow2", export: str = "disk"
) -> Iterator[NbdServer]:
    """`qemu-nbd` serving `image` on 127.0.0.1, persistent (it keeps
    serving after a client leaves)."""
    require("qemu-nbd")
    port = free_tcp_port()
    command = [
        "qemu-nbd",
        "--persistent",
        "--shared=4",
        "--bind=127.0.0.1",
        f"--port={port}",
        f"--export-name={export}",
        f"--format={image_format}",
        "--cache=writeback",
        "--discard=unmap",
        str(image),
    ]
    log = directory / "qemu-nbd.log"
    uri = f"nbd://127.0.0.1:{port}/{export}"
    with _serving(NbdServer(command, uri, log, ("tcp", ("127.0.0.1", port)))) as server:
        yield server


def qcow2_image(path: Path, size: str) -> Path:
    require("qemu-img")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


_LOG_START = re.compile(
    r"connection=(\d+) (Write|Zero|Trim) id=(\d+) offset=0x([0-9a-f]+) count=0x([0-9a-f]+)"
)
_LOG_END = re.compile(r"connection=(\d+) \.\.\.(Write|Zero|Trim) id=(\d+) return")


def overlapping_in_flight(log: Path) -> list[str]:
    """From nbdkit's log filter: the writes (WRITE, WRITE_ZEROES, TRIM) that
    started while an overlapping one of the same connection had not yet
    returned. The log filter writes a request's return before nbdkit sends
    the reply, so a client that waited for the reply shows none."""
    active: dict[tuple[str, str], tuple[int, int]] = {}
    found = []
    for line in log.read_text().splitlines():
        if start := _LOG_START.search(line):
            conn, _, ident, offset, count = start.groups()
            begin, end = int(offset, 16), int(offset, 16) + int(count, 16)
            for (other_conn, other), (b, e) in active.items():
                if other_conn == conn and b < end and begin < e:
                    found.append(f"connection {conn}: id {ident} overlaps id {other}")
            active[(conn, ident)] = (begin, end)
        elif end_match := _LOG_END.search(line):
            conn, _, ident = end_match.groups()
            active.pop((conn, ident), None)
    return found


def make_pki(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate
    (openssl), laid out as nbdkit's --tls-certificates wants them:
    ca-cert.pem, server-cert.pem, server-key.pem (+ client-cert/key.pem)."""
    require("openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(
            ["openssl", *args], check=True, capture_output=True, timeout=60, cwd=directory
        )

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-subj",
        "/CN=dstfuse test CA",
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(extension)
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}-key.pem",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}-cert.pem",
            "-extfile",
            f"{name}.ext",
        )
    return directory

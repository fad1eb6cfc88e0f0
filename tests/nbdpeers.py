"""Test support for the NBD server tests: real `dstfuse export` processes
with NBD addresses, and the real NBD clients that talk to them (libnbd's
nbdinfo, nbdcopy and its Python binding, qemu-img, qemu-io).

Every process started here is stopped in `finally`; every tool that is
missing makes the test skip with the tool's name.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .mounts import DSTFUSE, SetupFailed, dstfuse_env, free_tcp_port, stop_pid, tail

#: The interpreter that has libnbd's Python binding (a Debian package).
SYSTEM_PYTHON = "/usr/bin/python3"
START_TIMEOUT = 60.0
TOOL_TIMEOUT = 120.0


def require(*tools: str) -> None:
    """Skip unless every tool is installed (nbdsh also needs `import nbd`)."""
    for tool in tools:
        if tool == "libnbd-python":
            found = shutil.which(SYSTEM_PYTHON) and subprocess.run(
                [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, check=False
            ).returncode == 0
        else:
            found = shutil.which(tool) is not None
        if not found:
            pytest.skip(f"{tool} is not installed (apt-get install libnbd-bin python3-libnbd "
                        "qemu-utils)")


def run(*command: str, check: bool = True, input: bytes | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a peer tool; its output in the failure message when it fails."""
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
        check=False, input=None if input is None else input.decode(),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def nbd_python(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `script` (Python using libnbd's `nbd` module) with `args` in argv."""
    return run(SYSTEM_PYTHON, "-c", textwrap.dedent(script), *args, check=check)


@dataclass
class NbdExport:
    """A running `dstfuse export` with NBD addresses: `uri` is the NBD URI
    of its first NBD address without an export name (append one)."""

    process: subprocess.Popen
    log: Path
    listen: str
    nbd_port: int

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never logged:\n{tail(self.log)}")
            time.sleep(0.05)


@contextlib.contextmanager
def nbd_exported(
    directory: Path,
    *,
    path: Path | None = None,
    args: Sequence[str] = (),
    config: dict | None = None,
) -> Iterator[NbdExport]:
    """`dstfuse export PATH ... --nbd-listen 127.0.0.1:P` (or, with
    `config`, an export.yaml: its `listen` and `nbd_listen` are filled in)
    until the block ends."""
    port, nbd_port = free_tcp_port(), free_tcp_port()
    listen = f"127.0.0.1:{port}"
    if config is not None:
        config = {"listen": [listen], "nbd_listen": [f"127.0.0.1:{nbd_port}"], **config}
        config_file = directory / "export.yaml"
        config_file.write_text(yaml.safe_dump(config))
        command = [*DSTFUSE, "export", "--config", str(config_file)]
    else:
        assert path is not None
        command = [*DSTFUSE, "export", str(path), "--listen", listen,
                   "--nbd-listen", f"127.0.0.1:{nbd_port}", *args]
    log = directory / "export.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=dstfuse_env()
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while f"listening for NBD on 127.0.0.1:{nbd_port}" not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise SetupFailed(f"dstfuse export exited {process.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise SetupFailed(f"dstfuse export not listening in time:\n{tail(log)}")
            time.sleep(0.05)
        yield NbdExport(process, log, listen, nbd_port)
    finally:
        if process.poll() is None:
            process.terminate()
        stop_pid(process.pid, process)

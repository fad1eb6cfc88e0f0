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
    until the block ends; then it must exit 0 on SIGTERM without a
    traceback in its log."""
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
    # Only after a block that passed: a traceback in the log is a bug.
    assert process.returncode == 0, tail(log)
    assert "Traceback" not in log.read_text(errors="replace"), tail(log, 80)


@dataclass
class Certificates:
    """A CA and the certificates it signed, as PEM files: `server` holds
    cert.pem and key.pem (for nbd_tls:), `client` is a directory in the
    layout libnbd and qemu read (ca-cert.pem, client-cert.pem,
    client-key.pem), `ca_only` one with just ca-cert.pem (no client
    certificate), `ca` the CA certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client: Path
    ca_only: Path


def make_certificates(directory: Path) -> Certificates:
    """A fresh CA, a server certificate for 127.0.0.1/localhost and a
    client certificate, all signed by the CA, written under `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def build(subject, key, issuer, issuer_key, *, ca=False, extensions=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    def pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("dstfuse test CA")
    ca_cert = build(ca_name, ca_key, ca_name, ca_key, ca=True, extensions=[
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                      content_commitment=False, key_encipherment=False, data_encipherment=False,
                      key_agreement=False, encipher_only=False, decipher_only=False)])
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = build(name("localhost"), server_key, ca_name, ca_key, extensions=[
        x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = build(name("nbd test client"), client_key, ca_name, ca_key, extensions=[
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])

    server = directory / "server"
    client = directory / "client"
    ca_only = directory / "ca-only"
    for folder in (server, client, ca_only):
        folder.mkdir(parents=True)
    (server / "cert.pem").write_bytes(pem(server_cert))
    (server / "key.pem").write_bytes(pem_key(server_key))
    (server / "ca.pem").write_bytes(pem(ca_cert))
    (client / "ca-cert.pem").write_bytes(pem(ca_cert))
    (client / "client-cert.pem").write_bytes(pem(client_cert))
    (client / "client-key.pem").write_bytes(pem_key(client_key))
    (ca_only / "ca-cert.pem").write_bytes(pem(ca_cert))
    return Certificates(server / "ca.pem", server / "cert.pem", server / "key.pem", client,
                        ca_only)

"""NBD over TLS (`nbd_tls:` in export.yaml): real clients with X.509
certificates made in the test (libnbd's nbdinfo/nbdcopy with nbds:// and
tls-certificates, qemu-img with tls-creds-x509), and clients without TLS
or without a client certificate refused."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from dstfuse.config import NbdTls, load_export_config
from dstfuse.errors import ConfigError, UserError
from dstfuse.export.nbd_tls import server_context

from .nbdpeers import make_certificates, nbd_exported, require, run

MiB = 1 << 20


@pytest.fixture
def certificates(tmp_path):
    return make_certificates(tmp_path / "pki")


def tls_config(disk, certificates, *, with_ca: bool = True) -> dict:
    tls = {"cert": str(certificates.server_cert), "key": str(certificates.server_key)}
    if with_ca:
        tls["ca"] = str(certificates.ca)
    return {"exports": [{"name": "disk", "path": str(disk)}], "nbd_tls": tls}


def nbds(export, directory) -> str:
    return f"nbds://127.0.0.1:{export.nbd_port}/disk?tls-certificates={directory}"


@pytest.mark.slow
def test_nbdinfo_and_nbdcopy_over_tls_with_client_certificates(tmp_path, certificates):
    require("nbdinfo", "nbdcopy")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4 * MiB))
    source = tmp_path / "source"
    source.write_bytes(os.urandom(4 * MiB))
    back = tmp_path / "back"
    with nbd_exported(tmp_path, config=tls_config(disk, certificates)) as export:
        info = json.loads(run("nbdinfo", "--json", nbds(export, certificates.client)).stdout)
        assert info["protocol"] == "newstyle-fixed" and info["TLS"] is True
        assert info["exports"][0]["export-size"] == 4 * MiB
        run("nbdcopy", "--flush", str(source), nbds(export, certificates.client))
        run("nbdcopy", nbds(export, certificates.client), str(back))
        # Plain NBD is refused when TLS is required ...
        plain = run("nbdinfo", "--size", f"{export.uri}/disk", check=False)
        assert plain.returncode != 0 and "TLS" in plain.stderr
        # ... and so is TLS without a client certificate signed by the CA.
        anonymous = run("nbdinfo", "--size", nbds(export, certificates.ca_only), check=False)
        assert anonymous.returncode != 0
        export.wait_log("TLS handshake failed")
        assert export.log_text().count("connected over NBD") == 3
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_qemu_img_over_tls_with_tls_creds(tmp_path, certificates):
    require("qemu-img")
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(2 * MiB))
    with nbd_exported(tmp_path, config=tls_config(disk, certificates)) as export:
        creds = f"tls-creds-x509,id=tls0,dir={certificates.client},endpoint=client"
        image = (f"driver=nbd,host=127.0.0.1,port={export.nbd_port},export=disk,"
                 "tls-creds=tls0")
        info = json.loads(run("qemu-img", "info", "--output=json", "--object", creds,
                              "--image-opts", image).stdout)
        assert info["virtual-size"] == 2 * MiB
        copy = tmp_path / "copy.raw"
        run("qemu-img", "convert", "--object", creds, "--image-opts", image, "-O", "raw",
            str(copy))
        plain = run("qemu-img", "info", f"{export.uri}/disk", check=False)
        assert plain.returncode != 0
    assert copy.read_bytes() == disk.read_bytes()


@pytest.mark.slow
def test_tls_without_a_ca_takes_clients_without_certificates(tmp_path, certificates):
    require("nbdinfo")
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(MiB))
    with nbd_exported(tmp_path, config=tls_config(disk, certificates, with_ca=False)) as export:
        size = run("nbdinfo", "--size", nbds(export, certificates.ca_only)).stdout.strip()
        assert size == str(MiB)


def test_nbd_tls_config_keys_and_mistakes(tmp_path, certificates):
    config = tmp_path / "export.yaml"
    config.write_text(
        "exports: [{name: d, path: disk}]\nnbd_listen: 127.0.0.1\n"
        "nbd_tls: {cert: pki/server/cert.pem, key: pki/server/key.pem}\n"
    )
    loaded = load_export_config(config)
    assert loaded.nbd_tls == NbdTls(certificates.server_cert, certificates.server_key, None)
    assert server_context(loaded.nbd_tls) is not None
    for text, expected in [
        ("nbd_tls: {cert: c.pem}\nnbd_listen: 127.0.0.1\n", "missing key 'key'"),
        ("nbd_tls: {cert: c, key: k, cafile: x}\nnbd_listen: 127.0.0.1\n", "unknown key 'cafile'"),
        ("nbd_tls: {cert: c, key: k}\n", "nbd_tls needs nbd_listen"),
    ]:
        config.write_text("exports: [{name: d, path: disk}]\n" + text)
        with pytest.raises(ConfigError, match=expected):
            load_export_config(config)


def test_unusable_tls_files_are_one_line_errors(tmp_path, certificates):
    with pytest.raises(UserError, match="cannot read .*missing.pem"):
        server_context(NbdTls(tmp_path / "missing.pem", certificates.server_key))
    with pytest.raises(UserError, match="not a PEM certificate and its private key"):
        server_context(NbdTls(certificates.server_key, certificates.server_cert))
    with pytest.raises(UserError, match="not a PEM CA bundle"):
        server_context(NbdTls(certificates.server_cert, certificates.server_key,
                              certificates.server_key))

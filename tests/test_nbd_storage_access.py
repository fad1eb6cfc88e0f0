"""Who may use a mount's storages over NBD on TCP (`nbd_allow:` and
`nbd_tls:` in storage.yaml, the export's ACL and TLS code): a real mount
of a storage on a local file, real libnbd clients (nbdinfo, nbdcopy, the
Python binding over sockets bound to chosen loopback source addresses)
and qemu-img with X.509 certificates made in the test."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from dstfuse.config import AclRule, NbdTls, load_mount_config, parse_acl_rule
from dstfuse.errors import ConfigError

from .mounts import free_tcp_port, mounted, run_dstfuse, write_config
from .nbdpeers import make_certificates, nbd_python, require, run

MiB = 1 << 20
SIZE = 8 * MiB

#: libnbd from a chosen source address (nbdinfo has no option for it): a
#: socket bound to argv[1], connected to 127.0.0.1:argv[2], handed to
#: libnbd; it writes "W" at 0 and reads it back.
FROM_SOURCE = r"""
import errno, json, socket, sys
import nbd
sock = socket.socket()
sock.bind((sys.argv[1], 0))
sock.connect(("127.0.0.1", int(sys.argv[2])))
h = nbd.NBD()
try:
    h.connect_socket(sock.detach())
except nbd.Error as exc:
    print(json.dumps({"connected": False}))
    sys.exit(0)
out = {"connected": True, "read_only": h.is_read_only()}
try:
    h.pwrite(b"W" * 4096, 0)
    h.flush()
    out["write"] = "ok"
except nbd.Error as exc:
    out["write"] = errno.errorcode.get(exc.errnum)
out["written"] = h.pread(4096, 0) == b"W" * 4096
h.shutdown()
print(json.dumps(out))
"""


def local_storage(tmp_path: Path, **settings: object) -> Path:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    os.truncate(disk, SIZE)
    return write_config(tmp_path / "storage.yaml",
                        {"vol0": {"algorithm": "linear", "nodes": [{"local": str(disk)}]}},
                        **settings)


def greeting_from(source: str, port: int) -> bytes:
    """What the server sends a raw TCP connection from `source` first
    (the NBD greeting starts with NBDMAGIC; b"" when it closes at once)."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        try:
            return sock.recv(8)
        except ConnectionResetError:
            return b""


def test_mount_config_nbd_allow_and_nbd_tls(tmp_path):
    config = local_storage(
        tmp_path, nbd_listen=["unix:/run/v.sock", "127.0.0.1:10900"],
        nbd_allow=["10.0.0.0/8=ro", {"10.0.0.5": "rw"}, "::1"],
        nbd_tls={"cert": "pki/cert.pem", "key": "pki/key.pem", "ca": "/etc/ca.pem"},
    )
    loaded = load_mount_config(config)
    assert loaded.nbd_allow == (parse_acl_rule("10.0.0.0/8=ro"), parse_acl_rule("10.0.0.5"),
                                AclRule(parse_acl_rule("::1").network, True))
    assert loaded.nbd_tls == NbdTls(tmp_path / "pki/cert.pem", tmp_path / "pki/key.pem",
                                    Path("/etc/ca.pem"))
    assert load_mount_config(local_storage(tmp_path, nbd_listen="127.0.0.1")).nbd_allow == ()
    tls = {"cert": "c", "key": "k"}
    for settings, expected in [
        ({"nbd_listen": "127.0.0.1", "nbd_allow": ["10.0.0.300"]},
         "nbd_allow\\[0\\]: bad access rule '10.0.0.300'"),
        ({"nbd_listen": "127.0.0.1", "nbd_allow": ["10.0.0.1/8"]}, "did you mean 10.0.0.0/8"),
        ({"nbd_listen": "127.0.0.1", "nbd_allow": ["10.0.0.1=rx"]}, "mode must be 'rw' or 'ro'"),
        ({"nbd_allow": ["127.0.0.1"]}, "nbd_allow needs nbd_listen"),
        ({"nbd_tls": tls}, "nbd_tls needs nbd_listen"),
        ({"nbd_listen": "unix:/run/v.sock", "nbd_allow": ["127.0.0.1"]},
         "nbd_allow applies to TCP addresses only.*guarded by its file's permissions"),
        ({"nbd_listen": "127.0.0.1", "nbd_tls": {"cert": "c"}}, "missing key 'key'"),
        ({"nbd_listen": "127.0.0.1", "nbd_tls": {**tls, "cafile": "x"}}, "unknown key 'cafile'"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_mount_config(local_storage(tmp_path, **settings))


@pytest.mark.parametrize("foreground", [False, True])
def test_an_unreadable_nbd_tls_file_fails_the_mount_with_one_line(tmp_path, foreground):
    certificates = make_certificates(tmp_path / "pki")
    config = local_storage(tmp_path, nbd_listen=f"127.0.0.1:{free_tcp_port()}",
                           nbd_tls={"cert": str(tmp_path / "missing.pem"),
                                    "key": str(certificates.server_key)})
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = run_dstfuse("mount", *(["--foreground"] if foreground else []), config, mountpoint)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line == f"dstfuse mount: nbd_tls: cannot read {tmp_path}/missing.pem: " \
                   "No such file or directory", line
    assert not os.path.ismount(mountpoint)
    checked = run_dstfuse("check", config)
    assert checked.returncode == 1 and "nbd_tls: cannot read" in checked.stderr, checked.stderr


def test_nbd_allow_admits_by_source_address_and_ro_entries_refuse_writes(tmp_path):
    require("nbdinfo", "libnbd-python")
    port = free_tcp_port()
    config = local_storage(tmp_path, nbd_listen=f"127.0.0.1:{port}",
                           nbd_allow=["127.0.0.2", "127.0.0.3=ro"])
    with mounted(config, tmp_path / "mnt") as mount:
        # 127.0.0.1 is not in the list: closed at accept, before the greeting.
        assert greeting_from("127.0.0.1", port) == b""
        refused = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}", check=False)
        assert refused.returncode != 0
        assert json.loads(nbd_python(FROM_SOURCE, "127.0.0.1", str(port)).stdout) == {
            "connected": False}
        assert greeting_from("127.0.0.2", port) == b"NBDMAGIC"
        writer = json.loads(nbd_python(FROM_SOURCE, "127.0.0.2", str(port)).stdout)
        assert writer == {"connected": True, "read_only": False, "write": "ok", "written": True}
        with open(mount.file("vol0"), "r+b") as file:
            assert file.read(4096) == b"W" * 4096
            file.seek(0)
            file.write(b"F" * 4096)  # the ro client must see these bytes unchanged
        reader = json.loads(nbd_python(FROM_SOURCE, "127.0.0.3", str(port)).stdout)
        assert reader == {"connected": True, "read_only": True, "write": "EPERM",
                          "written": False}
        assert mount.file("vol0").read_bytes()[:4096] == b"F" * 4096
        log = mount.log_tail(300)
        assert "storages vol0: refused 127.0.0.1:" in log, log
        assert ("address 127.0.0.1 is not allowed by the mount's nbd_allow "
                "(127.0.0.2/32=rw, 127.0.0.3/32=ro)") in log, log
        assert mount.umount().returncode == 0
        assert "Traceback" not in mount.log_tail(1000)


def test_nbd_tls_is_required_with_client_certificates(tmp_path):
    require("nbdinfo", "nbdcopy", "qemu-img")
    certificates = make_certificates(tmp_path / "pki")
    port = free_tcp_port()
    config = local_storage(tmp_path, nbd_listen=f"127.0.0.1:{port}", nbd_tls={
        "cert": str(certificates.server_cert), "key": str(certificates.server_key),
        "ca": str(certificates.ca)})

    def nbds(directory: Path) -> str:
        return f"nbds://127.0.0.1:{port}/vol0?tls-certificates={directory}"

    source = tmp_path / "source"
    source.write_bytes(os.urandom(SIZE))
    with mounted(config, tmp_path / "mnt") as mount:
        info = json.loads(run("nbdinfo", "--json", nbds(certificates.client)).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
        run("nbdcopy", "--flush", str(source), nbds(certificates.client))
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        assert hashlib.sha256(mount.file("vol0").read_bytes()).hexdigest() == digest
        creds = f"tls-creds-x509,id=tls0,dir={certificates.client},endpoint=client"
        # As docs/operations.md spells it for qemu's -drive.
        image = (f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},"
                 "file.export=vol0,file.tls-creds=tls0")
        qemu = json.loads(run("qemu-img", "info", "--output=json", "--object", creds,
                              "--image-opts", image).stdout)
        assert qemu["virtual-size"] == SIZE
        # Plain NBD is refused (ERR_TLS_REQD), and so is TLS without a
        # client certificate signed by the CA.
        plain = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/vol0", check=False)
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
        assert run("qemu-img", "info", f"nbd://127.0.0.1:{port}/vol0", check=False).returncode
        anonymous = run("nbdinfo", "--size", nbds(certificates.ca_only), check=False)
        assert anonymous.returncode != 0
        assert "TLS handshake failed" in mount.log_tail(300)
        assert mount.umount().returncode == 0
        assert "Traceback" not in mount.log_tail(1000)

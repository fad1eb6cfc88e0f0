"""Loading storage.yaml and export.yaml (dstfuse.config): the section 3
contract of DESIGN.md, and errors that name the file, the line and the key."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from dstfuse.address import Address
from dstfuse.config import (
    AclRule,
    ExportConfig,
    ExportSpec,
    MountConfig,
    NodeSpec,
    StorageSpec,
    Timeouts,
    TlsFiles,
    Unflushed,
    load_export_config,
    load_mount_config,
    parse_acl_rule,
)
from dstfuse.errors import ConfigError, UserError
from dstfuse.protocol.nbd.uri import parse_nbd_uri

M, G = 1 << 20, 1 << 30

DESIGN_EXAMPLE = """\
# storage.yaml, read by `dstfuse mount` and `dstfuse check`
key_file: /etc/dstfuse/cluster.key   # optional: encrypt + authenticate every frame
cipher: aes-256-gcm                  # aes-256-gcm | chacha20-poly1305
checksum: xxh3-128                   # used when there is no key
timeouts:
  resend: 2s          # a transaction not acknowledged by then is resent
  max_resends: 15     # then it fails (single node: EIO; mirror: the leg goes dirty)
  keepalive: 1s       # ping when idle; a peer silent for 3 intervals is reconnected
  connect: 5s
storages:
  vol0:
    algorithm: mirror               # mirror | linear
    nodes:
      - remote: 10.0.0.5:1025
      - remote: "[fd00::6]:1025"
        export: disk1               # export name, when the server has several
      - local: /dev/sdb1
  big:
    algorithm: linear
    nodes:
      - remote: node3:1025
        size: 10G                    # use only the first 10 GiB of this node
      - storage: vol0                # stacking: another storage as a node
      - nbd: nbd://nbdhost:10809/export   # any NBD server
"""

# One valid storage, appended to configs that test top-level keys.
ONE_STORAGE = """\
storages:
  vol0:
    algorithm: linear
    nodes:
      - remote: node1:1025
"""


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in tmp_path so that messages name `storage.yaml` as the user would."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(directory: Path, text: str, name: str = "storage.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def mount_error(directory: Path, text: str) -> str:
    write(directory, text)
    with pytest.raises(ConfigError) as info:
        load_mount_config("storage.yaml")
    return str(info.value)


def export_error(directory: Path, text: str) -> str:
    write(directory, text, "export.yaml")
    with pytest.raises(ConfigError) as info:
        load_export_config("export.yaml")
    return str(info.value)


# --------------------------------------------------------------- storage.yaml


def test_design_example_loads_into_the_expected_dataclasses(in_tmp):
    write(in_tmp, DESIGN_EXAMPLE)
    config = load_mount_config("storage.yaml")
    vol0 = StorageSpec(
        name="vol0",
        algorithm="mirror",
        nodes=(
            NodeSpec(
                kind="remote",
                target="10.0.0.5:1025",
                line=14,
                address=Address("tcp", "10.0.0.5", 1025),
            ),
            NodeSpec(
                kind="remote",
                target="[fd00::6]:1025",
                export="disk1",
                line=15,
                address=Address("tcp", "fd00::6", 1025),
            ),
            NodeSpec(kind="local", target="/dev/sdb1", line=17),
        ),
        options={"region_size": 4 * M, "resync_rate": 100 * M, "resync_size": 4 * M},
        line=11,
    )
    big = StorageSpec(
        name="big",
        algorithm="linear",
        nodes=(
            NodeSpec(
                kind="remote",
                target="node3:1025",
                size=10 * G,
                line=21,
                address=Address("tcp", "node3", 1025),
            ),
            NodeSpec(kind="storage", target="vol0", line=23),
            NodeSpec(
                kind="nbd",
                target="nbd://nbdhost:10809/export",
                line=24,
                nbd=parse_nbd_uri("nbd://nbdhost:10809/export"),
            ),
        ),
        options={},
        line=18,
    )
    assert config == MountConfig(
        path=in_tmp / "storage.yaml",
        key_file=Path("/etc/dstfuse/cluster.key"),
        cipher="aes-256-gcm",
        checksum="xxh3-128",
        timeouts=Timeouts(resend=2.0, max_resends=15, keepalive=1.0, connect=5.0),
        max_in_flight=64,
        storages={"vol0": vol0, "big": big},
    )
    assert list(config.storages) == ["vol0", "big"]


def test_defaults_fill_everything_but_storages(in_tmp):
    write(in_tmp, ONE_STORAGE)
    config = load_mount_config(in_tmp / "storage.yaml")
    assert config.key_file is None
    assert config.cipher == "aes-256-gcm"
    assert config.checksum == "xxh3-128"
    assert config.timeouts == Timeouts()
    assert config.timeouts == Timeouts(resend=2.0, max_resends=15, keepalive=1.0, connect=5.0)
    assert config.max_in_flight == 64
    assert config.unflushed == Unflushed(limit=64 << 20, policy="flush")
    assert config.storages["vol0"].nodes == (
        NodeSpec("remote", "node1:1025", line=5, address=Address("tcp", "node1", 1025)),
    )


def test_used_storages_come_before_their_users_otherwise_file_order(in_tmp):
    write(
        in_tmp,
        """\
        storages:
          top:
            algorithm: linear
            nodes:
              - storage: middle
              - storage: other
          alone:
            algorithm: linear
            nodes: [{local: /tmp/a.img}]
          middle:
            algorithm: mirror
            nodes:
              - storage: bottom
              - local: /tmp/b.img
          bottom:
            algorithm: linear
            nodes: [{local: /tmp/c.img}]
          other:
            algorithm: linear
            nodes: [{local: /tmp/d.img}]
        """,
    )
    config = load_mount_config("storage.yaml")
    assert list(config.storages) == ["bottom", "middle", "other", "top", "alone"]


def test_relative_paths_are_taken_from_the_config_directory(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    write(
        sub,
        """\
        key_file: cluster.key
        storages:
          vol0:
            algorithm: linear
            nodes:
              - local: disks/a.img
              - local: /abs/b.img
        """,
    )
    config = load_mount_config(sub / "storage.yaml")
    assert config.key_file == sub / "cluster.key"
    assert [n.target for n in config.storages["vol0"].nodes] == [
        str(sub / "disks/a.img"),
        "/abs/b.img",
    ]


def test_values_are_read_as_written_not_as_yaml_types(in_tmp):
    # YAML 1.1 reads `yes`/`on` as true and 0x10 as 16; configs must not.
    write(
        in_tmp,
        """\
        max_in_flight: "128"
        timeouts: {resend: 1.5, max_resends: 0, keepalive: 250ms, connect: 1m}
        storages:
          0:
            algorithm: linear
            nodes:
              - remote: ::1
              - remote: yes
                export: on
        """,
    )
    config = load_mount_config("storage.yaml")
    assert config.max_in_flight == 128
    assert config.timeouts == Timeouts(resend=1.5, max_resends=0, keepalive=0.25, connect=60.0)
    nodes = config.storages["0"].nodes
    assert [n.address for n in nodes] == [Address("tcp", "::1", 1025), Address("tcp", "yes", 1025)]
    assert nodes[1].export == "on"


def test_sexagesimal_is_not_a_number(in_tmp):
    # YAML 1.1 would silently read 1:30 as 90.
    assert mount_error(in_tmp, "max_in_flight: 1:30\n" + ONE_STORAGE) == (
        "storage.yaml:1: max_in_flight: bad number '1:30' (expected a whole number)"
    )


def test_mirror_options_are_parsed_with_defaults(in_tmp):
    write(
        in_tmp,
        """\
        storages:
          m:
            algorithm: mirror
            region_size: 64K
            resync_rate: 50M/s
            nodes: [{local: /a}, {local: /b}]
          unlimited:
            algorithm: mirror
            resync_rate: 0
            resync_size: 1M
            nodes: [{local: /c}, {local: /d}]
        """,
    )
    config = load_mount_config("storage.yaml")
    assert config.storages["m"].options == {
        "region_size": 64 << 10,
        "resync_rate": 50 * M,
        "resync_size": 4 * M,
    }
    assert config.storages["unlimited"].options == {
        "region_size": 4 * M,
        "resync_rate": 0,
        "resync_size": 1 * M,
    }


def test_merge_keys_reuse_settings(in_tmp):
    write(
        in_tmp,
        """\
        storages:
          a: &linear
            algorithm: linear
            nodes: [{local: /a}]
          b:
            <<: *linear
            nodes: [{local: /b}]
        """,
    )
    config = load_mount_config("storage.yaml")
    assert config.storages["b"].algorithm == "linear"
    assert config.storages["b"].nodes[0].target == "/b"


def test_nbd_uris_are_kept_as_written(in_tmp):
    uris = ["nbd://nbdhost", "nbd://[fd00::7]:10809/disk", "nbd+unix:///disk?socket=/run/nbd.sock"]
    write(in_tmp, ONE_STORAGE + "".join(f"      - nbd: {uri}\n" for uri in uris))
    nodes = load_mount_config("storage.yaml").storages["vol0"].nodes[1:]
    assert [(n.kind, n.target, n.address) for n in nodes] == [("nbd", u, None) for u in uris]
    assert [(str(n.nbd.address), n.nbd.export, n.nbd.tls) for n in nodes] == [
        ("nbdhost:10809", "", False),
        ("[fd00::7]:10809", "disk", False),
        ("unix:/run/nbd.sock", "disk", False),
    ]


def test_nbds_nodes_take_tls_files_relative_to_the_config(in_tmp):
    write(
        in_tmp,
        ONE_STORAGE
        + "      - nbd: nbds://nbdhost/disk\n"
        + "        tls_ca: pki/ca.pem\n        tls_cert: /c.pem\n        tls_key: /k.pem\n",
    )
    node = load_mount_config("storage.yaml").storages["vol0"].nodes[1]
    assert node.nbd.tls and node.tls == TlsFiles(
        in_tmp / "pki/ca.pem", Path("/c.pem"), Path("/k.pem")
    )


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("nbd: nbd://h/x\n        tls_ca: /ca.pem", "'tls_ca' is only for nbds://"),
        ("nbd: nbds://h/x\n        tls_cert: /c.pem", "give tls_cert and tls_key together"),
        ("nbd: nbds://h/x?tls-verify-peer=false", "unsupported parameter 'tls-verify-peer'"),
        ("nbd: nbd+unix:///x", "expected nbd+unix:///EXPORT?socket=/PATH"),
        ("nbd: nbd://h/x?socket=/s", "socket= is only for nbd+unix://"),
    ],
)
def test_bad_nbd_nodes_are_one_line_errors(in_tmp, node, message):
    write(in_tmp, ONE_STORAGE + f"      - {node}\n")
    with pytest.raises(ConfigError) as caught:
        load_mount_config("storage.yaml")
    assert message in str(caught.value)


def test_unflushed_limit_and_policy_are_read(in_tmp):
    write(in_tmp, "unflushed_limit: 0\nunflushed_policy: drop\n" + ONE_STORAGE)
    assert load_mount_config("storage.yaml").unflushed == Unflushed(limit=0, policy="drop")
    write(in_tmp, "unflushed_limit: 16M\n" + ONE_STORAGE)
    assert load_mount_config("storage.yaml").unflushed == Unflushed(16 << 20, "flush")


def test_busy_poll_is_read_and_zero_turns_it_off(in_tmp):
    write(in_tmp, ONE_STORAGE)
    assert load_mount_config("storage.yaml").busy_poll == pytest.approx(200e-6)
    write(in_tmp, "busy_poll: 1.5ms\n" + ONE_STORAGE)
    assert load_mount_config("storage.yaml").busy_poll == pytest.approx(1.5e-3)
    write(in_tmp, "busy_poll: 0\n" + ONE_STORAGE)
    assert load_mount_config("storage.yaml").busy_poll == 0


def test_tcp_congestion_is_read_and_defaults_to_the_hosts(in_tmp):
    write(in_tmp, ONE_STORAGE)
    assert load_mount_config("storage.yaml").tcp_congestion is None
    write(in_tmp, "tcp_congestion: cubic\n" + ONE_STORAGE)
    assert load_mount_config("storage.yaml").tcp_congestion == "cubic"


def test_cipher_none_is_allowed_with_a_key(in_tmp):
    write(in_tmp, "key_file: /k\ncipher: none\n" + ONE_STORAGE)
    assert load_mount_config("storage.yaml").cipher == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "timout: 2s\n" + ONE_STORAGE,
            "storage.yaml:1: timout: unknown key 'timout' (did you mean 'timeouts'?)",
            id="unknown-top-level-key",
        ),
        pytest.param(
            "timeouts:\n  resend: 2s\n  resnd: 3s\n" + ONE_STORAGE,
            "storage.yaml:3: timeouts.resnd: unknown key 'resnd' (did you mean 'resend'?)",
            id="unknown-timeout-key",
        ),
        pytest.param(
            ONE_STORAGE + "        zzz: 1\n",
            "storage.yaml:6: storages.vol0.nodes[0].zzz: unknown key 'zzz' "
            "(expected one of: export, local, nbd, remote, size, storage, tls_ca, tls_cert, "
            "tls_key)",
            id="unknown-node-key-lists-allowed-keys",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - remote: node1:1025
                  - remote: node2:1025
                    size: 10Q
            """,
            "storage.yaml:7: storages.vol0.nodes[1].size: bad size '10Q' "
            "(use a number with K/M/G/T)",
            id="bad-size",
        ),
        pytest.param(
            ONE_STORAGE + "        size: 0\n",
            "storage.yaml:6: storages.vol0.nodes[0].size: must be greater than zero",
            id="zero-size",
        ),
        pytest.param(
            "timeouts:\n  resend: 2x\n" + ONE_STORAGE,
            "storage.yaml:2: timeouts.resend: bad duration '2x' (use a number with ms/s/m)",
            id="bad-duration",
        ),
        pytest.param(
            "timeouts:\n  keepalive: 0ms\n" + ONE_STORAGE,
            "storage.yaml:2: timeouts.keepalive: duration must be greater than zero, got '0ms'",
            id="zero-duration",
        ),
        pytest.param(
            "timeouts:\n  max_resends: -1\n" + ONE_STORAGE,
            "storage.yaml:2: timeouts.max_resends: bad number '-1' (expected a whole number)",
            id="negative-max-resends",
        ),
        pytest.param(
            "timeouts: 5s\n" + ONE_STORAGE,
            "storage.yaml:1: timeouts: expected a mapping of keys, got '5s'",
            id="timeouts-not-a-mapping",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - size: 1G
            """,
            "storage.yaml:5: storages.vol0.nodes[0]: node needs one of "
            "remote:, local:, storage:, nbd:",
            id="missing-node-kind",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - remote: node1:1025
                    local: /dev/sdb
            """,
            "storage.yaml:6: storages.vol0.nodes[0].local: node has both 'remote' and 'local' "
            "(give exactly one of remote, local, storage, nbd)",
            id="two-node-kinds",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - local: /dev/sdb
                    export: disk1
            """,
            "storage.yaml:6: storages.vol0.nodes[0].export: "
            "'export' is only for remote: nodes, not local:",
            id="export-on-local-node",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes: [{local: /a}]
              big:
                algorithm: linear
                nodes:
                  - storage: vol
            """,
            "storage.yaml:8: storages.big.nodes[0].storage: unknown storage 'vol' "
            "(did you mean 'vol0'?)",
            id="unknown-storage-reference",
        ),
        pytest.param(
            """\
            storages:
              a:
                algorithm: linear
                nodes:
                  - storage: b
              b:
                algorithm: linear
                nodes:
                  - storage: a
            """,
            "storage.yaml:5: storages.a.nodes[0].storage: storage cycle: a -> b -> a",
            id="cycle",
        ),
        pytest.param(
            """\
            storages:
              a:
                algorithm: linear
                nodes: [{storage: b}]
              b:
                algorithm: linear
                nodes: [{storage: c}]
              c:
                algorithm: linear
                nodes: [{local: /x}, {storage: a}]
            """,
            "storage.yaml:4: storages.a.nodes[0].storage: storage cycle: a -> b -> c -> a",
            id="long-cycle",
        ),
        pytest.param(
            """\
            storages:
              a:
                algorithm: linear
                nodes:
                  - local: /x
                  - storage: a
            """,
            "storage.yaml:6: storages.a.nodes[1].storage: storage cycle: a -> a",
            id="self-reference",
        ),
        pytest.param(
            """\
            storages:
              shared:
                algorithm: linear
                nodes: [{local: /x}]
              one:
                algorithm: linear
                nodes:
                  - storage: shared
              two:
                algorithm: linear
                nodes:
                  - storage: shared
            """,
            "storage.yaml:12: storages.two.nodes[0].storage: storage 'shared' is already a node "
            "of storage 'one' (line 8); a storage can be a node of only one storage",
            id="storage-with-two-owners",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - remote: node1:99999
            """,
            "storage.yaml:5: storages.vol0.nodes[0].remote: bad address 'node1:99999': "
            "port 99999 is outside 1..65535",
            id="bad-port",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - remote: "[fd00::zz]:1025"
            """,
            "storage.yaml:5: storages.vol0.nodes[0].remote: bad address '[fd00::zz]:1025': "
            "'fd00::zz' is not an IPv6 address",
            id="bad-ipv6-address",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - remote: [fd00::6]:1025
            """,
            "storage.yaml:5: YAML syntax error: expected <block end>, but found '<scalar>' "
            '(quote IPv6 addresses: "[fd00::6]:1025")',
            id="unquoted-ipv6-address",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - nbd: http://host/x
            """,
            "storage.yaml:5: storages.vol0.nodes[0].nbd: bad NBD URI 'http://host/x' "
            "(use nbd[s]://HOST[:PORT][/EXPORT] or nbd[s]+unix:///EXPORT?socket=/PATH)",
            id="bad-nbd-scheme",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - nbd: nbd://nbdhost:70000/x
            """,
            "storage.yaml:5: storages.vol0.nodes[0].nbd: bad NBD URI 'nbd://nbdhost:70000/x' "
            "(expected nbd://HOST[:PORT][/EXPORT])",
            id="nbd-bad-port",
        ),
        pytest.param(
            """\
            storages:
              vol0:
                algorithm: linear
                nodes:
                  - nbd: nbd+unix:///export
            """,
            "storage.yaml:5: storages.vol0.nodes[0].nbd: bad NBD URI 'nbd+unix:///export' "
            "(expected nbd+unix:///EXPORT?socket=/PATH)",
            id="nbd-unix-without-socket",
        ),
        pytest.param(
            "key_file: /k\ncipher: aes-128-gcm\n" + ONE_STORAGE,
            "storage.yaml:2: cipher: unknown value 'aes-128-gcm' (did you mean 'aes-256-gcm'?)",
            id="bad-cipher",
        ),
        pytest.param(
            "cipher: chacha20-poly1305\n" + ONE_STORAGE,
            "storage.yaml:1: cipher: cipher 'chacha20-poly1305' needs key_file (without a key, "
            "frames are only checksummed, not encrypted or authenticated)",
            id="cipher-without-key",
        ),
        pytest.param(
            "checksum: md5\n" + ONE_STORAGE,
            "storage.yaml:1: checksum: unknown value 'md5' (expected one of: xxh3-128)",
            id="bad-checksum",
        ),
        pytest.param(
            "key_file: [a, b]\n" + ONE_STORAGE,
            "storage.yaml:1: key_file: expected a single value, got a list",
            id="key-file-not-a-path",
        ),
        pytest.param(
            "max_in_flight: 0\n" + ONE_STORAGE,
            "storage.yaml:1: max_in_flight: 0 is out of range (must be between 1 and 4096)",
            id="max-in-flight-zero",
        ),
        pytest.param(
            "unflushed_policy: keep\n" + ONE_STORAGE,
            "storage.yaml:1: unflushed_policy: unknown value 'keep' (expected one of: drop, flush)",
            id="unflushed-policy-unknown",
        ),
        pytest.param(
            "unflushed_limit: lots\n" + ONE_STORAGE,
            "storage.yaml:1: unflushed_limit: bad size 'lots' (use a number with K/M/G/T)",
            id="unflushed-limit-not-a-size",
        ),
        pytest.param(
            "busy_poll: 1s\n" + ONE_STORAGE,
            "storage.yaml:1: busy_poll: 1s is too long (at most 10ms; 0 turns it off)",
            id="busy-poll-too-long",
        ),
        pytest.param(
            "busy_poll: soon\n" + ONE_STORAGE,
            "storage.yaml:1: busy_poll: bad duration 'soon' (use a number with ms/s/m)",
            id="busy-poll-not-a-duration",
        ),
        pytest.param(
            "tcp_congestion: Cubic!\n" + ONE_STORAGE,
            "storage.yaml:1: tcp_congestion: bad TCP congestion control name 'Cubic!' "
            "(lower-case letters, digits and '_', at most 15: e.g. cubic, bbr, reno)",
            id="tcp-congestion-bad-name",
        ),
        pytest.param(
            "max_in_flight: many\n" + ONE_STORAGE,
            "storage.yaml:1: max_in_flight: bad number 'many' (expected a whole number)",
            id="max-in-flight-not-a-number",
        ),
        pytest.param(
            "storages:\n  vol0: [\n",
            "storage.yaml:3: YAML syntax error: "
            "expected the node content, but found '<stream end>'",
            id="yaml-syntax-error",
        ),
        pytest.param(
            ONE_STORAGE + "---\n" + ONE_STORAGE,
            "storage.yaml:6: YAML syntax error: but found another document",
            id="two-yaml-documents",
        ),
        pytest.param(
            "",
            "storage.yaml:1: empty config (expected a mapping with 'storages')",
            id="empty-file",
        ),
        pytest.param(
            "# nothing yet\n",
            "storage.yaml:1: empty config (expected a mapping with 'storages')",
            id="only-comments",
        ),
        pytest.param(
            "- vol0\n",
            "storage.yaml:1: expected a mapping with 'storages', got a list",
            id="top-level-list",
        ),
        pytest.param(
            "max_in_flight: 8\n",
            "storage.yaml:1: missing key 'storages'",
            id="missing-storages",
        ),
        pytest.param(
            "storages: {}\n",
            "storage.yaml:1: storages: no storages defined",
            id="no-storages",
        ),
        pytest.param(
            "storages:\n",
            "storage.yaml:1: storages: expected a mapping of keys, got nothing",
            id="storages-empty-value",
        ),
        pytest.param(
            ONE_STORAGE.replace("vol0", ".hidden"),
            "storage.yaml:2: storages..hidden: bad storage name '.hidden' "
            "(use letters, digits, '.', '_', '-', not starting with '.')",
            id="hidden-storage-name",
        ),
        pytest.param(
            ONE_STORAGE.replace("vol0", "a/b"),
            "storage.yaml:2: storages.a/b: bad storage name 'a/b' "
            "(use letters, digits, '.', '_', '-', not starting with '.')",
            id="storage-name-with-slash",
        ),
        pytest.param(
            ONE_STORAGE.replace("linear", "raid5"),
            "storage.yaml:3: storages.vol0.algorithm: unknown value 'raid5' "
            "(expected one of: linear, mirror)",
            id="unknown-algorithm",
        ),
        pytest.param(
            ONE_STORAGE.replace("algorithm: linear", "algorithm:"),
            "storage.yaml:3: storages.vol0.algorithm: missing value",
            id="algorithm-without-value",
        ),
        pytest.param(
            "storages:\n  vol0:\n    nodes: [{local: /a}]\n",
            "storage.yaml:2: storages.vol0: missing key 'algorithm'",
            id="missing-algorithm",
        ),
        pytest.param(
            "storages:\n  vol0:\n    algorithm: linear\n    nodes: []\n",
            "storage.yaml:4: storages.vol0.nodes: needs at least 1 node",
            id="no-nodes",
        ),
        pytest.param(
            "storages:\n  vol0:\n    algorithm: mirror\n    nodes: [{local: /a}]\n",
            "storage.yaml:4: storages.vol0.nodes: mirror needs at least 2 nodes, got 1",
            id="mirror-with-one-leg",
        ),
        pytest.param(
            ONE_STORAGE.replace("    nodes:", "    region_size: 1M\n    nodes:"),
            "storage.yaml:4: storages.vol0.region_size: not an option of algorithm 'linear'",
            id="mirror-option-on-linear",
        ),
        pytest.param(
            "storages:\n  m:\n    algorithm: mirror\n    region_size: 96K\n"
            "    nodes: [{local: /a}, {local: /b}]\n",
            "storage.yaml:4: storages.m.region_size: 96K is not a power of two of at least 64K",
            id="region-size-not-power-of-two",
        ),
        pytest.param(
            "storages:\n  m:\n    algorithm: mirror\n    region_size: 32K\n"
            "    nodes: [{local: /a}, {local: /b}]\n",
            "storage.yaml:4: storages.m.region_size: 32K is not a power of two of at least 64K",
            id="region-size-too-small",
        ),
        pytest.param(
            "storages:\n  m:\n    algorithm: mirror\n    resync_rate: fast\n"
            "    nodes: [{local: /a}, {local: /b}]\n",
            "storage.yaml:4: storages.m.resync_rate: bad size 'fast' (use a number with K/M/G/T)"
            "; bytes per second, 0 = unlimited",
            id="bad-resync-rate",
        ),
        pytest.param(
            "storages:\n  m:\n    algorithm: mirror\n    resync_size: 0\n"
            "    nodes: [{local: /a}, {local: /b}]\n",
            "storage.yaml:4: storages.m.resync_size: must be greater than zero",
            id="zero-resync-size",
        ),
        pytest.param(
            ONE_STORAGE + "  vol0:\n    algorithm: linear\n    nodes: [{local: /a}]\n",
            "storage.yaml:6: storages.vol0: duplicate key 'vol0' (first at line 2)",
            id="duplicate-storage",
        ),
        pytest.param(
            "storages:\n  vol0:\n    algorithm: linear\n    nodes: {local: /a}\n",
            "storage.yaml:4: storages.vol0.nodes: expected a list of nodes, got a mapping",
            id="nodes-not-a-list",
        ),
    ],
)
def test_mount_config_errors_name_file_line_and_key(in_tmp, text, message):
    assert mount_error(in_tmp, text) == message


def test_missing_config_file_is_named(in_tmp):
    with pytest.raises(ConfigError) as info:
        load_mount_config("nope.yaml")
    assert str(info.value) == "nope.yaml: config file not found"


def test_unreadable_config_is_named(in_tmp):
    (in_tmp / "dir.yaml").mkdir()
    with pytest.raises(ConfigError) as info:
        load_mount_config("dir.yaml")
    assert str(info.value) == "dir.yaml: cannot read config: Is a directory"


def test_config_that_is_not_utf8_is_named(in_tmp):
    (in_tmp / "storage.yaml").write_bytes(b"storages:\n  \xff: {}\n")
    with pytest.raises(ConfigError) as info:
        load_mount_config("storage.yaml")
    assert str(info.value) == "storage.yaml: not UTF-8 text (byte 12)"


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


def test_loading_never_resolves_host_names(in_tmp, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("config loading must not resolve names")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    write(in_tmp, DESIGN_EXAMPLE.replace("node3", "no-such-host.invalid"))
    config = load_mount_config("storage.yaml")
    assert config.storages["big"].nodes[0].address == Address("tcp", "no-such-host.invalid", 1025)


# ---------------------------------------------------------------- export.yaml

EXPORT_EXAMPLE = """\
listen:
  - 0.0.0.0:1025
  - "[::]:1025"
  - unix:/run/dstfuse/export.sock
key_file: cluster.key
nbd_listen: [127.0.0.1]
max_connections: 32
handshake_timeout: 3s
max_request: 1M
exports:
  - name: disk1
    path: /dev/sdb1
    allow:
      - 10.0.0.0/8: rw
      - 192.168.1.5: ro
      - "::1=rw"
      - fd00::/8
  - name: images
    path: images/a.img
    read_only: yes
"""


def test_export_config_loads_into_the_expected_dataclasses(in_tmp):
    write(in_tmp, EXPORT_EXAMPLE, "export.yaml")
    assert load_export_config("export.yaml") == ExportConfig(
        listen=(
            Address("tcp", "0.0.0.0", 1025),
            Address("tcp", "::", 1025),
            Address("unix", path="/run/dstfuse/export.sock"),
        ),
        key_file=in_tmp / "cluster.key",
        exports=(
            ExportSpec(
                name="disk1",
                path=Path("/dev/sdb1"),
                read_only=False,
                allow=(
                    AclRule(ipaddress.ip_network("10.0.0.0/8"), writable=True),
                    AclRule(ipaddress.ip_network("192.168.1.5/32"), writable=False),
                    AclRule(ipaddress.ip_network("::1/128"), writable=True),
                    AclRule(ipaddress.ip_network("fd00::/8"), writable=True),
                ),
            ),
            ExportSpec(name="images", path=in_tmp / "images/a.img", read_only=True),
        ),
        nbd_listen=(Address("tcp", "127.0.0.1", 10809),),
        max_connections=32,
        handshake_timeout=3.0,
        max_request=1 << 20,
    )


def test_export_config_reads_tcp_congestion(in_tmp):
    write(in_tmp, "tcp_congestion: reno\nexports:\n  - {name: d, path: /d}\n", "export.yaml")
    assert load_export_config("export.yaml").tcp_congestion == "reno"
    write(in_tmp, "tcp_congestion: 'no way'\nexports:\n  - {name: d, path: /d}\n", "export.yaml")
    with pytest.raises(ConfigError, match="export.yaml:1: tcp_congestion: bad TCP congestion"):
        load_export_config("export.yaml")


def test_export_config_defaults(in_tmp):
    write(in_tmp, "exports:\n  - {name: d, path: /d}\n", "export.yaml")
    config = load_export_config("export.yaml")
    assert config == ExportConfig(
        listen=(Address("tcp", "0.0.0.0", 1025),),
        key_file=None,
        exports=(ExportSpec(name="d", path=Path("/d")),),
    )
    assert config.nbd_listen == ()
    assert config.max_connections == 256
    assert config.handshake_timeout == 10.0
    assert config.max_request == 4 << 20
    assert config.exports[0].allow == ()  # only loopback, enforced by the server


def test_export_allow_may_be_one_mapping(in_tmp):
    write(
        in_tmp,
        "exports:\n  - name: d\n    path: /d\n    allow:\n      10.1.0.0/16: ro\n      ::1: rw\n",
        "export.yaml",
    )
    rules = load_export_config("export.yaml").exports[0].allow
    assert rules == (
        AclRule(ipaddress.ip_network("10.1.0.0/16"), writable=False),
        AclRule(ipaddress.ip_network("::1/128"), writable=True),
    )
    assert [str(rule) for rule in rules] == ["10.1.0.0/16=ro", "::1/128=rw"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "listn: [host]\nexports: [{name: d, path: /d}]\n",
            "export.yaml:1: listn: unknown key 'listn' (did you mean 'listen'?)",
            id="unknown-key",
        ),
        pytest.param(
            "exports:\n  - name: d\n    path: /d\n    readonly: true\n",
            "export.yaml:4: exports[0].readonly: unknown key 'readonly' "
            "(did you mean 'read_only'?)",
            id="unknown-export-key",
        ),
        pytest.param(
            "listen:\n  - host:0\nexports: [{name: d, path: /d}]\n",
            "export.yaml:2: listen[0]: bad address 'host:0': port 0 is outside 1..65535",
            id="bad-listen-address",
        ),
        pytest.param(
            "listen: []\nexports: [{name: d, path: /d}]\n",
            "export.yaml:1: listen: needs at least 1 address",
            id="empty-listen",
        ),
        pytest.param(
            "exports: []\n",
            "export.yaml:1: exports: needs at least 1 export",
            id="no-exports",
        ),
        pytest.param(
            "exports:\n  - path: /d\n",
            "export.yaml:2: exports[0]: missing key 'name'",
            id="export-without-name",
        ),
        pytest.param(
            "exports:\n  - name: d\n",
            "export.yaml:2: exports[0]: missing key 'path'",
            id="export-without-path",
        ),
        pytest.param(
            "exports:\n  - {name: d, path: /d}\n  - {name: d, path: /e}\n",
            "export.yaml:3: exports[1]: export name 'd' is already used at line 2",
            id="duplicate-export-name",
        ),
        pytest.param(
            "exports:\n  - {name: 'a b', path: /d}\n",
            "export.yaml:2: exports[0].name: bad export name 'a b' "
            "(use letters, digits, '.', '_', '-', not starting with '.')",
            id="bad-export-name",
        ),
        pytest.param(
            "exports:\n  - {name: d, path: /d, read_only: maybe}\n",
            "export.yaml:2: exports[0].read_only: expected true or false, got 'maybe'",
            id="bad-read-only",
        ),
        pytest.param(
            "exports:\n  - name: d\n    path: /d\n    allow:\n      - 10.0.0.0/8: rx\n",
            "export.yaml:5: exports[0].allow[0].10.0.0.0/8: bad access mode 'rx' (use rw or ro)",
            id="bad-acl-mode",
        ),
        pytest.param(
            "exports:\n  - name: d\n    path: /d\n    allow:\n      - 10.0.0.1/8\n",
            "export.yaml:5: exports[0].allow[0]: bad access rule '10.0.0.1/8': "
            "10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)",
            id="acl-host-bits",
        ),
        pytest.param(
            "exports:\n  - name: d\n    path: /d\n    allow:\n      - somehost=rw\n",
            "export.yaml:5: exports[0].allow[0]: bad access rule 'somehost=rw': 'somehost' is "
            "not an IP address or network (use e.g. 10.0.0.0/8, 192.168.1.5 or fd00::/8)",
            id="acl-host-name",
        ),
        pytest.param(
            "max_request: 1K\nexports: [{name: d, path: /d}]\n",
            "export.yaml:1: max_request: 1K is out of range (must be between 4K and 64M)",
            id="max-request-too-small",
        ),
        pytest.param(
            "max_request: 65M\nexports: [{name: d, path: /d}]\n",
            "export.yaml:1: max_request: 65M is out of range (must be between 4K and 64M)",
            id="max-request-too-large",
        ),
        pytest.param(
            "max_connections: 0\nexports: [{name: d, path: /d}]\n",
            "export.yaml:1: max_connections: 0 is out of range (must be between 1 and 65536)",
            id="max-connections-zero",
        ),
        pytest.param(
            "handshake_timeout: soon\nexports: [{name: d, path: /d}]\n",
            "export.yaml:1: handshake_timeout: bad duration 'soon' (use a number with ms/s/m)",
            id="bad-handshake-timeout",
        ),
        pytest.param(
            "",
            "export.yaml:1: empty config (expected a mapping with 'exports')",
            id="empty-file",
        ),
        pytest.param(
            "exports:\n  - {name: d, path: /d\n",
            "export.yaml:3: YAML syntax error: expected ',' or '}', but got '<stream end>'",
            id="yaml-syntax-error",
        ),
    ],
)
def test_export_config_errors_name_file_line_and_key(in_tmp, text, message):
    assert export_error(in_tmp, text) == message


# ------------------------------------------------------------------ ACL rules


@pytest.mark.parametrize(
    ("text", "network", "writable"),
    [
        ("10.0.0.0/8=rw", "10.0.0.0/8", True),
        ("192.168.1.5=ro", "192.168.1.5/32", False),
        ("::1", "::1/128", True),
        ("fd00::/8=rw", "fd00::/8", True),
        ("[::1]=ro", "::1/128", False),
        (" 127.0.0.0/8 = RO ", "127.0.0.0/8", False),
        ("0.0.0.0/0", "0.0.0.0/0", True),
    ],
)
def test_parse_acl_rule(text, network, writable):
    assert parse_acl_rule(text) == AclRule(ipaddress.ip_network(network), writable)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.0/8=rx", "bad access rule '10.0.0.0/8=rx': mode must be 'rw' or 'ro'"),
        ("10.0.0.0/8=", "bad access rule '10.0.0.0/8=': mode must be 'rw' or 'ro'"),
        (
            "10.0.0.1/8=rw",
            "bad access rule '10.0.0.1/8=rw': 10.0.0.1/8 has host bits set "
            "(did you mean 10.0.0.0/8?)",
        ),
        (
            "host.example=rw",
            "bad access rule 'host.example=rw': 'host.example' is not an IP address or network "
            "(use e.g. 10.0.0.0/8, 192.168.1.5 or fd00::/8)",
        ),
        (
            "",
            "bad access rule '': '' is not an IP address or network "
            "(use e.g. 10.0.0.0/8, 192.168.1.5 or fd00::/8)",
        ),
        (
            "10.0.0.0/33",
            "bad access rule '10.0.0.0/33': '10.0.0.0/33' is not an IP address or network "
            "(use e.g. 10.0.0.0/8, 192.168.1.5 or fd00::/8)",
        ),
    ],
)
def test_parse_acl_rule_rejects_with_clear_message(text, message):
    with pytest.raises(ValueError) as info:
        parse_acl_rule(text)
    assert str(info.value) == message


def test_export_ciphers_restrict_the_node_and_need_a_key(in_tmp):
    write(
        in_tmp,
        "key_file: k\nciphers: [aes-256-gcm, none]\nexports:\n  - {name: d, path: /d}\n",
        "export.yaml",
    )
    assert load_export_config("export.yaml").ciphers == ("aes-256-gcm", "none")
    message = export_error(in_tmp, "ciphers: aes-256-gcm\nexports:\n  - {name: d, path: /d}\n")
    assert message.startswith("export.yaml:1: ciphers:") and "key_file" in message
    message = export_error(
        in_tmp, "key_file: k\nciphers: [rot13]\nexports:\n  - {name: d, path: /d}\n"
    )
    assert "export.yaml:2" in message and "rot13" in message


@pytest.mark.parametrize(
    ("uri", "address", "export", "tls"),
    [
        ("nbd://h", "h:10809", "", False),
        ("nbd://h:1234/", "h:1234", "", False),
        ("nbds://[::1]:99/a%20b", "[::1]:99", "a b", True),
        ("nbd+unix:///disk?socket=/run/n.sock", "unix:/run/n.sock", "disk", False),
        ("nbds+unix:///?socket=/run/n.sock", "unix:/run/n.sock", "", True),
    ],
)
def test_nbd_uris_parse_as_libnbd_does(uri, address, export, tls):
    parsed = parse_nbd_uri(uri)
    assert (str(parsed.address), parsed.export, parsed.tls, str(parsed)) == (
        address,
        export,
        tls,
        uri,
    )

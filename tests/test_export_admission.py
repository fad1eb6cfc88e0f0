"""`AcceptGate` (dstfuse/export/admission.py), the accept-time ACL check of
the export server and of a mount's NBD listener: who passes, and the
rate-limited refusal log. Unit tests on trio's MockClock."""

from __future__ import annotations

import ipaddress
import logging

import trio

from dstfuse.config import parse_acl_rule
from dstfuse.export.acl import ExportAcl
from dstfuse.export.admission import REFUSAL_LOG_INTERVAL, AcceptGate
from dstfuse.export.session import Peer


def tcp_peer(address: str, port: int = 40000) -> Peer:
    return Peer(f"{address}:{port}", ipaddress.ip_address(address))


def gate(*rule_sets: list[str]) -> AcceptGate:
    acls = [ExportAcl([parse_acl_rule(rule) for rule in rules]) for rules in rule_sets]
    return AcceptGate(acls, owner="storages vol0", acl_name="the mount's nbd_allow")


async def test_a_peer_passes_when_any_acl_admits_it_and_unix_peers_always_do():
    two = gate(["10.0.0.0/8=ro"], ["192.168.1.5"])
    assert two.refusal(tcp_peer("10.1.2.3")) is None
    assert two.refusal(tcp_peer("192.168.1.5")) is None
    assert two.refusal(Peer("unix:/run/v.sock", None)) is None
    assert two.refusal(tcp_peer("192.168.1.6")) == (
        "address 192.168.1.6 is not allowed by the mount's nbd_allow")
    loopback_only = gate([])
    assert loopback_only.refusal(tcp_peer("127.0.0.9")) is None
    assert loopback_only.refusal(tcp_peer("10.0.0.1")) is not None


async def test_refusals_are_logged_once_per_interval_per_address_with_a_count(
        autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="dstfuse.export.admission")
    refusing = gate(["10.0.0.0/8"])
    for _ in range(3):
        assert refusing.refusal(tcp_peer("192.168.0.1")) is not None
    assert refusing.refusal(tcp_peer("192.168.0.2")) is not None
    await trio.sleep(REFUSAL_LOG_INTERVAL)
    assert refusing.refusal(tcp_peer("192.168.0.1", 40001)) is not None
    assert [record.getMessage() for record in caplog.records] == [
        "storages vol0: refused 192.168.0.1:40000: address 192.168.0.1 is not allowed by "
        "the mount's nbd_allow",
        "storages vol0: refused 192.168.0.2:40000: address 192.168.0.2 is not allowed by "
        "the mount's nbd_allow",
        "storages vol0: refused 192.168.0.1:40001: address 192.168.0.1 is not allowed by "
        "the mount's nbd_allow (2 more refused since the last report)",
    ]

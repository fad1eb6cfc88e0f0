"""Who may use an export: the export's `allow` rules applied to a peer address.

Rules (`AclRule(network, writable)` from the config):

- the rule with the longest matching prefix decides (so `10.0.0.0/8=ro`
  with `10.0.0.5=rw` gives 10.0.0.5 write access whatever the order); among
  equally long matches the first listed wins;
- with no rules, only loopback peers (127.0.0.0/8, ::1 and IPv4-mapped
  loopback) may connect, with read-write access;
- unix-socket peers are always admitted with the export's full access: the
  socket file's permissions are what guards them;
- an IPv4-mapped IPv6 peer (::ffff:a.b.c.d) is matched as the IPv4 address;
- a read-only export caps every grant at READ.

This module decides; it never logs and never touches sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Protocol

from ..protocol import Permission

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

READ_WRITE = Permission.READ | Permission.WRITE


class AclRuleLike(Protocol):
    """What a rule needs to offer (`dstfuse.config.AclRule` does)."""

    @property
    def network(self) -> IPNetwork | str: ...

    @property
    def writable(self) -> bool: ...


def peer_ip(host: str) -> IPAddress:
    """The IP address a socket reported (`getpeername()[0]`), with IPv4-mapped
    IPv6 turned into IPv4 and any `%scope` suffix dropped."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ExportAcl:
    """The access rules of one export."""

    def __init__(self, rules: Sequence[AclRuleLike] = (), *, read_only: bool = False) -> None:
        self.rules: tuple[tuple[IPNetwork, bool], ...] = tuple(
            (_as_network(rule.network), bool(rule.writable)) for rule in rules
        )
        self.read_only = read_only

    def __str__(self) -> str:
        if not self.rules:
            return "loopback only"
        return ", ".join(f"{net}={'rw' if writable else 'ro'}" for net, writable in self.rules)

    def permission(self, peer: IPAddress | str | None) -> Permission | None:
        """What `peer` may do: an IP address (or its text) for TCP peers, None
        for a unix-socket peer. None means refused."""
        if peer is None:
            return self._cap(True)
        address = peer_ip(peer) if isinstance(peer, str) else peer
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not self.rules:
            return self._cap(True) if address.is_loopback else None
        best: tuple[int, bool] | None = None
        for network, writable in self.rules:
            if address.version == network.version and address in network:
                if best is None or network.prefixlen > best[0]:
                    best = (network.prefixlen, writable)
        if best is None:
            return None
        return self._cap(best[1])

    def _cap(self, writable: bool) -> Permission:
        if writable and not self.read_only:
            return READ_WRITE
        return Permission.READ


def _as_network(network: IPNetwork | str) -> IPNetwork:
    if isinstance(network, str):
        return ipaddress.ip_network(network, strict=False)
    return network

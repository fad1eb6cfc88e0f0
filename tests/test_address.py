"""Addresses as users write them (dstfuse.address)."""

from __future__ import annotations

import pytest

from dstfuse.address import Address, parse_address


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("10.0.0.5:1025", Address("tcp", "10.0.0.5", 1025), "10.0.0.5:1025"),
        ("10.0.0.5", Address("tcp", "10.0.0.5", 1025), "10.0.0.5:1025"),
        ("node3:9000", Address("tcp", "node3", 9000), "node3:9000"),
        ("node3", Address("tcp", "node3", 1025), "node3:1025"),
        ("storage-1.example.org:65535", Address("tcp", "storage-1.example.org", 65535), None),
        ("0.0.0.0:1", Address("tcp", "0.0.0.0", 1), None),
        ("[fd00::6]:1025", Address("tcp", "fd00::6", 1025), "[fd00::6]:1025"),
        ("[FD00:0::0006]:80", Address("tcp", "fd00::6", 80), "[fd00::6]:80"),
        ("[::1]", Address("tcp", "::1", 1025), "[::1]:1025"),
        ("[::]:1025", Address("tcp", "::", 1025), "[::]:1025"),
        ("::1", Address("tcp", "::1", 1025), "[::1]:1025"),
        ("fe80::1%eth0", Address("tcp", "fe80::1%eth0", 1025), "[fe80::1%eth0]:1025"),
        ("unix:/run/dstfuse.sock", Address("unix", path="/run/dstfuse.sock"), None),
        (" node3:1025 ", Address("tcp", "node3", 1025), "node3:1025"),
    ],
)
def test_parse_address_forms(text, expected, canonical):
    address = parse_address(text)
    assert address == expected
    assert str(address) == (canonical or text)
    assert parse_address(str(address)) == address


def test_parse_address_uses_the_given_default_port():
    assert parse_address("nbdhost", default_port=10809).port == 10809
    assert parse_address("[::1]", default_port=10809).port == 10809
    assert parse_address("nbdhost:1", default_port=10809).port == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host:0", "bad address 'host:0': port 0 is outside 1..65535"),
        ("host:65536", "bad address 'host:65536': port 65536 is outside 1..65535"),
        ("host:http", "bad address 'host:http': port 'http' is not a number"),
        ("host:", "bad address 'host:': port '' is not a number"),
        ("host:-1", "bad address 'host:-1': port '-1' is not a number"),
        ("[::1]:0", "bad address '[::1]:0': port 0 is outside 1..65535"),
        (":1025", "bad address ':1025': empty host"),
        ("", "empty address (expected HOST:PORT, [IPV6]:PORT or unix:/PATH)"),
        ("unix:run/x.sock", "bad address 'unix:run/x.sock': unix socket path must be absolute"),
        ("unix:", "bad address 'unix:': unix socket path must be absolute"),
        ("[fd00::6:1025", "bad address '[fd00::6:1025': missing ']' after IPv6 address"),
        ("[fd00::6]1025", "bad address '[fd00::6]1025': expected ':PORT' after ']'"),
        ("[10.0.0.1]:1025", "bad address '[10.0.0.1]:1025': '10.0.0.1' is not an IPv6 address"),
        ("fd00::zz", "bad address 'fd00::zz': 'fd00::zz' is not an IPv6 address"),
        ("10.0.0.256:1025", "bad address '10.0.0.256:1025': '10.0.0.256' is not an IPv4 address"),
        ("bad host:1", "bad address 'bad host:1': 'bad host' is not a host name or IP address"),
        ("-lead:1", "bad address '-lead:1': '-lead' is not a host name or IP address"),
    ],
)
def test_parse_address_rejects_with_clear_message(text, message):
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "udp", "host": "h", "port": 1},
        {"kind": "tcp", "host": "", "port": 1},
        {"kind": "tcp", "host": "h", "port": 0},
        {"kind": "unix", "path": "relative"},
    ],
)
def test_address_refuses_inconsistent_fields(fields):
    with pytest.raises(ValueError):
        Address(**fields)


def test_address_is_hashable_and_frozen():
    address = parse_address("node3:1025")
    assert {address: 1}[parse_address("node3")] == 1
    with pytest.raises(AttributeError):
        address.port = 1  # type: ignore[misc]

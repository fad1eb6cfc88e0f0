"""Negotiation: versions, modes and keys. A mismatch fails the handshake
with a message a user can act on, on the side that detects it, before any
request is accepted; the other side learns why through REFUSED."""

from __future__ import annotations

import errno

import pytest

from dstfuse.protocol import (
    KEYED_MODES,
    Command,
    Connection,
    HandshakeFailed,
    HelloReceived,
    LocalProtocolError,
    Refused,
    RemoteProtocolError,
    Request,
    Role,
    State,
    offered_modes,
)
from dstfuse.protocol import attributes as attrs
from dstfuse.protocol.constants import HEADER_SIZE, TAG_SIZE, Attr
from dstfuse.protocol.testing import CLIENT_ID, feed, forge_frame, make_pair, open_pair

KEY_A = b"A" * 32
KEY_B = b"B" * 32


def payload_of(frame: bytes) -> bytes:
    """The plaintext payload of a handshake frame (sealed with the checksum)."""
    return frame[HEADER_SIZE:-TAG_SIZE]


def hello(client: Connection, export: str | None = None) -> bytes:
    return client.hello(export=export, client_id=CLIENT_ID, client_name="client")


def assert_error_state(conn: Connection) -> None:
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Request(Command.PING, 1))


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_wrong_key_is_detected_by_the_client_and_told_to_the_node(mode):
    client, server = make_pair(mode, client_key=KEY_A, server_key=KEY_B)
    feed(server, hello(client))
    challenge = server.challenge(node_name="node")
    with pytest.raises(HandshakeFailed, match="key") as info:
        feed(client, challenge)
    assert_error_state(client)
    # The client explains itself; the node gets a Refused, not a request.
    [refused] = feed(server, client.refuse(errno.EACCES, info.value.message))
    assert refused == Refused(errno.EACCES, info.value.message)
    assert "key" in refused.message
    assert server.state is State.CLOSED


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_wrong_client_proof_is_detected_by_the_node(mode):
    client, server = make_pair(mode)
    feed(server, hello(client))
    feed(client, server.challenge(node_name="node"))
    # A client that skipped its own check (or a forger) sends a bad proof.
    bad_confirm = forge_frame(client, Command.CONFIRM,
                              payload=attrs.encode([(Attr.PROOF, bytes(32))]))
    with pytest.raises(HandshakeFailed, match="key"):
        feed(server, bad_confirm)
    assert_error_state(server)
    # REFUSED is still possible, sealed for the session the client expects.
    [refused] = feed(client, server.refuse(errno.EACCES, "wrong key"))
    assert refused == Refused(errno.EACCES, "wrong key")


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_keyed_confirm_without_proof_is_rejected(mode):
    client, server = make_pair(mode)
    feed(server, hello(client))
    feed(client, server.challenge(node_name="node"))
    with pytest.raises(RemoteProtocolError, match="PROOF"):
        feed(server, forge_frame(client, Command.CONFIRM))


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_keyed_challenge_must_end_with_its_proof(mode):
    client, server = make_pair(mode)
    feed(server, hello(client))
    challenge = payload_of(server.challenge(node_name="node"))
    moved = attrs.encode([(Attr.PROOF, challenge[-32:])]) + challenge[:-36]
    with pytest.raises(RemoteProtocolError, match="PROOF"):
        feed(client, forge_frame(Connection(Role.SERVER), Command.CHALLENGE, payload=moved))
    client, server = make_pair(mode)
    feed(server, hello(client))
    challenge = payload_of(server.challenge(node_name="node"))
    with pytest.raises(RemoteProtocolError, match="PROOF"):
        feed(client, forge_frame(Connection(Role.SERVER), Command.CHALLENGE,
                                 payload=challenge[:-36]))


@pytest.mark.parametrize(
    "client_key, server_key, client_mode",
    [(KEY_A, None, "aes-256-gcm"), (KEY_A, None, "blake2b-mac"), (None, KEY_B, "xxh3-128")],
    ids=["client-only", "client-only-mac", "node-only"],
)
def test_key_on_one_side_only_fails_naming_the_key(client_key, server_key, client_mode):
    client, server = make_pair(client_mode, client_key=client_key, server_key=server_key)
    [hello_event] = feed(server, hello(client))
    with pytest.raises(HandshakeFailed, match="key") as info:
        server.challenge(node_name="node")
    message = info.value.message
    assert client_mode in message  # names what the client offered ...
    assert ("xxh3-128" if server_key is None else "aes-256-gcm") in message  # ... and the node
    [refused] = feed(client, server.refuse(info.value.status, message))
    assert refused.message == message and refused.status == info.value.status
    assert client.state is State.CLOSED


def test_client_with_a_key_refuses_an_unauthenticated_mode():
    # Even if it offered one: accepting it would let anyone forge frames.
    client, server = make_pair(client_key=KEY_A, server_key=None,
                               client_modes=["aes-256-gcm", "xxh3-128"])
    feed(server, hello(client))
    challenge = server.challenge(node_name="node")
    assert server.mode == "xxh3-128"
    with pytest.raises(HandshakeFailed, match="key"):
        feed(client, challenge)


def forged_hello(versions=b"\x01", ciphers=b"xxh3-128") -> bytes:
    payload = attrs.encode([
        (Attr.VERSIONS, versions), (Attr.CLIENT_ID, CLIENT_ID), (Attr.CIPHERS, ciphers),
        (Attr.NONCE, bytes(32)),
    ])
    return forge_frame(Connection(Role.CLIENT), Command.HELLO, payload=payload)


@pytest.mark.parametrize("key", [None, KEY_B])
def test_no_common_version_names_both_offers(key):
    server = Connection(Role.SERVER, key=key)
    [event] = feed(server, forged_hello(versions=bytes([2, 3])))
    assert event.versions == (2, 3)
    with pytest.raises(HandshakeFailed) as info:
        server.challenge(node_name="node")
    assert "[2, 3]" in info.value.message and "[1]" in info.value.message
    assert "version" in info.value.message
    assert info.value.status == errno.EPROTO
    assert server.state is State.ERROR


def test_newest_common_version_is_chosen():
    server = Connection(Role.SERVER)
    feed(server, forged_hello(versions=bytes([7, 1, 2])))
    server.challenge(node_name="node")
    assert server.version == 1


@pytest.mark.parametrize(
    "key, ciphers, allowed",
    [
        (None, b"aegis-256,serpent", "xxh3-128"),
        (KEY_B, b"aegis-256", "aes-256-gcm, chacha20-poly1305, blake2b-mac"),
        (None, b"", "xxh3-128"),
    ],
)
def test_no_common_cipher_names_both_offers(key, ciphers, allowed):
    server = Connection(Role.SERVER, key=key)
    feed(server, forged_hello(ciphers=ciphers))
    with pytest.raises(HandshakeFailed) as info:
        server.challenge(node_name="node")
    offered = ciphers.decode().replace(",", ", ") or "nothing"
    assert f"client offers {offered}" in info.value.message
    assert allowed in info.value.message


def test_server_takes_the_first_offered_mode_it_allows():
    client, server = make_pair(key=KEY_A, client_modes=["chacha20-poly1305", "aes-256-gcm"])
    [event] = feed(server, hello(client))
    assert event == HelloReceived(export=None, client_id=CLIENT_ID, client_name="client",
                                  versions=(1,), modes=("chacha20-poly1305", "aes-256-gcm"))
    feed(client, server.challenge(node_name="node"))
    assert client.mode == server.mode == "chacha20-poly1305"


@pytest.mark.parametrize(
    "version, cipher, word",
    [(b"\x02", b"xxh3-128", "version 2"), (b"\x01", b"blake2b-mac", "blake2b-mac"),
     (b"\x01", b"rot13", "rot13")],
)
def test_client_rejects_a_choice_it_did_not_offer(version, cipher, word):
    client = Connection(Role.CLIENT, modes=["xxh3-128"])
    hello(client)
    payload = attrs.encode([(Attr.VERSION, version), (Attr.CIPHER, cipher),
                            (Attr.NONCE, bytes(32))])
    with pytest.raises(HandshakeFailed, match=word):
        feed(client, forge_frame(Connection(Role.SERVER), Command.CHALLENGE, payload=payload))
    assert_error_state(client)


def test_offered_modes_follow_the_client_config():
    assert offered_modes(False, "aes-256-gcm") == ["xxh3-128"]
    assert offered_modes(True, "aes-256-gcm") == ["aes-256-gcm"]
    assert offered_modes(True, "chacha20-poly1305") == ["chacha20-poly1305"]
    assert offered_modes(True, "none") == ["blake2b-mac"]


# ----------------------------------------------------------------------
# a man in the middle without the key


def reseal(command: Command, payload: bytes, role: Role) -> bytes:
    """Handshake frames are checksummed, not authenticated: anyone can
    rewrite them. Only key confirmation protects them."""
    return forge_frame(Connection(role), command, payload=payload)


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_attribute_moved_between_hello_and_challenge_is_detected(mode):
    # The injection a transcript without lengths would miss: EXPORT appended
    # to HELLO and the same bytes put in front of CHALLENGE give the same
    # concatenation, but not the same length-prefixed transcript.
    injected = attrs.encode([(Attr.EXPORT, b"someone-elses-disk")])
    client, server = make_pair(mode)
    original = payload_of(hello(client, export=None))
    [event] = feed(server, reseal(Command.HELLO, original + injected, Role.CLIENT))
    assert event.export == "someone-elses-disk"
    challenge = payload_of(server.challenge(node_name="node"))
    with pytest.raises(HandshakeFailed):
        feed(client, reseal(Command.CHALLENGE, injected + challenge, Role.SERVER))


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_rewritten_hello_is_detected(mode):
    client, server = make_pair(mode)
    original = attrs.decode(payload_of(hello(client, export="mine")))
    original[Attr.EXPORT] = b"theirs"
    [event] = feed(server, reseal(Command.HELLO, attrs.encode(original.items()), Role.CLIENT))
    assert event.export == "theirs"
    with pytest.raises(HandshakeFailed):
        feed(client, server.challenge(node_name="node"))


@pytest.mark.parametrize("mode", KEYED_MODES)
def test_rewritten_challenge_is_detected(mode):
    client, server = make_pair(mode)
    feed(server, hello(client))
    challenge = payload_of(server.challenge(node_name="node"))
    tampered = challenge.replace(b"node", b"evil")
    with pytest.raises(HandshakeFailed):
        feed(client, reseal(Command.CHALLENGE, tampered, Role.SERVER))


def test_session_keys_differ_per_connection_and_direction():
    client_a, server_a = open_pair("aes-256-gcm", key=KEY_A)
    client_b, server_b = open_pair("aes-256-gcm", key=KEY_A)
    request = Request(Command.WRITE, 1, 0, 16, data=bytes(16))
    frames = {client_a.send(request), client_b.send(request)}
    assert len(frames) == 2  # same key, same request, different bytes

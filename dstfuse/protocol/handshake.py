"""Handshake cryptography and negotiation rules (pure functions).

Key schedule for keyed modes: HKDF-SHA256 over the pre-shared key, salted
with client nonce || server nonce, info "dstfuse/1 <mode>", gives 128 bytes:
client-to-server key, server-to-client key, client confirm key, server
confirm key. Fresh nonces on both sides make every connection's keys new,
so sequence-number nonces never repeat under one key.

Key confirmation: the transcript hash is SHA-256 over the HELLO payload and
the CHALLENGE payload up to its PROOF attribute. The server proves it holds
the key with HMAC(server confirm key, "server" || hash); the client answers
with HMAC(client confirm key, "client" || hash). Either side that holds a
different key fails here, before any request is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .constants import KEYED_MODES, SUPPORTED_VERSIONS, UNKEYED_MODES
from .errors import HandshakeFailed


@dataclass(frozen=True)
class SessionKeys:
    client_write: bytes
    server_write: bytes
    client_confirm: bytes
    server_confirm: bytes


def derive_keys(psk: bytes, client_nonce: bytes, server_nonce: bytes, mode: str) -> SessionKeys:
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=128,
        salt=client_nonce + server_nonce,
        info=b"dstfuse/1 " + mode.encode(),
    ).derive(psk)
    return SessionKeys(material[:32], material[32:64], material[64:96], material[96:])


def transcript_hash(hello_payload: bytes, challenge_prefix: bytes) -> bytes:
    return hashlib.sha256(hello_payload + challenge_prefix).digest()


def proof(confirm_key: bytes, side: bytes, transcript: bytes) -> bytes:
    return hmac.new(confirm_key, side + transcript, hashlib.sha256).digest()


def offered_modes(has_key: bool, cipher: str) -> list[str]:
    """What a client offers: its configured cipher with a key (`none` means
    keyed MAC only), the unkeyed checksum without one."""
    if not has_key:
        return list(UNKEYED_MODES)
    return ["blake2b-mac" if cipher == "none" else cipher]


def allowed_modes(has_key: bool) -> list[str]:
    """What a node accepts: with a key only keyed modes, without only unkeyed."""
    return list(KEYED_MODES if has_key else UNKEYED_MODES)


def choose_mode(offered: list[str], allowed: list[str]) -> str:
    """The first mode the client offers that the node allows; otherwise a
    HandshakeFailed whose message says which side lacks the key."""
    for mode in offered:
        if mode in allowed:
            return mode
    offered_keyed = any(m in KEYED_MODES for m in offered)
    allowed_keyed = any(m in KEYED_MODES for m in allowed)
    if offered_keyed and not allowed_keyed:
        message = (
            f"key mismatch: the client uses a key ({', '.join(offered)}) but the node has "
            "no key_file; configure the same key on both sides"
        )
    elif allowed_keyed and not offered_keyed:
        message = (
            f"key required: the node has a key_file ({', '.join(allowed)}) but the client "
            "has none; set key_file in the client config"
        )
    else:
        message = (
            f"no common cipher: client offers {', '.join(offered) or 'nothing'}, "
            f"node allows {', '.join(allowed)}"
        )
    raise HandshakeFailed(message)


def choose_version(offered: list[int]) -> int:
    common = set(offered) & set(SUPPORTED_VERSIONS)
    if not common:
        raise HandshakeFailed(
            f"no common protocol version: client speaks {offered}, node speaks "
            f"{list(SUPPORTED_VERSIONS)}"
        )
    return max(common)

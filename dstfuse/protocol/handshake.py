"""Handshake cryptography and negotiation rules (pure functions).

Key schedule for keyed modes: HKDF-SHA256 over the pre-shared key, salted
with client nonce || server nonce, info "dstfuse/1 <mode>", gives 128 bytes:
client-to-server key, server-to-client key, client confirm key, server
confirm key. Fresh nonces on both sides make every connection's keys new,
so sequence-number nonces never repeat under one key.

Key confirmation: the transcript hash is SHA-256 over the HELLO payload and
the CHALLENGE payload up to its PROOF attribute, each length-prefixed. The server proves it holds
the key with HMAC(server confirm key, "server" || hash); the client answers
with HMAC(client confirm key, "client" || hash). Either side that holds a
different key fails here, before any request is accepted.

This module holds no state and never touches frames or sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .constants import KEYED_MODES, SUPPORTED_VERSIONS, UNKEYED_MODES
from .errors import HandshakeFailed

_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class SessionKeys:
    """The four keys of one connection, each 32 bytes."""

    client_write: bytes
    server_write: bytes
    client_confirm: bytes
    server_confirm: bytes


def derive_keys(psk: bytes, client_nonce: bytes, server_nonce: bytes, mode: str) -> SessionKeys:
    """HKDF-SHA256(ikm=psk, salt=client_nonce||server_nonce,
    info="dstfuse/1 "||mode, L=128), cut into four 32-byte keys."""
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=128,
        salt=client_nonce + server_nonce,
        info=b"dstfuse/1 " + mode.encode(),
    ).derive(psk)
    return SessionKeys(material[:32], material[32:64], material[64:96], material[96:])


def transcript_hash(hello_payload: bytes, challenge_prefix: bytes) -> bytes:
    """SHA-256 over the HELLO payload and the CHALLENGE payload before PROOF,
    each preceded by its length as u32. The lengths matter: without them a
    man in the middle could move an attribute from the end of HELLO to the
    start of CHALLENGE (e.g. inject an EXPORT the client never asked for)
    and both sides would still hash the same bytes."""
    digest = hashlib.sha256()
    for part in (hello_payload, challenge_prefix):
        digest.update(_LENGTH.pack(len(part)))
        digest.update(part)
    return digest.digest()


def proof(confirm_key: bytes, side: bytes, transcript: bytes) -> bytes:
    """HMAC-SHA256(confirm_key, side || transcript); side is b"server" or b"client"."""
    return hmac.new(confirm_key, side + transcript, hashlib.sha256).digest()


def mode_of_cipher(cipher: str) -> str:
    """The keyed mode a config's `cipher:` names (`none`: MAC only)."""
    return "blake2b-mac" if cipher == "none" else cipher


def offered_modes(has_key: bool, cipher: str) -> list[str]:
    """What a client offers: its configured cipher with a key (`none` means
    keyed MAC only), the unkeyed checksum without one."""
    if not has_key:
        return list(UNKEYED_MODES)
    return [mode_of_cipher(cipher)]


def allowed_modes(has_key: bool) -> list[str]:
    """What a node accepts: with a key only keyed modes, without only unkeyed."""
    return list(KEYED_MODES if has_key else UNKEYED_MODES)


def choose_mode(offered: list[str], allowed: list[str]) -> str:
    """The first mode the client offers that the node allows; otherwise a
    HandshakeFailed whose message names both lists and, when that is the
    cause, says which side lacks the key."""
    for mode in offered:
        if mode in allowed:
            return mode
    offered_keyed = any(m in KEYED_MODES for m in offered)
    offered_unkeyed = any(m in UNKEYED_MODES for m in offered)
    allowed_keyed = any(m in KEYED_MODES for m in allowed)
    allowed_unkeyed = any(m in UNKEYED_MODES for m in allowed)
    offers = ", ".join(offered) or "nothing"
    allows = ", ".join(allowed) or "nothing"
    if offered_keyed and not offered_unkeyed and allowed_unkeyed and not allowed_keyed:
        message = (
            f"key mismatch: the client uses a key ({offers}) but the node has "
            f"no key_file ({allows}); configure the same key on both sides"
        )
    elif offered_unkeyed and not offered_keyed and allowed_keyed and not allowed_unkeyed:
        message = (
            f"key required: the node has a key_file ({allows}) but the client "
            f"has none ({offers}); set key_file in the client config"
        )
    else:
        message = f"no common cipher: client offers {offers}, node allows {allows}"
    raise HandshakeFailed(message)


def choose_version(offered: list[int]) -> int:
    """The newest version both sides speak; otherwise a HandshakeFailed
    naming both lists."""
    common = set(offered) & set(SUPPORTED_VERSIONS)
    if not common:
        raise HandshakeFailed(
            f"no common protocol version: client speaks {offered}, node speaks "
            f"{list(SUPPORTED_VERSIONS)}"
        )
    return max(common)

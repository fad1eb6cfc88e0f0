"""The wire format as docs/protocol.md describes it. A peer written here from
the document alone (struct, xxhash, hashlib and cryptography; the spec
peer uses nothing from dstfuse.protocol) must interoperate with
`Connection` in every mode, from either side, and the document's test
vectors must hold for both. If this test needs a change, the document
needs the same change."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
import xxhash
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dstfuse.protocol import (
    Challenged,
    Command,
    Confirmed,
    Connection,
    Feature,
    Flag,
    HelloReceived,
    Permission,
    Ready,
    Reply,
    Request,
    Role,
)
from dstfuse.protocol.handshake import derive_keys
from dstfuse.protocol.sealing import session_sealer
from dstfuse.protocol.testing import feed, open_pair

MODES = ["xxh3-128", "aes-256-gcm", "chacha20-poly1305", "blake2b-mac"]
PSK = bytes(range(32))
HEADER = struct.Struct(">4sBBHQQIIII")  # 40 bytes, big-endian
TLV = struct.Struct(">HH")

# Attribute type numbers (docs/protocol.md, "Handshake attributes").
VERSIONS, VERSION, EXPORT, CLIENT_ID, CLIENT_NAME, CIPHERS, CIPHER, NONCE, PROOF = range(1, 10)
SIZE, PERMISSIONS, BLOCK_SIZE, MAX_REQUEST, FEATURES, MESSAGE, NODE_NAME = range(10, 17)


def tlvs(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(TLV.pack(kind, len(value)) + value for kind, value in items)


def parse_tlvs(payload: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload):
        kind, length = TLV.unpack_from(payload, pos)
        found.setdefault(kind, payload[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return found


def transcript(hello: bytes, challenge_prefix: bytes) -> bytes:
    return hashlib.sha256(
        struct.pack(">I", len(hello)) + hello + struct.pack(">I", len(challenge_prefix))
        + challenge_prefix
    ).digest()


class Direction:
    """One direction's sealing state, per the document."""

    def __init__(self) -> None:
        self.mode = "xxh3-128"  # handshake frames
        self.key: bytes | None = None
        self.seq = 0

    def switch(self, mode: str, key: bytes | None) -> None:
        self.mode, self.key, self.seq = mode, key, 0

    def seal(self, header: bytes, payload: bytes) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        if self.mode == "xxh3-128":
            return payload + xxhash.xxh3_128_digest(header + payload, seed=seq)
        if self.mode == "blake2b-mac":
            mac = hashlib.blake2b(struct.pack(">Q", seq) + header + payload, key=self.key,
                                  digest_size=16)
            return payload + mac.digest()
        aead = AESGCM(self.key) if self.mode == "aes-256-gcm" else ChaCha20Poly1305(self.key)
        return aead.encrypt(bytes(4) + struct.pack(">Q", seq), payload, header)

    def open(self, header: bytes, body_and_tag: bytes) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        if self.mode in ("xxh3-128", "blake2b-mac"):
            payload, tag = body_and_tag[:-16], body_and_tag[-16:]
            self.seq = seq
            assert self.seal(header, payload)[-16:] == tag, "bad tag"
            return payload
        aead = AESGCM(self.key) if self.mode == "aes-256-gcm" else ChaCha20Poly1305(self.key)
        return aead.decrypt(bytes(4) + struct.pack(">Q", seq), body_and_tag, header)


class SpecPeer:
    def __init__(self) -> None:
        self.out, self.into = Direction(), Direction()

    def frame(self, command: int, payload: bytes = b"", *, flags: int = 0, handle: int = 0,
              offset: int = 0, length: int = 0, status: int = 0) -> bytes:
        header = HEADER.pack(b"DSTF", 1, command, flags, handle, offset, length, status,
                             len(payload), 0)
        return header + self.out.seal(header, payload)

    def parse(self, data: bytes) -> tuple[tuple, bytes]:
        fields = HEADER.unpack(data[:40])
        magic, version, _, _, _, _, _, _, payload_len, reserved = fields
        assert (magic, version, reserved) == (b"DSTF", 1, 0)
        assert len(data) == 40 + payload_len + 16
        return fields, self.into.open(data[:40], data[40:])


def keys(mode: str, client_nonce: bytes, server_nonce: bytes, psk: bytes = PSK) -> list[bytes]:
    material = HKDF(algorithm=hashes.SHA256(), length=128, salt=client_nonce + server_nonce,
                    info=b"dstfuse/1 " + mode.encode()).derive(psk)
    return [material[i : i + 32] for i in range(0, 128, 32)]  # c2s, s2c, c-confirm, s-confirm


READY = Ready(size=1 << 30, permissions=Permission.READ | Permission.WRITE, block_size=512,
              max_request=65536, features=Feature.FLUSH | Feature.FUA, export="disk")


@pytest.mark.parametrize("mode", MODES)
def test_a_client_written_from_the_document_talks_to_a_connection(mode):
    keyed = mode != "xxh3-128"
    server = Connection(Role.SERVER, key=PSK if keyed else None)
    me = SpecPeer()
    my_nonce = bytes(range(50, 82))
    hello = tlvs([(VERSIONS, b"\x01"), (CLIENT_ID, b"I" * 16), (CLIENT_NAME, b"spec"),
                  (CIPHERS, mode.encode()), (NONCE, my_nonce), (EXPORT, b"disk")])
    assert feed(server, me.frame(1, hello)) == [
        HelloReceived(export="disk", client_id=b"I" * 16, client_name="spec", versions=(1,),
                      modes=(mode,))
    ]
    (_, _, command, *_), challenge = me.parse(server.challenge(node_name="n1"))
    assert command == 2
    attrs = parse_tlvs(challenge)
    assert attrs[VERSION] == b"\x01" and attrs[CIPHER] == mode.encode()
    assert attrs[NODE_NAME] == b"n1"
    confirm: list[tuple[int, bytes]] = []
    if keyed:
        c2s, s2c, c_confirm, s_confirm = keys(mode, my_nonce, attrs[NONCE])
        assert challenge[-36:-32] == TLV.pack(PROOF, 32)  # PROOF is the last attribute
        hashed = transcript(hello, challenge[:-36])
        assert attrs[PROOF] == hmac.new(s_confirm, b"server" + hashed, "sha256").digest()
        confirm = [(PROOF, hmac.new(c_confirm, b"client" + hashed, "sha256").digest())]
        me.into.switch(mode, s2c)
    else:
        c2s = None
        me.into.switch(mode, None)
    assert feed(server, me.frame(3, tlvs(confirm))) == [Confirmed()]
    me.out.switch(mode, c2s)
    (_, _, command, *_), ready = me.parse(server.ready(READY))
    attrs = parse_tlvs(ready)
    assert command == 4
    assert attrs[SIZE] == struct.pack(">Q", 1 << 30)
    assert attrs[PERMISSIONS] == b"\x03" and attrs[BLOCK_SIZE] == struct.pack(">I", 512)
    assert attrs[MAX_REQUEST] == struct.pack(">I", 65536)
    assert attrs[FEATURES] == struct.pack(">I", 3) and attrs[EXPORT] == b"disk"
    # A WRITE with FUA, and its reply.
    request = me.frame(17, b"spec!", flags=0x0001, handle=42, offset=4096, length=5)
    assert feed(server, request) == [Request(Command.WRITE, 42, 4096, 5, Flag.FUA, b"spec!")]
    fields, payload = me.parse(server.send(Reply(Command.WRITE, 42, 28, 4096, 5)))
    assert fields == (b"DSTF", 1, 17, 0x8000, 42, 4096, 5, 28, 0, 0) and payload == b""


@pytest.mark.parametrize("mode", MODES)
def test_a_node_written_from_the_document_talks_to_a_connection(mode):
    keyed = mode != "xxh3-128"
    client = Connection(Role.CLIENT, key=PSK if keyed else None, modes=[mode])
    me = SpecPeer()
    my_nonce = bytes(range(90, 122))
    (_, _, command, *_), hello = me.parse(
        client.hello(export=None, client_id=b"C" * 16, client_name="c")
    )
    attrs = parse_tlvs(hello)
    assert command == 1 and attrs[VERSIONS] == b"\x01" and EXPORT not in attrs
    assert attrs[CIPHERS] == mode.encode() and attrs[CLIENT_ID] == b"C" * 16
    prefix = tlvs([(VERSION, b"\x01"), (CIPHER, mode.encode()), (NONCE, my_nonce),
                   (NODE_NAME, b"spec-node")])
    challenge = prefix
    if keyed:
        c2s, s2c, c_confirm, s_confirm = keys(mode, attrs[NONCE], my_nonce)
        hashed = transcript(hello, prefix)
        challenge += tlvs([(PROOF, hmac.new(s_confirm, b"server" + hashed, "sha256").digest())])
    else:
        c2s = s2c = None
    assert feed(client, me.frame(2, challenge)) == [Challenged(1, mode, "spec-node")]
    me.out.switch(mode, s2c)
    _, confirm = me.parse(client.confirm())
    if keyed:
        assert parse_tlvs(confirm)[PROOF] == hmac.new(
            c_confirm, b"client" + hashed, "sha256"
        ).digest()
    else:
        assert confirm == b""
    me.into.switch(mode, c2s)
    ready = tlvs([(SIZE, struct.pack(">Q", 12345)), (PERMISSIONS, b"\x01"),
                  (MAX_REQUEST, struct.pack(">I", 4096))])
    assert feed(client, me.frame(4, ready)) == [
        Ready(size=12345, permissions=Permission.READ, block_size=4096, max_request=4096)
    ]
    fields, payload = me.parse(client.send(Request(Command.READ, 7, 512, 3)))
    assert fields == (b"DSTF", 1, 16, 0, 7, 512, 3, 0, 0, 0) and payload == b""
    reply = me.frame(16, b"abc", flags=0x8000, handle=7, offset=512, length=3)
    assert feed(client, reply) == [Reply(Command.READ, 7, 0, 512, 3, b"abc")]


def test_header_layout_byte_by_byte():
    client, server = open_pair("xxh3-128")
    frame = client.send(Request(Command.WRITE, 0x0102030405060708, 0x1112131415161718, 3,
                                Flag.FUA, b"abc"))
    assert frame[:40].hex(" ") == (
        "44 53 54 46"  # magic "DSTF"
        " 01"  # version
        " 11"  # command 17 = WRITE
        " 00 01"  # flags: FUA
        " 01 02 03 04 05 06 07 08"  # handle
        " 11 12 13 14 15 16 17 18"  # offset
        " 00 00 00 03"  # length
        " 00 00 00 00"  # status
        " 00 00 00 03"  # payload_len
        " 00 00 00 00"  # reserved
    )
    assert frame[40:43] == b"abc"
    # The first session frame of a direction has sequence number 0.
    assert frame[43:] == xxhash.xxh3_128_digest(frame[:43], seed=0)
    assert len(frame) == 40 + 3 + 16


# Section 11 of docs/protocol.md.
VECTOR_KEYS = [
    "a5359257c8aa77f097f5ab945667b95c853ec5c7bef12fc6b1aad47a93dab533",
    "a08133920f2e699df53ef52e5824ca0dec7a588fe8bcb027ebc67f484363e01e",
    "531da700096421ffbc6eea9d49630d881c411d249733b7c72f43d8ce6305fad1",
    "dc58d94db1069c5a42297f7266ccf8747c9ce3bad49463be2870e8a0d1c4a282",
]
VECTOR_HEADER = bytes.fromhex(
    "44535446011100010000000000000001000000000000000000000003000000000000000300000000"
)


def test_documented_frame_vector():
    client, server = open_pair("xxh3-128")
    frame = client.send(Request(Command.WRITE, 0x0102030405060708, 0x1112131415161718, 3,
                                Flag.FUA, b"abc"))
    assert frame.hex() == (
        "44535446" "01" "11" "0001" "0102030405060708" "1112131415161718"
        "00000003" "00000000" "00000003" "00000000" "616263"
        "7d02332e4679f61633bfe23bcae75b76"
    )


def test_documented_key_schedule_and_sealing_vectors():
    nonces = (b"\x11" * 32, b"\x22" * 32)
    spec = keys("aes-256-gcm", *nonces, psk=bytes(range(32)))
    library = derive_keys(bytes(range(32)), *nonces, "aes-256-gcm")
    assert [k.hex() for k in spec] == VECTOR_KEYS
    assert [library.client_write, library.server_write, library.client_confirm,
            library.server_confirm] == spec
    for mode, expected in [("aes-256-gcm", "18bba39b695c6d0cf02a6c1098400b800f2bd2"),
                           ("blake2b-mac", "616263152a3d999f9b5ad54eaa2ae041d3a52f")]:
        client_write = keys(mode, *nonces, psk=bytes(range(32)))[0]
        direction = Direction()
        direction.switch(mode, client_write)
        assert direction.seal(VECTOR_HEADER, b"abc").hex() == expected
        assert session_sealer(mode, client_write).seal(VECTOR_HEADER, b"abc").hex() == expected

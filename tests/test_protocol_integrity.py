"""Integrity: every bit of a sealed frame is covered, frames cannot be
replayed, dropped, swapped or reflected, and AEAD modes hide the payload.
A frame that fails its check never produces an event."""

from __future__ import annotations

import pytest

from dstfuse.protocol import (
    Command,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
)
from dstfuse.protocol.constants import HEADER_SIZE
from dstfuse.protocol.testing import CLIENT_ID, feed, make_pair, open_pair

MODES = ["xxh3-128", "aes-256-gcm", "chacha20-poly1305", "blake2b-mac"]
KEYED = MODES[1:]

# Header byte ranges whose corruption may make the frame unparseable (or,
# for payload_len, leave the receiver waiting for bytes that never come)
# before its check runs: magic, version, command, flags, payload_len, reserved.
# Every other bit (handle, offset, length, status, payload, tag) must fail
# the check itself.
_UNPARSEABLE = set(range(0, 8)) | set(range(32, 40))


def fixed_pair(mode):
    """An open pair whose session keys are the same every time, so that a
    frame sealed by one pair is valid for the next: only the corruption
    under test can make it fail."""
    return open_pair(mode, client_nonce=bytes(32), server_nonce=bytes(range(32)))


def frames_under_test(mode):
    """(receiving role, frame) for a small request and a small reply."""
    client, server = fixed_pair(mode)
    request = client.send(Request(Command.WRITE, 7, 4096, 4, data=b"data"))
    reply = server.send(Reply(Command.READ, 7, 0, 4096, 4, b"read"))
    return [(Role.SERVER, request), (Role.CLIENT, reply)]


@pytest.mark.parametrize("mode", MODES)
def test_flipping_any_bit_of_a_frame_is_detected(mode):
    for role, frame in frames_under_test(mode):
        assert len(frame) == HEADER_SIZE + 4 + 16
        for bit in range(len(frame) * 8):
            client, server = fixed_pair(mode)
            receiver = server if role is Role.SERVER else client
            corrupt = bytearray(frame)
            corrupt[bit // 8] ^= 1 << (bit % 8)
            receiver.receive_data(bytes(corrupt))
            receiver.receive_data(b"")  # so a grown payload_len cannot just wait
            expected = RemoteProtocolError if bit // 8 in _UNPARSEABLE else IntegrityError
            with pytest.raises(expected):
                receiver.next_event()
            assert receiver.state is State.ERROR, f"bit {bit}"


@pytest.mark.parametrize("mode", MODES)
def test_unmodified_frames_pass_the_same_check(mode):
    # The control for the test above: the same frames, intact, are accepted.
    for role, frame in frames_under_test(mode):
        client, server = fixed_pair(mode)
        receiver = server if role is Role.SERVER else client
        [event] = feed(receiver, frame)
        assert event.handle == 7


@pytest.mark.parametrize("mode", MODES)
def test_flipping_any_bit_of_a_handshake_frame_is_detected(mode):
    client, server = make_pair(mode)
    hello = client.hello(export="e", client_id=CLIENT_ID, client_name="c")
    assert len(feed(make_pair(mode)[1], hello)) == 1  # intact, any server takes it
    for bit in range(0, len(hello) * 8, 3):
        receiver = make_pair(mode)[1]
        corrupt = bytearray(hello)
        corrupt[bit // 8] ^= 1 << (bit % 8)
        receiver.receive_data(bytes(corrupt))
        receiver.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            receiver.next_event()


@pytest.mark.parametrize("mode", MODES)
def test_replayed_frame_is_rejected(mode):
    client, server = open_pair(mode)
    frame = client.send(Request(Command.WRITE, 1, 0, 4, data=b"once"))
    assert len(feed(server, frame)) == 1
    with pytest.raises(IntegrityError):
        feed(server, frame)
    assert server.state is State.ERROR


@pytest.mark.parametrize("mode", MODES)
def test_replayed_reply_is_rejected(mode):
    client, server = open_pair(mode)
    frame = server.send(Reply(Command.WRITE, 1, 0, 0, 4))
    assert len(feed(client, frame)) == 1
    with pytest.raises(IntegrityError):
        feed(client, frame)


@pytest.mark.parametrize("mode", MODES)
def test_swapped_frames_are_rejected(mode):
    client, server = open_pair(mode)
    first = client.send(Request(Command.WRITE, 1, 0, 5, data=b"first"))
    second = client.send(Request(Command.WRITE, 2, 0, 5, data=b"secnd"))
    with pytest.raises(IntegrityError):
        feed(server, second + first)


@pytest.mark.parametrize("mode", MODES)
def test_dropped_frame_makes_the_next_one_fail(mode):
    client, server = open_pair(mode)
    client.send(Request(Command.FLUSH, 1))  # lost on the way
    with pytest.raises(IntegrityError):
        feed(server, client.send(Request(Command.FLUSH, 2)))


@pytest.mark.parametrize("mode", KEYED)
def test_frame_reflected_back_to_its_sender_is_rejected(mode):
    # Each direction has its own key: a client's frame sent back to it fails
    # the check before its missing REPLY flag is even looked at.
    client, server = open_pair(mode)
    with pytest.raises(IntegrityError):
        feed(client, client.send(Request(Command.FLUSH, 1)))
    client, server = open_pair(mode)
    with pytest.raises(IntegrityError):
        feed(server, server.send(Reply(Command.FLUSH, 1)))


@pytest.mark.parametrize("mode", KEYED)
def test_frame_from_another_connection_with_the_same_key_is_rejected(mode):
    key = b"same key for both connections!!!"
    client_a, server_a = open_pair(mode, key=key)
    client_b, server_b = open_pair(mode, key=key)
    frame = client_a.send(Request(Command.WRITE, 1, 0, 4, data=b"move"))
    with pytest.raises(IntegrityError):
        feed(server_b, frame)


def test_unkeyed_checksum_is_forgeable_by_design():
    # xxh3-128 only detects accidents: a frame from another connection at the
    # same sequence number is accepted. This is why keyed modes exist.
    client_a, server_a = open_pair("xxh3-128")
    client_b, server_b = open_pair("xxh3-128")
    frame = client_a.send(Request(Command.WRITE, 1, 0, 4, data=b"move"))
    assert feed(server_b, frame) == [Request(Command.WRITE, 1, 0, 4, data=b"move")]


PLAINTEXT = b"attack at dawn, the password is hunter2. " * 40


@pytest.mark.parametrize("mode", ["aes-256-gcm", "chacha20-poly1305"])
def test_aead_hides_the_payload(mode):
    client, server = open_pair(mode)
    request = client.send(Request(Command.WRITE, 1, 0, len(PLAINTEXT), data=PLAINTEXT))
    reply = server.send(Reply(Command.READ, 1, 0, 0, len(PLAINTEXT), PLAINTEXT))
    for frame in (request, reply):
        body = frame[HEADER_SIZE:]
        for start in range(0, len(PLAINTEXT) - 8, 8):
            assert PLAINTEXT[start : start + 8] not in body
    assert feed(server, request)[0].data == PLAINTEXT
    assert feed(client, reply)[0].data == PLAINTEXT


@pytest.mark.parametrize("mode", ["xxh3-128", "blake2b-mac"])
def test_checksum_and_mac_modes_do_not_hide_the_payload(mode):
    client, server = open_pair(mode)
    frame = client.send(Request(Command.WRITE, 1, 0, len(PLAINTEXT), data=PLAINTEXT))
    assert frame[HEADER_SIZE : HEADER_SIZE + len(PLAINTEXT)] == PLAINTEXT


@pytest.mark.parametrize("mode", MODES)
def test_a_corrupted_frame_after_good_ones_loses_only_what_follows(mode):
    client, server = open_pair(mode)
    good = [Request(Command.WRITE, h, 0, 2, data=b"ok") for h in range(3)]
    frames = [client.send(r) for r in good]
    bad = bytearray(client.send(Request(Command.WRITE, 9, 0, 3, data=b"bad")))
    bad[HEADER_SIZE] ^= 0x20
    server.receive_data(b"".join(frames) + bytes(bad))
    assert [server.next_event() for _ in good] == good
    with pytest.raises(IntegrityError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.next_event()

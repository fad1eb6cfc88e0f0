"""UnflushedWrites alone: what is kept, what a FLUSH releases, what the
limit drops, and what a reboot then reports lost."""

from __future__ import annotations

import pytest

from dstfuse.nodes.unflushed import ENTRY_COST, MAX_UNPROTECTED_RANGES, Loss, UnflushedWrites
from dstfuse.protocol import Command, Flag

W, Z = Command.WRITE, Command.WRITE_ZEROES


def test_writes_are_kept_in_order_with_a_private_copy_of_their_data():
    kept = UnflushedWrites(1 << 20)
    buffer = bytearray(b"a" * 4096)
    kept.record(W, 0, 4096, Flag.NONE, memoryview(buffer))
    kept.record(Z, 8192, 4096, Flag.NONE, b"")
    buffer[:] = b"b" * 4096  # the caller reuses its buffer
    entries = list(kept)
    assert [(e.command, e.offset, e.data) for e in entries] == [
        (W, 0, b"a" * 4096),
        (Z, 8192, b""),
    ]
    assert kept.size == 4096 + 2 * ENTRY_COST


def test_bytes_and_views_of_bytes_are_kept_without_a_copy():
    """Nothing can change a bytes object, so a write FUSE handed over as
    bytes is kept as it is, and so is a view of most of it (a mirror's legs
    then share one buffer); a small piece of a large buffer is copied, so
    that it does not keep the whole buffer, and a view of anything mutable
    is copied (above)."""
    kept = UnflushedWrites(1 << 20)
    data = bytes(range(256)) * 32
    kept.record(W, 0, len(data), Flag.NONE, data)
    kept.record(W, 65536, 4096, Flag.NONE, memoryview(data)[4096:])
    kept.record(W, 131072, 512, Flag.NONE, memoryview(data)[:512])  # a small piece
    whole, part, piece = list(kept)
    assert whole.data is data
    assert isinstance(part.data, memoryview) and part.data.obj is data
    assert bytes(part.data) == data[4096:]
    assert type(piece.data) is bytes and piece.data == data[:512]  # copied: pins 512 bytes
    assert kept.size == len(data) + 4096 + 512 + 3 * ENTRY_COST


def test_flush_releases_only_writes_acknowledged_before_it_was_sent():
    kept = UnflushedWrites(1 << 20)
    kept.record(W, 0, 512, Flag.NONE, b"x" * 512)
    mark = kept.mark()  # the FLUSH is sent here
    kept.record(W, 512, 512, Flag.NONE, b"y" * 512)  # acknowledged while it is out
    kept.release(mark)
    assert [e.offset for e in kept] == [512]
    assert kept.size == 512 + ENTRY_COST


def test_past_the_limit_the_oldest_are_dropped_and_a_reboot_reports_them():
    kept = UnflushedWrites(2 * (4096 + ENTRY_COST))
    for index in range(3):
        kept.record(W, index * 4096, 4096, Flag.NONE, bytes(4096))
    kept.make_room()
    assert [e.offset for e in kept] == [4096, 8192]
    assert kept.unprotected
    assert kept.lose_unprotected() == Loss(4096, 1, ((0, 4096),))
    assert kept.lose_unprotected() is None  # reported once


def test_a_flush_covering_the_dropped_writes_protects_them_again():
    kept = UnflushedWrites(0)
    kept.record(W, 0, 4096, Flag.NONE, bytes(4096))
    mark = kept.mark()
    kept.record(W, 4096, 4096, Flag.NONE, bytes(4096))  # after the FLUSH went out
    kept.release(mark)
    assert kept.unprotected  # the second one is not covered
    kept.release(kept.mark())
    assert not kept.unprotected and kept.lose_unprotected() is None


def test_limit_zero_keeps_nothing_and_a_fua_write_is_not_lost():
    kept = UnflushedWrites(0)
    kept.record(W, 0, 4096, Flag.FUA, bytes(4096))
    assert len(kept) == 0 and not kept.unprotected
    kept.record(W, 0, 4096, Flag.NONE, bytes(4096))
    assert kept.lose_unprotected() == Loss(4096, 1, ((0, 4096),))


def test_unprotected_ranges_merge_and_stay_bounded():
    kept = UnflushedWrites(0)
    kept.record(W, 0, 10, Flag.NONE, bytes(10))
    kept.record(W, 10, 10, Flag.NONE, bytes(10))  # touches: merged
    kept.record(W, 100, 10, Flag.NONE, bytes(10))
    kept.record(W, 5, 200, Flag.NONE, bytes(200))  # covers both
    assert kept.lose_unprotected() == Loss(230, 4, ((0, 205),))
    for index in range(MAX_UNPROTECTED_RANGES + 50):
        kept.record(W, index * 100, 10, Flag.NONE, bytes(10))
    loss = kept.lose_unprotected()
    assert loss is not None and MAX_UNPROTECTED_RANGES // 2 <= len(loss.regions)
    assert len(loss.regions) <= MAX_UNPROTECTED_RANGES
    # coarsened, never smaller: every write still lies inside a region
    for index in range(MAX_UNPROTECTED_RANGES + 50):
        assert any(o <= index * 100 and index * 100 + 10 <= o + n for o, n in loss.regions)


def test_negative_limit_is_a_programming_error():
    with pytest.raises(ValueError):
        UnflushedWrites(-1)

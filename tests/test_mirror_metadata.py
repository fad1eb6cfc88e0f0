"""The mirror's on-disk format and in-memory bit sets: layout arithmetic,
header round trips and rejection of damaged or foreign bytes, bitmap blocks,
RegionBits, the write-intent bitmap's durability rules and block checks."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from dstfuse.errors import NodeError
from dstfuse.mirror.bitmap import RegionActivity, RegionBits, WriteIntentBitmap
from dstfuse.mirror.checks import UNKNOWN, BlockChecks, block_digest, digests_of
from dstfuse.mirror.metadata import (
    BITS_PER_BITMAP_BLOCK,
    BLOCK,
    HEADER_SIZE,
    MAGIC,
    DamagedMetadata,
    MemberRecord,
    MirrorHeader,
    NoMetadata,
    UnsupportedVersion,
    leg_layout,
    newest_header,
    pack_bitmap_block,
    unpack_bitmap_block,
)

MiB = 1 << 20
GiB = 1 << 30


def sample_header(**changes) -> MirrorHeader:
    fields = dict(
        storage_id=bytes(range(16)),
        leg_index=1,
        generation=7,
        leg_size=64 * MiB,
        data_size=leg_layout(64 * MiB, 4 * MiB).data_capacity,
        region_size=4 * MiB,
        members=(MemberRecord(1, 0, 3), MemberRecord(0, 6, 0)),
        sequence=12,
        flags=3,
        client_id=b"c" * 16,
        client_name="host:1234",
        held_since_us=1_700_000_000_000_000,
        heartbeat=99,
        heartbeat_us=1_700_000_001_000_000,
    )
    fields.update(changes)
    return MirrorHeader(**fields)


def test_layout_puts_checks_bitmap_and_two_slots_at_the_end():
    layout = leg_layout(10 * GiB + 1234, 4 * MiB)
    assert layout.leg_size == 10 * GiB
    assert layout.checks_length == 10 * GiB // BLOCK * 8  # 20 MiB of u64 entries
    assert layout.bitmap_length == BLOCK  # 2560 regions fit one block
    assert layout.bitmap_offset == layout.checks_offset + layout.checks_length
    assert layout.slot_offsets == (10 * GiB - 8192, 10 * GiB - 4096)
    assert layout.bitmap_offset + layout.bitmap_length == layout.slot_offsets[0]
    assert layout.data_capacity == 10 * GiB - layout.metadata_size
    assert layout.metadata_size < 10 * GiB // 400  # about 0.2 %


def test_layout_rejects_tiny_legs_and_bad_region_sizes():
    with pytest.raises(ValueError, match="too small"):
        leg_layout(16 * 1024, 64 * 1024)
    with pytest.raises(ValueError, match="power of two"):
        leg_layout(GiB, 3 * MiB)


def test_header_round_trips_and_its_checksum_covers_every_byte():
    header = sample_header()
    raw = header.pack()
    assert len(raw) == HEADER_SIZE and raw[:8] == MAGIC
    assert MirrorHeader.unpack(raw) == header
    for position in (10, 50, 300, HEADER_SIZE - 1):
        damaged = bytearray(raw)
        damaged[position] ^= 1
        with pytest.raises(DamagedMetadata):
            MirrorHeader.unpack(bytes(damaged))
    with pytest.raises(NoMetadata):
        MirrorHeader.unpack(bytes(HEADER_SIZE))


def test_a_newer_format_is_refused_not_misread():
    raw = bytearray(sample_header(version=2).pack())
    with pytest.raises(UnsupportedVersion):
        MirrorHeader.unpack(bytes(raw))


def test_newest_header_takes_the_valid_slot_with_the_higher_sequence():
    old, new = sample_header(sequence=4).pack(), sample_header(sequence=5, generation=8).pack()
    assert newest_header([old, new]).generation == 8
    assert newest_header([new, old]).generation == 8
    torn = new[:2000] + bytes(HEADER_SIZE - 2000)
    assert newest_header([old, torn]).sequence == 4
    with pytest.raises(NoMetadata):
        newest_header([bytes(HEADER_SIZE)] * 2)
    with pytest.raises(DamagedMetadata):
        newest_header([torn, bytes(HEADER_SIZE)])


def test_bitmap_block_is_bound_to_its_storage_and_position():
    bits = os.urandom(BLOCK - 16)
    raw = pack_bitmap_block(b"s" * 16, 3, bits)
    assert unpack_bitmap_block(b"s" * 16, 3, raw) == bits
    assert unpack_bitmap_block(b"t" * 16, 3, raw) is None
    assert unpack_bitmap_block(b"s" * 16, 4, raw) is None
    assert unpack_bitmap_block(b"s" * 16, 3, raw[:-1] + bytes([raw[-1] ^ 1])) is None


@given(st.sets(st.integers(min_value=0, max_value=99_999), max_size=60))
def test_region_bits_behave_like_a_set(members):
    bits = RegionBits(100_000)
    for region in members:
        bits.add(region)
    assert list(bits) == sorted(members)
    assert len(bits) == len(members)
    assert bool(bits) == bool(members)
    for region in list(members)[:5]:
        bits.discard(region)
        assert region not in bits
    other = RegionBits(100_000)
    for block in range(4):  # 12500 bytes of bits: four blocks
        other.set_block_bytes(block, bits.block_bytes(block))
    assert other == bits


def test_region_bits_set_all_stops_at_the_count():
    bits = RegionBits(BITS_PER_BITMAP_BLOCK + 3)
    bits.set_all()
    assert len(bits) == BITS_PER_BITMAP_BLOCK + 3
    assert bits.next_set(BITS_PER_BITMAP_BLOCK + 3) is None
    assert bits.block_bytes(1)[0] == 0b111


async def test_mark_returns_only_after_the_block_write_and_coalesces_writers():
    written: list[tuple[int, bytes]] = []
    gate = trio.Event()

    async def write_block(block: int, bits: bytes) -> None:
        await gate.wait()
        written.append((block, bits))

    bitmap = WriteIntentBitmap(100, write_block)
    done = []

    async def marker(region: int) -> None:
        await bitmap.mark([region])
        done.append(region)

    async with trio.open_nursery() as nursery:
        for region in (1, 2, 3):
            nursery.start_soon(marker, region)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [] and written == []
        gate.set()
    assert sorted(done) == [1, 2, 3]
    assert len(written) <= 2  # the writers behind the first share one write
    assert written[-1][1][0] == 0b1110
    await bitmap.mark([2])  # already durable: no write
    assert len(written) <= 2


async def test_a_region_being_cleared_stays_set_on_disk_until_finish_clear():
    written: list[bytes] = []

    async def write_block(block: int, bits: bytes) -> None:
        written.append(bits)

    bitmap = WriteIntentBitmap(100, write_block)
    await bitmap.mark([4, 5])
    clearing = bitmap.begin_clear([4])
    await bitmap.mark([6])  # another writer writes the block meanwhile
    assert written[-1][0] == 0b1110000  # region 4 is still set on disk
    await bitmap.finish_clear(clearing)
    assert written[-1][0] == 0b1100000
    assert 4 not in bitmap.desired and 5 in bitmap.durable


async def test_a_failed_bitmap_write_leaves_the_region_not_durable():
    async def write_block(block: int, bits: bytes) -> None:
        raise NodeError("vol0", "no leg took it")

    bitmap = WriteIntentBitmap(10, write_block)
    with pytest.raises(NodeError):
        await bitmap.mark([1])
    assert 1 not in bitmap.durable


async def test_activity_tells_reads_about_writes_that_overlapped_them():
    activity = RegionActivity()
    serial = activity.begin_read()
    assert activity.quiet_since(range(0, 2), serial)
    activity.begin(range(1, 2))
    assert not activity.quiet_since(range(0, 2), serial)
    activity.end(range(1, 2))
    assert not activity.quiet_since(range(1, 2), serial)
    assert activity.quiet_since(range(0, 1), serial)
    activity.forget([1])  # a read in flight still needs the history
    assert not activity.quiet_since(range(1, 2), serial)
    activity.end_read(serial)
    activity.forget([1])
    assert activity.quiet_since(range(1, 2), activity.begin_read())


def test_digests_leave_partial_blocks_unknown():
    data = os.urandom(3 * BLOCK)
    first, entries = digests_of(BLOCK // 2, data)
    assert first == 0 and len(entries) == 4
    assert entries[0] == UNKNOWN and entries[3] == UNKNOWN
    assert entries[1] == block_digest(data[BLOCK // 2 : BLOCK // 2 + BLOCK])


async def test_block_checks_cache_is_bounded_and_writes_dirty_pages_on_eviction():
    pages: dict[int, bytes] = {}

    async def load(page: int) -> bytes:
        return pages.get(page, bytes(BLOCK))

    async def write(page: int, raw: bytes) -> None:
        pages[page] = raw

    checks = BlockChecks(64 * MiB, 1 * MiB, load, write, cache_pages=8)
    for page in range(32):
        pinned = await checks.pin([page])
        checks.store(page * 512, [page + 1])
        checks.unpin(pinned)
    assert checks.cached_pages <= 8
    # without the background writer, evicted pages wait in a bounded queue
    assert 16 <= len(pages) < 24
    async with trio.open_nursery() as nursery:
        nursery.start_soon(checks.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        assert len(pages) >= 24  # evicted dirty pages were written
        pinned = await checks.pin([0])
        assert checks.lookup(0) == 1
        checks.unpin(pinned)
        nursery.cancel_scope.cancel()
    await checks.write_back()
    assert all(int.from_bytes(pages[p][:8], "little") == p + 1 for p in range(32))


async def test_untrusted_regions_are_not_checked_and_are_zeroed_before_clearing():
    pages: dict[int, bytes] = {0: (5).to_bytes(8, "little") * 512}

    async def load(page: int) -> bytes:
        return pages.get(page, bytes(BLOCK))

    async def write(page: int, raw: bytes) -> None:
        pages[page] = raw

    checks = BlockChecks(4 * MiB, 1 * MiB, load, write)
    checks.distrust([0])
    pinned = await checks.pin([0])
    assert checks.lookup(0) == UNKNOWN
    assert checks.mismatching(0, os.urandom(BLOCK)) == []
    checks.unpin(pinned)
    await checks.forget_untrusted([0])
    await checks.write_back()
    assert pages[0][:8] == bytes(8) and 0 not in checks.untrusted


@given(st.integers(min_value=0, max_value=5 * BLOCK), st.integers(min_value=0, max_value=4 * BLOCK))
def test_digests_match_a_block_by_block_reference(offset, length):
    data = bytes((offset + i) % 251 for i in range(length))
    first, entries = digests_of(offset, data)
    expected = []
    for block in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
        start, end = block * BLOCK, block * BLOCK + BLOCK
        if start >= offset and end <= offset + length:
            expected.append(block_digest(data[start - offset : end - offset]))
        else:
            expected.append(UNKNOWN)
    assert first == offset // BLOCK and entries == expected


async def test_checks_store_and_mismatch_across_page_boundaries():
    pages: dict[int, bytes] = {}

    async def load(page: int) -> bytes:
        return pages.get(page, bytes(BLOCK))

    async def write(page: int, raw: bytes) -> None:
        pages[page] = raw

    checks = BlockChecks(64 * MiB, 1 * MiB, load, write)
    offset = 510 * BLOCK  # four blocks across pages 0 and 1
    data = os.urandom(4 * BLOCK)
    pinned = await checks.pin(checks.touched_pages(offset, len(data)))
    checks.store(*digests_of(offset, data))
    assert checks.mismatching(offset, data) == []
    damaged = bytearray(data)
    damaged[2 * BLOCK + 7] ^= 1
    assert checks.mismatching(offset, bytes(damaged)) == [512]
    checks.store(*digests_of(offset + 100, data[: BLOCK + 200]), only_known=True)
    assert checks.mismatching(offset, data) == []  # partial blocks left alone
    checks.unpin(pinned)


@given(
    block=st.integers(min_value=0, max_value=2 * 512 - 1),
    known=st.booleans(),
    only_known=st.booleans(),
)
async def test_a_one_block_write_stores_what_a_longer_one_stores_for_that_block(
    block, known, only_known
):
    """The one-block fast paths of `digests_of` and `store` against the
    general ones: a write of two blocks (block, block + 1) stores the same
    entry for `block`, and dirties the same page; a read of `block` alone
    is checked as the longer read checks it."""

    async def load(page: int) -> bytes:
        return bytes(BLOCK)

    async def write(page: int, raw: bytes) -> None:
        pass

    data = os.urandom(2 * BLOCK)
    one, two = (BlockChecks(8 * MiB, 1 * MiB, load, write) for _ in range(2))
    first, entries = digests_of(block * BLOCK, data[:BLOCK])
    assert (first, entries) == (block, [block_digest(data[:BLOCK])])
    if not known:
        entries = [UNKNOWN]
    longer = digests_of(block * BLOCK, data)[1]
    longer[0] = entries[0]
    for checks, stored in ((one, entries), (two, longer)):
        pinned = await checks.pin(checks.touched_pages(block * BLOCK, 2 * BLOCK))
        checks.store(block, [7])  # what was there before
        checks._dirty.clear()
        checks.store(block, stored, only_known=only_known)
        checks.unpin(pinned)
    assert one.lookup(block) == two.lookup(block)
    assert one._dirty <= two._dirty and block // 512 in one._dirty
    damaged = bytes([data[0] ^ 1]) + data[1:]
    for read in (data, damaged):
        whole = two.mismatching(block * BLOCK, read)
        assert one.mismatching(block * BLOCK, read[:BLOCK]) == [b for b in whole if b == block]


async def test_pin_cached_pins_cached_pages_as_pin_does_or_nothing():
    loaded: list[int] = []

    async def load(page: int) -> bytes:
        loaded.append(page)
        return bytes(BLOCK)

    async def write(page: int, raw: bytes) -> None:
        pass

    checks = BlockChecks(64 * MiB, 1 * MiB, load, write, cache_pages=8)
    held = await checks.pin(range(0, 3))
    # one page of the range is not cached: nothing is pinned, nothing loaded
    assert checks.pin_cached(range(2, 4)) is None
    assert checks._pins == {0: 1, 1: 1, 2: 1} and loaded == [0, 1, 2]
    pinned = checks.pin_cached(range(0, 1))
    assert pinned == [0] and checks._pins == {0: 2, 1: 1, 2: 1}
    checks.unpin(held)
    assert checks._pins == {0: 1}
    checks.unpin(pinned)
    assert not checks._pins
    # page 0 was used last: the first page evicted is page 1, the oldest
    for page in range(3, 9):
        checks.unpin(await checks.pin([page]))
    assert 1 not in checks._cache and 0 in checks._cache and 2 in checks._cache


@given(
    st.integers(min_value=0, max_value=1030 * BLOCK),
    st.integers(min_value=0, max_value=6 * BLOCK),
    st.sets(st.integers(min_value=0, max_value=1040)),
    st.sets(st.integers(min_value=0, max_value=3)),
)
def test_mismatching_matches_a_block_by_block_reference(offset, length, damaged, untrusted):
    """Every whole block with a known entry, outside untrusted regions, is
    compared; partial blocks, unknown entries and untrusted regions never."""
    stored = bytes((offset + i) % 253 for i in range(length + 2 * BLOCK))

    async def load(page: int) -> bytes:
        return bytes(BLOCK)

    async def write(page: int, raw: bytes) -> None:
        pass

    async def main() -> None:
        checks = BlockChecks(8 * MiB, 1 * MiB, load, write)  # 256 blocks per region
        start = offset - offset % BLOCK
        pinned = await checks.pin(checks.touched_pages(start, len(stored)))
        checks.store(*digests_of(start, stored))
        for block in range(start // BLOCK, (start + len(stored)) // BLOCK, 3):
            checks.store(block, [UNKNOWN])
        checks.distrust(untrusted)
        data = bytearray(stored[offset - start : offset - start + length])
        for block in damaged:
            at = block * BLOCK - offset
            if 0 <= at < len(data):
                data[at] ^= 0xFF
        expected = []
        for block in range(-(-offset // BLOCK), (offset + length) // BLOCK):
            at = block * BLOCK - offset
            entry = checks.lookup(block)
            if entry != UNKNOWN and block_digest(bytes(data[at : at + BLOCK])) != entry:
                expected.append(block)
        assert checks.mismatching(offset, bytes(data)) == expected
        checks.unpin(pinned)

    trio.run(main)

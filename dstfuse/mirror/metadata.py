"""The mirror's on-disk metadata format (version 1): layout, header, bitmap blocks.

This module owns the bytes that sit at the END of every mirror leg
(docs/mirror-metadata.md describes them byte by byte) and nothing else: it
packs and unpacks them and computes where they go. It never does I/O and
never decides anything about leg states; `legs.py` reads and writes these
bytes, `history.py` interprets them.

Layout of a leg of `leg_size` bytes (rounded down to BLOCK), from the start:

    [0, data_capacity)            data: a plain image of the storage
    [checks_offset, +checks_len)  block check array: u64 per 4 KiB data block
    [bitmap_offset, +bitmap_len)  write-intent bitmap blocks
    [leg_size - 8192, +4096)      header slot 0
    [leg_size - 4096, +4096)      header slot 1

The header slots are found from the end of the leg alone, so a leg's
metadata can be read without knowing anything else about the storage. A
header write goes to slot `sequence % 2` with FUA, so the other slot always
holds the previous complete header: a torn write loses at most the newest
update and the reader takes the valid slot with the higher sequence.

Invariants: every multi-byte integer is little-endian; every header and
bitmap block carries an xxh3-128 over its own bytes (a bitmap block's also
covers the storage id and the block's index, so a block left from another
storage or shifted by a resize never passes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

import xxhash

#: Data block size: the storage size, every offset in the metadata and the
#: check array's granularity.
BLOCK = 4096
MAGIC = b"DSTMIRR\x00"
VERSION = 1
MAX_LEGS = 32
HEADER_SIZE = BLOCK
#: The header's checksum sits in the last 16 bytes of its 4 KiB slot.
HEADER_CHECKSUM_AT = HEADER_SIZE - 16
#: Bits of one bitmap block (the last 16 bytes of each block are its checksum).
BITMAP_BLOCK_BYTES = BLOCK - 16
BITS_PER_BITMAP_BLOCK = BITMAP_BLOCK_BYTES * 8
#: Entries (u64, one per data block) in one 4 KiB page of the check array.
CHECKS_PER_PAGE = BLOCK // 8
#: Smallest region the bitmap may track (the config enforces the same).
MIN_REGION_SIZE = 64 * 1024

# Header flags.
FLAG_CLEAN = 1 << 0  # the last session ended with aclose(): no write in flight
FLAG_CHECKS_VALID = 1 << 1  # the check array was maintained by every session

# Member record flags.
MEMBER_IN_SYNC = 1 << 0  # the leg held every acknowledged write at `generation`
MEMBER_FULL_RESYNC = 1 << 1  # its history is unknown: resync compares every region

_HEADER = struct.Struct(
    "<8s H H I Q 16s I I Q Q Q I I Q Q Q Q Q 16s 64s Q Q Q Q I I Q Q"
)
_MEMBER = struct.Struct("<I 4x Q Q 8x")
MEMBERS_AT = 256
assert _HEADER.size == MEMBERS_AT
assert MEMBERS_AT + MAX_LEGS * _MEMBER.size <= HEADER_CHECKSUM_AT


class MetadataError(Exception):
    """Bytes that are not a usable header of this format."""


class NoMetadata(MetadataError):
    """The magic is absent: this leg never held mirror metadata."""


class DamagedMetadata(MetadataError):
    """The magic is there but the checksum or the fields are wrong."""


class UnsupportedVersion(MetadataError):
    """Written by a newer dstfuse whose format this one cannot read."""


def round_down(value: int, unit: int = BLOCK) -> int:
    return value - value % unit


def ceil_div(value: int, unit: int) -> int:
    return -(-value // unit)


@dataclass(frozen=True)
class LegLayout:
    """Where a leg of `leg_size` bytes keeps its data and its metadata; a
    pure function of (leg size, region size), so it is never stored apart
    from those two numbers."""

    leg_size: int
    region_size: int
    checks_offset: int
    checks_length: int
    bitmap_offset: int
    bitmap_length: int

    @property
    def data_capacity(self) -> int:
        """Bytes of storage data this leg can hold (metadata excluded)."""
        return self.checks_offset

    @property
    def slot_offsets(self) -> tuple[int, int]:
        return (self.leg_size - 2 * HEADER_SIZE, self.leg_size - HEADER_SIZE)

    @property
    def metadata_size(self) -> int:
        return self.leg_size - self.checks_offset

    def bitmap_block_offset(self, index: int) -> int:
        return self.bitmap_offset + index * BLOCK

    def checks_page_offset(self, page: int) -> int:
        return self.checks_offset + page * BLOCK


def leg_layout(leg_size: int, region_size: int) -> LegLayout:
    """The layout of a leg; ValueError if the leg cannot hold its metadata
    plus at least one data block, or `region_size` is not a power of two
    of at least MIN_REGION_SIZE."""
    if region_size < MIN_REGION_SIZE or region_size & (region_size - 1):
        raise ValueError(f"region size {region_size} is not a power of two of at least 64 KiB")
    size = round_down(leg_size)
    blocks = size // BLOCK
    regions = ceil_div(size, region_size)
    bitmap_blocks = max(1, ceil_div(regions, BITS_PER_BITMAP_BLOCK))
    check_pages = max(1, ceil_div(blocks, CHECKS_PER_PAGE))
    metadata = (2 + bitmap_blocks + check_pages) * BLOCK
    if metadata + BLOCK > size:
        raise ValueError(f"a leg of {leg_size} bytes is too small for the mirror's metadata")
    checks_offset = size - metadata
    bitmap_offset = checks_offset + check_pages * BLOCK
    return LegLayout(
        leg_size=size,
        region_size=region_size,
        checks_offset=checks_offset,
        checks_length=check_pages * BLOCK,
        bitmap_offset=bitmap_offset,
        bitmap_length=bitmap_blocks * BLOCK,
    )


@dataclass(frozen=True)
class MemberRecord:
    """What a leg knows of one leg of the storage (itself included) at the
    header's generation: in sync, or stale since `stale_since`."""

    flags: int = 0
    stale_since: int = 0
    synced_at: int = 0

    @property
    def in_sync(self) -> bool:
        return bool(self.flags & MEMBER_IN_SYNC)

    @property
    def full_resync(self) -> bool:
        return bool(self.flags & MEMBER_FULL_RESYNC)


@dataclass(frozen=True)
class Renumbering:
    """The last removal of legs that renumbered the others (section 10 of
    docs/mirror-metadata.md): from `generation` on, the legs of the
    numbering before it whose bits are set in `removed` are gone, the rows
    of every member table are the remaining legs in their old order, and
    `previous` is the generation of the renumbering before this one (0:
    none). A header's numbering is named by the generation of its last
    renumbering (0 for a storage never renumbered)."""

    removed: int
    generation: int
    previous: int = 0

    def new_index(self, index: int) -> int | None:
        """Leg `index` of the numbering before, in the numbering after
        (None: it is one of the removed legs)."""
        if self.removed >> index & 1:
            return None
        return index - (self.removed & ((1 << index) - 1)).bit_count()


def numbering_of(renumbering: Renumbering | None) -> int:
    """The generation that names a numbering (0: never renumbered)."""
    return renumbering.generation if renumbering is not None else 0


@dataclass(frozen=True)
class MirrorHeader:
    """One leg's header. `members[i]` is this leg's view of leg i; the
    row for itself (`members[leg_index]`) says whether its own data is
    complete. All fields are plain values so headers compare by value."""

    storage_id: bytes
    leg_index: int
    generation: int
    leg_size: int
    data_size: int
    region_size: int
    members: tuple[MemberRecord, ...]
    sequence: int = 0
    flags: int = 0
    created_us: int = 0
    client_id: bytes = bytes(16)
    client_name: str = ""
    held_since_us: int = 0
    heartbeat: int = 0
    heartbeat_us: int = 0
    #: the generation at which the holder mounted: a later holder has a
    #: higher one (a taker mounts past every generation it read)
    holder_epoch: int = 0
    #: the last removal that renumbered the legs (None: never renumbered)
    renumbered: Renumbering | None = None
    #: legs (bits, in this header's numbering) being removed: recorded stale,
    #: the renumbering without them follows
    removing: int = 0
    version: int = VERSION
    layout: LegLayout | None = field(default=None, compare=False)

    @property
    def clean(self) -> bool:
        return bool(self.flags & FLAG_CLEAN)

    @property
    def checks_valid(self) -> bool:
        return bool(self.flags & FLAG_CHECKS_VALID)

    @property
    def self_record(self) -> MemberRecord:
        return self.members[self.leg_index]

    @property
    def held(self) -> bool:
        """A client holds the storage: it mounted and has not shut down."""
        return not self.clean and self.client_id != bytes(16)

    def member(self, index: int) -> MemberRecord | None:
        return self.members[index] if index < len(self.members) else None

    @property
    def numbering(self) -> int:
        """The generation naming this header's numbering of the legs."""
        return numbering_of(self.renumbered)

    def with_changes(self, **changes) -> MirrorHeader:
        return replace(self, **changes)

    # -- bytes ----------------------------------------------------------
    def pack(self) -> bytes:
        if not 0 < len(self.members) <= MAX_LEGS:
            raise ValueError(f"a mirror has 1 to {MAX_LEGS} legs, not {len(self.members)}")
        layout = self.layout or leg_layout(self.leg_size, self.region_size)
        name = self.client_name.encode("utf-8")[:64]
        renumbered = self.renumbered or Renumbering(0, 0, 0)
        raw = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            raw, 0,
            MAGIC, self.version, MAX_LEGS, self.flags, self.sequence,
            self.storage_id, self.leg_index, len(self.members), self.generation,
            layout.leg_size, self.data_size, self.region_size, BLOCK,
            layout.checks_offset, layout.checks_length,
            layout.bitmap_offset, layout.bitmap_length, self.created_us,
            self.client_id, name, self.held_since_us, self.heartbeat, self.heartbeat_us,
            self.holder_epoch, renumbered.removed, self.removing,
            renumbered.generation, renumbered.previous,
        )  # fmt: skip
        for index, record in enumerate(self.members):
            _MEMBER.pack_into(
                raw, MEMBERS_AT + index * _MEMBER.size,
                record.flags, record.stale_since, record.synced_at,
            )  # fmt: skip
        raw[HEADER_CHECKSUM_AT:] = xxhash.xxh3_128_digest(bytes(raw[:HEADER_CHECKSUM_AT]))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes) -> MirrorHeader:
        """Parse one slot; raises NoMetadata, DamagedMetadata or
        UnsupportedVersion."""
        if len(raw) != HEADER_SIZE:
            raise DamagedMetadata(f"header slot is {len(raw)} bytes, not {HEADER_SIZE}")
        if raw[:8] != MAGIC:
            raise NoMetadata("no mirror metadata")
        if xxhash.xxh3_128_digest(raw[:HEADER_CHECKSUM_AT]) != raw[HEADER_CHECKSUM_AT:]:
            raise DamagedMetadata("header checksum mismatch")
        (
            _magic, version, max_legs, flags, sequence, storage_id, leg_index, leg_count,
            generation, leg_size, data_size, region_size, block, checks_offset, checks_length,
            bitmap_offset, bitmap_length, created_us, client_id, name, held_since_us,
            heartbeat, heartbeat_us, holder_epoch, removed, removing, renumbered_at,
            previous_renumbering,
        ) = _HEADER.unpack_from(raw, 0)  # fmt: skip
        if version > VERSION:
            raise UnsupportedVersion(
                f"metadata format version {version} is newer than this dstfuse's ({VERSION})"
            )
        if block != BLOCK or max_legs != MAX_LEGS:
            raise DamagedMetadata(f"unexpected block size {block} or table size {max_legs}")
        if not 0 < leg_count <= MAX_LEGS or leg_index >= leg_count:
            raise DamagedMetadata(f"leg {leg_index} of {leg_count} is not a valid position")
        try:
            layout = leg_layout(leg_size, region_size)
        except ValueError as exc:
            raise DamagedMetadata(str(exc)) from None
        stored = (checks_offset, checks_length, bitmap_offset, bitmap_length)
        expected = (
            layout.checks_offset, layout.checks_length, layout.bitmap_offset, layout.bitmap_length
        )
        if stored != expected or data_size > layout.data_capacity or data_size % BLOCK:
            raise DamagedMetadata("layout fields disagree with the leg and region sizes")
        members = tuple(
            MemberRecord(*_MEMBER.unpack_from(raw, MEMBERS_AT + index * _MEMBER.size))
            for index in range(leg_count)
        )
        return cls(
            storage_id=storage_id,
            leg_index=leg_index,
            generation=generation,
            leg_size=leg_size,
            data_size=data_size,
            region_size=region_size,
            members=members,
            sequence=sequence,
            flags=flags,
            created_us=created_us,
            client_id=client_id,
            client_name=name.rstrip(b"\x00").decode("utf-8", "replace"),
            held_since_us=held_since_us,
            heartbeat=heartbeat,
            heartbeat_us=heartbeat_us,
            holder_epoch=holder_epoch,
            renumbered=(
                Renumbering(removed, renumbered_at, previous_renumbering)
                if renumbered_at
                else None
            ),
            removing=removing,
            version=version,
            layout=layout,
        )


def newest_header(slots: list[bytes]) -> MirrorHeader:
    """The valid slot with the highest sequence. Raises NoMetadata when no
    slot has the magic, UnsupportedVersion when one is too new, and
    DamagedMetadata when slots have the magic but none is valid."""
    headers: list[MirrorHeader] = []
    errors: list[MetadataError] = []
    for raw in slots:
        try:
            headers.append(MirrorHeader.unpack(raw))
        except MetadataError as exc:
            errors.append(exc)
    if headers:
        return max(headers, key=lambda header: header.sequence)
    for kind in (UnsupportedVersion, DamagedMetadata):
        for error in errors:
            if isinstance(error, kind):
                raise error
    raise NoMetadata("no mirror metadata")


# -- bitmap blocks ------------------------------------------------------
def pack_bitmap_block(storage_id: bytes, index: int, bits: bytes) -> bytes:
    """One 4 KiB bitmap block: BITMAP_BLOCK_BYTES of bits (region r of the
    block is bit r % 8 of byte r // 8), then xxh3-128 over the storage id,
    the block index (u64) and the bits."""
    if len(bits) != BITMAP_BLOCK_BYTES:
        raise ValueError(f"a bitmap block holds {BITMAP_BLOCK_BYTES} bytes of bits")
    digest = xxhash.xxh3_128_digest(storage_id + struct.pack("<Q", index) + bytes(bits))
    return bytes(bits) + digest


def unpack_bitmap_block(storage_id: bytes, index: int, raw: bytes) -> bytes | None:
    """The bits of a block, or None if it fails its check (torn, damaged,
    from another storage or another position): callers then treat every
    region of the block as marked."""
    if len(raw) != BLOCK:
        return None
    bits = raw[:BITMAP_BLOCK_BYTES]
    digest = xxhash.xxh3_128_digest(storage_id + struct.pack("<Q", index) + bits)
    return bytes(bits) if digest == raw[BITMAP_BLOCK_BYTES:] else None

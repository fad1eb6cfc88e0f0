"""The mirror's geometry: its data size cut into regions, the unit of the
write-intent bitmap, of resync and of verify.

Fixed when the storage starts (an existing storage keeps the region size it
was created with). Every region but the last is `region_size` bytes; the
last one ends at `size`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bitmap import RegionBits
from .metadata import ceil_div


@dataclass(frozen=True)
class Geometry:
    size: int
    region_size: int

    @property
    def regions(self) -> int:
        return ceil_div(self.size, self.region_size)

    def regions_of(self, offset: int, length: int) -> range:
        """The regions [offset, +length) touches (at least one)."""
        last = (offset + max(length, 1) - 1) // self.region_size
        return range(offset // self.region_size, last + 1)

    def region_bounds(self, region: int) -> tuple[int, int]:
        start = region * self.region_size
        return start, min(start + self.region_size, self.size)

    def region_bytes(self, regions: RegionBits) -> int:
        """The bytes of the storage the `regions` cover."""
        total = len(regions) * self.region_size
        last = self.regions - 1
        if self.regions and last in regions:
            total -= self.regions * self.region_size - self.size
        return total

"""A mirror's size found without starting it, for `dstfuse check`.

An existing mirror keeps the size recorded in its legs' headers (the mount
takes it from the newest one); a new mirror gets the smallest leg's data
capacity, which is a pure function of leg and region size. Only the header
slots are read; nothing is ever written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..algorithms.base import SizeFinding
from ..nodes.base import Node
from .legs import MirrorLeg
from .metadata import leg_layout
from .startup import examine_leg


async def find_mirror_size(
    storage_name: str, nodes: Sequence[tuple[Node | None, int]], options: Mapping
) -> SizeFinding:
    """`Algorithm.find_size` for the mirror: ValueError for a leg too small
    for the metadata; UserError for metadata of a newer format."""
    headers = []
    for index, (node, used) in enumerate(nodes):
        if node is None:
            continue
        finding = await examine_leg(MirrorLeg(storage_name, index, node, used))
        if finding.header is not None:
            headers.append(finding.header)
    if headers:
        newest = max(headers, key=lambda header: header.generation)
        return SizeFinding(newest.data_size, recorded=True)
    region_size = options["region_size"]
    capacity = min(leg_layout(used, region_size).data_capacity for _, used in nodes)
    return SizeFinding(capacity, recorded=False)

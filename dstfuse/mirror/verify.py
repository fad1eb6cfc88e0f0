"""Online verify: compare the in-sync legs region by region, optionally repair.

`OnlineVerify` is the storage's `verify` control file. Writing `verify` or
`repair` starts one pass over the whole storage in the background; reading
gives `idle`, `running <done>/<total> regions`, `done: <n> differing ranges`
followed by one `<offset> <length>` line per differing range (in bytes), or
`failed: <reason>`. After a repair the first line ends with `, <m> repaired`
and each range line with ` repaired` or ` failed`.

Each region is compared by `Node.checksum`, computed on the nodes, so equal
regions move no data. A region whose digests differ is read from every leg
and compared block by block before anything is reported: the difference may
be a digest artefact (a stacked leg's checksum over a node boundary is a
digest of digests), and the report names exact 4 KiB-aligned ranges. While
a region is being compared it is admitted in the mirror's `WriteOrder`, so
writes to it wait and the legs are compared at one instant.

A repair copies each differing block from the first in-sync leg whose bytes
pass the block check (the first in-sync leg when the block has no check)
to the others (`VerifyRepair`, the mirror's reads). Verify never changes a
leg's role except through `leg_failed` when a repair write fails.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..errors import NodeError, UserError
from ..fanout import gather
from ..nodes.base import ReadData
from ..ranges import WriteOrder
from .geometry import Geometry
from .legs import MirrorLeg
from .metadata import BLOCK
from .resync import RateLimit

log = logging.getLogger(__name__)

#: Bytes read per leg at a time when a region's digests differ.
COMPARE_CHUNK = 1 << 20


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and join touching or overlapping (offset, length) ranges."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            end = max(last_offset + last_length, offset + length)
            merged[-1] = (last_offset, end - last_offset)
        else:
            merged.append((offset, length))
    return merged


def _covered(offset: int, length: int, ranges: list[tuple[int, int]]) -> bool:
    """[offset, +length) lies inside one of the merged `ranges`."""
    return any(start <= offset and offset + length <= start + size for start, size in ranges)


def _block_runs(blocks: list[int]) -> list[tuple[int, int]]:
    return merge_ranges([(block * BLOCK, BLOCK) for block in blocks])


class VerifyRepair(Protocol):
    async def repair_block(self, offset: int, copies: list[tuple[MirrorLeg, ReadData]]) -> bool:
        """Make every leg of `copies` (leg, its bytes of the block at
        `offset`) hold the right bytes; True if they all agree now."""
        ...


class OnlineVerify:
    """One mirror's verify: at most one pass runs at a time, in the
    background (`start_background`), at most `rate` bytes/s (0 = unlimited)."""

    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        geometry: Geometry,
        *,
        write_order: WriteOrder,
        rate: int,
        repair: VerifyRepair,
        start_background: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> None:
        self.storage_name = storage_name
        self._mirror_legs = legs
        self._geometry = geometry
        self._write_order = write_order
        self._rate_limit = rate
        self._repairs = repair
        self._start_background = start_background
        self._rate = RateLimit()
        self.running = False
        self.repair = False
        self.done_regions = 0
        self.total_regions = 0
        self.differing: list[tuple[int, int]] = []
        self.repaired: list[tuple[int, int]] = []
        self.failure = ""
        self.finished = False

    # -- control file ----------------------------------------------------
    def read(self) -> str:
        if self.running:
            return f"running {self.done_regions}/{self.total_regions} regions\n"
        if self.failure:
            return f"failed: {self.failure}\n"
        if not self.finished:
            return "idle\n"
        differing = merge_ranges(self.differing)
        head = f"done: {len(differing)} differing ranges"
        if not self.repair:
            return head + "\n" + "".join(f"{offset} {length}\n" for offset, length in differing)
        repaired = merge_ranges(self.repaired)
        lines = [
            f"{offset} {length} {'repaired' if _covered(offset, length, repaired) else 'failed'}"
            for offset, length in differing
        ]
        head += f", {sum(line.endswith('repaired') for line in lines)} repaired"
        return head + "\n" + "".join(line + "\n" for line in lines)

    def write(self, text: str) -> None:
        """Start a pass; UserError for other words, a pass already
        running, or fewer than two in-sync legs to compare."""
        word = text.strip().lower()
        if word not in ("verify", "repair"):
            raise UserError(f"storage {self.storage_name}: write 'verify' or 'repair'")
        if self.running:
            raise UserError(f"storage {self.storage_name}: a verify is already running")
        legs = self._legs()
        if len(legs) < 2:
            self.failure = (
                f"storage {self.storage_name} has {len(legs)} in-sync leg(s) online; "
                "verify needs two"
            )
            raise UserError(self.failure)
        self.running = True
        self.repair = word == "repair"
        self.done_regions = 0
        self.total_regions = self._geometry.regions
        self.differing = []
        self.repaired = []
        self.failure = ""
        self.finished = False
        self._start_background(self._run)

    def _legs(self) -> list[MirrorLeg]:
        return [leg for leg in self._mirror_legs if leg.in_sync and leg.online]

    # -- the pass --------------------------------------------------------
    async def _run(self) -> None:
        what = "repair" if self.repair else "verify"
        log.info("storage %s: %s started", self.storage_name, what)
        for leg in self._legs():
            if not leg.node.checksums_on_node:
                log.info(
                    "storage %s: leg %s has no node-side checksums (NBD): %s reads its "
                    "data over the network and digests it here",
                    self.storage_name,
                    leg,
                    what,
                )
        try:
            for region in range(self.total_regions):
                start, end = self._geometry.region_bounds(region)
                await self._rate.take(end - start, self._rate_limit)
                ticket = await self._write_order.admit(start, end - start)
                try:
                    await self._region(start, end - start)
                finally:
                    self._write_order.release(ticket)
                self.done_regions += 1
        except (NodeError, _TooFewLegs) as exc:
            self.failure = str(exc)
            log.warning("storage %s: verify failed: %s", self.storage_name, exc)
        finally:
            self.running = False
            self.finished = True
        differing = merge_ranges(self.differing)
        log.info(
            "storage %s: verify done: %d differing ranges%s",
            self.storage_name,
            len(differing),
            f", {len(merge_ranges(self.repaired))} repaired" if self.repair else "",
        )

    async def _region(self, start: int, length: int) -> None:
        legs = self._legs()
        if len(legs) < 2:
            raise _TooFewLegs("fewer than two in-sync legs are online")
        outcomes = await gather([lambda leg=leg: leg.node.checksum(start, length) for leg in legs])
        answered = []
        for leg, (digest, error) in zip(legs, outcomes, strict=True):
            if error is None:
                answered.append((leg, digest))
            else:
                log.warning("%s: verify checksum failed: %s", leg, error)
        if len(answered) < 2:
            raise _TooFewLegs("fewer than two legs answered the checksum")
        if len({digest for _, digest in answered}) == 1:
            return
        await self._compare_bytes(start, length, [leg for leg, _ in answered])

    async def _compare_bytes(self, start: int, length: int, legs: list[MirrorLeg]) -> None:
        """Find the differing blocks of a region by its bytes, and repair."""
        offset = start
        while offset < start + length:
            size = min(COMPARE_CHUNK, start + length - offset)
            outcomes = await gather(
                [lambda leg=leg, at=offset, n=size: leg.node.read(at, n) for leg in legs]
            )
            datas = []
            for leg, (data, error) in zip(legs, outcomes, strict=True):
                if error is None:
                    datas.append((leg, data))
                else:
                    log.warning("%s: verify read failed: %s", leg, error)
            if len(datas) < 2:
                raise _TooFewLegs("fewer than two legs answered a verify read")
            differing = [
                block
                for block in range(size // BLOCK)
                if len({bytes(data[block * BLOCK : (block + 1) * BLOCK]) for _, data in datas}) > 1
            ]
            first = offset // BLOCK
            self.differing.extend(_block_runs([first + block for block in differing]))
            if differing and self.repair:
                for block in differing:
                    repaired = await self._repairs.repair_block(
                        (first + block) * BLOCK,
                        [(leg, data[block * BLOCK : (block + 1) * BLOCK]) for leg, data in datas],
                    )
                    if repaired:
                        self.repaired.append(((first + block) * BLOCK, BLOCK))
            offset += size


class _TooFewLegs(Exception):
    pass

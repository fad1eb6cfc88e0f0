"""A started mirror's parts, built whole once the storage is opened.

`MirrorRuntime` wires the parts that exist only after start (they need the
geometry, the bitmap and the block checks `open_mirror` produced, and the
nursery of the mirror's background tasks) to each other through the narrow
interfaces each declares: resync, verify and the leg watchers never see the
mirror itself. Nothing here is optional: before start there is no runtime,
after start there is all of it (`checks` is None only when the storage runs
with read_check off).
"""

from __future__ import annotations

import trio

from ..ranges import WriteOrder
from .bitmap import RegionActivity
from .clearing import BitmapCleaner
from .lease import HolderLease
from .legs import MirrorLeg
from .legstates import LegStates
from .membership import Membership
from .opening import Opened
from .options import MirrorOptions
from .reads import MirrorReads
from .resync import Resync, Wakeup
from .routing import ReadRouter
from .verify import OnlineVerify
from .watch import LegWatch


class MirrorRuntime:
    def __init__(
        self,
        storage_name: str,
        legs: list[MirrorLeg],
        options: MirrorOptions,
        opened: Opened,
        *,
        membership: Membership,
        lease: HolderLease,
        write_order: WriteOrder,
        router: ReadRouter,
        tasks: trio.Nursery,
    ) -> None:
        self.geometry = geometry = opened.geometry
        self.bitmap = bitmap = opened.bitmap
        self.checks = checks = opened.checks
        self.activity = activity = RegionActivity()
        #: the nursery of the mirror's background tasks
        self.tasks = tasks
        wakeup = Wakeup()
        self.states = states = LegStates(
            storage_name,
            legs,
            membership,
            geometry,
            bitmap,
            wake_resync=wakeup.set,
            start_background=tasks.start_soon,
        )
        self.reads = reads = MirrorReads(
            storage_name,
            router,
            geometry,
            activity=activity,
            bitmap=bitmap,
            checks=checks,
            lease=lease,
            write_order=write_order,
            states=states,
        )
        self.cleaner = BitmapCleaner(
            storage_name,
            legs,
            bitmap=bitmap,
            checks=checks,
            activity=activity,
            lease=lease,
            membership=membership,
            bitmap_idle=options.bitmap_idle,
            hot_regions=options.bitmap_hot // geometry.region_size,
        )
        self.resync = Resync(
            storage_name,
            legs,
            geometry,
            write_order=write_order,
            lease=lease,
            checks=checks,
            source=reads,
            reports=states,
            wakeup=wakeup,
        )
        self.verify = OnlineVerify(
            storage_name,
            legs,
            geometry,
            write_order=write_order,
            rate=options.resync_rate,
            repair=reads,
            start_background=tasks.start_soon,
        )
        self.watch = LegWatch(
            legs, membership, geometry, bitmap, checks=checks is not None, resyncs=states
        )

    def bitmap_text(self) -> str:
        """`marked <n> of <regions> regions of <bytes>` (the `bitmap` control
        file): regions that may differ between the legs (written recently,
        or missed by a leg), those being cleared included: they stay marked
        on disk until the clearing's flush and bitmap writes are done, and
        go back to marked if a leg fails meanwhile."""
        geometry = self.geometry
        marked = self.bitmap.desired.copy()
        marked.update(self.bitmap.clearing)
        return f"marked {len(marked)} of {geometry.regions} regions of {geometry.region_size}\n"

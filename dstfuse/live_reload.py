"""`dstfuse reload` inside the mount daemon: re-read the config the mount
was started with and apply the difference, all or nothing.

`LiveReload` owns the running config and the `.dst/.reload` control file.
Writing `reload` to that file runs one reload and the write returns only
once it is applied or refused; reading it shows the last reload as one
line (`control.ReloadOutcome`). A refused reload fails the write with
EINVAL.

Order of a reload (reloads run one at a time):

1. read and parse the config file with the mount's parser (its mistakes
   are refused with the same message `dstfuse mount` prints);
2. `plan_reload` decides, without touching anything, whether every change
   can be made online; any that cannot refuses the whole reload;
3. the appended nodes are started and the new storages built, all at
   once, as the mount builds its own (`Assembly.extend`); a part that does
   not start closes the others again and refuses the reload;
4. only then, with no await until the last step, is anything changed: the
   new timeouts go to every node, the new storages join the mount (control
   directories, files), the grown storages get their nodes (a mirror gets
   new legs, which it records and copies in the background, see
   mirror/adding.py), and the new config becomes the running one;
5. each grown storage file's size is refreshed in the kernel
   (`LiveMount.storage_resized`), so `losetup -c` sees it when the command
   returns.

Nothing here formats FUSE replies or knows pyfuse3: the daemon passes in
what a resize must tell the filesystem.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Protocol

import trio

from .algorithms import ControlFile
from .assembly import Assembly
from .config import MountConfig, load_mount_config
from .control import ReloadOutcome
from .errors import UserError
from .reload_plan import ReloadPlan, describe_node, plan_reload
from .storage import Storage
from .units import format_size

log = logging.getLogger(__name__)

#: The one value the reload file takes.
RELOAD_WORD = "reload"


class LiveMount(Protocol):
    """What a reload changes in the mount beyond its storages: the files."""

    def storages_added(
        self, storages: Mapping[str, Storage], exposed: Mapping[str, Storage]
    ) -> None:
        """New `storages` get control directories, the `exposed` ones files."""

    async def storage_resized(self, storage: Storage) -> None:
        """`storage` grew: its file must show the new size when this returns."""


class LiveReload:
    """Reloads of one mount (see the module doc). `config` is what the
    mount runs; `mount` is told what appeared and what grew."""

    def __init__(self, config: MountConfig, assembly: Assembly, mount: LiveMount) -> None:
        self.config = config
        self._assembly = assembly
        self._mount = mount
        self._lock = trio.Lock()
        self.last: ReloadOutcome | None = None

    def control_file(self) -> ControlFile:
        return ControlFile(read=self.render, write=self.write)

    def render(self) -> str:
        return self.last.render() if self.last is not None else "none\n"

    async def write(self, text: str) -> None:
        if text.strip() != RELOAD_WORD:
            raise UserError(f"write '{RELOAD_WORD}' to reload the config, not {text.strip()!r}")
        await self.reload()

    async def reload(self) -> ReloadOutcome:
        """Run one reload; UserError (refused, nothing applied) or the outcome."""
        async with self._lock:
            path = self.config.path
            log.info("reload: reading %s", path)
            try:
                wanted = await trio.to_thread.run_sync(load_mount_config, path)
                plan = plan_reload(self.config, wanted)
                message = await self._apply(plan)
            except UserError as exc:
                # The control file's writer logs the refusal, once.
                self._record("refused", f"{exc}; nothing applied")
                raise
            outcome = self._record("unchanged" if plan.empty else "applied", message)
            log.info("reload of %s: %s", path, message)
            return outcome

    def _record(self, outcome: str, message: str) -> ReloadOutcome:
        self.last = ReloadOutcome(outcome, datetime.datetime.now(datetime.UTC), message)
        return self.last

    def _remove_legs(self, plan: ReloadPlan) -> str:
        """Remove mirror legs (a reload of its own, see reload_plan): every
        removal is checked, then all are begun, with no await in between,
        so what was checked is what is applied."""
        mirrors = {name: self._assembly.storages[name].algorithm for name in plan.removed}
        for name, positions in plan.removed.items():
            mirrors[name].check_removal(positions)
        done = []
        for name, positions in plan.removed.items():
            gone = mirrors[name].remove_legs(positions)
            for leg in gone:
                done.append(
                    f"storage {name}: leg {leg.index} ({leg.node.description}) removed: it "
                    "takes no more writes; its node is closed once the new membership is "
                    "recorded"
                )
            if positions[0] < len(plan.config.storages[name].nodes):
                done.append(
                    f"storage {name}: the legs after leg {positions[0]} are renumbered as the "
                    "config lists them now"
                )
        self.config = plan.config
        return "; ".join(done)

    async def _apply(self, plan: ReloadPlan) -> str:
        """Carry out `plan` (all or nothing, see the module doc); what it did."""
        if plan.empty:
            self.config = plan.config  # the same, with the file's new line numbers
            return f"nothing to change: {plan.config.path} is what the mount runs"
        if plan.removed:
            return self._remove_legs(plan)
        running_nodes = list(self._assembly.nodes)
        extension = await self._assembly.extend(plan.config, plan.appended, plan.added)
        # From here on nothing fails and nothing awaits until every change is made.
        if plan.timeouts is not None:
            for node in running_nodes:
                node.set_timeouts(plan.timeouts)
        done = list(plan.changes)
        self._assembly.commit(extension)
        if extension.storages:
            self._mount.storages_added(extension.storages, extension.exposed)
        for name, storage in extension.storages.items():
            shown = "a new file" if name in extension.exposed else "a node of another storage"
            done.append(
                f"storage {name} added ({storage.algorithm.name}, {format_size(storage.size)}, "
                f"{shown})"
            )
        grown: list[Storage] = []
        for name, nodes in extension.appended.items():
            storage = self._assembly.storages[name]
            before = storage.size
            storage.append_nodes(nodes)
            if storage.algorithm.adds_legs:
                first = len(storage.placements()) - len(nodes)
                for position, spec in enumerate(plan.appended[name], start=first):
                    done.append(
                        f"storage {name}: leg {position} ({describe_node(spec)}) added, "
                        "not up to date: copied in the background (dstfuse status shows it)"
                    )
                continue
            grown.append(storage)
            appended = ", ".join(describe_node(spec) for spec in plan.appended[name])
            done.append(
                f"storage {name} grew from {format_size(before)} to "
                f"{format_size(storage.size)} ({appended} appended)"
            )
            log.info(
                "storage %s: grew from %d to %d bytes; appended %s",
                name,
                before,
                storage.size,
                appended,
            )
        self.config = plan.config
        for storage in grown:
            await self._mount.storage_resized(storage)
        return "; ".join(done)

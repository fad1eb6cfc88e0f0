"""The control tree `MOUNTPOINT/.dst/` as a pure model (DESIGN.md section 6).

This module owns what the control tree contains and how each file reads and
writes; `fs.py` only maps it onto FUSE. It never imports pyfuse3 and never
does I/O: every file is a `ControlFile` whose `read()` renders text from the
live storage, algorithm and node objects, and every directory is a
`ControlDirectory` whose entries are computed when asked, so the tree always
shows the current state.

Layout (all files are text ending in a newline)::

    .dst/.daemon                    pid, config, mountpoint, result (DaemonInfo)
    .dst/.reload                    the last reload (ReloadOutcome); write `reload`
    .dst/<storage>/alg              algorithm name
                   name             storage name
                   size             bytes
                   state            clean | degraded | resyncing | failed
                   nodes            one line per node:
                                    "n-<start>-<cookie> <start> <size> <type line>"
                   <algorithm.controls()>
                   n-<start>-<cookie>/type        "R: host:port", "L: /path", "S: name",
                                                  "N: nbd://host:port/export"
                                      start, size bytes
                                      state       sync | notsync
                                      status      clean | dirty | resyncing | offline
                                      flags       "online|offline rw|ro"
                                      resync_done, resync_total   bytes
                                      requests bytes_read bytes_written resends
                                      reconnects errors in_flight unflushed  (counters)
                                      <placement.controls> (mirror: clean, dirty, ...)

Invariants: names this module adds at the top of `.dst/` that are not
storages start with "." (storage names never do, config.py refuses them);
the standard files of a directory win over algorithm-provided ones with the
same name (a clash is logged once per render). Writing a file calls its
`ControlFile.write`, which raises `UserError` for bad input.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .algorithms import ControlFile, Placement
from .nodes.base import NodeState
from .storage import Storage

log = logging.getLogger(__name__)

#: Name of the control tree's directory in the mount root.
CONTROL_DIRECTORY = ".dst"
#: Name of the daemon file inside `.dst/`.
DAEMON_FILE = ".daemon"
#: Name of the reload file inside `.dst/` (`dstfuse.live_reload`).
RELOAD_FILE = ".reload"

COUNTER_FILES = (
    "requests",
    "bytes_read",
    "bytes_written",
    "resends",
    "reconnects",
    "errors",
    "in_flight",
    "unflushed",
)


class ControlDirectory:
    """A directory whose entries are computed by `entries()` on every call."""

    def __init__(self, entries: Callable[[], dict[str, ControlEntry]]) -> None:
        self._entries = entries

    def entries(self) -> dict[str, ControlEntry]:
        return self._entries()


ControlEntry = ControlDirectory | ControlFile


def text_file(value: Callable[[], object]) -> ControlFile:
    """A read-only file showing `str(value())` and a newline."""
    return ControlFile(read=lambda: f"{value()}\n")


@dataclass(frozen=True)
class DaemonInfo:
    """What `.dst/.daemon` says about the mount daemon; `umount` and `status`
    read it. `result` is the file the daemon writes its final outcome to
    when it exits ("ok" or "failed: <reason>"), or None when it has none."""

    pid: int
    config: Path
    mountpoint: Path
    result: Path | None = None

    def render(self) -> str:
        return (
            f"pid {self.pid}\n"
            f"config {self.config}\n"
            f"mountpoint {self.mountpoint}\n"
            f"result {self.result if self.result is not None else '-'}\n"
        )

    @classmethod
    def parse(cls, text: str) -> DaemonInfo:
        """The inverse of `render`; ValueError when `text` is not one."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key:
                fields[key] = value
        try:
            result = fields.get("result", "-")
            return cls(
                pid=int(fields["pid"]),
                config=Path(fields["config"]),
                mountpoint=Path(fields["mountpoint"]),
                result=None if result in ("", "-") else Path(result),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a dstfuse daemon file ({exc})") from None


@dataclass(frozen=True)
class ReloadOutcome:
    """The last reload, as `.dst/.reload` shows it in one line:
    `<outcome> <UTC time>: <message>`, outcome `applied`, `unchanged` or
    `refused`; the file says `none` before the first reload."""

    OUTCOMES: ClassVar[tuple[str, ...]] = ("applied", "unchanged", "refused")

    outcome: str
    time: datetime.datetime
    message: str

    @property
    def stamp(self) -> str:
        return self.time.strftime("%Y-%m-%dT%H:%M:%SZ")

    def render(self) -> str:
        return f"{self.outcome} {self.stamp}: {' '.join(self.message.split())}\n"

    @classmethod
    def parse(cls, text: str) -> ReloadOutcome | None:
        """The inverse of `render` (None for `none`); ValueError otherwise."""
        if text.strip() == "none":
            return None
        head, colon, message = text.strip().partition(": ")
        words = head.split()
        if not colon or len(words) != 2 or words[0] not in cls.OUTCOMES:
            raise ValueError(f"not a reload result: {text.strip()!r}")
        stamp = datetime.datetime.strptime(words[1], "%Y-%m-%dT%H:%M:%SZ")
        return cls(words[0], stamp.replace(tzinfo=datetime.UTC), message.strip())


def _merge(standard: dict[str, ControlEntry], extra: Mapping[str, ControlFile], where: str) -> None:
    for name, control in extra.items():
        if name in standard:
            log.warning("%s: control file %r clashes with a standard file; hidden", where, name)
            continue
        standard[name] = control


def node_lines(storage: Storage) -> str:
    """The `nodes` map: one line per placement, in storage order."""
    return "".join(
        f"{p.directory} {p.start} {p.size} {p.node.description}\n" for p in storage.placements()
    )


def node_directory(storage: Storage, placement: Placement) -> ControlDirectory:
    """The `n-<start>-<cookie>/` directory of one node of `storage`."""
    algorithm = storage.algorithm
    node = placement.node

    def flags() -> str:
        online = "offline" if node.state is NodeState.OFFLINE else "online"
        return f"{online} {'rw' if node.writable else 'ro'}"

    def entries() -> dict[str, ControlEntry]:
        files: dict[str, ControlEntry] = {
            "type": text_file(lambda: node.description),
            "start": text_file(lambda: placement.start),
            "size": text_file(lambda: placement.size),
            "state": text_file(
                lambda: "sync" if algorithm.node_state(placement) == "clean" else "notsync"
            ),
            "status": text_file(lambda: algorithm.node_state(placement)),
            "flags": text_file(flags),
            "resync_done": text_file(lambda: algorithm.resync_progress(placement)[0]),
            "resync_total": text_file(lambda: algorithm.resync_progress(placement)[1]),
        }
        for counter in COUNTER_FILES:
            files[counter] = text_file(lambda counter=counter: getattr(node.counters, counter))
        _merge(files, placement.controls, f"storage {storage.name}: {placement.directory}")
        return files

    return ControlDirectory(entries)


def storage_directory(storage: Storage) -> ControlDirectory:
    """The `.dst/<storage>/` directory."""

    def entries() -> dict[str, ControlEntry]:
        files: dict[str, ControlEntry] = {
            "alg": text_file(lambda: storage.algorithm.name),
            "name": text_file(lambda: storage.name),
            "size": text_file(lambda: storage.size),
            "state": text_file(lambda: storage.state),
            "nodes": ControlFile(read=lambda: node_lines(storage)),
        }
        for placement in storage.placements():
            files[placement.directory] = node_directory(storage, placement)
        _merge(files, storage.algorithm.controls(), f"storage {storage.name}")
        return files

    return ControlDirectory(entries)


class ControlTree:
    """The whole `.dst/` tree: one directory per storage (every storage of
    the mount, also those only used as nodes of another) plus the hidden
    files given in `hidden` (names must start with ".")."""

    def __init__(
        self, storages: Mapping[str, Storage], hidden: Mapping[str, ControlFile] | None = None
    ) -> None:
        hidden = dict(hidden or {})
        for name in hidden:
            if not name.startswith("."):
                raise ValueError(f"control file {name!r} must start with '.'")
        self._directories: dict[str, ControlDirectory] = {}
        for name, storage in storages.items():
            self._add(name, storage)
        self._hidden = hidden
        self.root = ControlDirectory(lambda: {**self._hidden, **self._directories})

    def add_storage(self, storage: Storage) -> None:
        """Give `storage` its directory, when a reload adds it."""
        self._add(storage.name, storage)

    def _add(self, name: str, storage: Storage) -> None:
        if name.startswith("."):
            raise ValueError(f"storage name {name!r} must not start with '.'")
        self._directories[name] = storage_directory(storage)

    def resolve(self, path: Sequence[str]) -> ControlEntry | None:
        """The entry at `path` (names below `.dst/`), or None if there is none."""
        entry: ControlEntry = self.root
        for name in path:
            if not isinstance(entry, ControlDirectory):
                return None
            child = entry.entries().get(name)
            if child is None:
                return None
            entry = child
        return entry

    def read(self, path: Sequence[str]) -> str:
        """The text of the file at `path`; KeyError if it is not a file."""
        entry = self.resolve(path)
        if not isinstance(entry, ControlFile):
            raise KeyError("/".join(path))
        return entry.read()

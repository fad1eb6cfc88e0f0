"""Read a mount's control tree (`MOUNTPOINT/.dst/`, DESIGN.md section 6) and
present it: the `status --json` object and the human table.

Reading and rendering are separate on purpose. `read_mount_status` is the
only code here that touches the file system; it needs nothing but a
directory path (no FUSE, no daemon connection), so a fake tree in a temp
directory stands in for a mount in tests. `status_json`, `render_status` and
`ResyncSampler` are pure functions of what was read.

Invariants:
- a read never changes the tree: only files are read, the writable trigger
  files (`clean`, `dirty`) are never opened (`.reload` is read, which only
  shows the last reload);
- a mount whose daemon is gone (ENOTCONN) and a directory that is not a
  dstfuse mount both become one-line `UserError`s that say what to do;
- a node directory that disappears while it is being read (the mount is
  being reconfigured) yields missing values, never a traceback.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .control import RELOAD_FILE, ReloadOutcome
from .errors import UserError
from .units import format_size, parse_size

CONTROL_DIR = ".dst"

#: Node counters, in the order the JSON object lists them.
COUNTERS = (
    "requests",
    "bytes_read",
    "bytes_written",
    "resends",
    "reconnects",
    "errors",
    "in_flight",
    "unflushed",
)
#: Mirror-only node files that `status` reports when present. `clean` and
#: `dirty` are deliberately absent: they are write triggers.
MIRROR_VALUES = ("read_repairs", "resync_rate", "resync_size", "resync_timeout", "disk")

# How many --watch samples the resync rate is averaged over.
_RATE_WINDOW = 10


@dataclass(frozen=True)
class NodeStatus:
    """One `n-<start>-<cookie>/` directory. `state` is its `status` file
    (clean/dirty/resyncing/offline); `sync` its `state` file (sync/notsync).
    Counters the tree does not provide are None."""

    name: str
    type: str | None
    start: int | None
    size: int | None
    state: str | None
    sync: str | None
    flags: str | None
    resync_done: int
    resync_total: int
    counters: dict[str, int | None]
    mirror: dict[str, int | str] = field(default_factory=dict)

    @property
    def cookie(self) -> int:
        try:
            return int(self.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return 0


@dataclass(frozen=True)
class StorageStatus:
    name: str
    algorithm: str | None
    size: int | None
    state: str | None
    nodes: tuple[NodeStatus, ...]


@dataclass(frozen=True)
class MountStatus:
    """`reload` is the last `dstfuse reload` (None before the first one,
    or from a daemon without `.dst/.reload`)."""

    mountpoint: str
    storages: dict[str, StorageStatus]
    reload: ReloadOutcome | None = None


# ---------------------------------------------------------------- reading


def daemon_gone_message(mountpoint: str | os.PathLike[str]) -> str:
    return (
        f"{mountpoint}: the dstfuse daemon serving this mount is gone "
        f"(Transport endpoint is not connected); clean up with 'dstfuse umount {mountpoint}' "
        f"(detach its loop devices first: losetup -j {mountpoint}/<storage>)"
    )


class _TreeReader:
    """Reads files under one mount, turning OS errors into UserErrors."""

    def __init__(self, mountpoint: str | os.PathLike[str]) -> None:
        self.mountpoint = os.fspath(mountpoint)

    def fail(self, path: Path, exc: OSError) -> UserError:
        if exc.errno == errno.ENOTCONN:
            return UserError(daemon_gone_message(self.mountpoint))
        if exc.errno == errno.EACCES:
            return UserError(
                f"{path}: permission denied (a FUSE mount is visible only to the user who "
                "mounted it unless it was mounted with -o allow_other)"
            )
        return UserError(f"{path}: {exc.strerror or exc}")

    def listdir(self, path: Path) -> list[str] | None:
        """Entry names of `path`, or None when it vanished meanwhile."""
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self.fail(path, exc) from None

    def is_dir(self, path: Path) -> bool:
        try:
            return path.is_dir()
        except OSError as exc:
            raise self.fail(path, exc) from None

    def text(self, path: Path) -> str | None:
        """The file's text without surrounding whitespace; None if absent."""
        try:
            # Control files report size 0 in stat; read() reads to EOF anyway.
            with open(path, encoding="utf-8", errors="replace") as file:
                return file.read().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise self.fail(path, exc) from None

    def number(self, path: Path) -> int | None:
        text = self.text(path)
        if text is None:
            return None
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{path}: expected a number of bytes, got {text!r}") from None

    def value(self, path: Path) -> int | str | None:
        """A number when the file holds one, else its text (e.g. `100ms`)."""
        text = self.text(path)
        if text is None:
            return None
        try:
            return int(text)
        except ValueError:
            return text


def read_mount_status(mountpoint: str | os.PathLike[str]) -> MountStatus:
    """Everything the control tree of the mount at `mountpoint` says.

    Raises UserError when `mountpoint` is missing, is not a dstfuse mount, or
    its daemon is gone."""
    reader = _TreeReader(mountpoint)
    root = Path(mountpoint)
    try:
        info = os.stat(root)
    except FileNotFoundError:
        raise UserError(f"{mountpoint}: no such directory") from None
    except OSError as exc:
        raise reader.fail(root, exc) from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{mountpoint}: not a directory (give the mount point)")
    control = root / CONTROL_DIR
    names = reader.listdir(control)
    if names is None:
        raise UserError(
            f"{mountpoint} is not a dstfuse mount (no {CONTROL_DIR} directory; "
            "mount one with 'dstfuse mount CONFIG MOUNTPOINT')"
        )
    storages: dict[str, StorageStatus] = {}
    for name in sorted(names):
        # `.daemon` and other dot names are the daemon's own, not storages.
        if name.startswith(".") or not reader.is_dir(control / name):
            continue
        storage = _read_storage(reader, control / name, name)
        if storage is not None:
            storages[name] = storage
    return MountStatus(
        mountpoint=reader.mountpoint,
        storages=storages,
        reload=_read_reload(reader, control / RELOAD_FILE),
    )


def _read_reload(reader: _TreeReader, path: Path) -> ReloadOutcome | None:
    text = reader.text(path)
    if text is None:
        return None
    try:
        return ReloadOutcome.parse(text)
    except ValueError:
        return None


def read_mount_status_within(mountpoint: str | os.PathLike[str], timeout: float) -> MountStatus:
    """`read_mount_status`, given up after `timeout` seconds.

    A daemon that is stopped (SIGSTOP, a debugger) or stuck leaves reads of
    its files waiting forever, and Ctrl-C may not interrupt them; the read
    runs in a daemon thread so that the command can give up with a UserError
    (the thread ends when the daemon answers or the process exits)."""
    outcome: list[MountStatus | BaseException] = []

    def read() -> None:
        try:
            outcome.append(read_mount_status(mountpoint))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append(exc)

    reader = threading.Thread(target=read, name="dstfuse-status-read", daemon=True)
    reader.start()
    reader.join(timeout)
    if not outcome:
        raise UserError(
            f"{mountpoint}: the dstfuse daemon does not answer within {timeout:g}s "
            "(stopped or stuck?); its pid is in .dst/.daemon"
        )
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _read_storage(reader: _TreeReader, directory: Path, name: str) -> StorageStatus | None:
    entries = reader.listdir(directory)
    if entries is None:
        return None
    nodes = []
    for entry in entries:
        if entry.startswith("n-") and reader.is_dir(directory / entry):
            node = _read_node(reader, directory / entry, entry)
            if node is not None:
                nodes.append(node)
    nodes.sort(key=lambda n: (n.start if n.start is not None else -1, n.cookie, n.name))
    state = reader.text(directory / "state") or _derived_storage_state(nodes)
    return StorageStatus(
        name=reader.text(directory / "name") or name,
        algorithm=reader.text(directory / "alg"),
        size=reader.number(directory / "size"),
        state=state,
        nodes=tuple(nodes),
    )


def _read_node(reader: _TreeReader, directory: Path, name: str) -> NodeStatus | None:
    if reader.listdir(directory) is None:
        return None
    sync = reader.text(directory / "state")
    status = reader.text(directory / "status")
    if status is None and sync is not None:
        # A tree without `status` still says whether the node is in sync.
        status = "clean" if sync == "sync" else "dirty"
    mirror: dict[str, int | str] = {}
    for key in MIRROR_VALUES:
        value = reader.value(directory / key)
        if value is not None:
            mirror[key] = value
    return NodeStatus(
        name=name,
        type=reader.text(directory / "type"),
        start=reader.number(directory / "start"),
        size=reader.number(directory / "size"),
        state=status,
        sync=sync,
        flags=reader.text(directory / "flags"),
        resync_done=reader.number(directory / "resync_done") or 0,
        resync_total=reader.number(directory / "resync_total") or 0,
        counters={key: reader.number(directory / key) for key in COUNTERS},
        mirror=mirror,
    )


def _derived_storage_state(nodes: Iterable[NodeStatus]) -> str | None:
    """The storage state from its nodes, for a tree without a `state` file."""
    states = [node.state for node in nodes]
    if not states:
        return None
    if all(state == "clean" for state in states):
        return "clean"
    if not any(state == "clean" for state in states):
        return "failed"
    return "resyncing" if "resyncing" in states else "degraded"


# ------------------------------------------------------------ resync rates


@dataclass(frozen=True)
class ResyncEstimate:
    """Bytes per second and seconds left; either may be unknown (None).
    `measured` is False when the rate is the node's configured limit
    (`resync_rate`): then the resync goes at most that fast and the ETA is
    the earliest it can end."""

    rate: float | None
    eta: float | None
    measured: bool = True


class ResyncSampler:
    """Resync speed from successive samples of `resync_done` (for --watch).

    The rate is averaged over the last few samples; a node whose progress
    went backwards (a new resync started) starts over."""

    def __init__(self, window: int = _RATE_WINDOW) -> None:
        self._window = window
        self._history: dict[tuple[str, str], list[tuple[float, int]]] = {}

    def add(self, status: MountStatus, now: float) -> None:
        seen = set()
        for storage in status.storages.values():
            for node in storage.nodes:
                key = (storage.name, node.name)
                seen.add(key)
                history = self._history.setdefault(key, [])
                if history and node.resync_done < history[-1][1]:
                    history.clear()
                history.append((now, node.resync_done))
                del history[: -self._window]
        for key in set(self._history) - seen:
            del self._history[key]

    def rate(self, storage: str, node: str) -> float | None:
        history = self._history.get((storage, node), [])
        if len(history) < 2:
            return None
        (first_time, first_done), (last_time, last_done) = history[0], history[-1]
        if last_time <= first_time:
            return None
        return (last_done - first_done) / (last_time - first_time)


def resync_estimate(
    storage: StorageStatus, node: NodeStatus, sampler: ResyncSampler | None = None
) -> ResyncEstimate:
    """Rate measured by `sampler` when it has two samples, else the limit in
    the node's `resync_rate` file (bytes/s; 0 means unlimited: no estimate)."""
    rate = sampler.rate(storage.name, node.name) if sampler is not None else None
    measured = rate is not None
    if rate is None:
        rate = _rate_from_file(node.mirror.get("resync_rate"))
    remaining = max(0, node.resync_total - node.resync_done)
    eta = remaining / rate if rate else None
    return ResyncEstimate(rate=rate, eta=eta, measured=measured)


def _rate_from_file(value: int | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, int):
        return float(value) if value > 0 else None
    text = value.strip()
    if text.lower().endswith("/s"):
        text = text[:-2]
    try:
        rate = parse_size(text)
    except ValueError:
        return None
    return float(rate) if rate > 0 else None


# -------------------------------------------------------------- rendering


def status_json(status: MountStatus) -> dict:
    """The `status --json` object (DESIGN.md section 2), with `reload`
    (outcome, time, message) once the mount has been reloaded."""
    result: dict = {
        "storages": {
            name: {
                "state": storage.state,
                "algorithm": storage.algorithm,
                "size": storage.size,
                "nodes": [_node_json(node) for node in storage.nodes],
            }
            for name, storage in status.storages.items()
        }
    }
    if status.reload is not None:
        result["reload"] = {
            "outcome": status.reload.outcome,
            "time": status.reload.stamp,
            "message": status.reload.message,
        }
    return result


def _node_json(node: NodeStatus) -> dict:
    item: dict = {
        "name": node.name,
        "type": node.type,
        "state": node.state,
        "sync": node.sync,
        "flags": node.flags,
        "start": node.start,
        "size": node.size,
        "resync_done": node.resync_done,
        "resync_total": node.resync_total,
    }
    item.update(node.counters)
    item.update(node.mirror)
    return item


def format_duration(seconds: float) -> str:
    """`0:17`, `12:05`, `1:02:03` (minutes:seconds, hours when needed)."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def resync_text(storage: StorageStatus, node: NodeStatus, sampler: ResyncSampler | None) -> str:
    """The RESYNC column: progress while resyncing, what is left while dirty."""
    done, total = node.resync_done, node.resync_total
    if node.state == "resyncing" and total > 0:
        percent = min(100, done * 100 // total)
        parts = [f"{percent}% {format_size(done)}/{format_size(total)}"]
        estimate = resync_estimate(storage, node, sampler)
        # A configured limit is shown as a bound: "<=35.0 MiB/s, ETA >=0:17".
        bound = ("", "") if estimate.measured else ("<=", ">=")
        if estimate.rate is not None:
            parts.append(f"{bound[0]}{format_size(int(estimate.rate))}/s")
        if estimate.eta is not None:
            parts.append(f"ETA {bound[1]}{format_duration(estimate.eta)}")
        return ", ".join(parts)
    if node.state == "resyncing":
        return "starting"
    if node.state in ("dirty", "offline") and total > done:
        return f"{format_size(total - done)} to resync"
    return "-"


_COLUMNS = tuple("NODE TYPE STATE DISK SIZE RESYNC ERRORS RESENDS RECONNECTS".split())


def render_status(status: MountStatus, sampler: ResyncSampler | None = None) -> str:
    """The human report: one block per storage, a table of its nodes."""
    if not status.storages:
        return f"{status.mountpoint}: no storages\n"
    blocks = [_render_storage(storage, sampler) for storage in status.storages.values()]
    if status.reload is not None:
        blocks.append(f"last reload: {status.reload.render()}")
    return "\n".join(blocks)


def _render_storage(storage: StorageStatus, sampler: ResyncSampler | None) -> str:
    size = f"{format_size(storage.size)}" if storage.size is not None else "size ?"
    header = f"{storage.name}: {storage.state or '?'}, {storage.algorithm or '?'}, {size}"
    rows = [
        (
            node.name,
            node.type or "?",
            node.state or "?",
            str(node.mirror.get("disk", "-")),
            format_size(node.size) if node.size is not None else "?",
            resync_text(storage, node, sampler),
            _counter(node, "errors"),
            _counter(node, "resends"),
            _counter(node, "reconnects"),
        )
        for node in storage.nodes
    ]
    return header + "\n" + format_table(_COLUMNS, rows, indent="  ")


def _counter(node: NodeStatus, key: str) -> str:
    value = node.counters.get(key)
    return "-" if value is None else str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart, one line per row."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines) + "\n"

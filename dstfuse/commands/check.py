"""`dstfuse check CONFIG`: validate a mount config and try every node.

Loads the config (and `nbd_tls:`'s PEM files), opens every node the way a
mount would (remote nodes connect and negotiate with the configured key and
cipher, nbd nodes run the NBD handshake, local nodes open their file),
prints what each node offers (size, access, cipher) and each storage's size
as its algorithm finds it (an existing mirror's recorded size is read from
its legs' headers), then closes everything. It mounts
nothing and writes nothing: no algorithm is started. Exit 0 when every
node answered; otherwise one line per failing node on stderr
(``vol0: R: 10.0.0.5:1025: refused by the node: ...``) and exit 1.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
from dataclasses import dataclass, field

import trio

from ..algorithms import algorithm_class
from ..config import MountConfig, NodeSpec, StorageSpec, load_mount_config
from ..errors import DstError, NodeError
from ..export.nbd_tls import server_context
from ..fanout import gather
from ..keys import load_key
from ..nodes.base import Node
from ..nodes.local import LocalNode
from ..nodes.nbd import NbdNode
from ..nodes.remote import RemoteNode
from ..protocol import offered_modes
from ..statusview import format_table
from ..units import format_size

log = logging.getLogger(__name__)

HELP = "validate a config, connect to every node and negotiate; mount nothing"

#: Longest wait for closing the nodes once the check is done.
CLOSE_TIMEOUT = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the storage.yaml a mount would use")


def run(args: argparse.Namespace) -> int:
    config = load_mount_config(args.config)
    server_context(config.nbd_tls)  # unreadable or unusable PEM files: one line, as mount
    key = load_key(config.key_file) if config.key_file else None
    client_name = f"{socket.gethostname()}:{os.getpid()} check"
    reports = trio.run(check_mount_config, config, key, client_name)
    sys.stdout.write(render_check(reports))
    failures = failure_lines(reports)
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------- the check


@dataclass
class NodeReport:
    """What opening one configured node showed. `size` is the node's own
    size, `used` what the storage takes of it (the config's `size:` limit).
    `error` is set (and the sizes are None) when the node could not be used."""

    spec: NodeSpec
    description: str
    size: int | None = None
    used: int | None = None
    writable: bool | None = None
    cipher: str = "-"
    error: str | None = None


@dataclass
class StorageReport:
    name: str
    algorithm: str
    nodes: list[NodeReport] = field(default_factory=list)
    #: The storage's size, None when a node failed or its size is unknown.
    size: int | None = None
    #: `SizeFinding.recorded`: read from the storage's metadata (True), the
    #: size a new storage would get (False), fixed by the nodes (None).
    recorded: bool | None = None
    #: A problem of the storage as a whole (a mirror leg too small for the
    #: metadata), reported like a failing node.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(node.error is None for node in self.nodes)


def describe(spec: NodeSpec) -> str:
    """The node's control-tree `type` line, known before it is opened."""
    if spec.kind == "remote":
        return f"R: {spec.address}" + (f" {spec.export}" if spec.export else "")
    if spec.kind == "local":
        return f"L: {spec.target}"
    if spec.kind == "nbd":
        return f"N: {spec.target}"
    return f"S: {spec.target}"


async def check_mount_config(
    config: MountConfig, key: bytes | None, client_name: str
) -> list[StorageReport]:
    """Open every remote and local node of `config` at once, note what each
    offers, close them all, and work out the storages' sizes."""
    pending: list[tuple[NodeReport, Node]] = []
    reports: list[StorageReport] = []
    for storage in config.storages.values():
        report = StorageReport(storage.name, storage.algorithm)
        for spec in storage.nodes:
            node_report = NodeReport(spec, describe(spec))
            report.nodes.append(node_report)
            if spec.kind == "remote":
                assert spec.address is not None
                node: Node = RemoteNode(
                    spec.address,
                    export=spec.export,
                    timeouts=config.timeouts,
                    key=key,
                    cipher=config.cipher,
                    max_in_flight=config.max_in_flight,
                    client_name=client_name,
                    storage=storage.name,
                    # Reports the access a mount would get without taking the
                    # export's write grant: works while the storage is mounted.
                    probe=True,
                )
                pending.append((node_report, node))
            elif spec.kind == "local":
                pending.append((node_report, LocalNode(spec.target)))
            elif spec.kind == "nbd":
                assert spec.nbd is not None
                nbd_node = NbdNode(
                    spec.nbd,
                    timeouts=config.timeouts,
                    tls=spec.tls,
                    max_in_flight=config.max_in_flight,
                    storage=storage.name,
                    # An NBD server has no write grant to take: connecting
                    # while the storage is mounted changes nothing.
                )
                pending.append((node_report, nbd_node))
        reports.append(report)

    modes = offered_modes(key is not None, config.cipher)
    async with trio.open_nursery() as nursery:
        #: id(NodeReport) -> its started node, while the check runs
        opened: dict[int, Node] = {}

        async def open_one(node_report: NodeReport, node: Node) -> None:
            await node.start(nursery)
            opened[id(node_report)] = node
            _record(node_report, node, modes)

        try:
            outcomes = await gather([functools.partial(open_one, r, n) for r, n in pending])
            for (node_report, _), (_, error) in zip(pending, outcomes, strict=True):
                if error is None:
                    continue
                if not isinstance(error, DstError):
                    raise error
                node_report.error = _error_text(node_report, error)
            sizes: dict[str, int | None] = {}
            for storage, report in zip(config.storages.values(), reports, strict=True):
                _resolve_storage_nodes(storage, report, sizes)
                await _work_out_size(storage, report, opened)
                sizes[report.name] = report.size
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                for node in opened.values():
                    await node.aclose()
            nursery.cancel_scope.cancel()
    return reports


def _record(report: NodeReport, node: Node, modes: list[str]) -> None:
    report.size = node.size
    limit = report.spec.size
    report.writable = node.writable
    if limit is not None and limit > node.size:
        # A mount refuses this too (assembly.py): the limit is a promise of
        # space the node does not have.
        report.error = (
            f"{report.description}: size {format_size(limit)} (line {report.spec.line}) is "
            f"larger than the node ({format_size(node.size)})"
        )
        return
    report.used = node.size if limit is None else limit
    if report.spec.kind == "remote":
        # The client offers exactly one mode per key setting, so a node that
        # completed the handshake uses that one.
        report.cipher = modes[0] if len(modes) == 1 else "negotiated"
    elif report.spec.kind == "nbd":
        report.cipher = "tls" if report.spec.nbd and report.spec.nbd.tls else "plain"
    else:
        report.cipher = "local"
    log.debug("%s: size %d, %s", report.description, node.size, "rw" if node.writable else "ro")


def _error_text(report: NodeReport, error: DstError) -> str:
    text = str(error)
    # NodeErrors name the node already; anything else gets the name here.
    if isinstance(error, NodeError) or text.startswith(report.description):
        return text
    return f"{report.description}: {text}"


def _resolve_storage_nodes(
    storage: StorageSpec, report: StorageReport, sizes: dict[str, int | None]
) -> None:
    """Fill in `storage:` nodes from the storages already worked out
    (the config lists storages in dependency order)."""
    for node_report in report.nodes:
        spec = node_report.spec
        if spec.kind != "storage":
            continue
        size = sizes.get(spec.target)
        node_report.cipher = "-"
        if size is None:
            # Not a failure of the node: only its size is unknown to check.
            continue
        node_report.size = size
        if spec.size is not None and spec.size > size:
            node_report.error = (
                f"{node_report.description}: size {format_size(spec.size)} (line {spec.line}) "
                f"is larger than the storage ({format_size(size)})"
            )
        else:
            node_report.used = size if spec.size is None else spec.size


async def _work_out_size(
    storage: StorageSpec, report: StorageReport, opened: dict[int, Node]
) -> None:
    """The size the storage's algorithm finds over the nodes that answered
    (reading at most its metadata: an existing mirror keeps the size
    recorded on its legs; a new one gets the smallest leg's capacity)."""
    if not report.ok or any(node.used is None for node in report.nodes):
        return
    nodes = [(opened.get(id(node)), node.used or 0) for node in report.nodes]
    try:
        found = await algorithm_class(storage.algorithm).find_size(
            storage.name, nodes, storage.options
        )
    except (ValueError, DstError) as exc:
        report.error = f"{storage.algorithm}: {exc}"
        return
    report.size, report.recorded = found.size, found.recorded


# ------------------------------------------------------------- reporting


def failure_lines(reports: list[StorageReport]) -> list[str]:
    """One line per node that could not be used: ``STORAGE: NODE: why``."""
    lines: list[str] = []
    for report in reports:
        lines.extend(f"{report.name}: {node.error}" for node in report.nodes if node.error)
        if report.error is not None:
            lines.append(f"{report.name}: {report.error}")
    return lines


_COLUMNS = ("NODE", "SIZE", "ACCESS", "CIPHER", "RESULT")


def render_check(reports: list[StorageReport]) -> str:
    return "\n".join(_render_storage(report) for report in reports)


def _render_storage(report: StorageReport) -> str:
    count = len(report.nodes)
    header = f"{report.name}: {report.algorithm}, {count} node{'s' if count != 1 else ''}"
    if report.size is not None:
        recorded = ", recorded" if report.recorded else ""
        header += f", size {format_size(report.size)} ({report.size} bytes{recorded})"
        if report.recorded is False:
            header += " if new"
    elif report.ok:
        header += ", size unknown"
    if algorithm_class(report.algorithm).replicated:
        legs = [node.used for node in report.nodes]
        if all(leg is not None for leg in legs):
            shown = ", ".join(format_size(leg) for leg in legs if leg is not None)
            header += f"; legs {shown}"
    rows = [
        (
            node.description,
            _size_text(node),
            "-" if node.writable is None else ("rw" if node.writable else "ro"),
            node.cipher if node.error is None else "-",
            _result_text(node),
        )
        for node in report.nodes
    ]
    return header + "\n" + format_table(_COLUMNS, rows, indent="  ")


def _size_text(node: NodeReport) -> str:
    if node.used is None:
        return "-" if node.error else "?"
    if node.size is not None and node.used != node.size:
        return f"{format_size(node.used)} of {format_size(node.size)}"
    return format_size(node.used)


def _result_text(node: NodeReport) -> str:
    if node.error is not None:
        return "FAILED"
    if node.spec.kind == "storage":
        return "ok (storage)"
    return "ok"

"""`dstfuse export`: serve a file or block device (or an export.yaml's
exports) to dstfuse clients, and to NBD clients on `--nbd-listen`
addresses, until SIGTERM/SIGINT.

This module turns flags into an `ExportConfig`, loads the key, runs the
`ExportServer` and reports where it listens. Every user mistake (missing
file, bad address or rule, address in use, unreadable key) is a one-line
`UserError`; it never prints a traceback for those.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .. import congestion, sdnotify
from ..address import parse_address
from ..errors import UserError
from ..units import format_size, parse_duration

if TYPE_CHECKING:
    from ..config import ExportConfig
    from ..export import ExportServer

log = logging.getLogger(__name__)

HELP = "serve a file or block device to dstfuse clients"
LOG_LEVEL = logging.INFO

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
#: Flags that describe one export; with --config the file says these.
_SINGLE_EXPORT_FLAGS = (
    "listen",
    "allow",
    "key_file",
    "cipher",
    "read_only",
    "shared",
    "name",
    "nbd_listen",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", metavar="PATH", help="file or block device to serve")
    parser.add_argument(
        "--config", metavar="export.yaml", help="serve the exports in this file (instead of PATH)"
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="HOST:PORT, [IPV6]:PORT or unix:/PATH (repeatable; default 0.0.0.0:1025)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        metavar="NET[=rw|ro]",
        help="admit peers in NET (repeatable; default: loopback only)",
    )
    parser.add_argument("--key-file", metavar="FILE", help="pre-shared key (see 'dstfuse keygen')")
    parser.add_argument(
        "--cipher",
        action="append",
        metavar="NAME",
        choices=("aes-256-gcm", "chacha20-poly1305", "none"),
        help="with --key-file: accept only this cipher (repeatable; default: all; "
        "none = authenticated, not encrypted)",
    )
    parser.add_argument("--read-only", action="store_true", help="refuse every write")
    parser.add_argument(
        "--shared",
        action="store_true",
        help="let several clients write at once (only for cluster filesystems; "
        "default: one writer at a time)",
    )
    parser.add_argument("--name", help="export name (default: the file's name)")
    parser.add_argument(
        "--nbd-listen",
        action="append",
        metavar="ADDR",
        help="also serve over NBD on ADDR (repeatable; default port 10809)",
    )
    parser.add_argument(
        "--max-connections", metavar="N", help="most established sessions at once (default 256)"
    )
    parser.add_argument(
        "--max-handshakes",
        metavar="N",
        help="most connections in their handshake at once, apart from --max-connections "
        "(default 128)",
    )
    parser.add_argument(
        "--grant-grace",
        metavar="DURATION",
        help="how long a writer keeps its grant after its last connection closed "
        "(default 60s)",
    )
    parser.add_argument(
        "--tcp-congestion",
        metavar="NAME",
        help="TCP congestion control of accepted connections, e.g. cubic "
        "(default: the host's net.ipv4.tcp_congestion_control)",
    )
    parser.add_argument(
        "--handshake-timeout",
        metavar="DURATION",
        help="close peers that do not finish the handshake in time (default 10s)",
    )


def run(args: argparse.Namespace) -> int:
    from ..allocator import keep_io_buffers
    from ..export import ExportServer
    from ..export.nbd_tls import server_context
    from ..keys import load_key

    config = build_config(args)
    if config.tcp_congestion is not None:
        congestion.check(
            config.tcp_congestion, "--tcp-congestion" if args.tcp_congestion else "tcp_congestion"
        )
    key = load_key(config.key_file) if config.key_file is not None else None
    server = ExportServer.from_config(config, key=key, nbd_tls=server_context(config.nbd_tls))
    keep_io_buffers()
    try:
        trio.run(_serve_until_signalled, server)
    except BaseExceptionGroup as group:
        _raise_user_error(group)
        raise
    return 0


def build_config(args: argparse.Namespace) -> ExportConfig:
    """The ExportConfig the flags (or --config file) describe."""
    from ..config import (
        NBD_DEFAULT_PORT,
        ExportConfig,
        ExportSpec,
        load_export_config,
        parse_acl_rule,
        parse_congestion,
    )

    if args.config is not None:
        if args.path is not None:
            raise UserError("give either PATH or --config, not both")
        given = [
            f"--{flag.replace('_', '-')}" for flag in _SINGLE_EXPORT_FLAGS if getattr(args, flag)
        ]
        if given:
            raise UserError(
                f"{', '.join(given)} cannot be combined with --config (set it in the file)"
            )
        config = load_export_config(args.config)
    else:
        if args.path is None:
            raise UserError("nothing to serve: give PATH or --config export.yaml")
        path = Path(args.path)
        name = args.name if args.name is not None else path.name
        if not _NAME_RE.fullmatch(name):
            raise UserError(
                f"bad export name {name!r} (use letters, digits, '.', '_', '-', "
                "not starting with '.'); choose one with --name"
            )
        rules = []
        for text in args.allow or ():
            try:
                rules.append(parse_acl_rule(text))
            except ValueError as exc:
                raise UserError(f"--allow: {exc}") from None
        listen = []
        for text in args.listen or ("0.0.0.0:1025",):
            try:
                listen.append(parse_address(text))
            except ValueError as exc:
                raise UserError(f"--listen: {exc}") from None
        nbd_listen = []
        for text in args.nbd_listen or ():
            try:
                nbd_listen.append(parse_address(text, default_port=NBD_DEFAULT_PORT))
            except ValueError as exc:
                raise UserError(f"--nbd-listen: {exc}") from None
        if args.cipher and not args.key_file:
            raise UserError(
                "--cipher needs --key-file (without a key, frames are only checksummed)"
            )
        config = ExportConfig(
            listen=tuple(listen),
            key_file=Path(args.key_file) if args.key_file else None,
            ciphers=tuple(args.cipher or ()),
            nbd_listen=tuple(nbd_listen),
            exports=(
                ExportSpec(
                    name, path, read_only=args.read_only, allow=tuple(rules), shared=args.shared
                ),
            ),
        )
    overrides: dict[str, Any] = {}
    for flag in ("max_connections", "max_handshakes"):
        text = getattr(args, flag)
        if text is not None:
            overrides[flag] = _count(f"--{flag.replace('_', '-')}", text)
    for flag in ("handshake_timeout", "grant_grace"):
        text = getattr(args, flag)
        if text is not None:
            overrides[flag] = _positive_seconds(f"--{flag.replace('_', '-')}", text)
    if args.tcp_congestion is not None:
        try:
            overrides["tcp_congestion"] = parse_congestion(args.tcp_congestion)
        except ValueError as exc:
            raise UserError(f"--tcp-congestion: {exc}") from None
    if overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    return config


def _count(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65536:
        raise UserError(f"{flag} {text!r}: use a number 1..65536")
    return value


def _positive_seconds(flag: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None
    if seconds <= 0:
        raise UserError(f"{flag} must be positive")
    return seconds


async def _serve_until_signalled(server: ExportServer) -> None:
    # The receiver is open before anything listens, so a SIGTERM right after
    # the "listening" line is always a graceful shutdown.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop watching signals

            addresses = await nursery.start(serve)
            summary = ", ".join(
                f"{export.name} ({format_size(export.size)}, {'ro' if export.read_only else 'rw'})"
                for export in server.exports
            )
            word = "export" if len(server.exports) == 1 else "exports"
            for address in addresses:
                log.info("%s %s listening on %s", word, summary, address)
            for address in server.nbd_addresses:
                log.info("%s %s listening for NBD on %s", word, summary, address)
            sdnotify.ready(f"serving {summary}")
            async for signum in signals:
                name = signal.Signals(signum).name
                if not server.is_shutting_down:
                    log.info("%s: finishing requests in flight, then exiting", name)
                    sdnotify.stopping("finishing requests in flight")
                    server.shutdown()
                else:
                    log.warning("%s again: exiting now", name)
                    nursery.cancel_scope.cancel()


def _raise_user_error(group: BaseExceptionGroup) -> None:
    """Trio wraps errors in groups; a group of only user errors is one."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    if leaves and all(isinstance(error, UserError) for error in leaves):
        raise leaves[0] from None

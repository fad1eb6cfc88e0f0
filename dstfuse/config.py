"""Load and validate `storage.yaml` (mount side) and `export.yaml` (node side).

This module owns the configuration contract of DESIGN.md section 3: it turns
YAML text into frozen dataclasses that the rest of dstfuse trusts without
checking again. Every mistake becomes one `ConfigError` line of the form
``FILE:LINE: KEY: problem`` (KEY is a dotted path such as
``storages.vol0.nodes[1].size``), so YAML is read through PyYAML's node API,
which keeps line numbers, rather than `safe_load`.

Values are taken from the text as written, not from YAML's implicit typing:
`remote: 1:30` stays the address "1:30" instead of becoming the sexagesimal
integer 90, and `size: 10G` and `size: 1024` go through the same parser.

Relative paths (`key_file`, `local:` nodes, export paths) are relative to the
directory of the config file, so a daemon that changes directory still finds
them. Loading never resolves host names, opens devices or reads key files:
existence is checked where the thing is used.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import congestion
from .address import DEFAULT_PORT, Address, parse_address
from .algorithms import NAMES as ALGORITHM_NAMES
from .algorithms import algorithm_class
from .busypoll import DEFAULT_WINDOW as DEFAULT_BUSY_POLL
from .busypoll import MAX_WINDOW as MAX_BUSY_POLL
from .errors import ConfigError, UserError
from .protocol.nbd.uri import NbdUri, parse_nbd_uri
from .units import parse_duration, parse_size

log = logging.getLogger(__name__)

CIPHERS = ("aes-256-gcm", "chacha20-poly1305", "none")
CHECKSUMS = ("xxh3-128",)
NODE_KINDS = ("remote", "local", "storage", "nbd")
DEFAULT_LISTEN = "0.0.0.0:1025"
NBD_DEFAULT_PORT = 10809

KiB = 1 << 10
MiB = 1 << 20

#: Storage and export names: safe as a file name in the mount and in logs.
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_NAME_RULE = "use letters, digits, '.', '_', '-', not starting with '.'"

_T = TypeVar("_T")

_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}

#: The `-o` options of the mount as a whole -> what each does; each
#: algorithm declares its own (`Algorithm.mount_options`).
MOUNT_OPTIONS = {
    "allow_other": "other users may open the storage files (FUSE allow_other)",
    "debug": "libfuse's request trace, and debug logging",
    "ro": "read-only: every node is opened read-only (no export's write grant needed)",
}


# ---------------------------------------------------------------- data model


@dataclass(frozen=True)
class Timeouts:
    """Transaction timing; all durations in seconds, all > 0."""

    resend: float = 2.0
    max_resends: int = 15
    keepalive: float = 1.0
    connect: float = 5.0


#: What a node does with unflushed writes past `unflushed_limit`.
UNFLUSHED_POLICIES = ("flush", "drop")


@dataclass(frozen=True)
class Unflushed:
    """How much acknowledged, not yet flushed write data a remote node keeps
    for replay after its host reboots (`limit` bytes, 0: none), and what
    happens past it: `flush` issues a FLUSH and waits for it, `drop` stops
    protecting the oldest writes (a reboot then fails the next FLUSH)."""

    limit: int = 64 * MiB
    policy: str = "flush"


#: Node keys of nbd: nodes with TLS (nbds://): PEM files, relative paths
#: taken from the config's directory.
NBD_TLS_KEYS = ("tls_ca", "tls_cert", "tls_key")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files an `nbds://` node uses: `ca` the certificates it trusts
    for the server (None: the system's trust store), `cert` and `key` its
    own client certificate (both or neither)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class NodeSpec:
    """One entry of a storage's `nodes:` list.

    `kind` is one of NODE_KINDS. `target` is: for "remote" the address text as
    written (`address` holds it parsed); for "local" an absolute path; for
    "storage" the name of another storage in the same config; for "nbd" the
    URI (`nbd` holds it parsed, `tls` its TLS files for nbds://). `export` is
    set only for remote nodes; `size` (bytes, > 0) limits how much of the node
    is used. `line` is where the node is in the file.
    """

    kind: str
    target: str
    export: str | None = None
    size: int | None = None
    line: int = 0
    address: Address | None = None
    nbd: NbdUri | None = None
    tls: TlsFiles | None = None


@dataclass(frozen=True)
class StorageSpec:
    """A storage: `algorithm` is one of `dstfuse.algorithms.NAMES`; `nodes`
    are in the order the algorithm places them. `options` holds the
    algorithm's `config_options`, parsed or defaulted (mirror:
    `region_size`, `resync_rate` (bytes/s, 0 = unlimited), `resync_size`,
    all ints in bytes); it is empty for linear."""

    name: str
    algorithm: str
    nodes: tuple[NodeSpec, ...]
    options: dict = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class MountConfig:
    """A validated `storage.yaml`.

    `storages` is in dependency order: a storage that is a `storage:` node of
    another comes before it, so building them in order always finds the
    node's storage already built. Each storage is a node of at most one
    other, and there are no cycles. `cipher` "none" means integrity by a
    keyed MAC without encryption and is only allowed with `key_file`.
    """

    path: Path
    key_file: Path | None
    cipher: str
    checksum: str
    timeouts: Timeouts
    max_in_flight: int
    storages: dict[str, StorageSpec]
    unflushed: Unflushed = Unflushed()
    #: seconds the daemon busy-polls after each I/O event (0: never; busypoll.py)
    busy_poll: float = DEFAULT_BUSY_POLL
    #: TCP congestion control of the connections to nodes (None: the host's)
    tcp_congestion: str | None = None
    #: serve the top-level storages over NBD here too
    nbd_listen: tuple[Address, ...] = ()
    #: who may connect over TCP to `nbd_listen` (as export.yaml's `allow:`;
    #: empty: loopback only; unix sockets: the socket file's permissions)
    nbd_allow: tuple[AclRule, ...] = ()
    #: TLS for `nbd_listen` (required there when set), as in export.yaml
    nbd_tls: NbdTls | None = None


@dataclass(frozen=True)
class AclRule:
    """Peers in `network` may connect; `writable` says whether they may write."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    writable: bool

    def __str__(self) -> str:
        return f"{self.network}={'rw' if self.writable else 'ro'}"


@dataclass(frozen=True)
class ExportSpec:
    """One exported file or block device. An empty `allow` means only
    loopback peers may connect (the export server enforces it). `shared`:
    several client identities may write at once (else one at a time)."""

    name: str
    path: Path
    read_only: bool = False
    allow: tuple[AclRule, ...] = ()
    shared: bool = False


@dataclass(frozen=True)
class NbdTls:
    """`nbd_tls:` of export.yaml and storage.yaml: the server's certificate
    chain and key (PEM files), and `ca`, when given, the CA bundle that
    client certificates must chain to (then every NBD client needs one)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class ExportConfig:
    """A validated `export.yaml` (or the same built from command-line flags)."""

    listen: tuple[Address, ...]
    key_file: Path | None
    exports: tuple[ExportSpec, ...]
    nbd_listen: tuple[Address, ...] = ()
    max_connections: int = 256
    #: connections in their handshake, counted apart from `max_connections`
    max_handshakes: int = 128
    handshake_timeout: float = 10.0
    #: how long a writer's grant outlives its last connection
    grant_grace: float = 60.0
    max_request: int = 4 * MiB
    #: keyed ciphers the node accepts (config names); empty = all of them
    ciphers: tuple[str, ...] = ()
    #: TLS for the NBD addresses (required there when set)
    nbd_tls: NbdTls | None = None
    #: TCP congestion control of accepted connections (None: the host's)
    tcp_congestion: str | None = None


# ------------------------------------------------------------ public parsers


def parse_acl_rule(text: str) -> AclRule:
    """The rule `NET[=rw|ro]` spells: NET is an IPv4/IPv6 address or CIDR
    network (`10.0.0.0/8`, `192.168.1.5`, `::1`, `fd00::/8`); the mode
    defaults to rw. Raises ValueError naming the problem."""
    net_text, equals, mode_text = str(text).strip().partition("=")
    mode = mode_text.strip().lower() if equals else "rw"
    if mode not in ("rw", "ro"):
        raise ValueError(f"bad access rule {text!r}: mode must be 'rw' or 'ro'")
    return AclRule(network=_network(net_text.strip(), str(text)), writable=mode == "rw")


def split_mount_options(values: Iterable[str]) -> dict[str, str | bool]:
    """`-o a,b=c -o d` -> {"a": True, "b": "c", "d": True}; UserError on an
    empty key. Nothing is checked against the known options."""
    options: dict[str, str | bool] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, equals, setting = item.partition("=")
            key = key.strip()
            if not key:
                raise UserError(f"bad mount option {item!r} (use KEY or KEY=VALUE)")
            options[key] = setting if equals else True
    return options


def parse_mount_options(values: Iterable[str], config: MountConfig) -> dict[str, str | bool]:
    """The `-o` options in `values`, each one a mount-wide option
    (`MOUNT_OPTIONS`) or declared by the algorithm of a storage in `config`.
    Anything else is a one-line UserError naming the option and the nearest
    known one, as an unknown key of storage.yaml is. Values are checked by
    whoever reads them (the algorithms, when the storages start)."""
    options = split_mount_options(values)
    known: dict[str, str] = dict(MOUNT_OPTIONS)
    for algorithm in dict.fromkeys(spec.algorithm for spec in config.storages.values()):
        known.update(algorithm_class(algorithm).mount_options)
    for key, value in options.items():
        if key in MOUNT_OPTIONS and value is not True:
            raise UserError(f"mount option '{key}' takes no value (use -o {key})")
        if key in known:
            continue
        owners = [name for name in ALGORITHM_NAMES if key in algorithm_class(name).mount_options]
        if owners:
            raise UserError(
                f"mount option '{key}' is read by {' and '.join(owners)} storages, "
                f"and {config.path.name} has none"
            )
        raise UserError(f"unknown mount option '{key}'{_suggest(key, known)}")
    return options


def load_mount_config(path: str | Path) -> MountConfig:
    """The validated mount configuration in the YAML file `path`; raises
    `ConfigError` naming file, line and key for any mistake."""
    source = _Source(path)
    root = source.root("storages")
    fields = _Mapping(
        root,
        (
            "key_file",
            "cipher",
            "checksum",
            "timeouts",
            "max_in_flight",
            "unflushed_limit",
            "unflushed_policy",
            "busy_poll",
            "tcp_congestion",
            "storages",
            "nbd_listen",
            "nbd_allow",
            "nbd_tls",
        ),
    )
    key_file = fields.read("key_file", source.path_value, None)
    cipher = fields.read("cipher", partial(_choice, choices=CIPHERS), CIPHERS[0])
    if "cipher" in fields and key_file is None:
        # An explicit cipher without a key would silently not encrypt.
        raise fields["cipher"].error(
            f"cipher '{cipher}' needs key_file (without a key, frames are only "
            "checksummed, not encrypted or authenticated)"
        )
    config = MountConfig(
        path=source.path,
        key_file=key_file,
        cipher=cipher,
        checksum=fields.read("checksum", partial(_choice, choices=CHECKSUMS), CHECKSUMS[0]),
        timeouts=fields.read("timeouts", _timeouts, Timeouts()),
        max_in_flight=fields.read("max_in_flight", partial(_int, minimum=1, maximum=4096), 64),
        storages=_storages(source, fields.require("storages")),
        unflushed=Unflushed(
            limit=fields.read(
                "unflushed_limit", partial(_size_in, minimum=0, maximum=64 << 30),
                Unflushed.limit,
            ),
            policy=fields.read(
                "unflushed_policy", partial(_choice, choices=UNFLUSHED_POLICIES),
                Unflushed.policy,
            ),
        ),
        busy_poll=fields.read("busy_poll", _busy_poll, DEFAULT_BUSY_POLL),
        tcp_congestion=fields.read("tcp_congestion", _congestion, None),
        nbd_listen=fields.read(
            "nbd_listen", partial(_addresses, default_port=NBD_DEFAULT_PORT), ()
        ),
        nbd_allow=fields.read("nbd_allow", _allow, ()),
        nbd_tls=fields.read("nbd_tls", partial(_nbd_tls, source), None),
    )
    _check_nbd_listener(fields, config)
    log.debug("%s: storages %s", source.name, ", ".join(config.storages))
    return config


def _check_nbd_listener(fields: _Mapping, config: MountConfig) -> None:
    """`nbd_allow:` and `nbd_tls:` only with an `nbd_listen:` they apply
    to; `nbd_allow:` only with a TCP address (a unix socket is guarded by
    its file's permissions, not by addresses)."""
    for key in ("nbd_allow", "nbd_tls"):
        if key in fields and not config.nbd_listen:
            raise fields[key].error(f"{key} needs nbd_listen (it is for the mount's NBD listener)")
    if "nbd_allow" in fields and all(a.kind == "unix" for a in config.nbd_listen):
        raise fields["nbd_allow"].error(
            "nbd_allow applies to TCP addresses only, and nbd_listen has none "
            "(a unix socket is guarded by its file's permissions)"
        )


def load_export_config(path: str | Path) -> ExportConfig:
    """The validated export-node configuration in the YAML file `path`;
    raises `ConfigError` naming file, line and key for any mistake."""
    source = _Source(path)
    root = source.root("exports")
    fields = _Mapping(
        root,
        (
            "listen",
            "key_file",
            "exports",
            "nbd_listen",
            "max_connections",
            "max_handshakes",
            "handshake_timeout",
            "grant_grace",
            "max_request",
            "ciphers",
            "nbd_tls",
            "tcp_congestion",
        ),
    )
    exports: list[ExportSpec] = []
    first_line: dict[str, int] = {}
    for item in _sequence(fields.require("exports"), minimum=1, what="export"):
        export = _export(source, item)
        if export.name in first_line:
            raise item.error(
                f"export name {export.name!r} is already used at line {first_line[export.name]}"
            )
        first_line[export.name] = item.line
        exports.append(export)
    config = ExportConfig(
        listen=fields.read(
            "listen",
            partial(_addresses, default_port=DEFAULT_PORT),
            (parse_address(DEFAULT_LISTEN),),
        ),
        key_file=fields.read("key_file", source.path_value, None),
        exports=tuple(exports),
        nbd_listen=fields.read(
            "nbd_listen", partial(_addresses, default_port=NBD_DEFAULT_PORT), ()
        ),
        max_connections=fields.read(
            "max_connections", partial(_int, minimum=1, maximum=65536), 256
        ),
        max_handshakes=fields.read(
            "max_handshakes", partial(_int, minimum=1, maximum=65536), 128
        ),
        handshake_timeout=fields.read("handshake_timeout", _positive_duration, 10.0),
        grant_grace=fields.read("grant_grace", _positive_duration, 60.0),
        max_request=fields.read(
            "max_request", partial(_size_in, minimum=4 * KiB, maximum=64 * MiB), 4 * MiB
        ),
        ciphers=fields.read("ciphers", _ciphers, ()),
        nbd_tls=fields.read("nbd_tls", partial(_nbd_tls, source), None),
        tcp_congestion=fields.read("tcp_congestion", _congestion, None),
    )
    if config.nbd_tls is not None and not config.nbd_listen:
        raise fields.require("nbd_tls").error("nbd_tls needs nbd_listen (TLS is for NBD only)")
    if config.ciphers and config.key_file is None:
        raise fields.require("ciphers").error(
            "ciphers need key_file (without a key, frames are only checksummed)"
        )
    log.debug("%s: %d export(s)", source.name, len(exports))
    return config


# ---------------------------------------------------------- YAML navigation


@dataclass(frozen=True)
class _Item:
    """A YAML node with where it came from: the file as the user named it,
    the dotted key path, and the 1-based line that errors point at (the
    key's line for mapping values, the item's line for list items)."""

    node: Node
    file: str
    key: str
    line: int

    def error(self, message: str, line: int | None = None) -> ConfigError:
        where = f"{self.file}:{line or self.line}"
        return ConfigError(f"{where}: {self.key}: {message}" if self.key else f"{where}: {message}")

    def child(self, name: str, node: Node, line: int) -> _Item:
        return _Item(node, self.file, f"{self.key}.{name}" if self.key else name, line)

    def index(self, position: int, node: Node) -> _Item:
        return _Item(node, self.file, f"{self.key}[{position}]", _line(node))


class _Mapping:
    """The keys of a YAML mapping, checked: keys are plain scalars, none
    repeats, and (when `allowed` is given) every key is one of `allowed`."""

    def __init__(self, item: _Item, allowed: Collection[str] | None) -> None:
        if not isinstance(item.node, MappingNode):
            raise item.error(f"expected a mapping of keys, got {_describe(item.node)}")
        # Resolve `<<: *anchor` merges. PyYAML puts merged pairs first, own
        # pairs last; own keys override merged ones, later merges earlier ones.
        own = sum(1 for key, _ in item.node.value if key.tag != "tag:yaml.org,2002:merge")
        SafeConstructor().flatten_mapping(item.node)
        merged = len(item.node.value) - own
        self.item = item
        self._items: dict[str, _Item] = {}
        written: dict[str, _Item] = {}
        for position, (key_node, value_node) in enumerate(item.node.value):
            key_line = _line(key_node)
            if not isinstance(key_node, ScalarNode) or not key_node.value:
                raise item.error("keys must be plain names", line=key_line)
            key = key_node.value
            child = item.child(key, value_node, key_line)
            if position >= merged:
                if key in written:
                    raise child.error(f"duplicate key '{key}' (first at line {written[key].line})")
                written[key] = child
            if allowed is not None and key not in allowed:
                raise child.error(f"unknown key '{key}'{_suggest(key, allowed)}")
            self._items[key] = child

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> _Item:
        return self._items[key]

    def read(self, key: str, reader: Callable[[_Item], _T], default: _T) -> _T:
        """`reader` applied to the value of `key`, or `default` when absent."""
        return reader(self._items[key]) if key in self._items else default

    def require(self, key: str) -> _Item:
        if key not in self._items:
            raise self.item.error(f"missing key '{key}'")
        return self._items[key]

    def items(self) -> Iterator[tuple[str, _Item]]:
        return iter(self._items.items())


class _Source:
    """One config file: its name for messages, its directory for relative
    paths, and its parsed YAML node tree."""

    def __init__(self, path: str | Path) -> None:
        self.name = str(path)
        self.path = Path(path).absolute()
        self.directory = self.path.parent
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{self.name}: config file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.name}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{self.name}: cannot read config: {exc.strerror}") from None

    def root(self, main_key: str) -> _Item:
        try:
            node = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            problem = exc.problem or exc.context or "syntax error"
            raise ConfigError(
                f"{self.name}:{line}: YAML syntax error: {problem}{self._hint(line)}"
            ) from None
        except yaml.YAMLError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else "syntax error"
            raise ConfigError(f"{self.name}: YAML error: {first_line}") from None
        if node is None:
            raise ConfigError(f"{self.name}:1: empty config (expected a mapping with '{main_key}')")
        item = _Item(node, self.name, "", _line(node))
        if not isinstance(node, MappingNode):
            raise item.error(f"expected a mapping with '{main_key}', got {_describe(node)}")
        return item

    def _hint(self, line: int) -> str:
        lines = self.text.splitlines()
        if 0 < line <= len(lines) and re.search(r":\s+\[[0-9A-Fa-f:]*:", lines[line - 1]):
            return ' (quote IPv6 addresses: "[fd00::6]:1025")'
        return ""

    def path_value(self, item: _Item) -> Path:
        """A path from the config; relative ones are taken from the config's
        directory."""
        return self.directory / _text(item)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "nothing"
    return f"'{node.value}'"


def _suggest(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of: {', '.join(sorted(choices))})"


# ------------------------------------------------------------ value readers


def _text(item: _Item) -> str:
    """The scalar as written (stripped); never empty."""
    node = item.node
    if not isinstance(node, ScalarNode):
        raise item.error(f"expected a single value, got {_describe(node)}")
    if node.tag == "tag:yaml.org,2002:null" or not node.value.strip():
        raise item.error("missing value")
    return node.value.strip()


def _choice(item: _Item, choices: Collection[str]) -> str:
    value = _text(item)
    if value not in choices:
        raise item.error(f"unknown value '{value}'{_suggest(value, choices)}")
    return value


def _name(item: _Item, what: str) -> str:
    value = _text(item)
    if not _NAME_RE.fullmatch(value):
        raise item.error(f"bad {what} name '{value}' ({_NAME_RULE})")
    return value


def _bool(item: _Item) -> bool:
    value = _text(item)
    if value.lower() not in _BOOLEANS:
        raise item.error(f"expected true or false, got '{value}'")
    return _BOOLEANS[value.lower()]


def _int(item: _Item, minimum: int, maximum: int | None = None) -> int:
    value = _text(item)
    if not re.fullmatch(r"\+?[0-9]+", value):
        raise item.error(f"bad number '{value}' (expected a whole number)")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise item.error(f"{number} is out of range (must be {bound})")
    return number


def _size(item: _Item) -> int:
    try:
        return parse_size(_text(item))
    except ValueError as exc:
        raise item.error(str(exc)) from None


def _size_in(item: _Item, minimum: int, maximum: int) -> int:
    size = _size(item)
    if not minimum <= size <= maximum:
        raise item.error(
            f"{_text(item)} is out of range (must be between {_short(minimum)} and "
            f"{_short(maximum)})"
        )
    return size


def _short(size: int) -> str:
    for suffix, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", MiB), ("K", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def _positive_duration(item: _Item) -> float:
    try:
        seconds = parse_duration(_text(item))
    except ValueError as exc:
        raise item.error(str(exc)) from None
    if seconds <= 0:
        raise item.error(f"duration must be greater than zero, got '{_text(item)}'")
    return seconds


def _busy_poll(item: _Item) -> float:
    try:
        seconds = parse_duration(_text(item))
    except ValueError as exc:
        raise item.error(str(exc)) from None
    if seconds > MAX_BUSY_POLL:
        raise item.error(
            f"{_text(item)} is too long (at most {MAX_BUSY_POLL * 1000:g}ms; "
            "0 turns it off)"
        )
    return seconds


def parse_congestion(text: str) -> str:
    """A TCP congestion control algorithm's name as Linux spells them
    (`cubic`, `bbr`, `reno`); ValueError otherwise. Whether the kernel
    offers it is `congestion.check`'s to say, at start-up."""
    name = str(text).strip()
    if not congestion.NAME.fullmatch(name):
        raise ValueError(
            f"bad TCP congestion control name {name!r} (lower-case letters, digits and "
            "'_', at most 15: e.g. cubic, bbr, reno)"
        )
    return name


def _congestion(item: _Item) -> str:
    try:
        return parse_congestion(_text(item))
    except ValueError as exc:
        raise item.error(str(exc)) from None


def _address(item: _Item, default_port: int) -> Address:
    try:
        return parse_address(_text(item), default_port)
    except ValueError as exc:
        raise item.error(str(exc)) from None


def _sequence(item: _Item, *, minimum: int, what: str) -> Iterator[_Item]:
    node = item.node
    if not isinstance(node, SequenceNode):
        raise item.error(f"expected a list of {what}s, got {_describe(node)}")
    if len(node.value) < minimum:
        raise item.error(f"needs at least {minimum} {what}{'s' if minimum > 1 else ''}")
    return (item.index(position, child) for position, child in enumerate(node.value))


def _addresses(item: _Item, default_port: int) -> tuple[Address, ...]:
    if isinstance(item.node, ScalarNode):  # one address needs no list
        return (_address(item, default_port),)
    return tuple(
        _address(child, default_port) for child in _sequence(item, minimum=1, what="address")
    )


def _ciphers(item: _Item) -> tuple[str, ...]:
    if isinstance(item.node, ScalarNode):
        return (_choice(item, CIPHERS),)
    return tuple(_choice(child, CIPHERS) for child in _sequence(item, minimum=1, what="cipher"))


def _network(text: str, rule: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    spelled = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_network(spelled, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(spelled, strict=False)
    except ValueError:
        raise ValueError(
            f"bad access rule {rule!r}: {text!r} is not an IP address or network "
            "(use e.g. 10.0.0.0/8, 192.168.1.5 or fd00::/8)"
        ) from None
    raise ValueError(f"bad access rule {rule!r}: {text} has host bits set (did you mean {loose}?)")


# ------------------------------------------------------------ storage.yaml


def _timeouts(item: _Item) -> Timeouts:
    fields = _Mapping(item, ("resend", "max_resends", "keepalive", "connect"))
    defaults = Timeouts()
    return Timeouts(
        resend=fields.read("resend", _positive_duration, defaults.resend),
        max_resends=fields.read("max_resends", partial(_int, minimum=0), defaults.max_resends),
        keepalive=fields.read("keepalive", _positive_duration, defaults.keepalive),
        connect=fields.read("connect", _positive_duration, defaults.connect),
    )


@dataclass(frozen=True)
class _Reference:
    """A `storage:` node: storage `user` uses storage `target` at `item`."""

    user: str
    target: str
    item: _Item


def _storages(source: _Source, item: _Item) -> dict[str, StorageSpec]:
    fields = _Mapping(item, None)
    names = {name for name, _ in fields.items()}
    if not names:
        raise item.error("no storages defined")
    storages: dict[str, StorageSpec] = {}
    references: list[_Reference] = []
    for name, storage_item in fields.items():
        if not _NAME_RE.fullmatch(name):
            raise storage_item.error(f"bad storage name '{name}' ({_NAME_RULE})")
        storages[name] = _storage(source, name, storage_item, references)
    uses = _check_references(references, names)
    return {name: storages[name] for name in _dependency_order(list(storages), uses)}


def _storage(source: _Source, name: str, item: _Item, references: list[_Reference]) -> StorageSpec:
    fields = _Mapping(item, None)
    _check_storage_keys(fields)
    algorithm = _choice(fields.require("algorithm"), ALGORITHM_NAMES)
    known = algorithm_class(algorithm).config_options
    options = {}
    for option, option_item in fields.items():
        if option in ("algorithm", "nodes"):
            continue
        if option not in known:
            raise option_item.error(f"not an option of algorithm '{algorithm}'")
        try:
            options[option] = known[option].parse(_text(option_item))
        except ValueError as exc:
            raise option_item.error(str(exc)) from None
    for option, declared in known.items():
        options.setdefault(option, declared.default)

    nodes_item = fields.require("nodes")
    nodes = []
    for node_item in _sequence(nodes_item, minimum=1, what="node"):
        node, target_item = _node(source, node_item)
        if node.kind == "storage":
            references.append(_Reference(name, node.target, target_item))
        nodes.append(node)
    minimum = algorithm_class(algorithm).minimum_nodes
    if len(nodes) < minimum:
        raise nodes_item.error(f"{algorithm} needs at least {minimum} nodes, got {len(nodes)}")
    return StorageSpec(
        name=name, algorithm=algorithm, nodes=tuple(nodes), options=options, line=item.line
    )


def _check_storage_keys(fields: _Mapping) -> None:
    """Refuse a key of a storage that no algorithm declares. Only the
    algorithm the storage names is imported unless a key is not its own
    (a storage that never mirrors never imports the mirror)."""
    named = fields["algorithm"].node.value if "algorithm" in fields else None
    named = named.strip() if isinstance(named, str) else None
    own = algorithm_class(named).config_options if named in ALGORITHM_NAMES else {}
    for key, key_item in fields.items():
        if key in ("algorithm", "nodes") or key in own:
            continue
        declared = {
            option for each in ALGORITHM_NAMES for option in algorithm_class(each).config_options
        }
        allowed = ("algorithm", "nodes", *sorted(declared))
        if key not in allowed:
            raise key_item.error(f"unknown key '{key}'{_suggest(key, allowed)}")


def _node(source: _Source, item: _Item) -> tuple[NodeSpec, _Item]:
    """The node `item` describes, and the item of its kind key (`remote:`...)."""
    fields = _Mapping(item, (*NODE_KINDS, "export", "size", *NBD_TLS_KEYS))
    kinds = [kind for kind in NODE_KINDS if kind in fields]
    if not kinds:
        raise item.error(f"node needs one of {', '.join(k + ':' for k in NODE_KINDS)}")
    if len(kinds) > 1:
        raise fields[kinds[1]].error(
            f"node has both '{kinds[0]}' and '{kinds[1]}' (give exactly one of "
            f"{', '.join(NODE_KINDS)})"
        )
    kind = kinds[0]
    target_item = fields[kind]
    address = None
    nbd = None
    if kind == "remote":
        address = _address(target_item, DEFAULT_PORT)
        target = _text(target_item)
    elif kind == "local":
        target = str(source.path_value(target_item))
    elif kind == "storage":
        target = _text(target_item)
    else:
        nbd = _nbd_uri(target_item)
        target = nbd.text
    tls = _tls_files(source, fields, nbd)
    export = None
    if "export" in fields:
        if kind != "remote":
            raise fields["export"].error(f"'export' is only for remote: nodes, not {kind}:")
        export = _name(fields["export"], "export")
    size = None
    if "size" in fields:
        size = _size(fields["size"])
        if size == 0:
            raise fields["size"].error("must be greater than zero")
    spec = NodeSpec(
        kind=kind,
        target=target,
        export=export,
        size=size,
        line=item.line,
        address=address,
        nbd=nbd,
        tls=tls,
    )
    return spec, target_item


def _nbd_uri(item: _Item) -> NbdUri:
    try:
        return parse_nbd_uri(_text(item))
    except ValueError as exc:
        raise item.error(str(exc)) from None


def _tls_files(source: _Source, fields: _Mapping, nbd: NbdUri | None) -> TlsFiles | None:
    """The node's tls_* keys: only on nbds:// nodes, cert and key together."""
    given = [key for key in NBD_TLS_KEYS if key in fields]
    if nbd is None or not nbd.tls:
        if given:
            raise fields[given[0]].error(f"'{given[0]}' is only for nbds:// and nbds+unix:// nodes")
        return None
    if ("tls_cert" in fields) != ("tls_key" in fields):
        present = "tls_cert" if "tls_cert" in fields else "tls_key"
        raise fields[present].error("give tls_cert and tls_key together (a client certificate)")
    paths = {key: source.path_value(fields[key]) for key in given}
    return TlsFiles(paths.get("tls_ca"), paths.get("tls_cert"), paths.get("tls_key"))


def _check_references(references: list[_Reference], names: set[str]) -> dict[str, list[str]]:
    """Every `storage:` target exists and has one owner; returns user -> targets."""
    owner: dict[str, _Reference] = {}
    uses: dict[str, list[str]] = {}
    for reference in references:
        if reference.target not in names:
            raise reference.item.error(
                f"unknown storage '{reference.target}'{_suggest(reference.target, names)}"
            )
        first = owner.get(reference.target)
        if first is not None:
            raise reference.item.error(
                f"storage '{reference.target}' is already a node of storage '{first.user}' "
                f"(line {first.item.line}); a storage can be a node of only one storage"
            )
        owner[reference.target] = reference
        uses.setdefault(reference.user, []).append(reference.target)
    for reference in references:
        cycle = _cycle_from(reference, owner)
        if cycle:
            raise reference.item.error(f"storage cycle: {' -> '.join(cycle)}")
    return uses


def _cycle_from(reference: _Reference, owner: dict[str, _Reference]) -> list[str]:
    """The cycle that `reference` closes, as storage names in "uses" order
    starting and ending at its user; empty when there is none. With one owner
    per storage, the owners above the user form a single chain: there is a
    cycle exactly when that chain reaches the target."""
    upward = [reference.user]
    while upward[-1] != reference.target:
        above = owner.get(upward[-1])
        if above is None or above.user in upward:
            return []
        upward.append(above.user)
    # upward is user, its owner, ..., target; the target uses ... uses the user.
    return [reference.user, *reversed(upward)]


def _dependency_order(names: list[str], uses: dict[str, list[str]]) -> list[str]:
    """`names` reordered so every storage comes after the storages it uses,
    otherwise keeping file order. The graph is known to be acyclic."""
    ordered: list[str] = []
    placed: set[str] = set()

    def place(name: str) -> None:
        if name in placed:
            return
        placed.add(name)
        for target in uses.get(name, []):
            place(target)
        ordered.append(name)

    for name in names:
        place(name)
    return ordered


# ------------------------------------------------------------- export.yaml


def _export(source: _Source, item: _Item) -> ExportSpec:
    fields = _Mapping(item, ("name", "path", "read_only", "allow", "shared"))
    name = _name(fields.require("name"), "export")
    path = source.path_value(fields.require("path"))
    return ExportSpec(
        name=name,
        path=path,
        read_only=fields.read("read_only", _bool, False),
        allow=fields.read("allow", _allow, ()),
        shared=fields.read("shared", _bool, False),
    )


def _nbd_tls(source: _Source, item: _Item) -> NbdTls:
    """`nbd_tls:` as a mapping of `cert`, `key` (both required) and `ca`:
    PEM file paths, relative ones from the config's directory."""
    fields = _Mapping(item, ("cert", "key", "ca"))
    return NbdTls(
        cert=source.path_value(fields.require("cert")),
        key=source.path_value(fields.require("key")),
        ca=fields.read("ca", source.path_value, None),
    )


def _allow(item: _Item) -> tuple[AclRule, ...]:
    """`allow:` as a list of `NET: rw|ro` / `"NET=rw"` items, or one mapping
    of `NET: rw|ro` pairs."""
    if isinstance(item.node, MappingNode):
        return tuple(_allow_mapping(item))
    rules: list[AclRule] = []
    for entry in _sequence(item, minimum=0, what="rule"):
        if isinstance(entry.node, MappingNode):
            rules.extend(_allow_mapping(entry))
        else:
            rules.append(_acl_rule(entry, _text(entry)))
    return tuple(rules)


def _allow_mapping(item: _Item) -> list[AclRule]:
    rules = []
    for network, mode_item in _Mapping(item, None).items():
        mode = _text(mode_item).lower()
        if mode not in ("rw", "ro"):
            raise mode_item.error(f"bad access mode '{_text(mode_item)}' (use rw or ro)")
        rules.append(_acl_rule(mode_item, f"{network}={mode}"))
    return rules


def _acl_rule(item: _Item, text: str) -> AclRule:
    try:
        return parse_acl_rule(text)
    except ValueError as exc:
        raise item.error(str(exc)) from None

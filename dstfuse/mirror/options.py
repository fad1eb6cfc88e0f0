"""The mirror's settings, from the storage's config options and `-o` options.

`MirrorOptions.parse` merges the config's parsed options (`region_size`,
`resync_rate`, `resync_size`: ints), what the mount adds (`client_name`,
`client_id`, `force`) and the mount's `-o` options, which arrive as text
or True and apply to every storage of the mount (so `primary=` may name
the storage: `primary=vol0:1`). Every bad value is a one-line UserError
naming the option. `-o` keys the mirror does not know are left alone:
they belong to the mount or to other algorithms.

The mount options the mirror reads are `MOUNT_OPTIONS` (the mount refuses
any other `-o` option that no algorithm of its storages declares); its
storage.yaml keys are `CONFIG_OPTIONS`, whose parsers read the value as
written in the file.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ..algorithms.base import ConfigOption
from ..errors import UserError
from ..units import parse_duration, parse_size

MiB = 1 << 20
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


#: The `-o` options the mirror reads -> what each does (sizes take K/M/G,
#: durations ms/s/m).
MOUNT_OPTIONS = {
    "force": "take over a storage another client holds at once (it is fenced), and go on "
    "without a missing leg that may hold newer data (what only it holds is lost)",
    "primary": "=[STORAGE:]LEG: keep LEG's data (after a split brain, or without a missing "
    "leg that may be newer)",
    "assume_clean": "first use: take the legs as identical, copy nothing",
    "read_check": "=on|off: check each block read against its recorded digest",
    "resync_rate": "=SIZE[/s]: resync bandwidth per leg (0 = unlimited)",
    "resync_size": "=SIZE: bytes copied per resync step",
    "heartbeat_interval": "=DURATION: how often the holder writes its heartbeat",
    "holder_timeout": "=DURATION: how long a holder's heartbeat may stand still",
    "bitmap_idle": "=DURATION: idle time before a region leaves the bitmap",
    "bitmap_hot": "=SIZE: while writes go on, idle regions stay in the bitmap up to this much "
    "(a crash resyncs these too; 0 = clear every idle region; default 1G)",
    "check_cache_pages": "=N: block-check pages (4 KiB each) kept in memory",
    "mount_wait": "=DURATION: how long a mount waits for a missing leg that may hold newer "
    "data before it refuses (default 10 s)",
    "leg_timeout": "=DURATION: how long a write waits for a silent leg before the mirror "
    "goes on without it (default 4 s)",
    "read_timeout": "=DURATION: how long a read waits for one leg before it asks another "
    "in-sync leg (default 2 s)",
}


#: The smallest region size a config may give (a power of two).
MIN_REGION_SIZE = 64 * 1024


def _config_region_size(text: str) -> int:
    size = parse_size(text)
    if size < MIN_REGION_SIZE or size & (size - 1):
        raise ValueError(f"{text} is not a power of two of at least 64K")
    return size


def _config_resync_rate(text: str) -> int:
    try:
        return _rate(text)  # 0 = unlimited
    except ValueError as exc:
        raise ValueError(f"{exc}; bytes per second, 0 = unlimited") from None


@dataclass(frozen=True)
class MirrorOptions:
    region_size: int = 4 * MiB
    resync_rate: int = 100 * MiB
    resync_size: int = 4 * MiB
    force: bool = False
    primary: int | None = None
    assume_clean: bool = False
    read_check: bool = True
    client_name: str = ""
    client_id: bytes = bytes(16)
    heartbeat_interval: float = 2.0
    #: how long a holder's heartbeat may stand still before we take over
    holder_timeout: float = 7.0
    #: a mount waits this long for missing legs that may hold newer data
    mount_wait: float = 10.0
    #: a write waits this long for a silent leg, then goes on without it
    leg_timeout: float = 4.0
    #: a read waits this long for one leg, then asks another too
    read_timeout: float = 2.0
    #: a region is cleared from the bitmap once no write touched it this long
    bitmap_idle: float = 5.0
    #: while the storage is being written, idle regions stay marked up to
    #: this many bytes (DRBD's activity log); once it is quiet for
    #: `bitmap_idle`, every idle region is cleared
    bitmap_hot: int = 1 << 30
    #: pages (4 KiB, 512 block digests each) of block checks kept in memory
    check_cache_pages: int = 4096

    @property
    def lease_time(self) -> float:
        """How long one renewal (a heartbeat a leg acknowledged) lets the
        holder write. It ends `heartbeat_interval + 1` s before a taker, who
        watches the heartbeat stand still for `holder_timeout`, may start:
        that margin is for writes still in flight."""
        return max(self.heartbeat_interval, self.holder_timeout - self.heartbeat_interval - 1.0)

    @classmethod
    def parse(cls, storage_name: str, options: Mapping[str, object]) -> MirrorOptions:
        mount = options.get("mount_options") or {}
        merged = {**options, **(mount if isinstance(mount, Mapping) else {})}

        def get(key: str, parse: Callable[[object], T], default: T) -> T:
            raw = merged.get(key)
            if raw is None:
                return default
            try:
                return parse(raw)
            except (TypeError, ValueError) as exc:
                raise UserError(f"storage {storage_name}: option {key}={raw!r}: {exc}") from None

        heartbeat = get("heartbeat_interval", _positive_duration, cls.heartbeat_interval)
        client_id = options.get("client_id")
        return cls(
            region_size=get("region_size", _size, cls.region_size),
            resync_rate=get("resync_rate", _rate, cls.resync_rate),
            resync_size=get("resync_size", _positive_size, cls.resync_size),
            force=get("force", _flag, False),
            primary=_primary(storage_name, merged.get("primary")),
            assume_clean=get("assume_clean", _flag, False),
            read_check=get("read_check", _flag, True),
            client_name=str(
                options.get("client_name") or f"{socket.gethostname()}:{os.getpid()}"
            ),
            client_id=bytes(client_id) if isinstance(client_id, bytes) else os.urandom(16),
            heartbeat_interval=heartbeat,
            holder_timeout=get("holder_timeout", _positive_duration, 3 * heartbeat + 1),
            bitmap_idle=get("bitmap_idle", _positive_duration, cls.bitmap_idle),
            bitmap_hot=get("bitmap_hot", _size, cls.bitmap_hot),
            mount_wait=get("mount_wait", _duration, cls.mount_wait),
            leg_timeout=get("leg_timeout", _positive_duration, cls.leg_timeout),
            read_timeout=get("read_timeout", _positive_duration, cls.read_timeout),
            check_cache_pages=get("check_cache_pages", _positive_int, cls.check_cache_pages),
        )


def _flag(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("use on or off")


def _size(raw: object) -> int:
    return parse_size(raw if isinstance(raw, int) else str(raw))


def _positive_size(raw: object) -> int:
    size = _size(raw)
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def _rate(raw: object) -> int:
    text = raw if isinstance(raw, int) else str(raw).strip()
    if isinstance(text, str) and text.lower().endswith("/s"):
        text = text[:-2]
    return parse_size(text)


def _positive_duration(raw: object) -> float:
    seconds = _duration(raw)
    if seconds == 0:
        raise ValueError("must be greater than zero")
    return seconds


def _duration(raw: object) -> float:
    seconds = parse_duration(raw if isinstance(raw, int | float) else str(raw))
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _positive_int(raw: object) -> int:
    number = int(str(raw))
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def _primary(storage_name: str, raw: object) -> int | None:
    """`primary=N` or `primary=STORAGE:N` (None when it names another storage)."""
    if raw is None or raw is True or raw == "":
        if raw is True:
            raise UserError("mount option primary needs a leg index: primary=N or STORAGE:N")
        return None
    text = str(raw).strip()
    name, colon, index = text.rpartition(":")
    if colon and name != storage_name:
        return None
    try:
        return int(index)
    except ValueError:
        raise UserError(
            f"mount option primary={text!r}: use a leg index, e.g. primary=0 or {storage_name}:0"
        ) from None


#: The mirror's storage.yaml keys (values in bytes; the defaults are
#: MirrorOptions').
CONFIG_OPTIONS = {
    "region_size": ConfigOption(MirrorOptions.region_size, _config_region_size),
    "resync_rate": ConfigOption(MirrorOptions.resync_rate, _config_resync_rate),
    "resync_size": ConfigOption(MirrorOptions.resync_size, _positive_size),
}

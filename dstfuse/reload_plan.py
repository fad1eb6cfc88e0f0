"""What a `dstfuse reload` would change: the difference between the config a
mount runs and the config it re-read, decided as a pure function.

`plan_reload(running, wanted)` either returns a `ReloadPlan` (what to do, and
one line per change saying so) or raises `ReloadRefused` naming every change
that cannot be applied online, so that nothing at all is applied from that
reload. It never touches a node or a storage: the daemon's `LiveReload`
carries the plan out.

What may change online in this release:

- `timeouts.resend`, `timeouts.max_resends`, `timeouts.connect`: every
  remote node reads them when it next arms a timer or connects;
- a linear storage may get nodes (remote or local) appended at the end,
  unless it is itself a node of another storage (that storage's map would
  have to move). Its existing nodes may not change, move or go: that would
  move or drop data;
- a new storage may be added (a new file appears), built from leaf nodes
  and other new storages only;
- a mirror may get legs (remote or local nodes) added at the end of its
  node list: each is recorded in the legs' metadata as not up to date and
  copied in full in the background (mirror/adding.py); it may lose any of
  its legs (the others keep their order and are renumbered), unless that
  leaves no up-to-date leg (mirror/removing.py), in a reload that changes
  nothing else.

Everything else is refused with one line naming the key or the storage:
the other global keys, `timeouts.keepalive` (running connections ping at
the interval they were opened with), an algorithm or an algorithm option,
any other change of a mirror's legs (reordering or changing a leg, or
adding and removing legs in one reload, need a remount or two reloads), and
removing a storage (needs a remount in this release: its file may be in
use, and a storage is flushed and closed only with the mount).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from .algorithms import algorithm_class
from .assembly import describe_spec
from .config import MountConfig, NodeSpec, StorageSpec, Timeouts
from .errors import UserError
from .units import format_size

#: Timeouts a running node takes over at once (see the module doc).
ONLINE_TIMEOUTS = ("resend", "max_resends", "connect")
#: Global keys that need a remount, as the config file spells them.
_FIXED_GLOBALS = (
    ("key_file", lambda c: c.key_file),
    ("cipher", lambda c: c.cipher),
    ("checksum", lambda c: c.checksum),
    ("max_in_flight", lambda c: c.max_in_flight),
    ("unflushed_limit", lambda c: c.unflushed.limit),
    ("unflushed_policy", lambda c: c.unflushed.policy),
    ("busy_poll", lambda c: c.busy_poll),
    ("tcp_congestion", lambda c: c.tcp_congestion),
)
#: Node kinds that can be appended online (a storage: node would hide a
#: storage that is a file of the mount today; nbd nodes are built elsewhere).
_APPENDABLE_KINDS = ("remote", "local")


class ReloadRefused(UserError):
    """The re-read config changes something that cannot change online; the
    message names each such change, separated by "; "."""


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload applies. `appended` maps a linear storage to the node
    specs to append at its end, in order (a mirror: its new legs);
    `removed` a mirror to the positions of the legs it loses; `added` names the new storages
    in the config's (dependency) order; `timeouts` is the new timing when
    it changed (None otherwise), and `changes` says each timing change in
    one phrase (growth is described once applied, with the new size)."""

    config: MountConfig
    appended: dict[str, tuple[NodeSpec, ...]] = field(default_factory=dict)
    #: mirror storage -> the positions (in the running config) of the legs
    #: it loses, ascending
    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    added: tuple[str, ...] = ()
    timeouts: Timeouts | None = None
    changes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes and not self.appended and not self.added and not self.removed


def describe_node(spec: NodeSpec) -> str:
    """A node spec as the control tree's `type` line names it, with the
    export and size limit the config gives it."""
    text = describe_spec(spec)
    if spec.export:
        text += f" {spec.export}"
    if spec.size is not None:
        text += f" size {format_size(spec.size)}"
    return text


def _identity(spec: NodeSpec) -> tuple:
    """What makes two node specs the same node: everything but the line."""
    return (spec.kind, spec.target, spec.export, spec.size)


def plan_reload(running: MountConfig, wanted: MountConfig) -> ReloadPlan:
    """The plan that turns `running` into `wanted`; ReloadRefused naming
    every change that cannot be made online (then nothing is applied)."""
    refusals: list[str] = []
    changes: list[str] = []
    for key, value in _FIXED_GLOBALS:
        if value(running) != value(wanted):
            refusals.append(f"{key} cannot change online")
    timeouts = _timeouts(running.timeouts, wanted.timeouts, changes, refusals)
    appended: dict[str, tuple[NodeSpec, ...]] = {}
    removed: dict[str, tuple[int, ...]] = {}
    added: list[str] = []
    nested = _nested_storages(running)
    for name in running.storages:
        if name not in wanted.storages:
            refusals.append(
                f"storage {name} is no longer in the config: removing a storage needs a "
                "remount in this release"
            )
    for name, spec in wanted.storages.items():
        old = running.storages.get(name)
        if old is None:
            refusal = _new_storage_refusal(spec, running)
            if refusal is None:
                added.append(name)
            else:
                refusals.append(refusal)
            continue
        cls = algorithm_class(spec.algorithm)
        if cls.adds_legs and old.algorithm == spec.algorithm and len(spec.nodes) < len(old.nodes):
            gone = _removed_legs(old, spec, refusals)
            if gone:
                removed[name] = gone
            continue
        grown = _storage(old, spec, name in nested, refusals)
        if grown:
            appended[name] = grown
    if removed and (appended or added or changes):
        refusals.append(
            "removing mirror legs cannot be combined with other changes: remove them in a "
            "reload of their own"
        )
    if refusals:
        raise ReloadRefused("; ".join(refusals))
    return ReloadPlan(
        config=wanted,
        appended=appended,
        removed=removed,
        added=tuple(added),
        timeouts=timeouts,
        changes=tuple(changes),
    )


def _timeouts(
    old: Timeouts, new: Timeouts, changes: list[str], refusals: list[str]
) -> Timeouts | None:
    changed = False
    for item in dataclasses.fields(Timeouts):
        before, after = getattr(old, item.name), getattr(new, item.name)
        if before == after:
            continue
        if item.name not in ONLINE_TIMEOUTS:
            refusals.append(
                f"timeouts.{item.name} cannot change online (running connections keep the "
                "value they were opened with)"
            )
            continue
        changed = True
        changes.append(f"timeouts.{item.name} {before:g} -> {after:g}")
    return new if changed else None


def _new_storage_refusal(spec: StorageSpec, running: MountConfig) -> str | None:
    """Why the new storage `spec` cannot be added online, or None. It may
    use only leaf nodes and other new storages: a running storage used as
    its node would stop being a file of the mount while in use."""
    for node in spec.nodes:
        if node.kind == "storage" and node.target in running.storages:
            return (
                f"storage {spec.name} is new and uses storage {node.target}, which runs now: "
                "a running storage cannot become a node online"
            )
    return None


def _nested_storages(config: MountConfig) -> dict[str, str]:
    """Storage used as a node -> the storage that uses it."""
    return {
        node.target: name
        for name, spec in config.storages.items()
        for node in spec.nodes
        if node.kind == "storage"
    }


def _storage(
    old: StorageSpec, new: StorageSpec, nested: bool, refusals: list[str]
) -> tuple[NodeSpec, ...]:
    """The nodes to append to storage `new`; refusals appended to `refusals`."""
    name = new.name
    if old.algorithm != new.algorithm:
        refusals.append(
            f"storage {name}: algorithm cannot change online ({old.algorithm} -> {new.algorithm})"
        )
        return ()
    _storage_options(old, new, refusals)
    before = [_identity(node) for node in old.nodes]
    after = [_identity(node) for node in new.nodes]
    if before == after:
        return ()
    cls = algorithm_class(new.algorithm)
    if cls.adds_legs:
        refusal = _leg_refusal(old, before, after)
        if refusal is not None:
            refusals.append(f"storage {name}: {refusal}")
            return ()
        return _appendable(name, new.nodes[len(old.nodes) :], refusals)
    if cls.serves_without_a_node:
        # A redundant storage's nodes are its legs.
        refusals.append(f"storage {name}: leg changes need a remount in this release")
        return ()
    if not cls.grows_by_appending:
        refusals.append(f"storage {name}: node changes need a remount ({new.algorithm})")
        return ()
    refusal = _linear_refusal(old, new, before, after)
    if refusal is not None:
        refusals.append(f"storage {name}: {refusal}")
        return ()
    grown = new.nodes[len(old.nodes) :]
    if nested:
        refusals.append(
            f"storage {name} is a node of another storage: it cannot grow online "
            "(the other storage's map would move)"
        )
        return ()
    return _appendable(name, grown, refusals)


def _storage_options(old: StorageSpec, new: StorageSpec, refusals: list[str]) -> None:
    for option in sorted(set(old.options) | set(new.options)):
        if old.options.get(option) != new.options.get(option):
            refusals.append(f"storage {new.name}: {option} cannot change online in this release")


def _appendable(
    name: str, grown: tuple[NodeSpec, ...], refusals: list[str]
) -> tuple[NodeSpec, ...]:
    for node in grown:
        if node.kind not in _APPENDABLE_KINDS:
            refusals.append(
                f"storage {name}: node {describe_node(node)} (line {node.line}): only remote: "
                "and local: nodes can be appended online"
            )
            return ()
    return grown


def _removed_legs(
    old: StorageSpec, new: StorageSpec, refusals: list[str]
) -> tuple[int, ...]:
    """The positions of the legs mirror `new` drops from `old`'s list (empty,
    with a refusal appended, when the new list is not the old one with some
    legs left out: the remaining legs keep their order, and are renumbered
    in every leg's metadata by the removal)."""
    name = new.name
    _storage_options(old, new, refusals)
    before = [_identity(node) for node in old.nodes]
    after = [_identity(node) for node in new.nodes]
    kept: list[int] = []
    position = 0
    for key in after:
        while position < len(before) and before[position] != key:
            position += 1
        if position == len(before):
            break
        kept.append(position)
        position += 1
    if len(kept) == len(after):
        return tuple(index for index in range(len(before)) if index not in kept)
    present = set(before)
    if any(key not in present for key in after):
        still = set(after)
        gone = ", ".join(
            describe_node(node) for node, key in zip(old.nodes, before, strict=True)
            if key not in still
        )
        refusals.append(f"storage {name}: {_add_and_remove_refusal(gone)}")
    else:
        refusals.append(
            f"storage {name}: legs reordered: the legs that remain must keep their order "
            "(a leg's position is recorded in the metadata of every leg)"
        )
    return ()


def _add_and_remove_refusal(gone: str) -> str:
    return (
        f"leg(s) removed ({gone}) while others are added: add the new legs first, then "
        "remove the old ones in a reload of their own"
    )


def _leg_refusal(old: StorageSpec, before: list[tuple], after: list[tuple]) -> str | None:
    """Why a mirror's new leg list is not its old one with legs added at
    the end, or None. A leg's position is its identity in the legs'
    metadata, so legs can only be added at the end."""
    if after[: len(before)] == before:
        return None
    present = set(after)
    removed = [node for node, key in zip(old.nodes, before, strict=True) if key not in present]
    if removed:
        gone = ", ".join(describe_node(node) for node in removed)
        return _add_and_remove_refusal(gone)
    return (
        "legs reordered or changed: a mirror's legs can only be added at the end of its "
        "node list (a leg's position is recorded in the metadata of every leg)"
    )


def _linear_refusal(
    old: StorageSpec, new: StorageSpec, before: list[tuple], after: list[tuple]
) -> str | None:
    """Why `new`'s nodes are not `old`'s with some appended, or None."""
    if after[: len(before)] == before:
        return None
    if len(after) < len(before) and after == before[: len(after)]:
        gone = ", ".join(describe_node(node) for node in old.nodes[len(after) :])
        return (
            f"node(s) removed from the end ({gone}): shrinking a linear storage would drop "
            "their data"
        )
    if Counter(after[: len(before)]) == Counter(before):
        return (
            "nodes reordered: linear nodes can only be appended at the end (reordering would "
            "move data)"
        )
    present = set(after)
    removed = [node for node, key in zip(old.nodes, before, strict=True) if key not in present]
    if removed and len(after) < len(before):
        gone = ", ".join(describe_node(node) for node in removed)
        return f"node(s) removed ({gone}): removing a linear node would move or drop data"
    index = next(i for i, (b, a) in enumerate(zip(before, after, strict=False)) if b != a)
    return (
        f"node {index} changed ({describe_node(old.nodes[index])} -> "
        f"{describe_node(new.nodes[index])}): linear nodes can only be appended at the end"
    )

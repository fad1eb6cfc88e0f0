"""`plan_reload`: what a reload may change online, decided from the running
and the re-read config alone (a table of config pairs, no I/O but the
config files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dstfuse.config import load_mount_config
from dstfuse.reload_plan import ReloadRefused, plan_reload


def config(tmp_path: Path, name: str, storages: dict, **settings):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**settings, "storages": storages}, sort_keys=False))
    return load_mount_config(path)


def linear(*nodes: str, **extra) -> dict:
    return {"algorithm": "linear", "nodes": [{"local": node} for node in nodes], **extra}


def mirror(*nodes: str, **extra) -> dict:
    return {"algorithm": "mirror", "nodes": [{"local": node} for node in nodes], **extra}


def plan(tmp_path: Path, running: dict, wanted: dict, running_settings=None, wanted_settings=None):
    return plan_reload(
        config(tmp_path, "running", running, **(running_settings or {})),
        config(tmp_path, "wanted", wanted, **(wanted_settings or {})),
    )


def refusal(tmp_path: Path, *args, **kwargs) -> str:
    with pytest.raises(ReloadRefused) as caught:
        plan(tmp_path, *args, **kwargs)
    return str(caught.value)


def test_the_same_config_plans_nothing(tmp_path):
    result = plan(tmp_path, {"vol": linear("/a", "/b")}, {"vol": linear("/a", "/b")})
    assert result.empty
    assert result.appended == {} and result.timeouts is None


def test_nodes_appended_at_the_end_of_a_linear_storage_are_planned_in_order(tmp_path):
    result = plan(tmp_path, {"vol": linear("/a")}, {"vol": linear("/a", "/b", "/c")})
    assert not result.empty
    assert [node.target for node in result.appended["vol"]] == ["/b", "/c"]


def test_legs_added_at_the_end_of_a_mirror_are_planned_in_order(tmp_path):
    result = plan(tmp_path, {"m": mirror("/a", "/b")}, {"m": mirror("/a", "/b", "/c", "/d")})
    assert [node.target for node in result.appended["m"]] == ["/c", "/d"]


def test_new_storages_are_added_in_dependency_order(tmp_path):
    result = plan(
        tmp_path,
        {"vol": linear("/a")},
        {
            "vol": linear("/a"),
            "outer": {"algorithm": "linear", "nodes": [{"storage": "inner"}, {"local": "/c"}]},
            "inner": mirror("/b", "/d"),
        },
    )
    assert result.added == ("inner", "outer")
    assert result.appended == {} and not result.empty


def test_online_timeouts_apply_and_keepalive_is_refused(tmp_path):
    result = plan(
        tmp_path,
        {"vol": linear("/a")},
        {"vol": linear("/a")},
        {"timeouts": {"resend": "2s", "max_resends": 15}},
        {"timeouts": {"resend": "500ms", "max_resends": 3, "connect": "9s"}},
    )
    assert result.timeouts is not None
    assert (result.timeouts.resend, result.timeouts.max_resends, result.timeouts.connect) == (
        0.5,
        3,
        9.0,
    )
    assert "timeouts.resend 2 -> 0.5" in result.changes
    message = refusal(
        tmp_path,
        {"vol": linear("/a")},
        {"vol": linear("/a")},
        wanted_settings={"timeouts": {"keepalive": "3s"}},
    )
    assert message.startswith("timeouts.keepalive cannot change online")


@pytest.mark.parametrize(
    ("running", "wanted", "expected"),
    [
        (
            {"vol": linear("/a", "/b")},
            {"vol": linear("/a")},
            "storage vol: node(s) removed from the end (L: /b): shrinking a linear storage "
            "would drop their data",
        ),
        (
            {"vol": linear("/a", "/b")},
            {"vol": linear("/b", "/a")},
            "storage vol: nodes reordered: linear nodes can only be appended at the end",
        ),
        (
            {"vol": linear("/a", "/b", "/c")},
            {"vol": linear("/a", "/c")},
            "storage vol: node(s) removed (L: /b): removing a linear node would move or drop data",
        ),
        (
            {"vol": linear("/a", "/b")},
            {"vol": linear("/a", "/x", "/b")},
            "storage vol: node 1 changed (L: /b -> L: /x): linear nodes can only be appended",
        ),
        (
            {"vol": linear("/a")},
            {"vol": {"algorithm": "linear", "nodes": [{"local": "/a", "size": "1M"}]}},
            "storage vol: node 0 changed (L: /a -> L: /a size 1.0 MiB)",
        ),
        (
            {"vol": linear("/a", "/b")},
            {"vol": mirror("/a", "/b")},
            "storage vol: algorithm cannot change online (linear -> mirror)",
        ),
        (
            {"vol": mirror("/a", "/b")},
            {"vol": mirror("/a", "/c")},
            "storage vol: leg(s) removed (L: /b) while others are added: add the new legs "
            "first, then remove the old ones in a reload of their own",
        ),
        (
            {"vol": mirror("/a", "/b")},
            {"vol": mirror("/b", "/a")},
            "storage vol: legs reordered or changed: a mirror's legs can only be added at the end",
        ),
        (
            {"vol": mirror("/a", "/b")},
            {"vol": mirror("/a", "/x", "/b")},
            "storage vol: legs reordered or changed",
        ),
        (
            {"vol": mirror("/a", "/b")},
            {"vol": mirror("/a", "/b", resync_rate="10M")},
            "storage vol: resync_rate cannot change online in this release",
        ),
        (
            {"vol": linear("/a")},
            {"vol": linear("/a"), "more": {"algorithm": "linear", "nodes": [{"storage": "vol"}]}},
            "storage more is new and uses storage vol, which runs now: a running storage "
            "cannot become a node online",
        ),
        (
            {"vol": linear("/a"), "more": linear("/b")},
            {"vol": linear("/a")},
            "storage more is no longer in the config: removing a storage needs a remount",
        ),
        (
            {
                "inner": linear("/a"),
                "outer": {"algorithm": "linear", "nodes": [{"storage": "inner"}]},
            },
            {
                "inner": linear("/a", "/b"),
                "outer": {"algorithm": "linear", "nodes": [{"storage": "inner"}]},
            },
            "storage inner is a node of another storage: it cannot grow online",
        ),
        (
            {"inner": linear("/a"), "vol": linear("/b")},
            {
                "inner": linear("/a"),
                "vol": {"algorithm": "linear", "nodes": [{"local": "/b"}, {"storage": "inner"}]},
            },
            "only remote: and local: nodes can be appended online",
        ),
    ],
)
def test_a_change_that_cannot_be_made_online_is_refused_naming_it(
    tmp_path, running, wanted, expected
):
    assert expected in refusal(tmp_path, running, wanted)


def test_every_refusal_is_named_and_nothing_is_planned(tmp_path):
    message = refusal(
        tmp_path,
        {"vol": linear("/a", "/b"), "m": mirror("/c", "/d")},
        {"vol": linear("/a"), "m": mirror("/c", "/e")},
        {"max_in_flight": 64},
        {"max_in_flight": 8},
    )
    assert message.split("; ")[0] == "max_in_flight cannot change online"
    assert "storage vol: node(s) removed from the end" in message
    assert "storage m: leg(s) removed (L: /d) while others are added: add the new" in message


def test_a_refused_change_refuses_the_growth_beside_it(tmp_path):
    message = refusal(
        tmp_path,
        {"vol": linear("/a"), "m": mirror("/c", "/d")},
        {"vol": linear("/a", "/b"), "m": mirror("/d", "/c")},
    )
    assert message.startswith("storage m: legs reordered or changed")
    assert ";" not in message


@pytest.mark.parametrize(
    ("wanted", "gone"),
    [
        (("/b", "/c"), (0,)),
        (("/a", "/c"), (1,)),
        (("/a", "/b"), (2,)),
    ],
)
def test_any_leg_of_a_mirror_can_be_removed(tmp_path, wanted, gone):
    result = plan(tmp_path, {"m": mirror("/a", "/b", "/c")}, {"m": mirror(*wanted)})
    assert result.removed == {"m": gone} and result.appended == {}


def test_several_legs_anywhere_can_be_removed_in_one_reload(tmp_path):
    result = plan(tmp_path, {"m": mirror("/a", "/b", "/c", "/d")}, {"m": mirror("/b", "/d")})
    assert result.removed == {"m": (0, 2)}


def test_a_removal_that_reorders_the_remaining_legs_is_refused(tmp_path):
    message = refusal(tmp_path, {"m": mirror("/a", "/b", "/c")}, {"m": mirror("/c", "/a")})
    assert message == (
        "storage m: legs reordered: the legs that remain must keep their order (a leg's "
        "position is recorded in the metadata of every leg)"
    )


def test_a_removal_with_a_new_leg_in_the_same_reload_is_refused(tmp_path):
    message = refusal(tmp_path, {"m": mirror("/a", "/b", "/c")}, {"m": mirror("/b", "/x")})
    assert message == (
        "storage m: leg(s) removed (L: /a, L: /c) while others are added: add the new legs "
        "first, then remove the old ones in a reload of their own"
    )


def test_a_removal_with_other_changes_is_refused(tmp_path):
    message = refusal(
        tmp_path,
        {"m": mirror("/a", "/b", "/c")},
        {"m": mirror("/b", "/c")},
        {"timeouts": {"resend": "2s"}},
        {"timeouts": {"resend": "3s"}},
    )
    assert "removing mirror legs cannot be combined with other changes" in message


def test_tcp_congestion_cannot_change_online(tmp_path):
    storages = {"vol": linear("/a")}
    message = refusal(tmp_path, storages, storages, {}, {"tcp_congestion": "reno"})
    assert message == "tcp_congestion cannot change online"


def test_busy_poll_cannot_change_online(tmp_path):
    storages = {"vol": linear("/a")}
    message = refusal(tmp_path, storages, storages, {"busy_poll": "0.2ms"}, {"busy_poll": 0})
    assert message == "busy_poll cannot change online"

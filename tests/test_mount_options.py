"""`-o` mount options: every one is mount-wide or declared by an algorithm of
the config's storages; anything else is refused with one line naming it and
the nearest known option, and the README documents every known option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dstfuse.algorithms import NAMES, algorithm_class
from dstfuse.config import MOUNT_OPTIONS, load_mount_config, parse_mount_options
from dstfuse.daemon import FUSE_OPTIONS
from dstfuse.errors import UserError

from .mounts import (
    REPO,
    force_unmount,
    is_mounted,
    remove_runtime_files,
    require_fuse,
    run_dstfuse,
    write_config,
)

MiB = 1 << 20


def config_of(tmp_path: Path, algorithm: str, legs: int = 2) -> Path:
    nodes = []
    for index in range(legs):
        image = tmp_path / f"leg{index}.img"
        image.write_bytes(bytes(MiB))
        nodes.append({"local": str(image)})
    return write_config(
        tmp_path / "storage.yaml", {"vol0": {"algorithm": algorithm, "nodes": nodes}}
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("assume_clan", "unknown mount option 'assume_clan' (did you mean 'assume_clean'?)"),
        ("read_chek=off", "unknown mount option 'read_chek' (did you mean 'read_check'?)"),
        ("primry=1", "unknown mount option 'primry' (did you mean 'primary'?)"),
        ("forse", "unknown mount option 'forse' (did you mean 'force'?)"),
        ("allow_others", "unknown mount option 'allow_others' (did you mean 'allow_other'?)"),
        ("region_size=1M", "unknown mount option 'region_size' (did you mean 'resync_size'?)"),
    ],
)
def test_a_misspelt_option_is_refused_naming_it_and_the_nearest_known_one(
    tmp_path, option, message
):
    config = load_mount_config(config_of(tmp_path, "mirror"))
    with pytest.raises(UserError) as caught:
        parse_mount_options([f"force,{option}"], config)
    assert str(caught.value) == message


def test_an_option_nothing_is_near_lists_the_known_ones(tmp_path):
    config = load_mount_config(config_of(tmp_path, "linear", legs=1))
    with pytest.raises(UserError) as caught:
        parse_mount_options(["frobnicate"], config)
    assert str(caught.value) == (
        "unknown mount option 'frobnicate' (expected one of: allow_other, debug, ro)"
    )


def test_an_option_of_an_algorithm_the_config_does_not_use_says_so(tmp_path):
    config = load_mount_config(config_of(tmp_path, "linear", legs=1))
    with pytest.raises(UserError) as caught:
        parse_mount_options(["primary=1"], config)
    assert str(caught.value) == (
        "mount option 'primary' is read by mirror storages, and storage.yaml has none"
    )


def test_known_options_pass_with_their_values_and_flags_take_none(tmp_path):
    config = load_mount_config(config_of(tmp_path, "mirror"))
    assert parse_mount_options(
        ["allow_other,force", "primary=vol0:1,read_check=off", "debug"], config
    ) == {
        "allow_other": True,
        "force": True,
        "primary": "vol0:1",
        "read_check": "off",
        "debug": True,
    }
    with pytest.raises(UserError, match=r"^mount option 'debug' takes no value \(use -o debug\)$"):
        parse_mount_options(["debug=1"], config)


def test_the_readme_documents_every_mount_option_and_no_other():
    readme = (REPO / "README.md").read_text()
    start = readme.index("### Mount options (`-o`)")
    section = readme[start : readme.index("\n#", start + 1)]
    documented = set(re.findall(r"^\| `([a-z_]+)[^`]*` \|", section, re.MULTILINE))
    known = set(MOUNT_OPTIONS)
    for name in NAMES:
        known |= set(algorithm_class(name).mount_options)
    assert documented == known


def test_a_mount_with_a_misspelt_option_fails_with_one_line_and_mounts_nothing(tmp_path):
    require_fuse()
    config = config_of(tmp_path, "mirror")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        for foreground in ([], ["--foreground"]):
            done = run_dstfuse(
                "mount", *foreground, "-o", "assume_clan", config, mountpoint, timeout=60
            )
            assert done.returncode == 1
            assert done.stderr.splitlines() == [
                "dstfuse mount: unknown mount option 'assume_clan' (did you mean 'assume_clean'?)"
            ]
            assert not is_mounted(mountpoint)
    finally:
        force_unmount(mountpoint)
        remove_runtime_files(mountpoint)


def test_the_options_handed_to_fuse_are_mount_wide_options():
    assert set(FUSE_OPTIONS) <= set(MOUNT_OPTIONS)

"""The systemd units in systemd/: `systemd-analyze verify` accepts them with
no warning, they keep the documented contract (paths, Type, restart policy,
ordering), and the loop unit's attach/detach recipe works on a real loop
device."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("dstfuse@.service", "dstfuse-export@.service", "dstfuse-loop@.service")
#: Where the units expect the command (README/unit comments: a symlink to
#: the virtualenv's script).
INSTALLED_DSTFUSE = "/usr/local/bin/dstfuse"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def unit_text(name: str) -> str:
    return (UNIT_DIR / name).read_text()


def directives(name: str) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order; continuation lines joined."""
    result: dict[str, list[str]] = {}
    section = ""
    text = re.sub(r"\\\n", " ", unit_text(name))
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        result.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return result


def one(name: str, key: str) -> str:
    values = directives(name).get(key, [])
    assert len(values) == 1, f"{name}: {key} is set {len(values)} times"
    return values[0]


# ------------------------------------------------------------ verification


def dstfuse_executable(tmp_path: Path) -> Path:
    """The installed script next to this interpreter, else a stub: verify
    only needs the ExecStart binaries to exist and be executable."""
    real = Path(sys.executable).parent / "dstfuse"
    if real.exists() and os.access(real, os.X_OK):
        return real
    stub = tmp_path / "bin" / "dstfuse"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return stub


def copy_units(directory: Path, executable: Path) -> None:
    directory.mkdir(exist_ok=True)
    for name in UNITS:
        text = unit_text(name).replace(INSTALLED_DSTFUSE, str(executable))
        (directory / name).write_text(text)


def verify_problems(directory: Path) -> list[str]:
    """What `systemd-analyze verify` says about instances of the units in
    `directory`: its exit status when non-zero, and every line it prints
    about them (unknown keys are only warnings, with exit status 0)."""
    instances = [
        "dstfuse@vol0.service",
        "dstfuse-export@disks.service",
        "dstfuse-loop@vol0.service",
    ]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *instances],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (done.stdout + done.stderr).splitlines()
    problems = [
        line for line in output if "dstfuse" in line or str(directory) in line or "%" in line
    ]
    if done.returncode != 0:
        problems.insert(0, f"exit status {done.returncode}: {output}")
    return problems


@needs_systemd_analyze
@pytest.mark.slow
def test_systemd_analyze_verify_accepts_every_unit_without_warnings(tmp_path):
    copy_units(tmp_path / "units", dstfuse_executable(tmp_path))
    assert verify_problems(tmp_path / "units") == []


@needs_systemd_analyze
@pytest.mark.slow
@pytest.mark.parametrize(
    "unit, old, new, expected",
    [
        ("dstfuse@.service", "KillMode=mixed", "KilMode=mixed", "Unknown key"),
        ("dstfuse-loop@.service", "Type=oneshot", "Type=oneshoot", "Failed to parse"),
        ("dstfuse-export@.service", "[Service]", "[Servic]", "Unknown section"),
    ],
)
def test_verification_catches_a_typo(tmp_path, unit, old, new, expected):
    """The check above can fail: a misspelt directive is reported."""
    directory = tmp_path / "units"
    copy_units(directory, dstfuse_executable(tmp_path))
    path = directory / unit
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    problems = verify_problems(directory)
    assert any(expected in line for line in problems), problems


@needs_systemd_analyze
@pytest.mark.slow
def test_verification_catches_a_missing_executable(tmp_path):
    directory = tmp_path / "units"
    copy_units(directory, tmp_path / "nowhere" / "dstfuse")
    problems = verify_problems(directory)
    assert problems and "is not executable" in " ".join(problems)


# --------------------------------------------------------------- contract


def test_units_use_the_literal_instance_name_never_the_unescaped_one():
    # %I would turn "vol-0" into "vol/0"; storage and config names may hold "-".
    for name in UNITS:
        for key, values in directives(name).items():
            assert not any("%I" in value for value in values), f"{name}: {key}"


def test_mount_unit_runs_the_foreground_mount_with_notify():
    unit = "dstfuse@.service"
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert one(unit, "Service.ExecStartPre") == "/bin/mkdir -p /mnt/dst/%i"
    assert one(unit, "Service.ExecStart") == (
        f"{INSTALLED_DSTFUSE} mount --foreground /etc/dstfuse/%i.yaml /mnt/dst/%i"
    )
    assert one(unit, "Service.ExecStop") == f"{INSTALLED_DSTFUSE} umount /mnt/dst/%i"
    assert one(unit, "Service.KillMode") == "mixed"
    assert one(unit, "Service.Restart") == "on-failure"
    assert int(one(unit, "Service.TimeoutStopSec")) >= 60
    assert "network-online.target" in one(unit, "Unit.Wants").split()
    assert "network-online.target" in one(unit, "Unit.After").split()
    assert one(unit, "Install.WantedBy") == "multi-user.target"


def test_mount_unit_reloads_through_dstfuse_reload_of_its_own_mountpoint():
    from dstfuse.cli import build_parser
    from dstfuse.commands import reload

    unit = "dstfuse@.service"
    command = one(unit, "Service.ExecReload")
    assert command == f"{INSTALLED_DSTFUSE} reload /mnt/dst/%i"
    mountpoint = one(unit, "Service.ExecStart").split()[-1]
    assert command.split()[-1] == mountpoint == one(unit, "Service.ExecStop").split()[-1]
    args = build_parser().parse_args(command.split()[1:])
    assert args.command == "reload" and args.mountpoint == mountpoint
    # systemd bounds ExecReload by TimeoutStartSec: the command gives up first
    # and says why.
    assert args.timeout == reload.DEFAULT_TIMEOUT < int(one(unit, "Service.TimeoutStartSec"))


def test_export_unit_serves_the_instance_config_and_always_restarts():
    unit = "dstfuse-export@.service"
    assert one(unit, "Service.ExecStart") == (
        f"{INSTALLED_DSTFUSE} export --config /etc/dstfuse/export-%i.yaml"
    )
    assert one(unit, "Service.Type") in ("simple", "notify")
    assert one(unit, "Service.Restart") == "always"
    assert "network-online.target" in one(unit, "Unit.After").split()


def test_loop_unit_is_bound_to_and_ordered_after_its_mount():
    unit = "dstfuse-loop@.service"
    assert one(unit, "Unit.BindsTo") == "dstfuse@%i.service"
    assert one(unit, "Unit.After") == "dstfuse@%i.service"
    assert one(unit, "Service.Type") == "oneshot"
    assert one(unit, "Service.RemainAfterExit") == "yes"
    assert one(unit, "Service.Environment") == "DSTFUSE_STORAGE=%i"
    assert "--direct-io=on" in one(unit, "Service.ExecStart")


# ------------------------------------------- the loop recipe, for real


def shell_script(unit: str, key: str, instance: str, mount_root: Path) -> list[str]:
    """The argv systemd runs for `key` of `unit`: specifiers and "$$"
    expanded the way systemd does for this (simple) command line."""
    command = one(unit, key)
    command = command.replace("/mnt/dst/%i", f"{mount_root}/%i").replace("%i", instance)
    match = re.fullmatch(r"/bin/sh -ec '(.*)'", command)
    assert match, f"{unit}: {key} is not a /bin/sh -ec '...' command: {command}"
    return ["/bin/sh", "-ec", match.group(1).replace("$$", "$")]


def loop_devices_of(path: Path) -> list[str]:
    done = subprocess.run(
        ["losetup", "--noheadings", "--output", "NAME", "--associated", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.split()


def loop_devices_usable() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("losetup") is not None
        and os.path.exists("/dev/loop-control")
    )


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(not loop_devices_usable(), reason="needs root, losetup and /dev/loop-control")
@pytest.mark.parametrize("storage", [None, "big"])
def test_loop_unit_attaches_once_with_direct_io_and_detaches(tmp_path, storage):
    unit = "dstfuse-loop@.service"
    instance = "vol-0"
    mount_dir = tmp_path / instance
    mount_dir.mkdir()
    image = mount_dir / (storage or instance)
    with open(image, "wb") as file:
        file.truncate(8 << 20)
    env = dict(os.environ, DSTFUSE_STORAGE=storage or instance)
    start = shell_script(unit, "Service.ExecStart", instance, tmp_path)
    stop = shell_script(unit, "Service.ExecStop", instance, tmp_path)
    try:
        first = subprocess.run(start, env=env, capture_output=True, text=True, timeout=30)
        assert first.returncode == 0, first.stderr
        devices = loop_devices_of(image)
        assert devices == [first.stdout.strip()]
        dio = Path("/sys/block") / Path(devices[0]).name / "loop" / "dio"
        assert dio.read_text().strip() == "1"
        # Starting again (unit restarted) must not attach a second device.
        again = subprocess.run(start, env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 0, again.stderr
        assert loop_devices_of(image) == devices
        stopped = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=30)
        assert stopped.returncode == 0, stopped.stderr
        assert loop_devices_of(image) == []
    finally:
        for device in loop_devices_of(image):
            subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30)

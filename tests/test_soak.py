"""The fault soak of tests/soak.py, CI-sized: one round of every fault
kind in an order the seed shuffles (env DSTFUSE_SOAK_SECONDS goes on with
more rounds for that long, DSTFUSE_SOAK_SEED replays a run). A
mirror of two legs on two namespaced hosts under ext4 and fio with crc32c
verify; one fault at a time (a node killed and restarted, a node frozen, a
link down, bytes corrupted on a leg's wire, the client killed and mounted
again). No write fails, fsck is clean, every block verifies and the legs
end byte-identical."""

from __future__ import annotations

import shutil

import pytest

from .soak import FAULTS, SoakSettings, run_soak

pytestmark = pytest.mark.slow


def test_a_mirror_on_two_hosts_loses_no_write_under_a_bounded_fault_soak(tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    report = run_soak(tmp_path, SoakSettings.from_environment())
    print(report.summary())
    print("\n".join(report.events))
    assert report.ext4_errors == 0
    assert report.fsck_returncode == 0, report.fsck
    assert report.umount_returncode == 0, report.umount_stderr
    assert report.legs_identical
    assert report.segments >= 2 and report.bytes_verified == report.bytes_written > 0
    assert set(report.faults) == set(FAULTS), report.faults  # every kind was injected

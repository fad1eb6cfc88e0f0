"""The node instance identity: its wire form, the continuity decision (a
table, like plan_start's), and what a real export node sends."""

from __future__ import annotations

import uuid

import pytest

from dstfuse.errors import UserError
from dstfuse.export.backend import Backend
from dstfuse.export.instance import BOOT_ID_OVERRIDE, boot_id
from dstfuse.export.served import ServedExport
from dstfuse.protocol import Continuity, NodeInstance, RemoteProtocolError, continuity
from dstfuse.protocol.instance import INSTANCE_SIZE

BOOT_A, BOOT_B = bytes(16), bytes([1]) * 16
PROC_1, PROC_2 = bytes([7]) * 16, bytes([8]) * 16
FIRST = NodeInstance(BOOT_A, 2049, 12, PROC_1)


def test_instance_round_trips_and_a_wrong_size_is_the_peers_error():
    assert len(FIRST.encode()) == INSTANCE_SIZE == 48
    assert NodeInstance.decode(FIRST.encode()) == FIRST
    with pytest.raises(RemoteProtocolError, match="INSTANCE is 47 bytes"):
        NodeInstance.decode(FIRST.encode()[:-1])


@pytest.mark.parametrize(
    "previous, current, expected",
    [
        (FIRST, FIRST, Continuity.SAME),
        (FIRST, NodeInstance(BOOT_A, 2049, 12, PROC_2), Continuity.RESTARTED),
        (FIRST, NodeInstance(BOOT_B, 2049, 12, PROC_2), Continuity.NEW),
        (FIRST, NodeInstance(BOOT_A, 2049, 13, PROC_2), Continuity.NEW),  # another file
        (FIRST, NodeInstance(BOOT_A, 2050, 12, PROC_1), Continuity.NEW),  # another device
        (None, FIRST, Continuity.NEW),
        (FIRST, None, Continuity.UNKNOWN),
        (None, None, Continuity.UNKNOWN),
    ],
)
def test_continuity_decision(previous, current, expected):
    assert continuity(previous, current) is expected


def test_served_export_reports_boot_id_backing_and_a_fresh_process_nonce(tmp_path, monkeypatch):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    chosen = uuid.uuid4()
    monkeypatch.setenv(BOOT_ID_OVERRIDE, str(chosen))
    first = ServedExport("disk", Backend(disk))
    second = ServedExport("disk", Backend(disk))
    info = disk.stat()
    assert first.instance.boot_id == chosen.bytes
    assert (first.instance.device, first.instance.inode) == (info.st_dev, info.st_ino)
    assert continuity(first.instance, second.instance) is Continuity.RESTARTED


def test_boot_id_comes_from_the_kernel_without_override(monkeypatch):
    monkeypatch.delenv(BOOT_ID_OVERRIDE, raising=False)
    with open("/proc/sys/kernel/random/boot_id") as file:
        assert boot_id() == uuid.UUID(file.read().strip()).bytes


def test_bad_boot_id_override_is_one_clear_line(monkeypatch):
    monkeypatch.setenv(BOOT_ID_OVERRIDE, "not-a-uuid")
    with pytest.raises(UserError, match=r"\$DSTFUSE_BOOT_ID is not a UUID: 'not-a-uuid'"):
        boot_id()

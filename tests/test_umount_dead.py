"""Which mount `dstfuse umount` takes for its own when the daemon is gone:
the topmost mount at the path in /proc/self/mountinfo, by its type."""

from __future__ import annotations

from pathlib import Path

from dstfuse.commands.umount import MOUNT_TYPE, mount_type

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:45 / /mnt/vol rw,nosuid,nodev,relatime shared:20 - fuse.dstfuse dstfuse rw,user_id=0
41 22 0:46 / /mnt/my\\040disk rw,nosuid shared:21 - fuse.dstfuse dstfuse rw,user_id=0
42 22 0:47 / /mnt/other rw,nosuid shared:22 - fuse nbdfuse rw,user_id=0
43 40 0:48 / /mnt/vol rw,nosuid shared:23 - tmpfs tmpfs rw
44 22 0:49 / /mnt/opt\\040(x) rw shared:24 - fuse.sshfs host: rw
"""


def test_the_topmost_mount_at_the_path_decides_and_escapes_are_undone():
    assert mount_type(Path("/mnt/vol"), MOUNTINFO) == "tmpfs"  # mounted on top of ours
    assert mount_type(Path("/mnt/my disk"), MOUNTINFO) == MOUNT_TYPE
    assert mount_type(Path("/mnt/other"), MOUNTINFO) == "fuse"
    assert mount_type(Path("/mnt/opt (x)"), MOUNTINFO) == "fuse.sshfs"
    assert mount_type(Path("/mnt/none"), MOUNTINFO) is None
    assert mount_type(Path("/mnt/vol"), "garbage\n\n") is None

"""This node process's instance identity, sent in READY (see
dstfuse/protocol/instance.py): the host's boot id, the backing file's
identity, and a nonce chosen once per process.

`DSTFUSE_BOOT_ID` (a UUID) replaces /proc/sys/kernel/random/boot_id. It
exists for tests only, which simulate a host reboot by restarting a node
with another boot id; never set it in production: a node that lies about
its boot hides a reboot's lost writes from its clients.
"""

from __future__ import annotations

import os
import uuid

from ..errors import UserError
from ..protocol import NodeInstance

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
BOOT_ID_OVERRIDE = "DSTFUSE_BOOT_ID"


def boot_id() -> bytes:
    """The host's boot id as 16 bytes; a UserError naming the source when
    it cannot be read or is not a UUID."""
    override = os.environ.get(BOOT_ID_OVERRIDE)
    source = f"${BOOT_ID_OVERRIDE}" if override is not None else BOOT_ID_PATH
    try:
        if override is None:
            with open(BOOT_ID_PATH) as file:
                override = file.read()
        return uuid.UUID(override.strip()).bytes
    except OSError as exc:
        raise UserError(f"cannot read the boot id from {source}: {exc.strerror}") from None
    except ValueError:
        raise UserError(f"the boot id in {source} is not a UUID: {override.strip()!r}") from None


def process_instance(backing: tuple[int, int], process: bytes) -> NodeInstance:
    """The identity of this process serving the backing `(device, inode)`."""
    device, inode = backing
    return NodeInstance(boot_id(), device, inode, process)

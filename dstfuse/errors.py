"""The error hierarchy above the wire protocol.

Every error that can reach the kernel carries the errno it becomes there.
`UserError` marks a mistake the user can fix (bad config, refused address,
wrong key): the command line prints its message as one line and exits
non-zero, with no traceback. Anything else escaping to the command line is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno as _errno


class DstError(Exception):
    """Base of all dstfuse errors; `errno` is what the kernel will see."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class UserError(DstError):
    """A mistake the user can fix; its message is one self-contained line."""


class ConfigError(UserError):
    """A bad configuration file; the message names the file, line and key."""

    errno = _errno.EINVAL


class NodeError(DstError):
    """A request on a node failed; `node` names it for logs and messages."""

    def __init__(self, node: str, message: str, *, errno: int = _errno.EIO) -> None:
        super().__init__(f"{node}: {message}", errno=errno)
        self.node = node


class NodeUnavailable(NodeError):
    """The node could not be reached within the request's resend budget."""


class NodeSlow(NodeError):
    """A read given up after the caller's patience (`Node.read_within`):
    the node may still answer; nothing changed on it."""


class NodeRefused(NodeError, UserError):
    """The node refused us during the handshake (ACL, unknown export, key)."""


class NodeFenced(NodeError):
    """Another client identity now holds the export's write grant: this
    client may not write there any more (its requests fail at once)."""


class RequestOutOfRange(DstError):
    """A request reaches past the end of a storage or node."""

    errno = _errno.EINVAL


class NodeWritesLost(NodeError):
    """A FLUSH found that writes the node had acknowledged were lost (its
    host rebooted before they were flushed, and they were not kept for
    replay). Reported once, by the next flush, with errno EIO. `regions` are
    the (offset, length) ranges of the node those writes covered (possibly
    merged into larger ones); `lost_bytes` how much was written in them."""

    def __init__(
        self, node: str, message: str, *, regions: tuple[tuple[int, int], ...], lost_bytes: int
    ) -> None:
        super().__init__(node, message, errno=_errno.EIO)
        self.regions = regions
        self.lost_bytes = lost_bytes

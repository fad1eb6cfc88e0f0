"""Nodes: the byte ranges that storages place (see `base.Node`).

Only the interface and the local node are imported here; `RemoteNode`
(`dstfuse.nodes.remote`) pulls in the network client and is imported where
it is used.
"""

from .base import CHECKSUM_SIZE, Node, NodeCounters, NodeState
from .local import LocalNode

__all__ = ["CHECKSUM_SIZE", "LocalNode", "Node", "NodeCounters", "NodeState"]

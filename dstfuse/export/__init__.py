"""The export node: serve local files or block devices to dstfuse clients.

- `backend`: the disk (one file or block device, I/O in threads);
- `acl`: which peer addresses may connect, and with what access;
- `admission`: the ACL check at accept (also for a mount's NBD listener);
- `lock`: the OFD lock that keeps a second node process off a file;
- `grant`: which client identity may write to an export (one at a time);
- `served`: one named export, its per-request checks and write order;
- `slots`: the connection caps (handshakes and sessions counted apart);
- `session`: one client connection (handshake, requests, takeover);
- `nbd_session`, `nbd_target`, `nbd_tls`: one NBD client connection, what
  it serves (an export, or a mount's storage), and the NBD TLS context
  (the export's and the mount's `nbd_tls:`);
- `listeners`: TCP/IPv6/unix listening sockets;
- `server`: `ExportServer`, tying them together.
"""

from .acl import ExportAcl
from .backend import Backend
from .served import ServedExport
from .server import ExportServer

__all__ = ["Backend", "ExportAcl", "ExportServer", "ServedExport"]

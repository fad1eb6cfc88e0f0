"""Hosts for multi-host tests: network namespaces joined to the root
namespace by veth pairs, `dstfuse export` processes inside them, the client
(the test, `dstfuse mount`) in the root namespace::

    from .hosts import hosts

    with hosts(2, tmp_path) as (first, second):
        node = first.export(tmp_path / "disk.img")       # dstfuse export in `first`
        node.address                                     # "10.213.N.2:1025"
        second.export(tmp_path / "other.img", ipv6=True).address   # "[fd00:213:0:M::2]:1025"
        with first.link_down():                          # the cable is out
            ...

Each host gets one /24 and one /64 of its own, that exist only on its veth
pair: `10.213.N.0/24` and `fd00:213:0:N::/64` (root side `.1`/`::1`, host
side `.2`/`::2`), N chosen free under a lock file so parallel runs never
share a prefix. Namespace and interface names carry the pid and a counter,
so they are unique per run. Only these addresses are ever used.

Guarantees:

- before any link can go down, every namespace involved (the root one
  included) has an `unreachable` route for each host's prefixes, at a metric
  above the connected route's: with the link down, a packet for a host
  fails at once ("no route to host") instead of leaving through the default
  route; `link_down()` checks that the routes are there;
- IPv6 addresses are added without duplicate address detection and kept on
  link down, so a link that comes back up is usable at once;
- on exit, whatever happened: the exports are stopped (SIGTERM, then
  SIGKILL), the veth pairs, the unreachable routes and
  the namespaces deleted.

`require_netns()` skips the test with the reason when namespaces cannot be
made here (not root, no `ip`, no permission).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .mounts import (
    COMMAND_TIMEOUT,
    DSTFUSE,
    START_TIMEOUT,
    Export,
    SetupFailed,
    dstfuse_env,
    stop_pid,
    tail,
)

#: The lock that makes choosing a prefix and configuring it atomic across
#: parallel test runs.
LOCK_FILE = "/run/lock/dstfuse-test-hosts.lock"
#: The unreachable routes' metric; connected routes have a lower one.
UNREACHABLE_METRIC = 4000
EXPORT_PORT = 1025

_runs = itertools.count(1)


def require_netns() -> None:
    """Skip the test unless network namespaces and veth pairs can be made."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("multi-host tests need iproute2's `ip`")
    probe = f"dstprobe{os.getpid()}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"network namespaces are not available here: {made.stderr.strip()}")
    _ip("netns", "del", probe)


def _run(command: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _ip(*args: str, namespace: str | None = None, check: bool = True):
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    return _run([*prefix, "ip", *args], check=check)


def _sysctl(setting: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    _run([*prefix, "sysctl", "-qw", setting])


@dataclass
class Host:
    """One namespace `namespace`, joined to the root namespace by the veth
    pair `root_link` (root side) / `link` (inside)."""

    number: int
    namespace: str
    root_link: str
    link: str
    ipv4: ipaddress.IPv4Network
    ipv6: ipaddress.IPv6Network
    directory: Path
    exports: list[Export] = field(default_factory=list)
    #: (namespace or None for the root one, prefix) of every unreachable route
    unreachable: list[tuple[str | None, str]] = field(default_factory=list)

    @property
    def address4(self) -> str:
        """The host's own IPv4 address (inside the namespace)."""
        return str(self.ipv4.network_address + 2)

    @property
    def address6(self) -> str:
        return str(self.ipv6.network_address + 2)

    @property
    def root_address4(self) -> str:
        """The root namespace's address on this host's link (the client's)."""
        return str(self.ipv4.network_address + 1)

    @property
    def root_address6(self) -> str:
        return str(self.ipv6.network_address + 1)

    def export(
        self, path: Path, *, ipv6: bool = False, args: Sequence[str] = (),
        timeout: float = START_TIMEOUT, env: Mapping[str, str] | None = None,
    ) -> Export:
        """Start `dstfuse export PATH` in this host, listening on its IPv4
        (or IPv6) address and allowing read-write only to the root side of
        its link. Stopped when `hosts()` ends (or by `stop()`).

        Only the network namespace is entered (`nsenter --net`), not `ip
        netns exec`'s private mount namespace: that one holds a copy of
        every mount the test has made so far (the FUSE mount, ext4 on a
        loop device), and as the root mount is not shared, an unmount in
        the root namespace leaves the copy, so the loop device stays busy
        and the FUSE file open for as long as the export runs."""
        if ipv6:
            listen = f"[{self.address6}]:{EXPORT_PORT}"
            allow = f"{self.root_address6}/128=rw"
        else:
            listen = f"{self.address4}:{EXPORT_PORT}"
            allow = f"{self.root_address4}/32=rw"
        log = self.directory / f"export-{self.namespace}-{Path(path).name}.log"
        seen = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [
                    "nsenter", f"--net=/run/netns/{self.namespace}",
                    *DSTFUSE, "export", str(path), "--listen", listen, "--allow", allow, *args,
                ],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=dstfuse_env(env),
            )  # fmt: skip
        export = Export(listen, process, log)
        self.exports.append(export)
        deadline = time.monotonic() + timeout
        while f"listening on {listen}" not in log.read_bytes()[seen:].decode(errors="replace"):
            if process.poll() is not None:
                raise SetupFailed(f"dstfuse export exited {process.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise SetupFailed(f"dstfuse export not listening within {timeout} s:\n{tail(log)}")
            time.sleep(0.05)
        return export

    def stop(self, export: Export) -> None:
        if export.process.poll() is None:
            export.process.terminate()
        stop_pid(export.process.pid, export.process)

    @contextlib.contextmanager
    def link_down(self) -> Iterator[None]:
        """The host's link is down (both ends lose carrier) for the block,
        up again after, whatever happened."""
        self.set_link(up=False)
        try:
            yield
        finally:
            self.set_link(up=True)

    def set_link(self, *, up: bool) -> None:
        if not up:
            self._check_unreachable_routes()
        _ip("link", "set", "dev", self.root_link, "up" if up else "down")

    def _check_unreachable_routes(self) -> None:
        for namespace, prefix in self.unreachable:
            family = "-6" if ":" in prefix else "-4"
            routes = json.loads(
                _ip("-j", family, "route", "show", "type", "unreachable", namespace=namespace)
                .stdout or "[]"
            )
            if not any(route.get("dst") == prefix for route in routes):
                raise AssertionError(
                    f"no unreachable route for {prefix} in {namespace or 'the root namespace'}: "
                    "refusing to take a link down"
                )


def _free_number(taken_v4: set[ipaddress.IPv4Network]) -> int:
    for number in range(1, 255):
        if ipaddress.ip_network(f"10.213.{number}.0/24") not in taken_v4:
            return number
    raise SetupFailed("no free 10.213.N.0/24 prefix for a test host")


def _prefixes_in_use() -> set[ipaddress.IPv4Network]:
    """Every 10.213.N.0/24 that a route in the root namespace already covers
    (another run's host, or anything else that uses it)."""
    taken = set()
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst.startswith("10.213."):
            with contextlib.suppress(ValueError):
                taken.add(ipaddress.ip_network(dst, strict=False).supernet(new_prefix=24))
    return taken


def _add_unreachable(host: Host, namespace: str | None, prefix: str) -> None:
    family = "-6" if ":" in prefix else "-4"
    _ip(family, "route", "add", "unreachable", prefix, "metric", str(UNREACHABLE_METRIC),
        namespace=namespace)  # fmt: skip
    host.unreachable.append((namespace, prefix))


def _build(host: Host) -> None:
    """Create the namespace and the veth pair of `host` and address them."""
    _ip("netns", "add", host.namespace)
    _ip("link", "add", host.root_link, "type", "veth", "peer", "name", host.link)
    _ip("link", "set", "dev", host.link, "netns", host.namespace)
    for namespace, link in ((None, host.root_link), (host.namespace, host.link)):
        _sysctl(f"net.ipv6.conf.{link}.keep_addr_on_down=1", namespace)
    _ip("addr", "add", f"{host.root_address4}/24", "dev", host.root_link)
    _ip("-6", "addr", "add", f"{host.root_address6}/64", "dev", host.root_link, "nodad")
    _ip("addr", "add", f"{host.address4}/24", "dev", host.link, namespace=host.namespace)
    _ip("-6", "addr", "add", f"{host.address6}/64", "dev", host.link, "nodad",
        namespace=host.namespace)  # fmt: skip
    for prefix in (str(host.ipv4), str(host.ipv6)):
        _add_unreachable(host, None, prefix)
        _add_unreachable(host, host.namespace, prefix)
    _ip("link", "set", "dev", "lo", "up", namespace=host.namespace)
    _ip("link", "set", "dev", host.link, "up", namespace=host.namespace)
    _ip("link", "set", "dev", host.root_link, "up")


def _tear_down(host: Host) -> None:
    """Stop the host's exports, delete its routes, link and namespace;
    never raises (the rest of the cleanup must run)."""
    for export in host.exports:
        with contextlib.suppress(Exception):
            host.stop(export)
    for namespace, prefix in host.unreachable:
        if namespace is None:  # the namespace's own go with it
            family = "-6" if ":" in prefix else "-4"
            _ip(family, "route", "del", "unreachable", prefix, "metric",
                str(UNREACHABLE_METRIC), check=False)  # fmt: skip
    _ip("link", "del", "dev", host.root_link, check=False)  # deletes the pair
    _ip("netns", "del", host.namespace, check=False)


@contextlib.contextmanager
def hosts(count: int, directory: Path) -> Iterator[list[Host]]:
    """`count` (1-3) hosts for the block; logs go to `directory`."""
    require_netns()
    assert 1 <= count <= 3
    run = next(_runs)
    tag = f"{os.getpid()}-{run}"
    made: list[Host] = []
    try:
        os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
        with open(LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = _prefixes_in_use()
            for index in range(1, count + 1):
                number = _free_number(taken)
                taken.add(ipaddress.ip_network(f"10.213.{number}.0/24"))
                host = Host(
                    number=number,
                    namespace=f"dsth{tag}n{index}",
                    root_link=f"dr{tag}n{index}",
                    link=f"dh{tag}n{index}",
                    ipv4=ipaddress.IPv4Network(f"10.213.{number}.0/24"),
                    ipv6=ipaddress.IPv6Network(f"fd00:213:0:{number:x}::/64"),
                    directory=directory,
                )
                made.append(host)
                _build(host)
        yield made
    finally:
        for host in reversed(made):
            _tear_down(host)


def namespaces_and_links_of_this_run() -> list[str]:
    """Names of namespaces and root-side links this process made that still
    exist (for the fixture's own test)."""
    tag = f"{os.getpid()}-"
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line]
    links = [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]
    return [name for name in [*names, *links] if name.startswith((f"dsth{tag}", f"dr{tag}"))]


__all__ = ["Host", "hosts", "namespaces_and_links_of_this_run", "require_netns"]

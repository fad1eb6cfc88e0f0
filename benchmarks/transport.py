"""The socket fast path alone: a client `Session` (or, `--layer storage`, a
`Storage` over one `RemoteNode`; `--layer mirror`, a mirror of two;
`--layer mirror-instant-leg`, the same with leg 1's writes answered at
once) against export nodes.

An export node (`python -m dstfuse export`, its own process) serves a
sparse file on 127.0.0.1; this process runs one client `Session` over TCP
loopback and keeps QD requests in flight per job, no FUSE and no
RemoteNode above it. Per job it prints microseconds per request (wall
time) and CPU per request of each process (this one: the client side;
the node from /proc/PID/stat).

A/B: `--ab TREE_A TREE_B` runs the benchmark once per tree per round, the
trees taking turns (who goes first alternates), each in a fresh process
with PYTHONPATH at that tree, and prints each job's median and range over
the rounds and B/A ratios (DESIGN.md section 9: quote ratios measured
back to back; the machine may be shared, so read the ranges).

    python benchmarks/transport.py [--requests-scale 1.0]
    python benchmarks/transport.py --ab /work/main . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MiB = 1 << 20
SIZE = 1 << 30
#: name -> (command, block size, queue depth, requests)
JOBS = {
    "write 4K QD1": ("WRITE", 4096, 1, 4000),
    "read 4K QD1": ("READ", 4096, 1, 4000),
    "write 4K QD32": ("WRITE", 4096, 32, 20000),
    "read 4K QD32": ("READ", 4096, 32, 20000),
    "write 1M QD4": ("WRITE", MiB, 4, 1500),
    "read 1M QD4": ("READ", MiB, 4, 1500),
}


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _offsets(index: int, block: int, left: list[int], size: int = SIZE) -> Iterator[int]:
    """Worker `index`'s pseudo-random block offsets below `size`, one per
    request the job has `left` (shared by its workers, counted down here)."""
    position = index * 7919
    slots = size // block
    while left[0] > 0:
        left[0] -= 1
        position = (position * 1103515245 + 12345) % slots
        yield position * block


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_node(disk: Path, port: int) -> subprocess.Popen[bytes]:
    node = subprocess.Popen(
        [sys.executable, "-m", "dstfuse", "export", str(disk), "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return node
        except OSError:
            if node.poll() is not None:
                raise SystemExit("the export node exited at start") from None
            time.sleep(0.05)
    node.kill()
    raise SystemExit("the export node did not listen within 20 s")


async def _run_jobs(
    ports: list[int], node_pids: list[int], scale: float, layer: str
) -> dict[str, dict[str, float]]:
    if layer != "session":
        return await _run_storage_jobs(
            ports, node_pids, scale, instant_leg=layer == "mirror-instant-leg"
        )
    [port], [node_pid] = ports, node_pids
    import trio

    from dstfuse.address import parse_address
    from dstfuse.allocator import keep_io_buffers
    from dstfuse.nodes.session import Session
    from dstfuse.nodes.transactions import Transaction
    from dstfuse.protocol import Command

    keep_io_buffers()  # as the mount daemon does
    session = await Session.establish(
        "bench",
        parse_address(f"127.0.0.1:{port}"),
        export=None,
        key=None,
        modes=["xxh3-128"],
        client_id=os.urandom(16),
        client_name="benchmarks/transport.py",
        number=1,
    )
    waiting: dict[int, Transaction] = {}

    def on_reply(reply: object) -> None:
        txn = waiting.pop(reply.handle)  # type: ignore[attr-defined]
        txn.finish(reply)  # type: ignore[arg-type]

    results: dict[str, dict[str, float]] = {}
    handles = iter(range(1, 1 << 62))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: session.run(on_reply, keepalive=600.0))
        for name, (command_name, block, depth, count) in JOBS.items():
            command = Command[command_name]
            count = max(depth * 4, int(count * scale))
            payload = os.urandom(block) if command is Command.WRITE else b""
            left = [count]

            async def worker(
                index: int, command: Command, block: int, payload: bytes, left: list[int]
            ) -> None:
                for offset in _offsets(index, block, left):
                    txn = Transaction(command, next(handles), offset, block, data=payload)
                    waiting[txn.handle] = txn
                    session.transmit(txn)
                    await txn.wait_done()
                    assert txn.reply is not None and txn.reply.status == 0

            cpu, node_cpu, start = time.process_time(), _cpu_of(node_pid), time.perf_counter()
            async with trio.open_nursery() as workers:
                for index in range(depth):
                    workers.start_soon(worker, index, command, block, payload, left)
            wall = time.perf_counter() - start
            results[name] = {
                "us_per_request": wall / count * 1e6,
                "client_cpu_us": (time.process_time() - cpu) / count * 1e6,
                "node_cpu_us": (_cpu_of(node_pid) - node_cpu) / count * 1e6,
            }
        nursery.cancel_scope.cancel()
    return results


async def _run_storage_jobs(
    ports: list[int], node_pids: list[int], scale: float, *, instant_leg: bool = False
) -> dict[str, dict[str, float]]:
    """The jobs through a `Storage` as `dstfuse mount` assembles it (linear
    over one remote node, or a mirror over several taken as clean; default
    options otherwise), without FUSE above it. The node CPU is the nodes'
    sum. `instant_leg`: the mirror's leg 1 answers every write at once
    without sending it, so the difference to a plain mirror is what the
    second leg costs; only the write jobs run (leg 1 does not hold the
    data a read would check)."""
    import trio

    from dstfuse.allocator import keep_io_buffers
    from dstfuse.assembly import open_assembly
    from dstfuse.config import load_mount_config

    keep_io_buffers()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config_file:
        algorithm = "mirror" if len(ports) > 1 else "linear"
        config_file.write(
            f"storages:\n  bench:\n    algorithm: {algorithm}\n    nodes:\n"
            + "".join(f"      - remote: 127.0.0.1:{port}\n" for port in ports)
        )
        config_file.flush()
        config = load_mount_config(config_file.name)
    options: dict[str, str | bool] = {"assume_clean": True} if len(ports) > 1 else {}

    def node_cpu() -> float:
        return sum(_cpu_of(pid) for pid in node_pids)

    results: dict[str, dict[str, float]] = {}
    async with open_assembly(config, mount_options=options) as assembly:
        storage = assembly.storages["bench"]
        if instant_leg:
            _answer_writes_at_once(storage.algorithm.legs[1].node)  # type: ignore[attr-defined]
        for name, (command_name, block, depth, count) in JOBS.items():
            if instant_leg and command_name != "WRITE":
                continue
            count = max(depth * 4, int(count * scale))
            writing = command_name == "WRITE"
            payload = os.urandom(block)
            left = [count]

            async def worker(
                index: int, block: int, writing: bool, payload: bytes, left: list[int]
            ) -> None:
                for offset in _offsets(index, block, left, storage.size):
                    if writing:
                        await storage.write(offset, payload)
                    else:
                        await storage.read(offset, block)

            cpu, node_start, start = time.process_time(), node_cpu(), time.perf_counter()
            async with trio.open_nursery() as workers:
                for index in range(depth):
                    workers.start_soon(worker, index, block, writing, payload, left)
            wall = time.perf_counter() - start
            results[name] = {
                "us_per_request": wall / count * 1e6,
                "client_cpu_us": (time.process_time() - cpu) / count * 1e6,
                "node_cpu_us": (node_cpu() - node_start) / count * 1e6,
            }
            await storage.flush()
    return results


def _answer_writes_at_once(node: object) -> None:
    """Make `node` (a mirror leg's) take every write at once, sending
    nothing: as if it answered in no time."""
    from dstfuse.nodes.base import StartedWrite

    class Answered(StartedWrite):
        on_done = None
        done = True
        succeeded = True
        settles_at_once = True

        async def settle(self) -> None:
            return None

    async def write(offset: int, data: object, *, fua: bool = False) -> None:
        return None

    node.begin_write = lambda offset, data, *, fua=False: Answered()  # type: ignore[attr-defined]
    node.write = write  # type: ignore[attr-defined]


def measure(scale: float, directory: str, layer: str) -> dict[str, dict[str, float]]:
    """One pass over every job against fresh export nodes (two for the
    mirror layer, one otherwise)."""
    import trio

    nodes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        try:
            for leg in range(2 if layer.startswith("mirror") else 1):
                disk = Path(tmp) / f"disk{leg}.img"
                with disk.open("wb") as f:
                    f.truncate(SIZE)
                ports.append(_free_port())
                nodes.append(_start_node(disk, ports[-1]))
            return trio.run(_run_jobs, ports, [node.pid for node in nodes], scale, layer)
        finally:
            for node in nodes:
                node.terminate()
                try:
                    node.wait(10)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()


def _one_round(
    tree: str, scale: float, directory: str, layer: str
) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    out = subprocess.run(
        [
            sys.executable, __file__, "--json", "--requests-scale", str(scale),
            "--dir", directory, "--layer", layer,
        ],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    )
    return json.loads(out.stdout)


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def ab(trees: list[str], rounds: int, scale: float, directory: str, layer: str) -> None:
    runs: dict[str, list[dict[str, dict[str, float]]]] = {tree: [] for tree in trees}
    for index in range(rounds):
        order = trees if index % 2 == 0 else trees[::-1]
        for tree in order:
            runs[tree].append(_one_round(tree, scale, directory, layer))
        print(f"round {index + 1}/{rounds} done", file=sys.stderr)
    a, b = trees
    print(f"A = {a}\nB = {b}\nmedian (range) over {rounds} rounds, interleaved\n")
    for metric, label in (
        ("us_per_request", "us per request (wall)"),
        ("client_cpu_us", "client CPU us per request"),
        ("node_cpu_us", "node CPU us per request"),
    ):
        print(f"{label:28} {'A':>24} {'B':>24}   B/A per round")
        for job in (job for job in JOBS if job in runs[a][0]):
            va = [r[job][metric] for r in runs[a]]
            vb = [r[job][metric] for r in runs[b]]
            ratios = sorted(y / x for x, y in zip(va, vb, strict=True))
            print(
                f"  {job:26} {_summary(va):>24} {_summary(vb):>24}   "
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ab", nargs=2, metavar="TREE", help="compare two source trees")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-scale", type=float, default=1.0)
    parser.add_argument("--dir", default="/var/tmp", help="where the sparse backing file goes")
    parser.add_argument("--json", action="store_true", help="one pass, JSON on stdout")
    parser.add_argument(
        "--layer",
        choices=("session", "storage", "mirror", "mirror-instant-leg"),
        default="session",
        help="what the jobs drive: a bare client Session, a Storage as a mount builds it "
        "(linear over one node), a mirror of two nodes, or one whose leg 1 answers "
        "writes at once (write jobs only)",
    )
    args = parser.parse_args()
    if args.ab:
        ab(args.ab, args.rounds, args.requests_scale, args.dir, args.layer)
        return
    results = measure(args.requests_scale, args.dir, args.layer)
    if args.json:
        json.dump(results, sys.stdout)
        return
    for job, figures in results.items():
        print(
            f"{job:16} {figures['us_per_request']:8.1f} us/request   client CPU "
            f"{figures['client_cpu_us']:6.1f} us   node CPU {figures['node_cpu_us']:6.1f} us"
        )


if __name__ == "__main__":
    main()

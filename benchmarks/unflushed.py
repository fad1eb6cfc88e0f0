"""What keeping unflushed writes for replay costs (docs/operations.md).

One RemoteNode against an in-process export node over TCP loopback, no
FUSE: the part of a request's path that `unflushed_limit` changes (a copy
of each acknowledged write, a FLUSH when the limit is reached). Settings
are run interleaved, `--repeat` rounds, and the ratio to `unflushed_limit:
0` printed per job (DESIGN.md section 9: quote ratios, not absolute times).

    python benchmarks/unflushed.py [--seconds 3] [--repeat 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path

import trio

from dstfuse.address import parse_address
from dstfuse.config import Timeouts, Unflushed
from dstfuse.export.backend import Backend
from dstfuse.export.served import ServedExport
from dstfuse.export.server import ExportServer
from dstfuse.nodes.remote import RemoteNode

MiB = 1 << 20
SIZE = 256 * MiB
#: name -> (block size, queue depth)
JOBS = {"seq-write 1M QD4": (MiB, 4), "rand-write 4K QD32": (4096, 32)}
SETTINGS = {
    "0 (off)": Unflushed(limit=0),
    "8M flush": Unflushed(limit=8 * MiB, policy="flush"),
    "64M flush": Unflushed(limit=64 * MiB, policy="flush"),
    "256M flush": Unflushed(limit=256 * MiB, policy="flush"),
    "64M drop": Unflushed(limit=64 * MiB, policy="drop"),
}


async def one_run(
    disk: Path, unflushed: Unflushed, block: int, depth: int, seconds: float
) -> float:
    """Bytes per second written by `depth` writers for `seconds`."""
    export = ServedExport("disk", Backend(disk))
    server = ExportServer([export], [("127.0.0.1", 0)], key=None)
    written = 0
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.serve)
        node = RemoteNode(
            parse_address(f"127.0.0.1:{address.port}"), export=None, timeouts=Timeouts(),
            key=None, unflushed=unflushed,
        )
        await node.start(nursery)
        data = os.urandom(block)
        sequential = block >= MiB

        async def writer(index: int) -> None:
            nonlocal written
            rng = random.Random(index)
            position = index * block
            while True:
                if sequential:
                    offset, position = position, (position + depth * block) % SIZE
                else:
                    offset = rng.randrange(SIZE // block) * block
                await node.write(offset, data)
                written += block

        start = trio.current_time()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as writers:
                for index in range(depth):
                    writers.start_soon(writer, index)
        elapsed = trio.current_time() - start
        await node.flush()
        await node.aclose()
        nursery.cancel_scope.cancel()
    return written / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="dstfuse-unflushed-") as directory:
        disk = Path(directory) / "disk.img"
        with open(disk, "wb") as file:
            file.truncate(SIZE)
        for job, (block, depth) in JOBS.items():
            results: dict[str, list[float]] = {name: [] for name in SETTINGS}
            names = list(SETTINGS)
            for round_number in range(args.repeat):
                # a different setting goes first each round: no order bias
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:
                    unflushed = SETTINGS[name]
                    results[name].append(
                        trio.run(one_run, disk, unflushed, block, depth, args.seconds)
                    )
            base = statistics.median(results["0 (off)"])
            print(job)
            for name, values in results.items():
                ratio = statistics.median(values) / base
                spread = (max(values) - min(values)) / base
                print(f"  unflushed_limit {name:11} {ratio:5.2f}x of off (spread {spread:.2f})")


if __name__ == "__main__":
    main()

"""What the mirror's durable metadata costs per data write, counted.

Wall-clock figures on a shared two-core machine are noise; the counts are
not. This runs the real mirror (`dstfuse/mirror/`) over two in-memory legs
on trio's MockClock (each request takes a simulated 100 us, a FUA write or a
FLUSH 2 ms: the export node's fdatasync) and reports, per data write and per
leg, the bitmap block writes, check page writes and reads, header writes,
FUA writes and FLUSHes, plus the mirror's own CPU per request (process time
over the same workload without the simulated latency).

    PYTHONPATH=$PWD python benchmarks/mirror_metadata.py [--seconds 20]

Jobs: random 4 KiB writes at QD1 and QD32 over a storage the check cache
covers (1 GiB), the same at QD32 over one it does not (64 GiB with a 256
page cache), and sequential 1 MiB writes at QD4 (the benchmark's fio jobs).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dstfuse.mirror.algorithm import Mirror  # noqa: E402
from tests.test_mirror_nodes import MemoryNode  # noqa: E402

KiB, MiB, GiB = 1024, 1 << 20, 1 << 30


class SparseNode(MemoryNode):
    """A MemoryNode that keeps only the 4 KiB blocks written (legs of tens
    of GiB) and, with `latency`, takes simulated time per request."""

    def __init__(self, name: str, size: int, latency: bool) -> None:
        super().__init__(name, 0)
        self._size = size
        self.blocks: dict[int, bytes] = {}
        self.latency = latency

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        self.size = self._size

    async def _request(self, op: str, offset: int, length: int, fua: bool = False) -> None:
        self.ops.append((op, offset, length, fua))
        if self.latency:
            await trio.sleep(2e-3 if fua or op == "flush" else 1e-4)
        else:
            await trio.lowlevel.checkpoint()

    async def read(self, offset: int, length: int) -> bytes:
        await self._request("read", offset, length)
        return b"".join(
            self.blocks.get(block, bytes(4096))
            for block in range(offset // 4096, (offset + length) // 4096)
        )

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        await self._request("write", offset, len(data), fua)
        view = memoryview(data)
        for at in range(0, len(view), 4096):
            self.blocks[(offset + at) // 4096] = bytes(view[at : at + 4096])

    async def _forget(self, op: str, offset: int, length: int, fua: bool = False) -> None:
        await self._request(op, offset, length, fua)
        for block in range(offset // 4096, (offset + length) // 4096):
            self.blocks.pop(block, None)

    async def trim(self, offset: int, length: int) -> None:
        await self._forget("trim", offset, length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._forget("write_zeroes", offset, length, fua)


def classify(mirror: Mirror, leg, op: tuple) -> str:
    kind, offset, _length, _fua = op
    layout = leg.layout
    if kind == "flush":
        return "flush"
    if offset < mirror.size:
        return f"data {kind}"
    if offset < layout.bitmap_offset:
        return f"check {kind}"
    if offset < layout.slot_offsets[0]:
        return f"bitmap {kind}"
    return f"header {kind}"


async def run_job(
    job: str, size: int, cache_pages: int, seconds: float, latency: bool, limit: int
):
    nodes = [SparseNode(f"leg{i}", size, latency) for i in range(2)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await node.start(nursery)
        mirror = Mirror(
            "bench",
            [(node, None) for node in nodes],
            {"assume_clean": True, "client_name": "bench:1", "client_id": os.urandom(16),
             "check_cache_pages": cache_pages},
        )
        await mirror.start(nursery)
        for node in nodes:
            node.ops.clear()
        rng = random.Random(7)
        blocks = mirror.size // 4096
        writes = 0
        deadline = trio.current_time() + seconds
        cpu = time.process_time()

        async def worker(stream: int, depth: int) -> None:
            nonlocal writes
            span = mirror.size // depth // MiB * MiB
            position = stream * span
            while trio.current_time() < deadline and writes < limit:
                if job.startswith("seq"):
                    await mirror.write(position, bytes(MiB))
                    position = (position + MiB) % (span * depth)
                else:
                    await mirror.write(rng.randrange(blocks) * 4096, bytes(4096))
                writes += 1

        depth = {"rand-write-qd1": 1, "seq-write": 4}.get(job.split("@")[0], 32)
        async with trio.open_nursery() as workers:
            for stream in range(depth):
                workers.start_soon(worker, stream, depth)
        cpu = time.process_time() - cpu
        counts = []
        for leg, node in zip(mirror.legs, nodes, strict=True):
            tally: dict[str, int] = {}
            for op in node.ops:
                key = classify(mirror, leg, op)
                tally[key] = tally.get(key, 0) + 1
                if op[3]:
                    tally["fua"] = tally.get("fua", 0) + 1
            counts.append(tally)
        await mirror.aclose()
        nursery.cancel_scope.cancel()
    return writes, counts, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per job")
    parser.add_argument(
        "--writes", type=int, default=20000, help="at most this many writes per job"
    )
    args = parser.parse_args()
    jobs = [
        ("rand-write-qd1", GiB, 4096),
        ("rand-write-qd32", GiB, 4096),
        ("rand-write-qd32@64GiB", 64 * GiB, 256),
        ("seq-write", GiB, 4096),
    ]
    keys = ["bitmap write", "check write", "check read", "header write", "fua", "flush"]
    print(f"{'job':24} {'writes':>7} " + " ".join(f"{k:>13}" for k in keys) + "   cpu/req")
    for job, size, cache in jobs:
        writes, counts, _ = trio.run(
            run_job, job, size, cache, args.seconds, True, args.writes,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
        plain, _, cpu = trio.run(run_job, job, size, cache, 1e9, False, 4000,
                                 clock=trio.testing.MockClock(autojump_threshold=0))
        leg0 = counts[0]
        per = [leg0.get(key, 0) / writes for key in keys]
        print(f"{job:24} {writes:7d} " + " ".join(f"{value:13.4f}" for value in per)
              + f"   {cpu / max(plain, 1) * 1e6:6.0f} us")


if __name__ == "__main__":
    main()

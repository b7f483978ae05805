#!/usr/bin/env python3
"""What waiting for the usage record's commit adds to an answered inference request.

    .venv/bin/python bench/usage_commit.py [--requests 2000] [--batches 50] [--concurrency 64]

The app sends an answer's last byte only once its usage record is committed
(`StoreWorker.record_committed`): this measures that round trip alone, on the real store
(SQLite, WAL, synchronous=NORMAL, in a temporary directory) and the real writer thread, under
uvloop as the server runs: one record at a time (what a request at c=1 waits for), and
`--concurrency` records at once (they share one transaction and one loop wake-up).
A lone request whose writer is idle commits on the event loop instead (`commit_now`): the two
are timed in alternating blocks of 100 records (`--gap-ms` asleep before each record, as the
idle gap between requests at c=1).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import uvloop

from ferroserve.gateway.store import Store
from ferroserve.gateway.worker import StoreWorker


def row(i: int) -> tuple:
    return (f"bench-{i}", time.time(), None, "bench", "/v1/embeddings", "m", "local", 0, 5, 0, 0, 0.0, 1.0, None, 200,
            None, None, None)


async def main(args: argparse.Namespace) -> None:
    worker = StoreWorker(Store(tempfile.mkdtemp(prefix="usage-commit-")), on_external_change=lambda store: None)
    one = []
    for i in range(args.requests):
        started = time.perf_counter()
        await worker.record_committed(row(i))
        one.append(time.perf_counter() - started)
    queued, inline = [], []
    for block in range(args.requests // 100):
        for i in range(100):
            await asyncio.sleep(args.gap_ms / 1e3)
            started = time.perf_counter()
            if block % 2:
                assert worker.commit_now(row(2 * 10**7 + block * 100 + i))
                inline.append(time.perf_counter() - started)
            else:
                await worker.record_committed(row(2 * 10**7 + block * 100 + i))
                queued.append(time.perf_counter() - started)
    started = time.perf_counter()
    for b in range(args.batches):
        await asyncio.gather(*(worker.record_committed(row(10**7 + b * args.concurrency + j)) for j in range(args.concurrency)))
    per_batch = (time.perf_counter() - started) / args.batches
    worker.close()
    one.sort()
    print(f"one at a time ({args.requests}): median {statistics.median(one) * 1e6:.0f} µs, "
          f"p99 {one[int(len(one) * 0.99)] * 1e6:.0f} µs")
    for name, t in (("queued to the writer", queued), ("committed on the loop (commit_now)", inline)):
        t.sort()
        print(f"{name}, {args.gap_ms:g} ms gaps ({len(t)}): median {statistics.median(t) * 1e6:.0f} µs, "
              f"p99 {t[int(len(t) * 0.99)] * 1e6:.0f} µs")
    print(f"{args.concurrency} at once ({args.batches} batches): {per_batch * 1e3:.2f} ms per batch, "
          f"{per_batch / args.concurrency * 1e6:.1f} µs per record")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    uvloop.run(main(parser.parse_args()))

#!/usr/bin/env python3
"""Server memory at c=64 on a chat model (issue 14's target on the 1B model: worker RSS
<= weights + KV budget + 250 MB).

    .venv/bin/python bench/rss.py                                   # the 1B-shape Q4_K_M of bench/make_models.sh
    .venv/bin/python bench/rss.py --model PATH.gguf --concurrency 64 --max-tokens 128

Starts `ferroserve serve` with that one chat model (no embedding model, so the number is the
chat model's), then keeps `--concurrency` streaming requests in flight (distinct prompts,
greedy, `max_tokens` with `ignore_eos`, so every sequence holds KV to its end) for `--waves`
waves, sampling the granian worker's VmRSS every 100 ms. Reports the RSS idle (after one
warm-up request) and the peak under load against the budget: the GGUF's size (its weights)
plus the engine's KV budget (`FERROSERVE_KV_BUDGET_BYTES`, default as the server's) plus 250 MB.
Results go to bench/results/rss-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO))

from batch import worker_rss_mb  # noqa: E402
from ferroserve.config import Settings  # noqa: E402
from tests.conftest import free_port  # noqa: E402

DEFAULT_MODEL = BENCH_DIR / ".work" / "models" / "llama-1b-random-q4_k_m.gguf"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


async def one(client: httpx.AsyncClient, i: int, max_tokens: int) -> int:
    body = {"model": "chat", "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"[{i:04d}] Write a long story about a lighthouse keeper."}]}
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request {i}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return chunks


async def load(url: str, concurrency: int, waves: int, max_tokens: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        for wave in range(waves):
            t = time.monotonic()
            got = await asyncio.gather(*(one(client, wave * concurrency + i, max_tokens) for i in range(concurrency)))
            log(f"wave {wave}: {concurrency} streams, {sum(got)} chunks in {time.monotonic() - t:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--server-args", default="", help="extra `ferroserve serve` arguments")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.model.exists():
        log(f"{args.model} is missing: run `make bench-models` (bench/make_models.sh)")
        return 2
    # The server reads FERROSERVE_KV_BUDGET_BYTES from the environment it inherits from here.
    kv_budget = int(os.environ.get("FERROSERVE_KV_BUDGET_BYTES") or Settings().kv_budget_bytes)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(REPO / ".venv" / "bin" / "ferroserve"), "serve", "--insecure-no-auth", "--port", str(port),
           "--model", f"chat={args.model}", *args.server_args.split()]
    log("starting:", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samples: list[float] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/v1/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        asyncio.run(load(url, 1, 1, 8))  # warm-up: first request's allocations
        idle = worker_rss_mb(proc.pid)

        def sample() -> None:
            while not stop.is_set():
                samples.append(worker_rss_mb(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        asyncio.run(load(url, args.concurrency, args.waves, args.max_tokens))
        stop.set()
        sampler.join()
        weights_mb = args.model.stat().st_size / 2**20
        budget_mb = weights_mb + kv_budget / 2**20 + 250
        peak = max(samples)
        result = {"model": str(args.model), "concurrency": args.concurrency, "waves": args.waves,
                  "max_tokens": args.max_tokens, "idle_rss_mb": idle, "peak_rss_mb": peak,
                  "weights_mb": weights_mb, "kv_budget_mb": kv_budget / 2**20, "budget_mb": budget_mb,
                  "met": peak <= budget_mb, "cpus": os.cpu_count()}
        log(f"worker RSS idle {idle:.0f} MB, peak at c={args.concurrency} {peak:.0f} MB; budget = weights "
            f"{weights_mb:.0f} + KV {kv_budget / 2**20:.0f} + 250 = {budget_mb:.0f} MB: "
            f"{'met' if result['met'] else 'MISSED'} (headroom {budget_mb - peak:.0f} MB)")
        out = args.out or BENCH_DIR / "results" / f"rss-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        log(f"wrote {out}")
    finally:
        stop.set()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

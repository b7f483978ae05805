#!/usr/bin/env python3
"""One stream through the server against the engine's own decode step (bench/NOTES.md,
"Step token budget and the c=1 server path").

Alternates, over rounds: (A) `llama_bench` (its "1 sequence: decode step", in-process, no
HTTP; STREAMS=2 to keep its batch part short), and (B) our server at concurrency 1 with bench/chat.py's prompt, greedy,
128 tokens (ignore_eos), non-streaming then streaming. For B it reports tokens/s (128 over the
request's latency, as chat.py counts it), the same as ms per token, and the server process's CPU
per thread name from /proc over the requests (engine, rayon workers, the Python event loop,
granian's I/O threads), in ms per generated token.

    .venv/bin/python bench/c1_path.py --bench target/release/examples/llama_bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from chat import PROMPT, Server, _free_port, default_gguf  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed)."""
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        name = re.sub(r"\d+$", "", name)  # rayon-worker-0, -1 ... as one
        out[name] += (int(fields[11]) + int(fields[12])) / TICK
    return out


async def requests(url: str, n: int, stream: bool, first_n: int) -> list[float]:
    import httpx

    lat = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        for i in range(n):
            body = json.dumps({"model": "smollm2", "prompt": PROMPT.format(n=first_n + i), "max_tokens": 128,
                               "temperature": 0.0, "ignore_eos": True, "stream": stream}).encode()
            t0 = time.perf_counter()
            if stream:
                async with client.stream("POST", url, content=body,
                                         headers={"content-type": "application/json"}) as r:
                    async for _ in r.aiter_raw():
                        pass
            else:
                r = await client.post(url, content=body, headers={"content-type": "application/json"})
                assert r.json()["usage"]["completion_tokens"] == 128
            lat.append(time.perf_counter() - t0)
    return lat


def server_round(a, rnd: int) -> dict:
    port = _free_port()
    cmd = [a.python, "-m", "ferroserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(kv.split("=", 1) for kv in a.env)
    server = Server("ours", "ferroserve", cmd, f"http://127.0.0.1:{port}", "/v1/ready",
                    BENCH_DIR / ".work" / "c1-path.log", {}, env)
    server.start()
    res = {}
    try:
        asyncio.run(server.wait_ready(300))
        url = server.url + "/v1/completions"
        asyncio.run(requests(url, 2, False, 9000))
        # The worker is the process holding the engine: the server's child if granian forks.
        kids = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        pid = int(kids[0]) if kids else server.pid
        for stream in (False, True):
            c0 = thread_cpu(pid)
            lat = asyncio.run(requests(url, a.requests, stream, 1 + 1000 * rnd + (500 if stream else 0)))
            c1 = thread_cpu(pid)
            tokens = 128 * len(lat)
            per_thread = {k: round(1e3 * (c1[k] - c0.get(k, 0.0)) / tokens, 3) for k in c1
                          if c1[k] - c0.get(k, 0.0) > 0}
            med = statistics.median(lat)
            res["stream" if stream else "plain"] = {
                "tok_s": round(128 / med, 1), "ms_per_token": round(1e3 * med / 128, 3),
                "cpu_ms_per_token": per_thread,
            }
    finally:
        server.stop()
    return res


def bench_round(a) -> float:
    env = {**os.environ, "NUMERICS": "fast", "STREAMS": "2", "FLOOR": "0"}
    out = subprocess.run([a.bench, str(a.gguf), "3"], capture_output=True, text=True, env=env, check=True).stdout
    for line in out.splitlines():
        if line.startswith("1 sequence: decode step"):
            return float(line.split()[4])
    raise RuntimeError(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="llama_bench example binary")
    p.add_argument("--gguf", default=default_gguf())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    for rnd in range(a.rounds):
        step_ms = bench_round(a)
        print(json.dumps({"round": rnd, "llama_bench_step_ms": step_ms,
                          "llama_bench_tok_s": round(1e3 / step_ms, 1)}), flush=True)
        print(json.dumps({"round": rnd, **server_round(a, rnd)}), flush=True)
    print(json.dumps({"os_load": os.getloadavg()}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Time to first token against decode smoothness, per scheduler setting (bench/NOTES.md,
"Step token budget").

Starts our server once per setting (FERROSERVE_* environment given as `--setting`), alternating
settings over rounds (A B A B), and runs two streaming workloads on SmolLM2-135M Q4_1 with
bench/chat.py's distinct 41-token prompts, greedy, 128 tokens each (ignore_eos):

  burst    16 requests sent at once (three waves, one after the other): TTFT p50/p95, as
           chat.py's TTFT at c=16 measures it, and per wave how many steps the first tokens
           came in (groups of first-token arrivals more than 10 ms apart).
  single   8 streaming requests one after another (8 tokens each): TTFT p50/p95 at c=1.
  join     8 streams decoding, then 8 more arrive at once: TTFT of the 8 newcomers, and the
           gaps between tokens of the 8 running streams from the newcomers' arrival until the
           last newcomer's first token (what a running stream feels when prefill joins its
           steps), p50/p95/max.

    .venv/bin/python bench/ttft_budget.py --setting FERROSERVE_MAX_BATCH_TOKENS=512 \
        --setting FERROSERVE_MAX_BATCH_TOKENS=1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from chat import PROMPT, Server, _free_port, pct  # noqa: E402


def body(n: int, max_tokens: int) -> bytes:
    return json.dumps({
        "model": "smollm2", "prompt": PROMPT.format(n=n), "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True, "stream": True,
    }).encode()


async def stream(client, url: str, data: bytes) -> dict:
    """Sends one streaming completion; returns its start time and each text chunk's time."""
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, content=data,
                             headers={"content-type": "application/json"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            choices = json.loads(payload).get("choices") or []
            if choices and choices[0].get("text"):
                stamps.append(time.perf_counter())
    return {"t0": t0, "stamps": stamps}


async def burst(client, url: str, first_n: int, size: int, max_tokens: int,
                groups: list[int] | None = None) -> list[float]:
    results = await asyncio.gather(*(stream(client, url, body(first_n + i, max_tokens))
                                     for i in range(size)))
    if groups is not None:
        groups.append(first_token_groups([r["stamps"][0] for r in results]))
    return [r["stamps"][0] - r["t0"] for r in results]


def first_token_groups(times: list[float], gap_s: float = 0.010) -> int:
    """How many engine steps a burst's first tokens came from: tokens of one step reach the
    clients together (one drain), a step's prefill of even one prompt takes > 10 ms."""
    times = sorted(times)
    return 1 + sum(b - a > gap_s for a, b in zip(times, times[1:]))


async def join(client, url: str, first_n: int, running: int, joining: int,
               max_tokens: int) -> tuple[list[float], list[float]]:
    old = [asyncio.create_task(stream(client, url, body(first_n + i, max_tokens)))
           for i in range(running)]
    await asyncio.sleep(1.0)  # the running streams are past prefill and decoding
    new = await asyncio.gather(*(stream(client, url, body(first_n + running + i, 16))
                                 for i in range(joining)))
    old_done = await asyncio.gather(*old)
    t_join = min(r["t0"] for r in new)
    t_last_first = max(r["stamps"][0] for r in new)
    gaps = []
    for r in old_done:
        s = r["stamps"]
        gaps += [b - a for a, b in zip(s, s[1:]) if b >= t_join and a <= t_last_first]
    return [r["stamps"][0] - r["t0"] for r in new], gaps


async def session(url: str, n_base: int, with_join: bool = True) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:
        url += "/v1/completions"
        await burst(client, url, 9000, 4, 8)  # warm-up
        ttft, groups = [], []
        for wave in range(3):
            ttft += await burst(client, url, n_base + 100 * wave, 16, 128, groups)
        single = []
        for i in range(8):
            single += await burst(client, url, n_base + 300 + i, 1, 8)
        join_ttft, gaps = [], []
        for wave in range(2 if with_join else 0):
            t, g = await join(client, url, n_base + 500 + 100 * wave, 8, 8, 128)
            join_ttft += t
            gaps += g
    ms = lambda xs, q: round(pct(xs, q) * 1e3, 1)  # noqa: E731
    return {
        "burst16_ttft_ms": {"p50": ms(ttft, 50), "p95": ms(ttft, 95), "max": ms(ttft, 100)},
        "burst16_first_token_steps": groups,
        "single_ttft_ms": {"p50": ms(single, 50), "p95": ms(single, 95)},
        **({
            "join8_ttft_ms": {"p50": ms(join_ttft, 50), "p95": ms(join_ttft, 95)},
            "join8_running_gap_ms": {"p50": ms(gaps, 50), "p95": ms(gaps, 95), "max": ms(gaps, 100),
                                     "n": len(gaps)},
        } if with_join else {}),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", action="append", default=[], metavar="K=V[,K=V]",
                   help="server environment for one setting (repeat; empty string = defaults)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--no-join", action="store_true", help="only the bursts and the c=1 requests")
    a = p.parse_args()
    settings = a.setting or [""]
    out: dict[str, list] = {s: [] for s in settings}
    for rnd in range(a.rounds):
        for s in settings:
            env = dict(kv.split("=", 1) for kv in s.split(",") if kv)
            port = _free_port()
            cmd = [a.python, "-m", "ferroserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
            server = Server("ours", "ferroserve", cmd, f"http://127.0.0.1:{port}", "/v1/ready",
                            BENCH_DIR / ".work" / "ttft-budget.log", {}, env)
            server.start()
            try:
                asyncio.run(server.wait_ready(300))
                res = asyncio.run(session(server.url, 1 + 1000 * rnd, not a.no_join))
            finally:
                server.stop()
            print(json.dumps({"round": rnd, "setting": s or "defaults", **res}), flush=True)
            out[s].append(res)
    print(json.dumps({"os_load": os.getloadavg()}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where a streaming server's CPU goes: the HTTP layer's share at c=64 streaming chat.

    .venv/bin/python bench/stream_cpu.py                 # 64 streams x 128 tokens, 3 rounds
    .venv/bin/python bench/stream_cpu.py --streams 16 --rounds 1

Starts `ferroserve serve` (the bundled SmolLM2), then per round sends `--streams` concurrent
streaming chat completions (greedy, `max_tokens` with `ignore_eos`, so every stream carries
exactly that many tokens) and reads the server worker's per-thread CPU time from
/proc/PID/task/*/stat before and after. Threads are grouped by name: the Python thread that
runs the event loop (the HTTP layer, the gateway and every per-token step in Python), the
engine (`ferroserve-chat` and the compute pool it starts), granian's I/O threads, other.
Reported: CPU seconds per group, the Python thread's share of the server's CPU, and its
microseconds per streamed token — the number the per-token Python work shows up in.

The client (httpx, in this process) shares the machine's cores with the server: its CPU is
reported too, and the comparison that matters is the same command before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import httpx
from serving import start_server, stop_server

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def worker_pid(parent: int) -> int:
    """granian's worker process (the one serving), a child of the CLI's process."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return int(children[0]) if children else parent


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def group(name: str, tid: int, pid: int) -> str:
    if tid == pid:
        return "python (event loop)"
    if name.startswith("ferroserve-chat") or name.startswith("rayon") or name.startswith("ferroserve-pool"):
        return "engine"
    if name.startswith("tokio") or name.startswith("granian"):
        return "granian I/O"
    return f"other ({name})"


async def one_stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> int:
    body = {"model": "smollm2", "stream": True, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"[{i:04d}] Tell me about the sea."}]}
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    tokens += 1
    return tokens


async def round_(url: str, streams: int, max_tokens: int, offset: int) -> tuple[int, float]:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, url, offset + i, max_tokens) for i in range(streams)))
        return sum(counts), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve-args", default="", help="extra `ferroserve serve` arguments")
    args = ap.parse_args()

    proc, url, _ = start_server(["--insecure-no-auth", *args.serve_args.split()], name="stream-cpu", timeout_s=120)
    try:
        pid = worker_pid(proc.pid)
        asyncio.run(round_(url, 4, 16, 9000))  # warm-up
        print(f"# stream_cpu: {args.streams} streams x {args.max_tokens} tokens, {args.rounds} rounds; CPU: {cpu_model()}, "
              f"{os.cpu_count()} cores; serve args: {args.serve_args or '(default)'}")
        shares, per_token = [], []
        for r in range(args.rounds):
            before, client_before = thread_times(pid), time.process_time()
            tokens, seconds = asyncio.run(round_(url, args.streams, args.max_tokens, r * args.streams))
            after, client_cpu = thread_times(pid), time.process_time() - client_before
            groups: dict[str, float] = {}
            for tid, (name, t) in after.items():
                groups[group(name, tid, pid)] = groups.get(group(name, tid, pid), 0.0) + t - before.get(tid, (name, 0.0))[1]
            total = sum(groups.values())
            py = groups.get("python (event loop)", 0.0)
            shares.append(py / total)
            per_token.append(py / tokens * 1e6)
            detail = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))
            print(f"round {r + 1}: {tokens} tokens in {seconds:.2f}s ({tokens / seconds:.0f} tok/s); server CPU {total:.2f}s: "
                  f"{detail}; client CPU {client_cpu:.2f}s")
        print(f"python thread share of server CPU: median {statistics.median(shares) * 100:.1f}% "
              f"[{min(shares) * 100:.1f}-{max(shares) * 100:.1f}]; python us per streamed token: median "
              f"{statistics.median(per_token):.1f} [{min(per_token):.1f}-{max(per_token):.1f}]")
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()

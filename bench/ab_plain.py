#!/usr/bin/env python3
"""Two builds of our server, A/B, on non-streaming completions at one concurrency: tok/s and
the Python thread's CPU per generated token.

    PYTHONPATH=python:. .venv/bin/python bench/ab_plain.py --a /work/main/python --b python \\
        --model bench/.work/models/smollm2-135m-q4_k_m.gguf --concurrency 16 --rounds 3

Starts one `ferroserve serve` per tree (`--a` and `--b` are the directories put first on
PYTHONPATH; each holds its own `ferroserve/_core.abi3.so`), both up for the whole run, and
alternates measurements A B B A A B ... so that both see the same minutes of a shared machine
(an idle server costs nothing: its engine thread waits on its channel). A measurement is a closed
loop of `--concurrency` clients sending `--waves` x concurrency requests: bench/chat.py's
distinct 41-token prompts, greedy, `max_tokens` with `ignore_eos` (every answer is checked to
have exactly that many tokens). Per measurement: aggregate tok/s, and from /proc the server
worker's CPU: the Python thread (the event loop: HTTP, gateway, the engine's events),
and the whole process (every thread, those that exited included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from chat import PROMPT  # noqa: E402
from serving import start_server, stop_server  # noqa: E402
from stream_cpu import CLK_TCK, cpu_model, group, thread_times, worker_pid  # noqa: E402


async def closed_loop(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int, first: int) -> tuple[int, float]:
    bodies = [{"model": model, "prompt": PROMPT.format(n=first + i), "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True} for i in range(n_requests)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue = iter(bodies)

        async def worker() -> None:
            nonlocal tokens
            for body in queue:
                r = await client.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                got = r.json()["usage"]["completion_tokens"]
                if got != max_tokens:
                    raise SystemExit(f"an answer had {got} tokens, not {max_tokens}")
                tokens += got

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens, time.perf_counter() - t0


def process_cpu_s(pid: int) -> float:
    """The whole process's CPU time (threads that have exited included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(url: str, pid: int, a, first: int) -> dict:
    before, process_before = thread_times(pid), process_cpu_s(pid)
    tokens, seconds = asyncio.run(closed_loop(url, a.model_name, a.concurrency, a.waves * a.concurrency, a.max_tokens, first))
    after, process = thread_times(pid), process_cpu_s(pid) - process_before
    groups: dict[str, float] = {}
    for tid, (name, t) in after.items():
        g = group(name, tid, pid)
        groups[g] = groups.get(g, 0.0) + t - before.get(tid, (name, 0.0))[1]
    py = groups.get("python (event loop)", 0.0)
    # Threads that inherit the name `python`: granian's I/O threads and any pool started from Python.
    py_named = sum(t - before.get(tid, (name, 0.0))[1] for tid, (name, t) in after.items() if name == "python" and tid != pid)
    return {"other_python_named_us_per_token": py_named / tokens * 1e6,
            "tok_s": tokens / seconds, "py_us_per_token": py / tokens * 1e6, "py_cores": py / seconds,
            "process_us_per_token": process / tokens * 1e6, "process_cores": process / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="tree A's python directory (put first on PYTHONPATH)")
    ap.add_argument("--b", required=True, help="tree B's python directory")
    ap.add_argument("--model", required=True, help="GGUF served by both (as `--model NAME=PATH`, NAME its stem)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--waves", type=int, default=4, help="requests per measurement = waves x concurrency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="each round measures A and B once (order ABBA...)")
    ap.add_argument("--serve-args", default="", help="extra `ferroserve serve` arguments for both")
    a = ap.parse_args()
    a.model_name = Path(a.model).stem

    servers = {}
    try:
        for label, tree in (("A", a.a), ("B", a.b)):
            env = {"PYTHONPATH": f"{Path(tree).resolve()}:{BENCH.parent}"}
            proc, url, log = start_server(["--insecure-no-auth", "--model", f"{a.model_name}={Path(a.model).resolve()}",
                                           *a.serve_args.split()], name=f"ab-{label}", env=env, timeout_s=180)
            servers[label] = (proc, url, worker_pid(proc.pid))
            asyncio.run(closed_loop(url, a.model_name, a.concurrency, a.concurrency, 16, 9000))  # warm-up
            print(f"# {label}: {tree} (log {log})", flush=True)
        print(f"# ab_plain: c={a.concurrency}, {a.waves * a.concurrency} requests x {a.max_tokens} tokens per measurement, "
              f"{a.rounds} rounds; model {a.model}; CPU: {cpu_model()}, {os.cpu_count()} cores", flush=True)
        results: dict[str, list[dict]] = {"A": [], "B": []}
        first = 1
        for r in range(a.rounds):
            for label in ("AB" if r % 2 == 0 else "BA"):
                _, url, pid = servers[label]
                m = measure(url, pid, a, first)
                first += a.waves * a.concurrency
                results[label].append(m)
                print(f"round {r} {label}: {m['tok_s']:7.1f} tok/s; python thread {m['py_us_per_token']:5.1f} us/token "
                      f"({m['py_cores']:.3f} core); other `python` threads {m['other_python_named_us_per_token']:5.1f} us/token; whole server {m['process_us_per_token']:6.1f} us/token "
                      f"({m['process_cores']:.2f} cores)", flush=True)
        for label in ("A", "B"):
            ms = results[label]
            tok = [m["tok_s"] for m in ms]
            py = [m["py_us_per_token"] for m in ms]
            print(f"{label}: tok/s median {statistics.median(tok):.1f} [{min(tok):.1f}-{max(tok):.1f}]; python us/token "
                  f"median {statistics.median(py):.1f} [{min(py):.1f}-{max(py):.1f}]")
        ratios = [b["tok_s"] / a_["tok_s"] for a_, b in zip(results["A"], results["B"])]
        print(f"B/A tok/s per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
    finally:
        for proc, _, _ in servers.values():
            stop_server(proc)


if __name__ == "__main__":
    main()

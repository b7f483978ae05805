#!/usr/bin/env python3
"""Batch embeddings (issue 15): a large `/v1/batch/embeddings` job against the synchronous
endpoint's best throughput, and what it does to interactive traffic and memory. Per round
and per arm (a server configuration, started fresh):

1. sync (first arm of each round): the same kind of short sentences through
   `POST /v1/embeddings` in requests of 256 and 2,048 inputs at concurrency 1, 2 and 4; the
   best inputs/s is the anchor;
2. idle: interactive probes alone (one-sentence embeddings every 0.2 s and 16-token chats
   every 1 s, each answered before the next of its kind) — p50/p95 latency — half of
   `--idle-s` before the batches and half after them, pooled (the machine's load drifts);
   the worker's RSS after the first half (so memory the interactive paths touch is not
   counted as the batch's);
3. throughput: a batch of `--inputs` with no other traffic (submit → completed); the
   worker's peak RSS during it (sampled every 0.2 s) is the batch's memory;
4. during: a batch of `--probed-inputs` while the same probes run; p50/p95 during it (and
   the peak RSS, which also holds the KV-cache blocks the chat probes touch).

Arms: `priorities` (the defaults: batch jobs at batch priority) and `no-priorities`
(`FERROSERVE_BATCH_JOBS_PRIORITY=interactive`: batch rows compete with interactive requests
as equals), or `name:VAR=value,VAR=value` for any other environment.

    .venv/bin/python bench/batch.py                                  # 100,000 inputs, 1 round
    .venv/bin/python bench/batch.py --inputs 20000 --rounds 2        # quicker A/B

Flags after `--` go to `ferroserve serve` (gateway on, no keys, its own data dir). Results
go to bench/results/batch-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving import start_server

REPO = Path(__file__).resolve().parents[1]
EMBED, CHAT = "all-minilm", "smollm2"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sentences(n: int, salt: str) -> list[str]:
    subjects = ("The cat", "A ship", "My neighbour", "This server", "The river", "An old tree", "Our team", "The market")
    verbs = ("watches", "carries", "remembers", "builds", "follows", "answers", "paints", "measures")
    objects = ("the lighthouse", "a quiet song", "every invoice", "the morning train", "two red apples", "the long report")
    return [f"{subjects[i % 8]} {verbs[(i // 8) % 8]} {objects[(i // 64) % 6]} {salt}{i}." for i in range(n)]


def worker_rss_mb(main_pid: int) -> float:
    """RSS of the granian worker (the process serving; its parent only supervises)."""
    try:
        children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
        pid = int(children[0]) if children else main_pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


class Probes:
    """Interactive traffic: a one-sentence embedding every `embed_every_s`, a 16-token chat
    every `chat_every_s`, each answered before the next of its kind (latencies in ms)."""

    def __init__(self, url: str, embed_every_s: float = 0.2, chat_every_s: float = 1.0) -> None:
        self.url, self.embed_every_s, self.chat_every_s = url, embed_every_s, chat_every_s
        self.embed_ms: list[float] = []
        self.chat_ms: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _loop(self, every_s: float, fn, out: list[float]) -> None:
        client = httpx.Client(timeout=120)
        i = 0
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                r = fn(client, i)
                if r.status_code != 200:
                    self.errors += 1
                else:
                    out.append((time.perf_counter() - began) * 1000)
            except httpx.HTTPError:
                self.errors += 1
            i += 1
            self._stop.wait(max(0.0, every_s - (time.perf_counter() - began)))

    def _embed(self, client: httpx.Client, i: int):
        return client.post(self.url + "/v1/embeddings", json={"model": EMBED, "input": f"interactive probe number {i} here",
                                                              "metadata": {"cache_mode": "bypass"}})

    def _chat(self, client: httpx.Client, i: int):
        return client.post(self.url + "/v1/chat/completions", json={
            "model": CHAT, "messages": [{"role": "user", "content": f"Say something about {i}."}], "max_tokens": 16,
            "temperature": 0, "ignore_eos": True})

    def start(self) -> Probes:
        """Starts (or starts again: the latencies add up) the probe threads."""
        self._stop.clear()
        for every, fn, out in ((self.embed_every_s, self._embed, self.embed_ms), (self.chat_every_s, self._chat, self.chat_ms)):
            t = threading.Thread(target=self._loop, args=(every, fn, out), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join()
        return {"embed_n": len(self.embed_ms), "embed_p50_ms": pct(self.embed_ms, 0.5), "embed_p95_ms": pct(self.embed_ms, 0.95),
                "chat_n": len(self.chat_ms), "chat_p50_ms": pct(self.chat_ms, 0.5), "chat_p95_ms": pct(self.chat_ms, 0.95),
                "errors": self.errors}


def sync_throughput(url: str, texts: list[str], per_request: int, concurrency: int) -> float:
    bodies = [json.dumps({"model": EMBED, "input": texts[i:i + per_request], "encoding_format": "base64",
                          "metadata": {"cache_mode": "bypass"}}).encode() for i in range(0, len(texts), per_request)]
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency))

    def send(body: bytes) -> None:
        r = client.post(url + "/v1/embeddings", content=body, headers={"content-type": "application/json"})
        r.raise_for_status()

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, bodies))
    return len(texts) / (time.perf_counter() - began)


ARMS = {"priorities": {}, "no-priorities": {"FERROSERVE_BATCH_JOBS_PRIORITY": "interactive"}}


def parse_arm(spec: str) -> tuple[str, dict[str, str]]:
    if spec in ARMS:
        return spec, ARMS[spec]
    name, _, assignments = spec.partition(":")
    return name, dict(a.split("=", 1) for a in assignments.split(",") if a)


def run_batch(url: str, texts: list[str]) -> tuple[float, float]:
    """Submits one batch and polls it to the end: (seconds submit → completed, seconds to accept)."""
    began = time.perf_counter()
    r = httpx.post(url + "/v1/batch/embeddings", json={"model": EMBED, "inputs": texts}, timeout=600)
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    submitted = time.perf_counter()
    while True:
        got = httpx.get(f"{url}/v1/batch/{batch_id}", timeout=60).json()
        if got["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.25)
    finished = time.perf_counter()
    assert got["status"] == "completed" and got["completed_jobs"] == len(texts), got
    return finished - began, submitted - began


def run_arm(args, arm: str, env: dict[str, str], round_no: int, with_sync: bool) -> dict:
    server, url, log_path = start_server(args.server_args, name="batch", env=env)
    try:
        # Warm-up: both models, every path once.
        sync_throughput(url, sentences(512, "w"), 256, 2)
        Probes(url).start().stop()
        out: dict = {"arm": arm, "env": env, "round": round_no, "load_average_before": os.getloadavg()}
        if with_sync:
            log("sync throughput ...")
            sync = {}
            for per_request in (32, 256, 2048):
                for concurrency in (1, 2, 4):
                    rate = sync_throughput(url, sentences(args.sync_inputs, f"s{per_request}c{concurrency}-"), per_request,
                                           concurrency)
                    sync[f"{per_request}x{concurrency}"] = round(rate, 1)
                    log(f"  {per_request} inputs/request, c={concurrency}: {rate:.0f} inputs/s")
            out["sync_inputs_per_s"] = sync
            out["sync_best_inputs_per_s"] = max(sync.values())

        log(f"[{arm} round {round_no}] idle probes ...")
        # Half the idle probes before the batches and half after, pooled: the machine's load
        # drifts, and the idle latencies are then from around the batch's time, not only before it.
        idle_probes = Probes(url).start()
        time.sleep(args.idle_s / 2)
        idle_before = idle_probes.stop()
        rss_idle = worker_rss_mb(server.pid)
        log(f"  idle before: {idle_before}")

        rss_peak = [rss_idle]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                rss_peak.append(worker_rss_mb(server.pid))
                sampling.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log(f"[{arm} round {round_no}] batch of {args.inputs}, no other traffic ...")
        seconds, accept = run_batch(url, sentences(args.inputs, f"b{round_no}-"))
        rss_batch_alone = max(rss_peak)
        log(f"  {seconds:.1f} s ({accept:.2f} s to accept), {args.inputs / seconds:.0f} inputs/s; peak RSS {rss_batch_alone:.0f} MB")
        log(f"[{arm} round {round_no}] batch of {args.probed_inputs} with probes ...")
        probes = Probes(url).start()
        probed_seconds, _ = run_batch(url, sentences(args.probed_inputs, f"p{round_no}-"))
        during = probes.stop()
        sampling.set()
        sampler.join()
        log(f"  {probed_seconds:.1f} s; during: {during}")
        log(f"[{arm} round {round_no}] idle probes again ...")
        idle_probes.start()
        time.sleep(args.idle_s / 2)
        idle = idle_probes.stop()
        log(f"  idle (both halves): {idle}")
        out.update({
            "batch_seconds": round(seconds, 2), "batch_accept_seconds": round(accept, 3),
            "batch_inputs_per_s": round(args.inputs / seconds, 1),
            "probed_batch_seconds": round(probed_seconds, 2),
            "probed_batch_inputs_per_s": round(args.probed_inputs / probed_seconds, 1),
            "idle": idle, "idle_before_batches": idle_before, "during_batch": during,
            "embed_p95_ratio": round(during["embed_p95_ms"] / idle["embed_p95_ms"], 2),
            "chat_p95_ratio": round(during["chat_p95_ms"] / idle["chat_p95_ms"], 2),
            # The batch's own memory: its peak with no other traffic. With the probes, each new
            # chat prompt also touches fresh KV-cache blocks (≈ 0.7 MB a chat until the KV
            # budget is touched), which is the chat path's memory, not the batch's.
            "rss_idle_mb": round(rss_idle, 1), "rss_peak_batch_alone_mb": round(rss_batch_alone, 1),
            "rss_growth_mb": round(rss_batch_alone - rss_idle, 1),
            "rss_peak_with_probes_mb": round(max(rss_peak), 1),
            "load_average_after": os.getloadavg(),
        })
        return out
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs of the batch run alone (throughput)")
    ap.add_argument("--probed-inputs", type=int, default=None, help="inputs of the batch run with probes (default: --inputs)")
    ap.add_argument("--sync-inputs", type=int, default=16_384, help="inputs per synchronous configuration")
    ap.add_argument("--idle-s", type=float, default=30.0, help="seconds of probes on the idle server")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; each runs every arm, in turn")
    ap.add_argument("--arms", nargs="+", default=["priorities", "no-priorities"],
                    help="priorities, no-priorities, or name:VAR=value,...")
    ap.add_argument("server_args", nargs="*", help="extra `ferroserve serve` flags (after --)")
    args = ap.parse_args()
    args.probed_inputs = args.probed_inputs or args.inputs
    arms = [parse_arm(a) for a in args.arms]

    runs = []
    for round_no in range(args.rounds):
        for index, (arm, env) in enumerate(arms):
            runs.append(run_arm(args, arm, env, round_no, with_sync=index == 0))
    # Each round's batches against that round's synchronous best: the same window of a shared machine.
    sync_of_round = {r["round"]: r["sync_best_inputs_per_s"] for r in runs if "sync_best_inputs_per_s" in r}
    for r in runs:
        r["batch_vs_sync_best"] = round(r["batch_inputs_per_s"] / sync_of_round[r["round"]], 3)
    best_sync = max(sync_of_round.values())
    summary = {}
    for arm, _ in arms:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {
            "batch_inputs_per_s": median([r["batch_inputs_per_s"] for r in mine]),
            "batch_vs_sync_best": median([r["batch_vs_sync_best"] for r in mine]),
            "embed_p95_ratio": median([r["embed_p95_ratio"] for r in mine]),
            "chat_p95_ratio": median([r["chat_p95_ratio"] for r in mine]),
            "rss_growth_mb": max(r["rss_growth_mb"] for r in mine),
        }
    result = {
        "bench": "batch", "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "server_args": args.server_args, "inputs": args.inputs, "probed_inputs": args.probed_inputs, "rounds": args.rounds,
        "sync_best_inputs_per_s": best_sync, "summary": summary, "runs": runs,
    }
    out = REPO / "bench" / "results" / f"batch-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    log(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

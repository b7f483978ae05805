#!/usr/bin/env python3
"""Issue 16 part 4: overload, driven by locust (as a library), against one ferroserve it starts.

    .venv/bin/python bench/overload.py                     # 60 s capacity + 5 min at 3x, ≈ 7 min
    .venv/bin/python bench/overload.py --duration 120      # a shorter overload phase

The server runs as users run it (gateway on, `--insecure-no-auth`, its own `--data-dir`), with
the default admission bounds unless `--max-queue` / `--max-running` say otherwise, access lines
on (`--log-level info`) so the server's own time for each refusal is known too.

1. Warm-up: `--warmup` (30) s closed loop at concurrency `max_running` (the engine's batch).
2. Capacity: `--capacity-duration` s closed loop at concurrency `max_running`: every request is
   admitted (none waits), the batch stays full. Capacity X = answered requests per second;
   the unloaded p95 at capacity L = their p95 latency.
3. Overload: `--factor` (3) x X requests per second, open loop: locust users with
   `constant_pacing(--pacing)` (each starts one request every `--pacing` s whatever the
   answers do), `factor * X * pacing` of them, spawned at the arrival rate so arrivals spread
   evenly, for `--duration` s. The server's worker RSS is sampled every 5 s.

Every request: non-streaming chat on the default model, one user message with a request number
in it (no prefix cache helps), `max_tokens` 32 (`--max-tokens`), `ignore_eos`, temperature 0.

Targets (issue 16): admitted p95 <= 2 L; refusals (503 capacity_unavailable) p99 <= 5 ms;
worker RSS within +-5 % of its value when the overload phase began; no request hangs (none times
out, none fails otherwise, and admission's in-flight count is back to 0 after the run). The
latency figures are of the overload phase after its first `--pacing` s (the users' ramp-up);
hangs count over the whole phase. RSS is also reported at ready, after the warm-up and after
the capacity phase: the KV cache's pages are zeroed lazily, and freed blocks that hold a
cached prefix are reused last, so RSS grows until every block of the KV budget has been used
once (≈ 250 requests of this shape for the default 512 MiB) and is flat after that.
Client times are locust's (the client shares the 2 cores with the server); the server's own
times come from its access lines. Beside locust, a light prober in its own process and session
(blocking sockets, `--probe-rate` requests/s, default 10; 0 turns it off; `--probe-sched` runs it
at a nice value or SCHED_FIFO) sends the same request during the overload and times each
refusal by stage: its connect, its send, the kernel's receive stamp of the answer (SO_TIMESTAMPNS)
and the moment its recvmsg() returned, so its own wake-up is measured apart (`wake`) instead of
counted as the server's. Its `x-probe-sent` header carries its send time (CLOCK_MONOTONIC) for
a server instrumented to log the wait before the handler (bench/NOTES.md, "The prober's tail").
The worker threads' scheduler waits over the overload phase (/proc/.../schedstat) are in the
result too: the event loop, the other nice-0 threads (granian's, the store's), the compute
threads. `--server-env FERROSERVE_HTTP_RT_PRIORITY=1` runs the server's HTTP threads at
real-time priority (python/ferroserve/http_priority.py).

Results: a summary on stdout and bench/results/overload-<UTC time>.json (`--out`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, constant_pacing, task
from locust.env import Environment

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"
MODEL = "SmolLM2-135M-Instruct"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


class Server:
    def __init__(self, python: str, extra: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-bench-overload-"))
        self.cmd = [python, "-m", "ferroserve", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", str(self.data_dir), "--insecure-no-auth", "--log-level", "info", *extra]
        WORK.mkdir(exist_ok=True)
        self.log_path = WORK / "overload-server.log"
        self._log = self.log_path.open("w")
        log(f"[server] {' '.join(self.cmd)}")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **env})

    def get(self, path: str) -> tuple[int, str]:
        import http.client

        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def wait_ready(self, timeout: float = 300.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.get("/v1/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the server was not ready after {timeout:.0f} s; log {self.log_path}")

    def worker_pid(self) -> int:
        """The granian worker (the process that holds the engines)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.worker_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float | None:
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(f'{name}{{model="{MODEL}"}} '):
                return float(line.split()[-1])
        return None

    def threads(self) -> list[tuple[int, str, int]]:
        """(tid, name, nice) of each of the worker's threads."""
        out = []
        for entry in Path(f"/proc/{self.worker_pid()}/task").iterdir():
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            out.append((int(entry.name), (entry / "comm").read_text().strip(), int(fields[16])))
        return out

    def schedstat(self) -> dict[int, tuple[str, int, int, int, int]]:
        """tid -> (name, nice, ns on a CPU, ns runnable but waiting for one, times run) from
        /proc/PID/task/TID/schedstat (cumulative since the thread started)."""
        out = {}
        for tid, name, nice in self.threads():
            try:
                run, wait, slices = map(int, Path(f"/proc/{self.worker_pid()}/task/{tid}/schedstat").read_text().split())
            except (OSError, ValueError):
                continue
            out[tid] = (name, nice, run, wait, slices)
        return out

    def http_threads_fifo(self) -> list[int]:
        tids = [tid for tid, _, nice in self.threads() if nice == 0]
        for tid in tids:
            subprocess.run(["chrt", "-f", "-p", "20", str(tid)], check=True)
        return tids

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# Load -----------------------------------------------------------------------------------------------
Row = tuple[float, int, float, "str | None"]  # (start unix time, status, client ms, failure or None)


class Records:
    """Every request of the current phase."""

    def __init__(self) -> None:
        self.phase = "warmup"
        self.rows: dict[str, list[Row]] = {}

    def on_request(self, request_type, name, response_time, response_length, response=None, exception=None,
                   start_time=None, **kw) -> None:
        status = getattr(response, "status_code", 0) or 0
        failure = None if exception is None else f"{type(exception).__name__}: {exception}"[:120]
        self.rows.setdefault(self.phase, []).append((start_time or time.time(), status, response_time, failure))


def make_user(max_tokens: int, timeout_s: float):
    counter = itertools.count()

    class ChatUser(FastHttpUser):
        network_timeout = timeout_s
        connection_timeout = timeout_s
        wait_time = constant(0)

        @task
        def chat(self) -> None:
            body = {"model": "smollm2", "messages": [{"role": "user", "content": f"[{next(counter)}] Tell me a story."}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            with self.client.post("/v1/chat/completions", json=body, catch_response=True) as r:
                if r.status_code == 503:
                    # The refusal this benchmark is about; its shape is checked on the way.
                    ok = r.headers.get("retry-after") and b"capacity_unavailable" in (r.content or b"")
                    r.success() if ok else r.failure("a 503 that is not capacity_unavailable with retry-after")
                elif r.status_code == 200:
                    usage = r.json().get("usage", {})
                    if usage.get("completion_tokens") != max_tokens:
                        r.failure(f"completion_tokens {usage.get('completion_tokens')} != {max_tokens}")

    return ChatUser


def run_phase(user_class, host: str, records: Records, phase: str, users: int, spawn_rate: float, seconds: float,
              sampler=None) -> float:
    """One locust run (its own environment and runner) of `users` users for `seconds`."""
    env = Environment(user_classes=[user_class], host=host)
    env.events.request.add_listener(records.on_request)
    records.phase = phase
    runner = env.create_local_runner()
    started = time.monotonic()
    runner.start(users, spawn_rate=spawn_rate)
    while time.monotonic() - started < seconds:
        gevent.sleep(min(5.0, seconds - (time.monotonic() - started)))
        if sampler is not None:
            sampler()
    records.phase = phase + "-drain"  # requests cut short by the stop are not the phase's
    runner.quit()
    return time.monotonic() - started


def summary(rows: list[Row], seconds: float) -> dict:
    """Answered = 200 with all its tokens; refused = 503 capacity_unavailable with retry-after;
    other = anything else (a timeout, a failed check, another status): a hang or a bug."""
    ok = [ms for _, status, ms, err in rows if status == 200 and err is None]
    refused = [ms for _, status, ms, err in rows if status == 503 and err is None]
    other = [(status, err) for _, status, ms, err in rows if err is not None or status not in (200, 503)]
    return {
        "requests": len(rows), "seconds": round(seconds, 1), "offered_per_s": round(len(rows) / seconds, 2),
        "answered": len(ok), "answered_per_s": round(len(ok) / seconds, 2),
        "answered_ms": {"p50": percentile(ok, 50), "p95": percentile(ok, 95), "p99": percentile(ok, 99), "max": max(ok, default=None)},
        "refused": len(refused),
        "refused_ms": {"p50": percentile(refused, 50), "p99": percentile(refused, 99), "max": max(refused, default=None)},
        "other": len(other), "other_kinds": sorted({f"{s}: {e}" for s, e in other}),
    }


def server_refusal_ms(log_path: Path, since_unix: float, until_unix: float, probes: bool | None = None) -> dict:
    """The server's own time (access line `ms`) for each 503 of the overload window (`probes`:
    only the prober's (True), only locust's (False), or all), and the same by where the server
    decided it (the access line's `refused`: `arrival`, before the body; `body`, right after
    it; `engine`, after parsing; servers before session 11 do not say)."""
    ms = []
    by_path: dict[str, list[float]] = {}
    body_ms: list[float] = []
    for line in log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "request" and entry.get("status") == 503 and since_unix <= entry.get("ts", 0) <= until_unix:
            if probes is None or probes == str(entry.get("request_id", "")).startswith("probe-"):
                ms.append(entry["ms"])
                by_path.setdefault(entry.get("refused", "unknown"), []).append(entry["ms"])
                if "body_ms" in entry:
                    body_ms.append(entry["body_ms"])
    out = {"count": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms, default=None)}
    out["by_path"] = {path: {"count": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v)}
                      for path, v in sorted(by_path.items())}
    if body_ms:  # refusals decided after the body: when it had been read (ms from the handler's start)
        out["body_read_ms"] = {"p50": percentile(body_ms, 50), "p99": percentile(body_ms, 99), "max": max(body_ms)}
    return out


# The light prober ------------------------------------------------------------------------------------
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS has the same number
PROBE_FIELDS = ("start_unix", "status", "request_id", "connect_ns", "sent_ns", "wrote_ns", "arrived_ns", "woke_ns",
                "done_ns")


def _realtime_minus_monotonic_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, from the tightest of a few paired readings (the kernel's
    receive timestamps are on the realtime clock; everything else here is monotonic)."""
    best = None
    for _ in range(50):
        a = time.monotonic_ns()
        r = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
    return best[1]


def probe_once(host: str, port: int, n: int, max_tokens: int, offset_ns: int, timeout_s: float = 120.0) -> dict:
    """One probe on a blocking socket of its own (a refusal decided before the body ends its
    connection, so each probe opens one; the connect is timed apart). Monotonic ns stamps:
    `connect_ns` before connect(); `sent_ns` just before the request's one send() (also sent in
    `x-probe-sent`); `wrote_ns` after it; `arrived_ns` when the kernel queued the answer's first
    bytes on our socket (its SO_TIMESTAMPNS receive stamp); `woke_ns` when recvmsg() handed them
    to us (arrived -> woke is this process's own wake-up); `done_ns` at the answer's last byte."""
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": f"[probe {n}] Tell me a story."}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    row = {"start_unix": time.time(), "status": 0, "request_id": f"probe-{n}"}
    row["connect_ns"] = time.monotonic_ns()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sent = time.monotonic_ns()
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                      f"content-length: {len(body)}\r\nx-request-id: probe-{n}\r\nx-probe-sent: {sent}\r\n\r\n".encode() + body)
            row["wrote_ns"] = time.monotonic_ns()
            row["sent_ns"] = sent
            buf = b""
            need = None
            while need is None or len(buf) < need:
                data, ancillary, _, _ = s.recvmsg(65536, 256)
                now = time.monotonic_ns()
                if "woke_ns" not in row:
                    row["woke_ns"] = now
                    for level, kind, stamp in ancillary:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = struct.unpack("qq", stamp[:16])
                            row["arrived_ns"] = sec * 1_000_000_000 + nsec - offset_ns
                if not data:
                    break
                buf += data
                if need is None and b"\r\n\r\n" in buf:
                    head, _, _ = buf.partition(b"\r\n\r\n")
                    row["status"] = int(head.split(b" ", 2)[1])
                    length = [v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                              if k.strip().lower() == b"content-length"]
                    need = len(head) + 4 + int(length[0]) if length else None
            row["done_ns"] = time.monotonic_ns()
    except (OSError, ValueError, IndexError):  # a failure is a row too (status 0)
        row["status"] = 0
    return row


def probe(url: str, rate: float, seconds: float, max_tokens: int, out: str) -> None:
    """Runs in its own process (and session, so its own scheduler autogroup; no gevent, no
    locust): one probe every 1/rate s on a thread pool of blocking sockets (an admitted probe
    waits seconds for its answer, so they overlap). Rows go to `out` as JSON objects with the
    `probe_once` stamps."""
    import concurrent.futures
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    offset = _realtime_minus_monotonic_ns()
    futures = []
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        t0 = time.monotonic()
        for n in itertools.count():
            due = t0 + n / rate
            if due - t0 >= seconds:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            futures.append(pool.submit(probe_once, parts.hostname, parts.port, n, max_tokens, offset))
        rows = [f.result() for f in futures]
    Path(out).write_text(json.dumps({"rows": rows, "schedstat": _own_schedstat()}))


def _own_schedstat() -> dict:
    """This process's threads together: ns on a CPU, ns waiting for one, times run."""
    run = wait = slices = 0
    for entry in Path("/proc/self/task").iterdir():
        try:
            r, w, n = map(int, (entry / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        run, wait, slices = run + r, wait + w, slices + n
    return {"run_ms": round(run / 1e6, 1), "wait_ms": round(wait / 1e6, 1), "slices": slices,
            "wait_per_slice_us": round(wait / 1e3 / max(slices, 1), 1)}


def schedstat_delta(before: dict, after: dict, worker_pid: int) -> dict:
    """How long each kind of the worker's threads waited for a CPU per wake-up over the phase:
    the event loop (the worker's main thread), granian's threads (at nice 0 and started after the
    engines' compute threads, as granian starts them after the app's init), the other threads at
    nice 0 (the store's, ...), and the engines' compute threads (nice > 0)."""
    groups: dict[str, list[int]] = {}
    last_compute = max((tid for tid, t in after.items() if t[1] > 0), default=0)
    for tid, (name, nice, run, wait, slices) in after.items():
        b = before.get(tid, (name, nice, 0, 0, 0))
        if tid == worker_pid:
            kind = "event_loop"
        elif nice > 0:
            kind = "compute"
        else:
            kind = "granian" if tid > last_compute else "other"
        g = groups.setdefault(kind, [0, 0, 0, 0])
        g[0] += 1
        g[1] += run - b[2]
        g[2] += wait - b[3]
        g[3] += slices - b[4]
    return {k: {"threads": n, "run_ms": round(r / 1e6, 1), "wait_ms": round(w / 1e6, 1), "slices": sl,
                "wait_per_slice_us": round(w / 1e3 / max(sl, 1), 1)} for k, (n, r, w, sl) in sorted(groups.items())}


def probe_summary(rows: list, since_unix: float, server_lines: dict[str, dict]) -> dict:
    """The prober's refusals, end to end and by stage (ms; each stage's own p50/p90/p99/max,
    so the stages' p99s do not add up to the total's):
    - `total`: connect() to the answer's last byte; `after_connect`: from the send on;
      `without_own_wake`: the total less `wake` (what a client that is not itself kept waiting
      for a CPU would see);
    - `connect`: connect() (the kernel completes it; a slow one is this process descheduled);
    - `to_handler`: send() -> our handler's first line (loopback, granian's I/O thread, its
      hand-over to the event loop through the GIL, the loop's queue), from the server's access
      line (`probe_wait_ms`, a server built to read `x-probe-sent`: else absent);
    - `handler`: the handler (access line `ms`);
    - `handler_to_socket`: the handler's end -> the answer's first bytes queued on our socket
      (granian writing it; from the access line's `end_mono_ns`, same server build);
    - `wake`: the answer's bytes queued -> recvmsg() returned them (this prober's own wake-up);
    - `rest`: the first bytes -> the last."""
    rows = [r for r in rows if r["start_unix"] >= since_unix]
    refused = [r for r in rows if r["status"] == 503 and "done_ns" in r]
    stages: dict[str, list[float]] = {k: [] for k in ("total", "without_own_wake", "after_connect", "connect",
                                                       "to_handler", "handler", "handler_to_socket", "wake", "rest")}
    for r in refused:
        ms = lambda a, b: (r[b] - r[a]) / 1e6  # noqa: E731
        stages["total"].append(ms("connect_ns", "done_ns"))
        stages["after_connect"].append(ms("sent_ns", "done_ns"))
        stages["connect"].append(ms("connect_ns", "sent_ns"))
        stages["rest"].append(ms("woke_ns", "done_ns"))
        if "arrived_ns" in r:
            stages["wake"].append(ms("arrived_ns", "woke_ns"))
            stages["without_own_wake"].append(stages["total"][-1] - stages["wake"][-1])
        line = server_lines.get(r["request_id"])
        if line is not None:
            stages["handler"].append(line["ms"])
            if "probe_wait_ms" in line:
                stages["to_handler"].append(line["probe_wait_ms"])
            if "end_mono_ns" in line and "arrived_ns" in r:
                stages["handler_to_socket"].append((r["arrived_ns"] - line["end_mono_ns"]) / 1e6)

    def spread(v: list[float]) -> dict:
        return {"n": len(v), "p50": percentile(v, 50), "p90": percentile(v, 90), "p99": percentile(v, 99),
                "max": max(v, default=None)}

    out = {"sent": len(rows), "refused": len(refused), "answered": sum(1 for r in rows if r["status"] == 200),
           "other": sum(1 for r in rows if r["status"] not in (200, 503)),
           "refused_ms": spread(stages["total"]), "stages_ms": {k: spread(v) for k, v in stages.items()}}
    # The slowest 2 % of refusals: where their time went (mean of each stage over them).
    slow = sorted(refused, key=lambda r: r["done_ns"] - r["connect_ns"])[-max(1, len(refused) // 50):] if refused else []
    if slow:
        def mean_stage(f) -> float | None:
            v = [x for x in (f(r) for r in slow) if x is not None]
            return round(statistics.fmean(v), 3) if v else None
        lines = server_lines
        out["slowest_2pct_mean_ms"] = {
            "n": len(slow),
            "total": mean_stage(lambda r: (r["done_ns"] - r["connect_ns"]) / 1e6),
            "connect": mean_stage(lambda r: (r["sent_ns"] - r["connect_ns"]) / 1e6),
            "to_handler": mean_stage(lambda r: lines.get(r["request_id"], {}).get("probe_wait_ms")),
            "handler": mean_stage(lambda r: lines.get(r["request_id"], {}).get("ms")),
            "handler_to_socket": mean_stage(lambda r: (r["arrived_ns"] - lines[r["request_id"]]["end_mono_ns"]) / 1e6
                                            if "arrived_ns" in r and "end_mono_ns" in lines.get(r["request_id"], {}) else None),
            "wake": mean_stage(lambda r: (r["woke_ns"] - r["arrived_ns"]) / 1e6 if "arrived_ns" in r else None),
            "rest": mean_stage(lambda r: (r["done_ns"] - r["woke_ns"]) / 1e6),
        }
    return out


def probe_access_lines(log_path: Path) -> dict[str, dict]:
    """The server's access line of each probe, by request id."""
    lines = {}
    for line in log_path.read_text().splitlines():
        if line.startswith("{") and '"probe-' in line:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "request":
                lines[str(entry.get("request_id"))] = entry
    return lines


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe-worker":
        url, rate, seconds, max_tokens, out = sys.argv[2:7]
        probe(url, float(rate), float(seconds), int(max_tokens), out)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of overload (default 300)")
    p.add_argument("--capacity-duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=30.0, help="seconds; long enough to use every KV block once")
    p.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the capacity")
    p.add_argument("--pacing", type=float, default=10.0, help="seconds between one overload user's requests")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-running", type=int, default=64, help="FERROSERVE_MAX_RUNNING (the default)")
    p.add_argument("--max-queue", type=int, help="--max-queue for the server (default: the server's)")
    p.add_argument("--timeout", type=float, default=60.0, help="a request slower than this is a hang")
    p.add_argument("--server-python", default=str(REPO / ".venv" / "bin" / "python"),
                   help="the Python that runs `-m ferroserve serve` (default: the repo's .venv)")
    p.add_argument("--probe-rate", type=float, default=10.0,
                   help="requests/s of the light prober during the overload (0: none)")
    p.add_argument("--probe-sched", default="normal",
                   help="the prober's scheduling: normal (nice 0, its own session), fifo (SCHED_FIFO 10, "
                        "root), or a nice value (-20..19) (default normal)")
    p.add_argument("--server-http-fifo", action="store_true",
                   help="diagnosis only (root): after ready, put the worker's threads at nice 0 (the event "
                        "loop, granian's, the store's; not the engines' compute threads at nice > 0) in "
                        "SCHED_FIFO 20, to see what scheduling alone is worth")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server (repeatable)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    extra = ["--max-queue", str(a.max_queue)] if a.max_queue is not None else []
    server = Server(a.server_python, extra, {"FERROSERVE_MAX_RUNNING": str(a.max_running),
                                             **dict(kv.split("=", 1) for kv in a.server_env)})
    records = Records()
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                    "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        server.wait_ready()
        if a.server_http_fifo:
            result["server_http_fifo"] = server.http_threads_fifo()
        rss_phases = {"ready": server.rss_bytes()}
        result["rss_phases_mb"] = rss_phases
        user = make_user(a.max_tokens, a.timeout)
        concurrency = a.max_running
        log(f"warm-up: {a.warmup:.0f} s at concurrency {concurrency}")
        run_phase(user, server.url, records, "warmup", concurrency, concurrency, a.warmup)
        gevent.sleep(3)
        rss_phases["after_warmup"] = server.rss_bytes()

        log(f"capacity: {a.capacity_duration:.0f} s closed loop at concurrency {concurrency}")
        seconds = run_phase(user, server.url, records, "capacity", concurrency, concurrency, a.capacity_duration)
        capacity = summary(records.rows.get("capacity", []), seconds)
        result["capacity"] = capacity
        x = capacity["answered_per_s"]
        unloaded_p95 = capacity["answered_ms"]["p95"]
        log(f"  capacity {x:.2f} req/s, p95 {unloaded_p95:.0f} ms, refused {capacity['refused']}")
        gevent.sleep(3)
        rss_phases["after_capacity"] = server.rss_bytes()

        rate = a.factor * x
        users = max(1, round(rate * a.pacing))
        user.wait_time = constant_pacing(a.pacing)
        rss: list[tuple[float, int]] = []
        t0 = time.monotonic()

        def sample() -> None:
            rss.append((round(time.monotonic() - t0, 1), server.rss_bytes()))

        sample()
        log(f"overload: {rate:.1f} req/s offered ({a.factor:g}x) by {users} users pacing {a.pacing:g} s, {a.duration:.0f} s")
        began = time.time()
        prober = None
        probe_out = WORK / "overload-probe.json"
        if a.probe_rate > 0:
            # Its own session: its own scheduler autogroup (with autogroups on, as here, a
            # process competes with the other *sessions* first, then with its session's threads;
            # locust's 800 users are one busy session), and `--probe-sched` on top.
            sched = {"fifo": ["chrt", "-f", "10"], "normal": []}.get(a.probe_sched, ["nice", "-n", a.probe_sched])
            prober = subprocess.Popen([*sched, sys.executable, __file__, "--probe-worker", server.url, str(a.probe_rate),
                                       str(a.duration), str(a.max_tokens), str(probe_out)], start_new_session=True)
        sched_before = server.schedstat()
        run_phase(user, server.url, records, "overload", users, rate, a.duration, sample)
        result["server_schedstat"] = schedstat_delta(sched_before, server.schedstat(), server.worker_pid())
        if prober is not None:
            prober.wait(timeout=180)
        # Arrivals ramp up over the first `pacing` s (users spawn at the arrival rate): the
        # figures are of the steady part after it (the whole phase must still hang nowhere).
        since, until = began + a.pacing, time.time()
        rows = records.rows.get("overload", [])
        overload = summary([r for r in rows if r[0] >= since], until - since)
        overload["whole_phase"] = summary(rows, until - began)
        overload["server_refusal_ms"] = server_refusal_ms(server.log_path, since, until)
        if prober is not None:
            probed = json.loads(probe_out.read_text())
            overload["probe"] = probe_summary(probed["rows"], since, probe_access_lines(server.log_path))
            overload["probe"]["prober_schedstat"] = probed["schedstat"]
            overload["probe"]["server_ms"] = server_refusal_ms(server.log_path, since, until, probes=True)
        gevent.sleep(5)
        in_flight_after = server.metric("ferroserve_admission_in_flight")
        rss_first, rss_values = rss[0][1], [b for _, b in rss]
        result["overload"] = overload
        result["rss"] = {"samples": rss, "first_mb": round(rss_first / 2**20, 1), "last_mb": round(rss_values[-1] / 2**20, 1),
                         "min_mb": round(min(rss_values) / 2**20, 1), "max_mb": round(max(rss_values) / 2**20, 1),
                         "max_drift_pct": round(100 * max(abs(b - rss_first) for b in rss_values) / rss_first, 2)}
        for k, v in rss_phases.items():
            rss_phases[k] = round(v / 2**20, 1)
        result["after"] = {"admission_in_flight": in_flight_after, "health": server.get("/health")[0],
                           "capacity_rejections_total": server.metric("ferroserve_capacity_rejections_total")}
        p95 = overload["answered_ms"]["p95"]
        result["targets"] = {
            "admitted_p95_over_unloaded": round(p95 / unloaded_p95, 3) if p95 and unloaded_p95 else None,
            "admitted_p95_within_2x": bool(p95 and unloaded_p95 and p95 <= 2 * unloaded_p95),
            "refusal_p99_ms_client": overload["refused_ms"]["p99"],
            "refusal_p99_ms_server": overload["server_refusal_ms"]["p99"],
            "refusal_p99_ms_probe": overload.get("probe", {}).get("refused_ms", {}).get("p99"),
            "refusal_p99_ms_probe_without_own_wake":
                overload.get("probe", {}).get("stages_ms", {}).get("without_own_wake", {}).get("p99"),
            "refusal_p99_within_5ms_client": (overload["refused_ms"]["p99"] or 0) <= 5.0,
            "rss_within_5pct": result["rss"]["max_drift_pct"] <= 5.0,
            "no_hangs": overload["whole_phase"]["other"] == 0 and in_flight_after == 0,
        }
    finally:
        server.stop()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or BENCH_DIR / "results" / f"overload-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("capacity", "overload", "rss", "after", "targets") if k in result}, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Server overhead: requests/s of `GET /v1/models` under wrk, ferroserve vs a bare granian RSGI +
msgspec handler (bench/bare_rsgi.py) with the same granian settings, one run, rounds alternating.

    .venv/bin/python bench/http_floor.py                 # needs wrk (make bench-setup installs it)
    .venv/bin/python bench/http_floor.py --rounds 3 --duration 10 --connections 64

Issue 2's target: ferroserve ≥ 40,000 requests/s here (the bare handler does ≈ 60,000–78,000
on these 2 cores per the issue). wrk runs on the same 2 cores as the server (as the issue's
reference measurement did), with 1 thread and `--connections` keep-alive connections.
Every response's status is checked (wrk reports non-2xx; any is an error). Results go to
bench/results/http-floor-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server at {url} not ready after {timeout:.0f} s")


def start(kind: str, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if kind == "ours":
        cmd = [str(VENV_BIN / "ferroserve"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    else:
        # Same granian settings as `ferroserve serve` (cli.py): RSGI, one worker, uvloop.
        cmd = [str(VENV_BIN / "granian"), "--interface", "rsgi", "--workers", "1", "--loop", "uvloop",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
               "--factory", "bare_rsgi:create_app"]
        env["PYTHONPATH"] = str(BENCH_DIR)
    log(f"[{kind}] starting: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=BENCH_DIR)
    wait_ready(f"http://127.0.0.1:{port}/v1/models", 120)
    return proc


def wrk(url: str, duration: int, connections: int, script: str | None = None) -> dict:
    """One wrk run (one thread, `connections` connections); `script` is an optional Lua
    request script (bench/gateway.py sends POST bodies and headers with one)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    path = None
    if script is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(script)
        path = f.name
        cmd += ["-s", path]
    try:
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    finally:
        if path is not None:
            os.unlink(path)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "requests_per_s": rps,
        "requests": total,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": sock.group(1) if sock else None,
        "latency_p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        log("wrk not found: `make bench-setup` installs it (apt-get install wrk)")
        return 2

    results: dict[str, list[dict]] = {"bare": [], "ours": []}
    for rnd in range(args.rounds):
        for kind in (["bare", "ours"] if rnd % 2 == 0 else ["ours", "bare"]):
            port = free_port()
            proc = start(kind, port)
            try:
                url = f"http://127.0.0.1:{port}/v1/models"
                wrk(url, 2, args.connections)  # warm-up
                r = wrk(url, args.duration, args.connections)
                load = os.getloadavg()[0]
                r["loadavg_1m"] = load
                results[kind].append(r)
                log(f"round {rnd} {kind}: {r['requests_per_s']:.0f} req/s, p50 {r['latency_p50_ms']} ms, "
                    f"non-2xx {r['non_2xx']}, load {load:.2f}")
                if r["non_2xx"] or r["socket_errors"]:
                    log(f"  errors: {r}")
            finally:
                proc.terminate()
                proc.wait(30)
    med = {k: statistics.median(x["requests_per_s"] for x in v) for k, v in results.items()}
    summary = {"median_requests_per_s": med, "ours_over_bare": med["ours"] / med["bare"], "target_ours": 40000}
    log(f"median req/s: ours {med['ours']:.0f}, bare {med['bare']:.0f} ({summary['ours_over_bare']:.2f}x); target >= 40000")
    ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH_DIR / "results" / f"http-floor-{ts}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args) | {"out": str(out)},
                               "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                     capture_output=True, text=True).stdout.strip(),
                               "results": results, "summary": summary}, indent=1, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What the gateway costs per request, and whether metering loses records under load.

    .venv/bin/python bench/gateway.py                      # overhead (3 rounds x 5 s) + 30 s metering run
    .venv/bin/python bench/gateway.py --rounds 3 --duration 5 --skip-metering
    .venv/bin/python bench/gateway.py --skip-overhead --metering-seconds 30 --metering-rate 1000

1. Overhead (issue 4's target: ≤ 50 µs median per request). The same server build serves the
   same routes twice, side by side in one run with rounds alternating: gateway **off**
   (`FERROSERVE_GATEWAY=off`: no auth, limits, metering or request metrics) and **key** (a key
   with RPM/TPM limits high enough never to trigger, sent as `Authorization: Bearer`).
   Routes: `GET /v1/models` (auth, rate-limit window and its nine headers, metrics) and
   `POST /v1/chat/completions` for a model that does not exist (all of that, plus body read,
   JSON decode, the 404, and a usage record queued and written to SQLite): the engine is
   never reached, so the gateway's share is not buried under milliseconds of model time.
   Two measures: (a) saturated: wrk with 1 thread and 64 connections on the same 2 cores;
   the per-request CPU cost is 1e6/rps, which charges the gateway for its background SQLite
   writer too; (b) one connection (c=1): the median latency, i.e. what a request waits for.
   The gateway's cost is the difference of the medians over rounds, in each measure.
2. Metering: wrk drives the metered route at ≈ `--metering-rate` requests/s (a per-request
   `delay()` in the wrk script) for `--metering-seconds`; the server is then stopped (SIGTERM,
   which flushes the writer) and the rows in its SQLite file are counted. No record may be
   lost: rows == the server's own `ferroserve_requests_total` for the route (read just before
   shutdown) and rows ≥ the responses wrk counted.

Results go to bench/results/gateway-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import http_floor  # noqa: E402
from http_floor import free_port, log, wait_ready  # noqa: E402

VENV_BIN = Path(sys.executable).parent
METERED_BODY = '{"model":"no-such-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
ROUTES = {
    "models": ("GET", "/v1/models", None),
    "metered_404": ("POST", "/v1/chat/completions", METERED_BODY),
}


def lua_script(method: str, body: str | None, key: str | None, delay_ms: float | None) -> str:
    lines = [f'wrk.method = "{method}"', 'wrk.headers["Content-Type"] = "application/json"']
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    if key is not None:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
    if delay_ms is not None:
        lines.append(f"function delay() return {delay_ms} end")
    return "\n".join(lines) + "\n"


def wrk(url: str, script: str, duration: int, connections: int) -> dict:
    return http_floor.wrk(url, duration, connections, script)


def start(mode: str, port: int, data_dir: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["FERROSERVE_GATEWAY"] = "off" if mode == "off" else "on"
    cmd = [str(VENV_BIN / "python"), "-m", "ferroserve", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--log-level", "warning"]
    log(f"[{mode}] starting: FERROSERVE_GATEWAY={env['FERROSERVE_GATEWAY']} {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_ready(f"http://127.0.0.1:{port}/v1/ready", 120)
    return proc


def make_key(data_dir: Path) -> str:
    r = subprocess.run([str(VENV_BIN / "python"), "-m", "ferroserve", "keys", "create", "--workspace", "bench",
                        "--rpm", "1000000000", "--tpm", "1000000000", "--data-dir", str(data_dir)],
                       capture_output=True, text=True, check=True, cwd=REPO)
    return r.stdout.strip()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def overhead(args, key_dir: Path, key: str) -> dict:
    off_dir = Path(tempfile.mkdtemp(prefix="ferroserve-bench-off-"))
    results: dict[str, dict[str, list[dict]]] = {r: {"off": [], "key": []} for r in ROUTES}
    single: dict[str, dict[str, list[dict]]] = {r: {"off": [], "key": []} for r in ROUTES}
    for rnd in range(args.rounds):
        for mode in (["off", "key"] if rnd % 2 == 0 else ["key", "off"]):
            port = free_port()
            proc = start(mode, port, off_dir if mode == "off" else key_dir)
            try:
                for route, (method, path, body) in ROUTES.items():
                    script = lua_script(method, body, key if mode == "key" else None, None)
                    url = f"http://127.0.0.1:{port}{path}"
                    wrk(url, script, 1, args.connections)  # warm-up
                    r = wrk(url, script, args.duration, args.connections)
                    r["loadavg_1m"] = os.getloadavg()[0]
                    results[route][mode].append(r)
                    log(f"round {rnd} {mode:>3} {route:<12} c={args.connections} {r['requests_per_s']:>8.0f} req/s  p50 {r['latency_p50_ms']} ms  "
                        f"non-2xx {r['non_2xx']}  load {r['loadavg_1m']:.2f}")
                    one = wrk(url, script, args.single_duration, 1)
                    one["loadavg_1m"] = os.getloadavg()[0]
                    single[route][mode].append(one)
                    log(f"round {rnd} {mode:>3} {route:<12} c=1  {one['requests_per_s']:>8.0f} req/s  p50 {one['latency_p50_ms'] * 1000:.0f} µs")
            finally:
                stop(proc)
    summary = {}
    for route, modes in results.items():
        med = {m: statistics.median(x["requests_per_s"] for x in v) for m, v in modes.items()}
        us = {m: 1e6 / v for m, v in med.items()}
        p50 = {m: 1000 * statistics.median(x["latency_p50_ms"] for x in v) for m, v in single[route].items()}
        summary[route] = {"median_requests_per_s": med, "us_per_request": us,
                          "gateway_us_per_request": us["key"] - us["off"], "key_over_off": med["key"] / med["off"],
                          "c1_median_p50_us": p50, "gateway_c1_p50_us": p50["key"] - p50["off"]}
        log(f"{route}: saturated: off {med['off']:.0f} req/s ({us['off']:.1f} µs), key {med['key']:.0f} req/s ({us['key']:.1f} µs): "
            f"gateway +{us['key'] - us['off']:.1f} µs/request; c=1 p50: off {p50['off']:.0f} µs, key {p50['key']:.0f} µs: "
            f"gateway +{p50['key'] - p50['off']:.0f} µs (target ≤ 50)")
    return {"results": results, "single_connection": single, "summary": summary}


def metering(args, data_dir: Path, key: str) -> dict:
    port = free_port()
    proc = start("key", port, data_dir)
    db_path = data_dir / "ferroserve.sqlite3"
    route = "/v1/chat/completions"
    try:
        before = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        metric_re = re.compile(r'^ferroserve_requests_total\{route="/v1/chat/completions",status="404"\} (\S+)$', re.M)
        # delay() per request per connection: connections / delay ≈ the target rate.
        delay_ms = 1000.0 * args.metering_connections / args.metering_rate
        script = lua_script("POST", METERED_BODY, key, delay_ms)
        r = wrk(f"http://127.0.0.1:{port}{route}", script, args.metering_seconds, args.metering_connections)
        r["loadavg_1m"] = os.getloadavg()[0]
        time.sleep(0.5)  # let the last in-flight responses finish
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        served = int(float(metric_re.search(text).group(1)))
    finally:
        stop(proc)
    rows = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM usage").fetchone()[0] - before
    out = {"wrk": r, "delay_ms": delay_ms, "server_requests": served, "usage_rows": rows,
           "lost": served - rows, "ok": rows == served and rows >= r["requests"]}
    log(f"metering: wrk {r['requests']} responses at {r['requests_per_s']:.0f} req/s for {args.metering_seconds} s; "
        f"server counted {served}; SQLite rows {rows}; lost {served - rows}; load {r['loadavg_1m']:.2f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--single-duration", type=int, default=3, help="seconds per c=1 wrk run")
    ap.add_argument("--metering-seconds", type=int, default=30)
    ap.add_argument("--metering-rate", type=float, default=1100.0, help="target requests/s of the metering run")
    ap.add_argument("--metering-connections", type=int, default=16)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-metering", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        log("wrk not found: `make bench-setup` installs it (apt-get install wrk)")
        return 2
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-bench-key-"))
    key = make_key(data_dir)
    report: dict = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                    "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                    "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    if not args.skip_overhead:
        report["overhead"] = overhead(args, data_dir, key)
    if not args.skip_metering:
        report["metering"] = metering(args, data_dir, key)
    ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH_DIR / "results" / f"gateway-{ts}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {out}")
    return 0 if report.get("metering", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Scale-out: two ferroserve replicas behind nginx against one (issue 18's second target: the
trivial route at >= 1.6x one replica's rate "where the cores allow it").

    PYTHONPATH=python:. .venv/bin/python bench/scaleout.py                    # 3 rounds x 8 s per arm
    PYTHONPATH=python:. .venv/bin/python bench/scaleout.py --rounds 5 --duration 10

Real servers on loopback, as the replica tests start them: PostgreSQL and Redis (Debian's
packages, tests/replicas/conftest.py) shared by both replicas, nginx (Debian's `nginx-light` or
`nginx`: `apt-get install nginx-light wrk`) in front with upstream keep-alive, wrk (one thread,
`--connections` keep-alive connections) as the client. Arms, alternating per round:

- `direct 1`: wrk -> replica A (what one replica does without a proxy);
- `nginx 1`: wrk -> nginx -> replica A (the like-for-like baseline: the proxy's cost included);
- `nginx 2`: wrk -> nginx -> replicas A and B (round robin).

Routes: `GET /v1/models` (the trivial route: no store, no engine) and a metered `POST
/v1/embeddings` for a model that does not exist (auth against the shared database's key cache
and one Redis rate-window round trip, a usage record queued: the gateway's own path without an
engine). The target ratio is `nginx 2` / `nginx 1`. Every process here shares the machine's
cores: the CPU each group used is reported next to the rates so the result can be read as
what the cores allow. Results go to bench/results/scaleout-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from ferroserve.config import default_models  # noqa: E402
from tests.conftest import Server, free_port, run_cli  # noqa: E402
from tests.replicas.conftest import Postgres, Redis  # noqa: E402

EMBED = "all-minilm"
NGINX_CONF = """
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream ferroserve {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://ferroserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
WRK_POST = """
wrk.method = "POST"
wrk.body = '{"model": "no-such-model", "input": "hi"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer KEY"
"""


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


class Nginx:
    def __init__(self, binary: str, upstreams: list[str], workers: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ferroserve-nginx-"))
        self.port = free_port()
        servers = "\n".join(f"        server {u};" for u in upstreams)
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=workers, tmp=self.tmp, servers=servers, port=self.port))
        self.proc = subprocess.Popen([binary, "-p", str(self.tmp), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import httpx
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except Exception:
                time.sleep(0.1)
        raise SystemExit(f"nginx did not answer on {self.url}: {(self.tmp / 'error.log').read_text()}")

    def pids(self) -> list[int]:
        return [self.proc.pid, *_children(self.proc.pid)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += [int(child), *_children(int(child))]
    except OSError:
        pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / tick


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wrk(url: str, duration: int, connections: int, script: Path | None) -> tuple[float, int, str]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, int(m.group(1)) if m else 0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--nginx-workers", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx_bin).exists() or not shutil.which("wrk"):
        log("needs nginx and wrk: apt-get install -y nginx-light wrk")
        return 2

    spec = next(m for m in default_models() if m.kind == "embedding")
    pg, redis_server = Postgres(), Redis()
    replicas: list[Server] = []
    proxies: dict[str, Nginx] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ferroserve-scaleout-"))
    try:
        store = ["--database-url", pg.new_database(), "--redis-url", redis_server.new_url()]
        for _ in range(2):
            replicas.append(Server(["--log-level", "warning", "--model", f"{EMBED}={spec.path}", *store]))
        key = run_cli(["keys", "create", "--rpm", "100000000", *store[:2]]).stdout.strip()
        for r in replicas:
            r.wait_ready()
        time.sleep(1.5)  # both replicas have seen the key
        script = tmp / "post.lua"
        script.write_text(WRK_POST.replace("KEY", key))
        a, b = (r.url.removeprefix("http://") for r in replicas)
        proxies = {"nginx 1": Nginx(nginx_bin, [a], args.nginx_workers),
                   "nginx 2": Nginx(nginx_bin, [a, b], args.nginx_workers)}
        arms = {"direct 1": (replicas[0].url, [replicas[0]], None),
                "nginx 1": (proxies["nginx 1"].url, [replicas[0]], proxies["nginx 1"]),
                "nginx 2": (proxies["nginx 2"].url, replicas, proxies["nginx 2"])}
        routes = {"GET /v1/models": ("/v1/models", None), "metered 404": ("/v1/embeddings", script)}
        samples: dict = {route: {arm: [] for arm in arms} for route in routes}
        for rnd in range(args.rounds):
            order = list(arms) if rnd % 2 == 0 else list(reversed(arms))
            for route, (path, lua) in routes.items():
                for arm in order:
                    url, used, proxy = arms[arm]
                    server_pids = [p for r in used for p in (r.proc.pid, *_children(r.proc.pid))]
                    proxy_pids = proxy.pids() if proxy else []
                    before = cpu_seconds(server_pids), cpu_seconds(proxy_pids), _children_cpu()
                    t = time.monotonic()
                    rate, bad, _ = wrk(url + path, args.duration, args.connections, lua)
                    wall = time.monotonic() - t
                    cores = ((cpu_seconds(server_pids) - before[0]) / wall, (cpu_seconds(proxy_pids) - before[1]) / wall,
                             (_children_cpu() - before[2]) / wall)
                    want_bad = route == "metered 404"  # every answer is a 404 there
                    if (bad == 0) == want_bad:
                        raise SystemExit(f"{arm} {route}: {bad} non-2xx answers, unexpected")
                    samples[route][arm].append({"rate": rate, "server_cores": cores[0], "nginx_cores": cores[1],
                                                "wrk_cores": cores[2]})
                    log(f"round {rnd} {route:15s} {arm:9s} {rate:9.0f} req/s  "
                        f"cores: replicas {cores[0]:.2f} nginx {cores[1]:.2f} wrk {cores[2]:.2f}")
        summary = {}
        for route, by_arm in samples.items():
            med = {arm: statistics.median(s["rate"] for s in v) for arm, v in by_arm.items()}
            summary[route] = {"median_rate": med, "nginx2_over_nginx1": med["nginx 2"] / med["nginx 1"],
                              "nginx2_over_direct1": med["nginx 2"] / med["direct 1"],
                              "cores": {arm: {k: statistics.median(s[k] for s in v) for k in ("server_cores", "nginx_cores", "wrk_cores")}
                                        for arm, v in by_arm.items()}}
            log(f"{route}: " + ", ".join(f"{arm} {r:.0f}/s" for arm, r in med.items())
                + f"; nginx 2 / nginx 1 = {summary[route]['nginx2_over_nginx1']:.2f}x, "
                  f"nginx 2 / direct 1 = {summary[route]['nginx2_over_direct1']:.2f}x")
        out = args.out or BENCH_DIR / "results" / f"scaleout-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "cpus": os.cpu_count(),
                                   "samples": samples, "summary": summary}, indent=2, default=str))
        log(f"wrote {out}")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for r in replicas:
            r.stop()
        redis_server.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

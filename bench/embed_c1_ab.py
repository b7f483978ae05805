#!/usr/bin/env python3
"""One sentence at a time over HTTP (issue 14's c=1 embeddings target), server variants
alternated in the same minutes (bench/NOTES.md, "One sentence over HTTP, the path").

Each round starts one server per arm, warms it (30 requests), times `--requests` requests of
one sentence each (bench/workload.py's sentences, cycling; keep-alive `http.client`, the
leanest client: its own share of a request is ≈ 0.1 ms), stops it, and goes on to the next
arm; the p50 / p95 per arm and round are printed as JSON lines, then the median of the p50s.
An arm is `NAME=PYTHONPATH` (`:`-separated; the tree whose `ferroserve` runs), optionally followed by
`,KEY=VALUE` server environment entries:

    .venv/bin/python bench/embed_c1_ab.py --arm main=/work/main/python \\
        --arm new=python,FERROSERVE_X=1 --rounds 4

With `EMBHTTP_TRACE`-style instrumentation the client's send/receive stamps (time.time_ns)
go to `--stamps FILE` (one line per request: arm, round, send ns, receive ns).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))
import workload  # noqa: E402

from tests.conftest import stop_process_group  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(pythonpath: str, env_extra: dict, port: int, log_path: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": pythonpath, **env_extra}
    cmd = [sys.executable, "-m", "ferroserve", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        stop_process_group(proc, 20)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("server not ready")


def thread_counters(pid: int) -> dict[str, list[float]]:
    """Per thread name (numbered threads summed): [CPU seconds, voluntary context switches]
    of the server's worker process (granian's child when it forks one)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    pids = [pid] + [int(k) for k in kids]
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, list[float]] = {}
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{p}/task/{tid}/stat").read_text()
                status = Path(f"/proc/{p}/task/{tid}/status").read_text()
            except OSError:
                continue
            # Threads keep the name of the thread that made them ("python" for rayon's and
            # granian's): those are told apart by id ("python@<tid>", "@main" for the process's own).
            name = stat[stat.index("(") + 1:stat.rindex(")")].rstrip("0123456789-")
            if name == "python":
                name += "@main" if tid == str(p) else f"@{tid}"
            fields = stat[stat.rindex(")") + 2:].split()
            vol = int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))
            acc = out.setdefault(name, [0.0, 0.0])
            acc[0] += (int(fields[11]) + int(fields[12])) / tick
            acc[1] += vol
    return out


def run_requests(port: int, bodies: list[bytes], n: int, model_check: bool) -> list[tuple[int, int]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    headers = {"content-type": "application/json"}
    stamps = []
    for i in range(n):
        body = bodies[i % len(bodies)]
        t0 = time.time_ns()
        conn.request("POST", "/v1/embeddings", body, headers)
        r = conn.getresponse()
        data = r.read()
        t1 = time.time_ns()
        if r.status != 200:
            raise SystemExit(f"status {r.status}: {data[:300]!r}")
        if model_check and i == 0:
            assert len(json.loads(data)["data"][0]["embedding"]) > 0
        stamps.append((t0, t1))
    conn.close()
    return stamps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", required=True, help="NAME=PYTHONPATH[,KEY=VALUE...]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--model", default="all-minilm")
    p.add_argument("--server-args", default="--embed-cache-mb 0")
    p.add_argument("--stamps", help="append per-request client stamps here")
    p.add_argument("--log-dir", default="/tmp")
    a = p.parse_args()
    arms = []
    for spec in a.arm:
        name, rest = spec.split("=", 1)
        path, *envs = rest.split(",")
        paths = [str(Path(x).resolve()) for x in path.split(os.pathsep)]
        arms.append((name, os.pathsep.join([*paths, str(REPO)]), dict(e.split("=", 1) for e in envs)))
    bodies = [json.dumps({"model": a.model, "input": s}).encode() for s in workload.sentences(512)]
    p50s: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    for rnd in range(a.rounds):
        for name, path, env in arms:
            port = free_port()
            proc = start(path, env, port, Path(a.log_dir) / f"embed-c1-ab-{name}-{rnd}.log", a.server_args.split())
            try:
                wait_ready(port, proc)
                run_requests(port, bodies, 30, True)
                load0 = os.getloadavg()[0]
                c0 = thread_counters(proc.pid)
                stamps = run_requests(port, bodies, a.requests, False)
                c1 = thread_counters(proc.pid)
            finally:
                stop(proc)
            lat = sorted((t1 - t0) / 1e6 for t0, t1 in stamps)
            p50 = statistics.median(lat)
            p50s[name].append(p50)
            print(json.dumps({"round": rnd, "arm": name, "p50_ms": round(p50, 3),
                              "p95_ms": round(lat[int(0.95 * len(lat))], 3), "load1": round(load0, 2),
                              # per request: server CPU ms and voluntary context switches, per thread name
                              "cpu_ms": {k: round(1e3 * (v[0] - c0.get(k, [0, 0])[0]) / a.requests, 3) for k, v in c1.items()
                                         if v[0] - c0.get(k, [0, 0])[0] > 0.01 * a.requests / 1e3},
                              "vcsw": {k: round((v[1] - c0.get(k, [0, 0])[1]) / a.requests, 2) for k, v in c1.items()
                                       if v[1] - c0.get(k, [0, 0])[1] > 0.1 * a.requests}}), flush=True)
            if a.stamps:
                with open(a.stamps, "a") as f:
                    f.writelines(f"{name} {rnd} {t0} {t1}\n" for t0, t1 in stamps)
    print(json.dumps({"median_p50_ms": {k: round(statistics.median(v), 3) for k, v in p50s.items()},
                      "p50s": {k: [round(x, 3) for x in v] for k, v in p50s.items()}}), flush=True)


if __name__ == "__main__":
    main()

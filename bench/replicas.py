#!/usr/bin/env python3
"""What shared state costs per metered request: the gateway on PostgreSQL + Redis against the
gateway on SQLite (issue 18's target: ≤ 300 µs more at the median).

    PYTHONPATH=python:. .venv/bin/python bench/replicas.py                 # 3 rounds x 1,500 requests a route
    PYTHONPATH=python:. .venv/bin/python bench/replicas.py --rounds 5 --requests 3000

Real servers on loopback, started here in temporary directories as the tests start them
(tests/replicas/conftest.py: Debian's postgresql and redis-server): PostgreSQL with its
default durability (fsync and synchronous_commit on, set on its command line: each answered
request waits for its usage record's commit, so for one request at a time that is a WAL flush
per request, which SQLite's WAL with synchronous=NORMAL does not do); Redis without
persistence. One `ferroserve serve` per mode, the same build and the embedding model only,
rounds rotating the modes' order. Modes (`--modes`, default the first three):

- `sqlite`: the embedded default, limits in process;
- `postgres+redis`: `--database-url` and `--redis-url`, usage at the database's durability;
- `postgres+redis async`: the same with `--pg-async-commit` (usage records committed with
  synchronous_commit=off; the answer still waits for the commit);
- `postgres`, `sqlite+redis`: one of the two shared stores alone, to see which costs what.

One client connection (c=1, keep-alive), requests one after another; the median latency per
route and mode, over all rounds. Routes:

- `metered 404`: `POST /v1/embeddings` for a model that does not exist, with a key that has an
  RPM limit (never reached): auth, the 404, the request counted in its window as it is settled
  (Redis: one script round trip) and a usage record queued for the writer (not waited for).
- `embeddings`: `POST /v1/embeddings` of one short input, key with RPM and TPM limits, in a
  workspace with a budget, on a priced model: the request's count, its tokens and its budget
  reservation in one Redis script, the model, the budget settled (no round trip when the cost
  is the reservation), and the usage record committed before the answer (a PostgreSQL commit,
  or SQLite's).

Results go to bench/results/replicas-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from ferroserve.config import default_models  # noqa: E402
from tests.conftest import Server, run_cli  # noqa: E402
from tests.replicas.conftest import Postgres, Redis  # noqa: E402

EMBED = "all-minilm"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def make_key(store_args: list[str], *flags: str) -> str:
    r = run_cli(["keys", "create", *flags, *store_args])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def measure(url: str, key: str, body: dict, n: int, want: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(50):  # warm-up: connection, caches, Redis scripts loaded
            client.post("/v1/embeddings", json=body)
        for _ in range(n):
            t = time.perf_counter()
            r = client.post("/v1/embeddings", json=body)
            out.append(time.perf_counter() - t)
            assert r.status_code == want, r.text
    return out


MODES = ("sqlite", "postgres+redis", "postgres+redis async", "postgres", "sqlite+redis")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1500, help="per route, mode and round")
    ap.add_argument("--modes", default=",".join(MODES[:3]), help=f"comma-separated, sqlite first; of {', '.join(MODES)}")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    chosen = args.modes.split(",")
    if chosen[0] != "sqlite" or not set(chosen) <= set(MODES):
        ap.error(f"--modes: sqlite first, then any of {', '.join(MODES[1:])}")

    spec = next(m for m in default_models() if m.kind == "embedding")
    pg, redis_server = Postgres(durable=True), Redis()
    servers: dict[str, Server] = {}
    try:
        modes: dict[str, list[str]] = {}
        for mode in chosen:
            flags = []
            if mode.startswith("postgres"):
                flags += ["--database-url", pg.new_database()]
            if "redis" in mode:
                flags += ["--redis-url", redis_server.new_url()]
            if mode.endswith("async"):
                flags += ["--pg-async-commit"]
            modes[mode] = flags
        keys: dict[str, dict[str, str]] = {}
        for mode, flags in modes.items():
            srv = Server(["--log-level", "warning", "--model", f"{EMBED}={spec.path}", "--price", f"{EMBED}=0.02:0", *flags])
            store_args = flags[:2] if mode.startswith("postgres") else ["--data-dir", str(srv.data_dir)]
            keys[mode] = {
                "metered 404": make_key(store_args, "--workspace", "bench", "--rpm", "100000000"),
                "embeddings": make_key(store_args, "--workspace", "budgeted", "--rpm", "100000000", "--tpm", "1000000000",
                                       "--budget-usd", "1000000"),
            }
            srv.wait_ready()
            servers[mode] = srv
        time.sleep(1.5)  # the servers have polled the keys made after they opened their stores
        routes = {"metered 404": ({"model": "no-such-model", "input": "hi"}, 404),
                  "embeddings": ({"model": EMBED, "input": "hi"}, 200)}
        samples: dict[str, dict[str, list[float]]] = {r: {m: [] for m in modes} for r in routes}
        for rnd in range(args.rounds):
            order = list(modes)[rnd % len(modes):] + list(modes)[:rnd % len(modes)]
            for route, (body, want) in routes.items():
                for mode in order:
                    got = measure(servers[mode].url, keys[mode][route], body, args.requests, want)
                    samples[route][mode] += got
                    log(f"round {rnd} {route:12s} {mode:15s} p50 {statistics.median(got) * 1e6:8.0f} µs")
        summary = {}
        for route, by_mode in samples.items():
            p50 = {m: statistics.median(v) * 1e6 for m, v in by_mode.items()}
            p90 = {m: statistics.quantiles(v, n=10)[-1] * 1e6 for m, v in by_mode.items()}
            added = {m: p50[m] - p50["sqlite"] for m in by_mode if m != "sqlite"}
            summary[route] = {"p50_us": p50, "p90_us": p90, "added_p50_us": added}
            log(f"{route:12s} p50 sqlite {p50['sqlite']:.0f} µs; "
                + "; ".join(f"{m} {p50[m]:.0f} µs ({added[m]:+.0f})" for m in added))
        load = Path("/proc/loadavg").read_text().split()[:3]
        log(f"load average at the end: {' '.join(load)}")
        out = args.out or BENCH_DIR / "results" / f"replicas-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "summary": summary, "loadavg": load}, indent=2, default=str))
        log(f"wrote {out}")
    finally:
        for srv in servers.values():
            srv.stop()
        redis_server.stop()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

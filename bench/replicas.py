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
- `postgres+redis async exact`: the same with `--limit-leases off` (one Redis script per request;
  the other Redis modes admit from leases of the keys' large limits, shared_limits.py);
- `postgres`, `sqlite+redis`: one of the two shared stores alone, to see which costs what.

One client connection per mode and route (c=1, keep-alive), requests one after another, the
modes taking turns every 100 requests (`--block`); the median latency per route and mode, over
all rounds, and the server's CPU time per request (its worker process's user + system time
across each mode's own blocks, less what it spends idle in the same time: what our code costs,
which a busy machine's waits for a core do not inflate). Routes:

- `metered 404`: `POST /v1/embeddings` for a model that does not exist, with a key that has an
  RPM limit (never reached): auth, the 404, the request counted in its window as it is settled
  (Redis: one script round trip) and a usage record queued for the writer (not waited for).
- `embeddings`: `POST /v1/embeddings` of one short input, key with RPM and TPM limits, in a
  workspace with a budget, on a priced model: the request's count, its tokens and its budget
  reservation in one Redis script (with leases, one script takes a lease of 1/100 of each of
  these large limits and the next requests make none), the model, the budget settled (no round
  trip when the cost is the reservation), and the usage record committed before the answer (a
  PostgreSQL commit, or SQLite's). The same input every time, so after the warm-up the embedding cache answers
  it: the gateway's own cost, no model time to hide a round trip behind.
- `computed` (`--computed` requests per mode and round): the same with the cache bypassed, so the
  model computes each one; with Redis the admission travels while it does (gate.Ticket.admit's
  `ahead`).

After them, a burst of `--concurrency` clients (16) × 50 embeddings per mode: requests per
second and, on PostgreSQL, rows per usage transaction (their `xmin`), the group commit's size.

Before the servers, the floors in this process: the median of one Redis admission script, one
usage commit on PostgreSQL (durable and async) and on SQLite.

Results go to bench/results/replicas-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(srv: Server) -> int:
    """granian's worker process: the one that serves (and runs the gateway)."""
    return int(Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()[0])


def measure(client: httpx.Client, body: dict, n: int, want: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post("/v1/embeddings", json=body)
        out.append(time.perf_counter() - t)
        assert r.status_code == want, r.text
    return out


def round_trips(pg: Postgres, redis_server: Redis, n: int) -> dict[str, float]:
    """The floors, in this process without a server: the median of `n` calls each of the Redis
    admission script, a one-row usage commit on PostgreSQL (durable, and with
    synchronous_commit=off) and on SQLite (WAL, synchronous=NORMAL)."""
    import tempfile

    from ferroserve.gateway import shared_limits
    from ferroserve.gateway.pg_store import PostgresStore
    from ferroserve.gateway.store import Store

    def median_us(fn) -> float:
        for _ in range(50):
            fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    row = ("r", time.time(), "k", "w", "embeddings", EMBED, "local", 0, 1, 0, 0, 0.0, 1.0, None, 200, None, None, None)
    client = shared_limits.connect(redis_server.new_url())
    admit = client.register_script(shared_limits._ADMIT)
    args = [1e9, 1e-8, 0.0, 60, 10**9, 1, 1, time.time(), 60000, 10**9, 0, 0, 0.0, 10]  # (no lease)
    url = pg.new_database()
    durable, fast = PostgresStore(url), PostgresStore(url, usage_async_commit=True)
    sqlite = Store(tempfile.mkdtemp(prefix="ferroserve-bench-"))
    try:
        return {"redis admission script": median_us(lambda: admit(keys=["b", "w"], args=args)),
                "postgres usage commit, durable": median_us(lambda: durable.insert_usage([row])),
                "postgres usage commit, --pg-async-commit": median_us(lambda: fast.insert_usage([row])),
                "sqlite usage commit (WAL, NORMAL)": median_us(lambda: sqlite.insert_usage([row]))}
    finally:
        client.close()
        durable.close()
        fast.close()
        sqlite.close()


def concurrent_burst(mode: str, url: str, key: str, flags: list[str], concurrency: int, per_client: int = 50) -> dict:
    """`concurrency` clients sending embeddings at once: requests per second and, on
    PostgreSQL, how many transactions wrote their usage rows (each row's `xmin`): the group
    commit's size under load."""
    import concurrent.futures

    import psycopg

    def client_run(_: int) -> None:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60) as client:
            measure(client, {"model": EMBED, "input": "hi"}, per_client, 200)

    database = flags[1] if flags and flags[0] == "--database-url" else None
    query = "SELECT count(*), count(DISTINCT xmin::text) FROM usage WHERE status = 200"
    before = (0, 0)
    if database:
        with psycopg.connect(database) as conn:
            before = conn.execute(query).fetchone()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_run, range(concurrency)))
    seconds = time.perf_counter() - began
    out = {"requests_per_s": concurrency * per_client / seconds}
    if database:
        time.sleep(0.2)
        with psycopg.connect(database) as conn:
            rows, transactions = conn.execute(query).fetchone()
        out |= {"rows": rows - before[0], "transactions": transactions - before[1]}
    log(f"c={concurrency} embeddings {mode:20s} " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()))
    return out


MODES = ("sqlite", "postgres+redis", "postgres+redis async", "postgres+redis async exact", "postgres", "sqlite+redis")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1500, help="per route, mode and round")
    ap.add_argument("--concurrency", type=int, default=16, help="clients of the burst after the c=1 rounds (0: none)")
    ap.add_argument("--block", type=int, default=100, help="requests a mode sends before the next mode's turn")
    ap.add_argument("--modes", default=",".join(MODES[:3]), help=f"comma-separated, sqlite first; of {', '.join(MODES)}")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--computed", type=int, default=300,
                    help="per mode and round: embeddings computed by the model (the cache bypassed; 0: none)")
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
            if "async" in mode:
                flags += ["--pg-async-commit"]
            if mode.endswith("exact"):
                flags += ["--limit-leases", "off"]
            modes[mode] = flags
        keys: dict[str, dict[str, str]] = {}
        for mode, flags in modes.items():
            srv = Server(["--log-level", "warning", "--model", f"{EMBED}={spec.path}", "--price", f"{EMBED}=0.02:0", *flags])
            store_args = flags[:2] if mode.startswith("postgres") else ["--data-dir", str(srv.data_dir)]
            limited = ("--workspace", "budgeted", "--rpm", "100000000", "--tpm", "1000000000", "--budget-usd", "1000000")
            keys[mode] = {
                "metered 404": make_key(store_args, "--workspace", "bench", "--rpm", "100000000"),
                "embeddings": make_key(store_args, *limited),
                "computed": make_key(store_args, *limited),
            }
            srv.wait_ready()
            servers[mode] = srv
        floors = round_trips(pg, redis_server, 1000)
        for what, us in floors.items():
            log(f"{what:42s} p50 {us:8.0f} µs")
        for mode, srv in servers.items():  # each server knows the keys made after it opened its store
            for key in keys[mode].values():
                deadline = time.monotonic() + 10
                while httpx.get(srv.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10).status_code != 200:
                    assert time.monotonic() < deadline, f"{mode}: a key made with the CLI is still unknown after 10 s"
                    time.sleep(0.05)
        routes = {"metered 404": ({"model": "no-such-model", "input": "hi"}, 404),
                  "embeddings": ({"model": EMBED, "input": "hi"}, 200),
                  "computed": ({"model": EMBED, "input": "hi", "metadata": {"cache_mode": "bypass"}}, 200)}
        samples: dict[str, dict[str, list[float]]] = {r: {m: [] for m in modes} for r in routes}
        # The server's own CPU time per request (its worker process, all threads): what our code
        # costs, whatever the machine's load adds to the wall-clock latency in waits for a core.
        cpu_s: dict[str, dict[str, float]] = {r: dict.fromkeys(modes, 0.0) for r in routes}
        workers = {mode: worker_pid(srv) for mode, srv in servers.items()}
        # What an idle server spends a second (its polls: key versions, batch leases), to take
        # out of the per-request figure (a slow mode's blocks last longer and so pay more polls).
        idle_before = {mode: cpu_seconds(pid) for mode, pid in workers.items()}
        time.sleep(3.0)
        idle_cpu_per_s = {mode: (cpu_seconds(pid) - idle_before[mode]) / 3.0 for mode, pid in workers.items()}
        wall_s: dict[str, dict[str, float]] = {r: dict.fromkeys(modes, 0.0) for r in routes}
        clients = {(mode, route): httpx.Client(base_url=servers[mode].url, timeout=30,
                                               headers={"authorization": f"Bearer {keys[mode][route]}"})
                   for mode in modes for route in routes}
        for (mode, route), client in clients.items():  # warm-up: connection, caches, Redis scripts loaded
            measure(client, routes[route][0], 50, routes[route][1])
        # The machine is shared: the modes take turns every `--block` requests, so a burst of
        # someone else's load falls on all of them alike.
        for rnd in range(args.rounds):
            order = list(modes)[rnd % len(modes):] + list(modes)[:rnd % len(modes)]
            for route, (body, want) in routes.items():
                n = args.computed if route == "computed" else args.requests
                if not n:
                    continue
                blocks = max(1, n // args.block)
                got: dict[str, list[float]] = {m: [] for m in modes}
                for _ in range(blocks):
                    for mode in order:
                        cpu_before, wall_before = cpu_seconds(workers[mode]), time.perf_counter()
                        got[mode] += measure(clients[mode, route], body, n // blocks, want)
                        cpu_s[route][mode] += cpu_seconds(workers[mode]) - cpu_before
                        wall_s[route][mode] += time.perf_counter() - wall_before
                for mode in order:
                    samples[route][mode] += got[mode]
                    log(f"round {rnd} {route:12s} {mode:20s} p50 {statistics.median(got[mode]) * 1e6:8.0f} µs")
        for client in clients.values():
            client.close()
        summary = {}
        for route, by_mode in samples.items():
            if not by_mode["sqlite"]:
                continue
            p50 = {m: statistics.median(v) * 1e6 for m, v in by_mode.items()}
            p90 = {m: statistics.quantiles(v, n=10)[-1] * 1e6 for m, v in by_mode.items()}
            added = {m: p50[m] - p50["sqlite"] for m in by_mode if m != "sqlite"}
            cpu_us = {m: (cpu_s[route][m] - idle_cpu_per_s[m] * wall_s[route][m]) / len(v) * 1e6 for m, v in by_mode.items()}
            summary[route] = {"p50_us": p50, "p90_us": p90, "added_p50_us": added, "server_cpu_us_per_request": cpu_us}
            log(f"{route:12s} p50 sqlite {p50['sqlite']:.0f} µs; "
                + "; ".join(f"{m} {p50[m]:.0f} µs ({added[m]:+.0f})" for m in added))
            log(f"{route:12s} server CPU per request (less idle): " + "; ".join(f"{m} {us:.0f} µs" for m, us in cpu_us.items()))
        burst = {mode: concurrent_burst(mode, servers[mode].url, keys[mode]["embeddings"], modes[mode], args.concurrency)
                 for mode in modes} if args.concurrency else {}
        load = Path("/proc/loadavg").read_text().split()[:3]
        log(f"load average at the end: {' '.join(load)}")
        out = args.out or BENCH_DIR / "results" / f"replicas-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "summary": summary, "idle_cpu_per_s": idle_cpu_per_s, "round_trips_p50_us": floors, "burst": burst,
                                   "loadavg": load}, indent=2, default=str))
        log(f"wrote {out}")
    finally:
        for srv in servers.values():
            srv.stop()
        redis_server.stop()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

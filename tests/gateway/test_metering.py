"""Usage metering against the real SQLite file: 200 mixed requests (embeddings, chat plain and
streamed, completions, errors) from concurrent clients each leave exactly one row whose
tokens equal the response's `usage`; a restart keeps keys, usage and budgets."""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.gateway.conftest import CHAT, EMBED, PRICES, auth, create_key, embed, key_id_of, keys_cli, usage_rows


@pytest.fixture(scope="module")
def data_dir():
    return Path(tempfile.mkdtemp(prefix="ferroserve-meter-"))


@pytest.fixture(scope="module")
def keys(data_dir):
    return {
        "meter": create_key(data_dir, "meter"),
        "budget": create_key(data_dir, "small", "--budget-usd", "12"),
        "revoked": create_key(data_dir, "meter"),
    }


def start(data_dir: Path) -> Server:
    srv = Server(["--log-level", "info", *PRICES], data_dir=data_dir)
    srv.wait_ready()
    return srv


def _request(url: str, key: str, i: int) -> tuple[str, int, dict | None]:
    """Request number i of the mix; returns (request id, status, usage or None)."""
    rid = f"mix-{i:03d}"
    h = {**auth(key), "x-request-id": rid}
    kind = i % 10
    if kind < 5:  # embeddings: one text, or several
        body = {"model": EMBED, "input": f"sentence number {i}" if kind % 2 else [f"a {i}", f"b {i} c d", "e"]}
        r = httpx.post(url + "/v1/embeddings", json=body, headers=h, timeout=120)
        usage = r.json().get("usage")
        if usage:
            usage = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0, "cached_tokens": 0}
    elif kind == 5:  # chat, plain
        r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=120, json={
            "model": CHAT, "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 1 + i % 3, "temperature": 0})
        usage = r.json().get("usage")
    elif kind == 6:  # chat, streamed with the usage chunk
        usage = None
        with httpx.stream("POST", url + "/v1/chat/completions", headers=h, timeout=120, json={
                "model": CHAT, "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 2, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        assert r.headers["x-request-id"] == rid
    elif kind == 7:  # text completion
        r = httpx.post(url + "/v1/completions", headers=h, timeout=120,
                       json={"model": CHAT, "prompt": f"{i} plus one is", "max_tokens": 2, "temperature": 0})
        usage = r.json().get("usage")
    elif kind == 8:  # a bad request: metered as a failure with no tokens
        r = httpx.post(url + "/v1/embeddings", json={"model": EMBED, "input": []}, headers=h, timeout=60)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    else:  # an unknown model
        r = httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": []}, headers=h, timeout=60)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    assert r.headers["x-request-id"] == rid
    if usage is not None and "prompt_tokens_details" in usage:
        usage = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                 "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}
    return rid, r.status_code, usage


def test_usage_rows_match_responses_then_survive_a_restart(data_dir, keys):
    srv = start(data_dir)
    try:
        assert embed(srv.url, keys["revoked"]).status_code == 200
        keys_cli(data_dir, "revoke", key_id_of(data_dir, keys["revoked"]))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _request(srv.url, keys["meter"], i), range(200)))
        statuses = [s for _, s, _ in results]
        assert statuses.count(200) == 160 and statuses.count(400) == 20 and statuses.count(404) == 20
        # The usage query goes through the writer's queue, so it sees every answered request.
        summary = httpx.get(srv.url + "/v1/usage?limit=1000", headers=auth(keys["meter"])).json()
        rows = {r["request_id"]: r for r in usage_rows(data_dir) if r["workspace"] == "meter" and r["request_id"].startswith("mix-")}
        assert len(rows) == 200
        for rid, status, usage in results:
            row = rows[rid]
            assert row["status"] == status, rid
            got = {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"], "cached_tokens": row["cached_tokens"]}
            assert got == usage, rid
            assert row["cache_hit"] == int(usage["cached_tokens"] > 0), rid
            expected_cost = (usage["prompt_tokens"] * (1e6 if row["model"] == "sentence-transformers/all-MiniLM-L6-v2" else 1000)
                             + usage["completion_tokens"] * (0 if row["model"] == "sentence-transformers/all-MiniLM-L6-v2" else 2000)) / 1e6
            assert row["cost_usd"] == pytest.approx(expected_cost), rid
            assert row["latency_ms"] > 0 and row["key_id"].startswith("key_")
            if status == 200:
                assert row["backend"] == "local" and row["model"] in ("sentence-transformers/all-MiniLM-L6-v2", "SmolLM2-135M-Instruct")
        streamed = [rows[rid] for rid, *_ in results if int(rid[4:]) % 10 == 6]
        assert all(r["ttft_ms"] is not None and r["ttft_ms"] <= r["latency_ms"] for r in streamed)
        # The workspace's totals: the 200, plus the one request made with its since-revoked key.
        assert summary["total_requests"] == 201
        assert summary["total_tokens_in"] == sum(u["prompt_tokens"] for *_, u in results) + other_prompt_tokens(data_dir, "meter")
        assert summary["total_tokens_out"] == sum(u["completion_tokens"] for *_, u in results)
        # Spend part of a budget right before stopping: these rows must survive the restart.
        n = embed(srv.url, keys["budget"], headers={"x-request-id": "budget-0"}).json()["usage"]["prompt_tokens"]
        assert embed(srv.url, keys["budget"], headers={"x-request-id": "budget-1"}).status_code == 200
        before = httpx.get(srv.url + "/v1/usage", headers=auth(keys["meter"])).json()
    finally:
        srv.stop()
    # Access log: one JSON object per request, naming the key by id, never its secret or the prompts.
    text = srv.log_path.read_text()
    access = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"msg":"request"' in line]
    mixed = {a["request_id"]: a for a in access if a["request_id"].startswith("mix-")}
    assert len(mixed) == 200 and all(a["workspace"] == "meter" and a["key"].startswith("key_") for a in mixed.values())
    assert mixed["mix-005"]["prompt_tokens"] == rows["mix-005"]["prompt_tokens"]
    for secret in keys.values():
        assert secret not in text
    assert "Count to" not in text and "sentence number" not in text

    srv = start(data_dir)
    try:
        rows = usage_rows(data_dir)
        assert {"budget-0", "budget-1"} <= {r["request_id"] for r in rows}
        after = httpx.get(srv.url + "/v1/usage", headers=auth(keys["meter"])).json()
        for field in ("total_requests", "total_tokens_in", "total_tokens_out", "total_cost"):
            assert after[field] == before[field], field
        assert embed(srv.url, keys["revoked"]).status_code == 401  # still revoked
        assert embed(srv.url, keys["meter"]).status_code == 200  # still valid
        # $12 at $1 a token buys ceil(12 / n) requests in all; two were made before the restart.
        allowed = -(-12 // n)
        for _ in range(allowed - 2):
            assert embed(srv.url, keys["budget"]).status_code == 200
        r = embed(srv.url, keys["budget"])
        assert r.status_code == 402 and r.json()["error"]["code"] == "budget_exceeded"
    finally:
        srv.stop()


def other_prompt_tokens(data_dir: Path, workspace: str) -> int:
    """Prompt tokens of the workspace's rows that are not part of the mix."""
    return sum(r["prompt_tokens"] for r in usage_rows(data_dir) if r["workspace"] == workspace and not r["request_id"].startswith("mix-"))

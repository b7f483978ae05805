"""Regression tests for what the schemathesis runs (issue 16) found, and the issue's part 8/9
fixes: 500s on odd query values, a fuzzer revoking its own key, reads refused over the RPM,
operator limits on generation length, and workspace isolation on every object route (admin
routes refuse user keys)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.gateway.conftest import CHAT, EMBED, auth, create_key, embed, key_id_of


@pytest.fixture(scope="module")
def srv():
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-findings-"))
    keys = {"admin": create_key(data_dir, "ops", "--admin"), "a": create_key(data_dir, "alpha"),
            "b": create_key(data_dir, "beta"), "rpm": create_key(data_dir, "limited", "--rpm", "2")}
    s = Server(["--log-level", "warning", "--max-tokens-limit", "8", "--default-max-tokens", "4"], data_dir=data_dir)
    try:
        s.wait_ready()
        s.keys = keys
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("query", ["/v1/usage?limit=%C2%B2", "/v1/request-history?limit=%C2%B2", "/v1/usage?start=inf",
                                   "/v1/usage?start=1e20", "/v1/usage?end=nan", "/v1/usage/export?start=-1e300"])
def test_odd_query_values_are_400_not_500(srv, query):
    r = httpx.get(srv.url + query, headers=auth(srv.keys["a"]), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text


@pytest.mark.parametrize("query", ["expires=%C2%B2&signature=a", "expires=12&signature=%C3%A9"])
def test_odd_signed_url_values_are_403_not_500(srv, query):
    r = httpx.get(f"{srv.url}/v1/batch-results/x?{query}", timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_signature", r.text


def test_a_key_cannot_revoke_itself(srv):
    admin = srv.keys["admin"]
    r = httpx.delete(f"{srv.url}/v1/admin/keys/{key_id_of(srv.data_dir, admin)}", headers=auth(admin), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "cannot_revoke_self", r.text
    assert httpx.get(srv.url + "/v1/models", headers=auth(admin), timeout=30).status_code == 200


def test_reads_work_while_over_the_rpm(srv):
    key = srv.keys["rpm"]
    statuses = [embed(srv.url, key).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    for path in ("/v1/usage", "/v1/models", "/v1/request-history"):
        assert httpx.get(srv.url + path, headers=auth(key), timeout=30).status_code == 200, path
    assert embed(srv.url, key).status_code == 429  # inference is still limited


def _chat(srv, **kw):
    return httpx.post(srv.url + "/v1/chat/completions", headers=auth(srv.keys["a"]), timeout=120,
                      json={"model": CHAT, "messages": [{"role": "user", "content": "Count to fifty."}], "ignore_eos": True, **kw})


def test_default_max_tokens_and_limit(srv):
    assert _chat(srv).json()["usage"]["completion_tokens"] == 4  # --default-max-tokens
    assert _chat(srv, max_tokens=8).json()["usage"]["completion_tokens"] == 8
    r = _chat(srv, max_tokens=9)  # over --max-tokens-limit
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_key_comparison_is_constant_time():
    """The stored digest is compared with hmac.compare_digest (after a dict lookup by the hash)."""
    import inspect

    from ferroserve.gateway.gate import Gateway

    assert "hmac.compare_digest(key.secret_sha256, digest)" in inspect.getsource(Gateway.open_ticket)


@pytest.fixture(scope="module")
def alpha(srv) -> dict[str, str]:
    """One object of each kind, made by workspace alpha: ids by kind."""
    key = srv.keys["a"]
    a = auth(key)
    history = embed(srv.url, key, headers={"x-request-id": "iso-req-1"}).headers["x-request-id"]
    file = httpx.post(srv.url + "/v1/files?purpose=user_data", content=b"hello", headers=a, timeout=30).json()["id"]
    line = json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}})
    batch_file = httpx.post(srv.url + "/v1/files", headers=a, timeout=30, data={"purpose": "batch"},
                            files={"file": ("b.jsonl", line.encode())}).json()["id"]
    batch = httpx.post(srv.url + "/v1/batches", headers=a, timeout=30,
                       json={"input_file_id": batch_file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    response = httpx.post(srv.url + "/v1/responses", headers=a, timeout=120,
                          json={"model": CHAT, "input": "hi", "max_output_tokens": 2}).json()["id"]
    batch_embeddings = httpx.post(srv.url + "/v1/batch/embeddings", headers=a, timeout=30,
                                  json={"model": EMBED, "inputs": ["x"]}).json()["id"]
    deadline = time.monotonic() + 10  # the usage writer stores the history record
    while httpx.get(f"{srv.url}/v1/request-history/{history}", headers=a, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "alpha's request never reached its history"
        time.sleep(0.1)
    return {"history": history, "file": file, "batch_file": batch_file, "batch": batch.json()["id"], "response": response,
            "batch_embeddings": batch_embeddings, "key": key_id_of(srv.data_dir, key)}


# Every object route, as workspace beta's user key calls it with alpha's objects: (method, path,
# JSON body, expected status, expected error code). A status of 200 means a list, which must not
# name the object.
ISOLATION = [
    ("GET", "/v1/usage", None, 200, "history"),
    ("GET", "/v1/usage?workspace=alpha", None, 403, "permission_denied"),
    ("GET", "/v1/usage/export", None, 200, "history"),
    ("GET", "/v1/usage/export?workspace=alpha", None, 403, "permission_denied"),
    ("GET", "/v1/request-history", None, 200, "history"),
    ("GET", "/v1/request-history/{history}", None, 404, "not_found"),
    ("GET", "/v1/files", None, 200, "file"),
    ("GET", "/v1/files/{file}", None, 404, "not_found"),
    ("GET", "/v1/files/{file}/content", None, 404, "not_found"),
    ("DELETE", "/v1/files/{file}", None, 404, "not_found"),
    ("GET", "/v1/batches", None, 200, "batch"),
    ("GET", "/v1/batches/{batch}", None, 404, "not_found"),
    ("POST", "/v1/batches/{batch}/cancel", None, 404, "not_found"),
    ("POST", "/v1/batches", {"input_file_id": "{batch_file}", "endpoint": "/v1/chat/completions",
                             "completion_window": "24h"}, 404, "not_found"),
    ("GET", "/v1/batch/{batch_embeddings}", None, 404, "not_found"),
    ("DELETE", "/v1/batch/{batch_embeddings}", None, 404, "not_found"),
    ("GET", "/v1/responses/{response}", None, 404, "not_found"),
    ("GET", "/v1/responses/{response}/input_items", None, 404, "not_found"),
    ("POST", "/v1/responses/{response}/cancel", None, 404, "not_found"),
    ("DELETE", "/v1/responses/{response}", None, 404, "not_found"),
    # Continuing another workspace's conversation is as if it did not exist (OpenAI's 400).
    ("POST", "/v1/responses", {"model": CHAT, "input": "and?", "previous_response_id": "{response}"}, 400,
     "previous_response_not_found"),
    ("POST", "/v1/responses/input_tokens", {"model": CHAT, "input": "and?", "previous_response_id": "{response}"}, 400,
     "previous_response_not_found"),
    # Keys are an admin's: a user key is refused on every admin route.
    ("GET", "/v1/admin/keys", None, 403, "permission_denied"),
    ("POST", "/v1/admin/keys", {"workspace": "beta"}, 403, "permission_denied"),
    ("GET", "/v1/admin/keys/{key}", None, 403, "permission_denied"),
    ("DELETE", "/v1/admin/keys/{key}", None, 403, "permission_denied"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "expected"), ISOLATION,
                         ids=[f"{m} {p}" for m, p, *_ in ISOLATION])
def test_another_workspace_cannot_reach_an_object(srv, alpha, method, path, body, status, expected):
    url = srv.url + path.format(**alpha)
    if body is not None:
        body = json.loads(json.dumps(body).replace("{batch_file}", alpha["batch_file"]).replace("{response}", alpha["response"]))
    r = httpx.request(method, url, headers=auth(srv.keys["b"]), json=body, timeout=60)
    assert r.status_code == status, r.text
    if status == 200:
        assert alpha[expected] not in r.text, f"beta's {path} shows alpha's {expected}"
    else:
        assert r.json()["error"]["code"] == expected, r.text
    # ... and alpha still has its own.
    a = auth(srv.keys["a"])
    for own in (f"/v1/request-history/{alpha['history']}", f"/v1/files/{alpha['file']}", f"/v1/batches/{alpha['batch']}",
                f"/v1/batch/{alpha['batch_embeddings']}", f"/v1/responses/{alpha['response']}"):
        assert httpx.get(srv.url + own, headers=a, timeout=30).status_code == 200, own

"""Regression tests for what the schemathesis runs (issue 16) found, and the issue's part 8/9
fixes: 500s on odd query values, a fuzzer revoking its own key, reads refused over the RPM,
operator limits on generation length, workspace isolation, admin routes."""

from __future__ import annotations

import tempfile
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


def test_admin_routes_refuse_user_keys(srv):
    for method, path in (("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"), ("GET", "/v1/admin/keys/key_x"),
                         ("DELETE", "/v1/admin/keys/key_x")):
        r = httpx.request(method, srv.url + path, headers=auth(srv.keys["a"]), json={"workspace": "x"}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", (method, path, r.text)


def test_key_comparison_is_constant_time():
    """The stored digest is compared with hmac.compare_digest (after a dict lookup by the hash)."""
    import inspect

    from ferroserve.gateway.gate import Gateway

    assert "hmac.compare_digest(key.secret_sha256, digest)" in inspect.getsource(Gateway.open_ticket)


def _made_in_alpha(srv) -> dict[str, str]:
    """One object of each kind in workspace alpha: (route to read it) -> id."""
    a = auth(srv.keys["a"])
    rid = embed(srv.url, srv.keys["a"], headers={"x-request-id": "iso-req-1"}).headers["x-request-id"]
    f = httpx.post(srv.url + "/v1/files?purpose=user_data", content=b"hello", headers=a, timeout=30).json()["id"]
    resp = httpx.post(srv.url + "/v1/responses", headers=a, timeout=120,
                      json={"model": CHAT, "input": "hi", "max_output_tokens": 2}).json()["id"]
    batch = httpx.post(srv.url + "/v1/batch/embeddings", headers=a, timeout=30,
                       json={"model": EMBED, "inputs": ["x"]}).json()["id"]
    return {"history": rid, "file": f, "response": resp, "batch": batch}


def test_workspaces_are_isolated_on_every_object_route(srv):
    made = _made_in_alpha(srv)
    import time

    time.sleep(1)  # the usage writer stores the history record
    b = auth(srv.keys["b"])
    reads = [("GET", f"/v1/request-history/{made['history']}"), ("GET", f"/v1/files/{made['file']}"),
             ("GET", f"/v1/files/{made['file']}/content"), ("DELETE", f"/v1/files/{made['file']}"),
             ("GET", f"/v1/responses/{made['response']}"), ("GET", f"/v1/responses/{made['response']}/input_items"),
             ("POST", f"/v1/responses/{made['response']}/cancel"), ("DELETE", f"/v1/responses/{made['response']}"),
             ("GET", f"/v1/batch/{made['batch']}"), ("DELETE", f"/v1/batch/{made['batch']}"),
             ("GET", f"/v1/batches/{made['batch']}")]
    for method, path in reads:
        r = httpx.request(method, srv.url + path, headers=b, timeout=30)
        assert r.status_code == 404, (method, path, r.text)
    assert made["history"] not in httpx.get(srv.url + "/v1/request-history", headers=b, timeout=30).text
    assert made["history"] not in httpx.get(srv.url + "/v1/usage", headers=b, timeout=30).text
    assert made["file"] not in httpx.get(srv.url + "/v1/files", headers=b, timeout=30).text
    r = httpx.get(srv.url + "/v1/usage?workspace=alpha", headers=b, timeout=30)
    assert r.status_code == 403
    # ... and alpha still reads its own.
    a = auth(srv.keys["a"])
    assert httpx.get(f"{srv.url}/v1/files/{made['file']}", headers=a, timeout=30).status_code == 200
    assert httpx.get(f"{srv.url}/v1/responses/{made['response']}", headers=a, timeout=30).status_code == 200

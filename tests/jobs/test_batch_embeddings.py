"""NUREV's `/v1/batch/embeddings` on a real server: a 5,000-input batch equals the synchronous
endpoint's vectors (JSONL and .npy through the signed URL), signed webhooks reach a real
receiver (also one that fails the first three tries), cancel, tampered and expired URLs, and
workspaces that cannot see each other's batches."""

from __future__ import annotations

import io
import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from ferroserve.jobs import signing, webhooks
from ferroserve.jobs.webhooks import MAX_ATTEMPTS
from tests.gateway.conftest import EMBED, auth, keys_cli
from tests.jobs.conftest import results_jsonl, sentences, start_server, sync_vectors, wait_batch


@pytest.fixture(scope="module")
def srv(data_dir, keys):
    server = start_server(data_dir)
    yield server
    server.stop()


def submit(srv, key: str, inputs: list[str], **extra) -> dict:
    r = httpx.post(srv.url + "/v1/batch/embeddings", headers=auth(key), json={"model": EMBED, "inputs": inputs, **extra},
                   timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def test_five_thousand_inputs_equal_the_synchronous_vectors(srv, keys):
    key = keys["alpha"]
    texts = sentences(5000)
    batch = submit(srv, key, texts)
    assert batch["status"] == "pending" and batch["total_jobs"] == 5000 and batch["object"] == "batch"
    done = wait_batch(srv.url, key, batch["id"])
    assert done["status"] == "completed", done
    assert (done["completed_jobs"], done["failed_jobs"]) == (5000, 0) and done["total_tokens"] > 5000
    assert done["completed_at"] is not None
    expected = sync_vectors(srv.url, key, texts)
    rows = results_jsonl(srv.url, key, batch["id"])
    assert [row["index"] for row in rows] == list(range(5000))
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The same vectors as a float32 NumPy file.
    url = httpx.get(f"{srv.url}/v1/batch/{batch['id']}/results", headers=auth(key)).json()["url"]
    npy = np.load(io.BytesIO(httpx.get(url + "&format=npy", timeout=120).content))
    assert npy.dtype == np.float32 and npy.shape == (5000, expected.shape[1])
    np.testing.assert_array_equal(npy, got)
    # The batch was metered like any request, in chunks.
    usage = httpx.get(srv.url + "/v1/usage", headers=auth(key)).json()
    assert usage, usage


def test_webhook_is_signed_with_the_workspace_secret(srv, data_dir, keys, receiver):
    hook = receiver()
    batch = submit(srv, keys["alpha"], sentences(20, "w"), webhook_url=hook.url)
    [(headers, body, status)] = hook.wait(1, 60)
    secret = keys_cli(data_dir, "workspace-secret", "--workspace", "alpha")
    assert webhooks.verify(secret, body, headers["x-ferroserve-signature"])
    assert headers["x-nurev-signature"] == headers["x-ferroserve-signature"]
    event = json.loads(body)
    assert event == {"event": "batch.completed", "batch_id": batch["id"], "status": "completed",
                     "totals": {"total_jobs": 20, "completed_jobs": 20, "failed_jobs": 0, "total_tokens": event["totals"]["total_tokens"]}}
    # An altered body does not verify; neither does another workspace's secret.
    assert not webhooks.verify(secret, body.replace(b"completed", b"failed", 1), headers["x-ferroserve-signature"])
    other = keys_cli(data_dir, "workspace-secret", "--workspace", "beta")
    assert not webhooks.verify(other, body, headers["x-ferroserve-signature"])


def test_a_failing_receiver_gets_it_on_the_fourth_try(srv, data_dir, keys, receiver):
    hook = receiver(fail_first=3)
    batch = submit(srv, keys["alpha"], sentences(10, "r"), webhook_url=hook.url)
    calls = hook.wait(4, 60)
    assert [c[2] for c in calls] == [503, 503, 503, 200]
    assert len({c[1] for c in calls}) == 1  # the same signed body each time
    secret = keys_cli(data_dir, "workspace-secret", "--workspace", "alpha")
    assert webhooks.verify(secret, calls[-1][1], calls[-1][0]["x-ferroserve-signature"])
    time.sleep(0.5)
    assert len(hook.requests) == 4  # delivered: no more tries
    deadline = time.monotonic() + 10
    while True:
        listed = httpx.get(f"{srv.url}/v1/batch/{batch['id']}/webhook-deliveries", headers=auth(keys["alpha"])).json()["data"]
        if len(listed) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(d["attempt"], d["status_code"], d["delivered"]) for d in listed] == [
        (1, 503, False), (2, 503, False), (3, 503, False), (4, 200, True)]


def test_an_unreachable_receiver_is_tried_at_least_five_times(srv, keys):
    assert MAX_ATTEMPTS >= 5
    delays = [webhooks.backoff_s(n, 1.0) for n in range(1, 6)]
    assert all(0.5 * 2 ** i <= d <= 2 ** i for i, d in enumerate(delays))  # exponential, jittered


def test_cancel_mid_way(srv, data_dir, keys, receiver):
    key = keys["alpha"]
    hook = receiver()
    batch = submit(srv, key, sentences(5000, "c"), webhook_url=hook.url)
    wait_batch(srv.url, key, batch["id"], until=lambda b: b["completed_jobs"] > 0)
    r = httpx.delete(f"{srv.url}/v1/batch/{batch['id']}", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # NUREV has no "cancelling": the batch reads cancelled at once, and stops within a chunk.
    time.sleep(1.5)
    done = wait_batch(srv.url, key, batch["id"])
    time.sleep(1.0)
    after = wait_batch(srv.url, key, batch["id"])
    assert done["status"] == after["status"] == "cancelled" and 0 < after["completed_jobs"] < 5000
    assert after["completed_jobs"] == done["completed_jobs"]  # it stopped
    r = httpx.get(f"{srv.url}/v1/batch/{batch['id']}/results", headers=auth(key))
    assert r.status_code == 404
    # The webhook says so, signed like the others, with the totals where it stopped.
    [(headers, body, _)] = hook.wait(1, 60)
    assert webhooks.verify(keys_cli(data_dir, "workspace-secret", "--workspace", "alpha"), body, headers["x-ferroserve-signature"])
    assert headers["x-ferroserve-event"] == "batch.cancelled"
    event = json.loads(body)
    assert (event["event"], event["batch_id"], event["status"]) == ("batch.cancelled", batch["id"], "cancelled")
    assert event["totals"]["completed_jobs"] == after["completed_jobs"] and "results" not in event


def test_public_url_in_result_urls_and_webhooks(data_dir, keys, receiver):
    """Behind a proxy the Host header may be an internal address: with --public-url the
    signed results URL (from GET and in the webhook) starts with the public one, and the
    same path and signature work when the proxy forwards them."""
    server = start_server(data_dir, "--public-url", "https://batches.example.com/")
    try:
        key, hook = keys["alpha"], receiver()
        batch = submit(server, key, sentences(8, "u"), webhook_url=hook.url)
        [(_, body, _)] = hook.wait(1, 60)
        event = json.loads(body)
        assert event["event"] == "batch.completed"
        got = httpx.get(f"{server.url}/v1/batch/{batch['id']}/results", headers=auth(key)).json()
        for url in (got["url"], event["results"]["url"]):
            assert url.startswith(f"https://batches.example.com/v1/batch-results/{batch['id']}?expires="), url
            proxied = httpx.get(server.url + url.removeprefix("https://batches.example.com"), timeout=60)
            assert proxied.status_code == 200 and len(proxied.text.splitlines()) == 8
        assert event["results"]["expires_at"].endswith("Z")
    finally:
        server.stop()


def test_tampered_and_expired_result_urls_are_refused(srv, data_dir, keys):
    key = keys["alpha"]
    batch = submit(srv, key, sentences(5, "t"))
    assert wait_batch(srv.url, key, batch["id"])["status"] == "completed"
    url = httpx.get(f"{srv.url}/v1/batch/{batch['id']}/results", headers=auth(key)).json()["url"]
    assert httpx.get(url).status_code == 200
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    flipped = query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1")
    cases = {
        "signature": f"{base}?expires={query['expires']}&signature={flipped}",
        "expiry moved": f"{base}?expires={int(query['expires']) + 3600}&signature={query['signature']}",
        "no signature": base,
        "other batch": url.replace(batch["id"], batch["id"][:-1] + ("0" if batch["id"][-1] != "0" else "1")),
    }
    for what, bad in cases.items():
        r = httpx.get(bad)
        assert r.status_code == 403, (what, r.text)
        assert r.json()["error"]["code"] == "invalid_signature", what
    # Correctly signed but expired (signed here with the server's key, an hour ago).
    import sqlite3

    db = sqlite3.connect(data_dir / "ferroserve.sqlite3")
    [key_value] = db.execute("SELECT value FROM server_secrets WHERE name = ?", (signing.KEY_NAME,)).fetchone()
    db.close()
    past = int(time.time()) - 3600
    expired = f"{base}?expires={past}&signature={signing.signature(key_value, parts.path, past)}"
    r = httpx.get(expired)
    assert r.status_code == 403 and r.json()["error"]["code"] == "url_expired"


def test_results_404_until_completed_and_other_workspaces_see_nothing(srv, keys):
    alpha, beta = keys["alpha"], keys["beta"]
    batch = submit(srv, alpha, sentences(3000, "x"))
    r = httpx.get(f"{srv.url}/v1/batch/{batch['id']}/results", headers=auth(alpha))
    assert r.status_code == 404, r.text
    for method, path in (("GET", ""), ("GET", "/results"), ("GET", "/webhook-deliveries"), ("DELETE", "")):
        r = httpx.request(method, f"{srv.url}/v1/batch/{batch['id']}{path}", headers=auth(beta))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path, r.text)
    assert wait_batch(srv.url, alpha, batch["id"])["status"] == "completed"  # beta's DELETE did nothing
    r = httpx.get(f"{srv.url}/v1/batch/{batch['id']}/results", headers=auth(beta))
    assert r.status_code == 404


@pytest.mark.parametrize("body, param", [
    ({"model": EMBED, "inputs": []}, "inputs"),
    ({"model": EMBED, "inputs": ["a", ""]}, "inputs"),
    ({"model": EMBED, "inputs": ["a", 3]}, "inputs"),
    ({"model": EMBED}, "inputs"),
    ({"model": EMBED, "inputs": ["a"], "webhook_url": "ftp://example.com/x"}, "webhook_url"),
    ({"model": "no-such-model", "inputs": ["a"]}, "model"),
])
def test_bad_requests_name_the_parameter(srv, keys, body, param):
    r = httpx.post(srv.url + "/v1/batch/embeddings", headers=auth(keys["alpha"]), json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_too_many_inputs_and_no_key(srv, keys):
    r = httpx.post(srv.url + "/v1/batch/embeddings", headers=auth(keys["alpha"]),
                   json={"model": EMBED, "inputs": ["a"] * 100_001}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "inputs"
    r = httpx.post(srv.url + "/v1/batch/embeddings", json={"model": EMBED, "inputs": ["a"]})
    assert r.status_code == 401

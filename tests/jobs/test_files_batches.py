"""OpenAI's `/v1/files` and `/v1/batches` through the official client: a chat batch and an
embeddings batch end to end, JSONL checked line by line on upload, the size limit, cancel,
a budget that runs out mid-batch, pagination, and workspaces that cannot see each other."""

from __future__ import annotations

import base64
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.gateway.conftest import CHAT, EMBED, PRICES, auth, create_key, usage_rows
from tests.jobs.conftest import sentences, start_server, sync_vectors, wait_batch

FINAL = ("completed", "failed", "cancelled", "expired")
MAX_FILE_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def setup():
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-files-"))
    keys = {"alpha": create_key(data_dir, "alpha"), "beta": create_key(data_dir, "beta"),
            "poor": create_key(data_dir, "poor", "--budget-usd", "40")}
    srv = start_server(data_dir, *PRICES, env={"FERROSERVE_MAX_FILE_BYTES": str(MAX_FILE_BYTES)})
    yield srv, data_dir, keys
    srv.stop()


def client_for(setup, who: str) -> openai.OpenAI:
    srv, _, keys = setup
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=keys[who], max_retries=0)


def jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def chat_rows(n: int, max_tokens: int = 8) -> list[dict]:
    return [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": CHAT, "messages": [{"role": "user", "content": f"Name a colour, {i}."}],
                      "max_tokens": max_tokens, "temperature": 0}} for i in range(n)]


def embed_rows(texts: list[str]) -> list[dict]:
    return [{"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": EMBED, "input": t, "encoding_format": "base64"}} for i, t in enumerate(texts)]


def run(client: openai.OpenAI, rows: list[dict], endpoint: str, timeout: float = 300, **extra):
    upload = client.files.create(file=("batch.jsonl", jsonl(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h", **extra)
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch.id)).status not in FINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return upload, batch


def lines_of(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_chat_batch_end_to_end(setup):
    client = client_for(setup, "alpha")
    rows = chat_rows(12)
    upload, batch = run(client, rows, "/v1/chat/completions", metadata={"job": "nightly"})
    assert upload.purpose == "batch" and upload.bytes == len(jsonl(rows)) and upload.filename == "batch.jsonl"
    assert batch.status == "completed" and batch.metadata == {"job": "nightly"}
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 12, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    out = lines_of(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
    for o in out:
        assert o["error"] is None and o["id"].startswith("batch_req_") and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 8
    # Greedy rows answer as the synchronous endpoint does.
    sync = client.chat.completions.create(**rows[3]["body"])
    assert out[3]["response"]["body"]["choices"][0]["message"]["content"] == sync.choices[0].message.content
    # The output is a file of the workspace like any other; its usage rows carry the row ids.
    meta = client.files.retrieve(batch.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(client.files.content(batch.output_file_id).content)
    ids = {r["request_id"] for r in usage_rows(setup[1])}
    deadline = time.monotonic() + 10
    while not all(o["id"] in ids for o in out) and time.monotonic() < deadline:
        time.sleep(0.2)
        ids = {r["request_id"] for r in usage_rows(setup[1])}
    assert all(o["id"] in ids for o in out)


def test_embeddings_batch_end_to_end(setup):
    srv, _, keys = setup
    client = client_for(setup, "alpha")
    texts = sentences(40, "e")
    rows = embed_rows(texts)
    rows[7]["body"]["input"] = ""  # an invalid row fails alone, into the error file
    _, batch = run(client, rows, "/v1/embeddings")
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (39, 1)
    out = lines_of(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"emb-{i}" for i in range(40) if i != 7]
    [err] = lines_of(client, batch.error_file_id)
    assert err["custom_id"] == "emb-7" and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "input"
    expected = sync_vectors(srv.url, keys["alpha"], [t for i, t in enumerate(texts) if i != 7])
    got = np.stack([np.frombuffer(base64.b64decode(o["response"]["body"]["data"][0]["embedding"]), dtype="<f4") for o in out])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_malformed_lines_are_reported_with_their_numbers(setup):
    client = client_for(setup, "alpha")
    good = chat_rows(5)
    text = (json.dumps(good[0]) + "\n" + "{not json\n" + json.dumps(good[1]) + "\n"
            + json.dumps({**good[2], "custom_id": 7}) + "\n" + json.dumps({**good[3], "url": "/v1/images"}) + "\n"
            + json.dumps({**good[4], "custom_id": "chat-0"}) + "\n")
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", text.encode()), purpose="batch")
    error = info.value.body
    assert error["param"] == "file" and error["code"] == "invalid_file"
    message = error["message"]
    for line in ("line 2: not valid JSON", "line 4: Expected `str`, got `int` - at `$.custom_id`", "line 5: url must be",
                 "line 6: custom_id 'chat-0' is used twice"):
        assert line in message, message
    assert "line 1:" not in message and "line 3:" not in message
    assert not client.files.list(purpose="batch").data or all(f.filename != "bad.jsonl" for f in client.files.list().data)


def test_upload_over_the_size_limit_is_413(setup):
    srv, _, keys = setup
    big = jsonl(chat_rows(1)) * (MAX_FILE_BYTES // len(jsonl(chat_rows(1))) + 10)
    r = httpx.post(srv.url + "/v1/files", headers=auth(keys["alpha"]), data={"purpose": "batch"},
                   files={"file": ("big.jsonl", big)}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    # The raw-body shape (IPOP's `?purpose=`) is accepted too, and limited alike.
    r = httpx.post(srv.url + "/v1/files?purpose=batch&filename=raw.jsonl", headers=auth(keys["alpha"]),
                   content=jsonl(chat_rows(2)), timeout=60)
    assert r.status_code == 200 and r.json()["filename"] == "raw.jsonl", r.text
    r = httpx.post(srv.url + "/v1/files", headers=auth(keys["alpha"]), files={"file": ("x.jsonl", b"{}")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"


def test_cancel_a_running_batch(setup):
    client = client_for(setup, "alpha")
    upload = client.files.create(file=("long.jsonl", jsonl(chat_rows(400, max_tokens=32))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.batches.cancel(batch.id).status == "cancelling"
    deadline = time.monotonic() + 60
    while (got := client.batches.retrieve(batch.id)).status == "cancelling":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert got.status == "cancelled" and got.cancelled_at and 0 < got.request_counts.completed < 400
    out = lines_of(client, got.output_file_id)
    assert [o["custom_id"] for o in out] == [f"chat-{i}" for i in range(len(out))]
    assert len(out) == got.request_counts.completed


def test_a_budget_exhausted_mid_batch_fails_the_rest_without_overspending(setup):
    srv, data_dir, keys = setup
    client = client_for(setup, "poor")  # $40 budget; embeddings cost $1 a token here
    texts = [f"word{i}" for i in range(30)]
    _, batch = run(client, embed_rows(texts), "/v1/embeddings")
    counts = batch.request_counts
    assert batch.status == "completed" and counts.completed > 0 and counts.failed > 0 and counts.completed + counts.failed == 30
    errors = lines_of(client, batch.error_file_id)
    assert all(e["response"]["status_code"] == 402 and e["response"]["body"]["error"]["code"] == "budget_exceeded" for e in errors)
    assert [e["custom_id"] for e in errors] == [f"emb-{i}" for i in range(counts.completed, 30)]  # the rest, in order
    time.sleep(1.0)
    spent = sum(r["cost_usd"] for r in usage_rows(data_dir) if r["workspace"] == "poor")
    assert 0 < spent <= 40
    # NUREV's batch: the same budget, already spent, fails every input.
    r = httpx.post(srv.url + "/v1/batch/embeddings", headers=auth(keys["poor"]), json={"model": EMBED, "inputs": texts})
    done = wait_batch(srv.url, keys["poor"], r.json()["id"])
    assert done["status"] == "failed" and done["failed_jobs"] == 30
    assert sum(r["cost_usd"] for r in usage_rows(data_dir) if r["workspace"] == "poor") == spent


def test_pagination_and_workspaces(setup):
    alpha, beta = client_for(setup, "alpha"), client_for(setup, "beta")
    upload, batch = run(alpha, chat_rows(2), "/v1/chat/completions")
    _, second = run(alpha, chat_rows(1), "/v1/chat/completions")
    page = alpha.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    after = alpha.batches.list(limit=1, after=second.id)
    assert [b.id for b in after.data] == [batch.id]
    assert batch.id not in {b.id for b in beta.batches.list().data}
    assert upload.id not in {f.id for f in beta.files.list().data}
    for call in (lambda: beta.batches.retrieve(batch.id), lambda: beta.batches.cancel(batch.id),
                 lambda: beta.files.retrieve(upload.id), lambda: beta.files.content(upload.id),
                 lambda: beta.files.content(batch.output_file_id), lambda: beta.files.delete(upload.id),
                 lambda: beta.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    # Deleting the input file leaves the batch's own copy; the file is gone.
    assert alpha.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        alpha.files.retrieve(upload.id)
    assert alpha.batches.retrieve(batch.id).status == "completed"


@pytest.mark.parametrize("body, param", [
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, "input_file_id"),
    ({"input_file_id": "file-x", "endpoint": "/v1/images", "completion_window": "24h"}, "endpoint"),
    ({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "9d"}, "completion_window"),
])
def test_bad_batch_requests_name_the_parameter(setup, body, param):
    srv, _, keys = setup
    r = httpx.post(srv.url + "/v1/batches", headers=auth(keys["alpha"]), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_file_for_another_endpoint_is_refused(setup):
    client = client_for(setup, "alpha")
    upload = client.files.create(file=("c.jsonl", jsonl(chat_rows(1))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert info.value.body["param"] == "endpoint"

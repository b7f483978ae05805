"""Batches survive `kill -9`: the server dies mid-batch, a new one on the same data dir takes
the batch over (once the dead owner's heartbeat is stale), and the output holds every input
exactly once, in input order — checked index by index against the synchronous endpoint."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from ferroserve.jobs.leases import STALE_S
from tests.gateway.conftest import CHAT, EMBED, auth
from tests.jobs.conftest import results_jsonl, sentences, start_server, sync_vectors, wait_batch

N = 5000


@pytest.fixture()
def servers(data_dir):
    started = []

    def start(**env):
        started.append(start_server(data_dir, env={"FERROSERVE_BATCH_CHUNK_INPUTS": "128", **env}))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def test_kill_minus_nine_mid_batch_then_restart(servers, data_dir, keys):
    key = keys["alpha"]
    texts = sentences(N, "k")
    a = servers()
    r = httpx.post(a.url + "/v1/batch/embeddings", headers=auth(key), json={"model": EMBED, "inputs": texts}, timeout=120)
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    before = wait_batch(a.url, key, batch_id, until=lambda b: b["completed_jobs"] >= 1000)
    a.kill()
    assert before["status"] == "processing" and before["completed_jobs"] < N
    b = servers()
    began = time.monotonic()
    done = wait_batch(b.url, key, batch_id, timeout=STALE_S + 300)
    assert done["status"] == "completed" and (done["completed_jobs"], done["failed_jobs"]) == (N, 0), done
    assert time.monotonic() - began > STALE_S - 4  # taken over only once the dead owner fell silent
    assert f'"msg":"batch claimed","batch_id":"{batch_id}","status":"in_progress"' in b.log_path.read_text()
    # Every input exactly once, in order: no duplicates, no gaps, and each the right vector.
    rows = results_jsonl(b.url, key, batch_id)
    assert len(rows) == N and [row["index"] for row in rows] == list(range(N))
    assert all(row["embedding"] is not None for row in rows)
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    np.testing.assert_allclose(got, sync_vectors(b.url, key, texts), rtol=0, atol=1e-6)
    assert (data_dir / "batches" / f"{batch_id}.f32").stat().st_size == N * got.shape[1] * 4


def test_openai_chat_batch_survives_kill_minus_nine(servers, data_dir, keys):
    from openai import OpenAI

    key = keys["alpha"]
    rows = 96
    lines = "\n".join(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": CHAT, "messages": [{"role": "user", "content": f"Count to {i % 9}."}],
                                           "max_tokens": 16, "temperature": 0}}) for i in range(rows))
    a = servers()
    client = OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0)
    upload = client.files.create(file=("chat.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 32:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a.kill()
    b = servers()
    client = OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
    deadline = time.monotonic() + STALE_S + 300
    while (got := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert got.status == "completed" and got.request_counts.completed == rows and got.error_file_id is None
    out = [json.loads(line) for line in client.files.content(got.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"row-{i}" for i in range(rows)]
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["choices"][0]["message"]["content"] for o in out)

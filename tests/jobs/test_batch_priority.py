"""Batch jobs give way to interactive requests (issue 15), on a real server: an interactive
embedding sent while a batch's inputs wait in the embedding engine is answered ahead of them,
and what counts as interactive (what batch work waits for). Checked by order and by the
counts /metrics reports, not by latency."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import CHAT, EMBED, auth
from tests.jobs.conftest import sentences, start_server

# One chunk holds the whole batch, so every batch input waiting in the engine was queued
# there before the interactive requests below.
BATCH_INPUTS = 3000


@pytest.fixture(scope="module")
def srv(data_dir, keys):
    server = start_server(data_dir, env={"FERROSERVE_BATCH_CHUNK_INPUTS": str(BATCH_INPUTS)})
    yield server
    server.stop()


def embed_queue(url: str) -> dict[str, float]:
    """The embedding engine's waiting inputs by priority, from /metrics."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "ferroserve_embed_waiting_inputs":
            return {s.labels["priority"]: s.value for s in family.samples}
    raise AssertionError("/metrics has no ferroserve_embed_waiting_inputs")


def test_interactive_embeddings_go_ahead_of_a_queued_batch(srv, keys):
    key = keys["alpha"]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
    r = httpx.post(srv.url + "/v1/batch/embeddings", headers=auth(key), timeout=120,
                   json={"model": EMBED, "inputs": sentences(BATCH_INPUTS, "q")})
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while sum(embed_queue(srv.url).values()) == 0:
        assert time.monotonic() < deadline, "the batch's chunk never reached the engine"
        time.sleep(0.01)
    for i in range(3):
        assert sum(embed_queue(srv.url).values()) > 0
        got = client.embeddings.create(model=EMBED, input=f"an interactive question, number {i}")
        assert len(got.data) == 1 and len(got.data[0].embedding) == 384
        # Answered while batch inputs queued before it still wait: it went ahead of them. (Run
        # with FERROSERVE_BATCH_JOBS_PRIORITY=interactive, where both wait in one queue, it
        # comes back only once the whole chunk is embedded, and this fails.)
        assert sum(embed_queue(srv.url).values()) > 0
        status = httpx.get(f"{srv.url}/v1/batch/{batch_id}", headers=auth(key)).json()
        assert status["status"] == "processing" and status["completed_jobs"] == 0, status
    # The batch's inputs wait at batch priority; nothing interactive waits.
    queue = embed_queue(srv.url)
    assert queue["batch"] > 0 and queue["interactive"] == 0, queue
    r = httpx.delete(f"{srv.url}/v1/batch/{batch_id}", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def interactive_in_flight(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "ferroserve_interactive_in_flight":
            return family.samples[0].value
    raise AssertionError("/metrics has no ferroserve_interactive_in_flight")


@pytest.mark.parametrize("service_tier, counted", [("default", True), ("flex", False)])
def test_an_inference_request_counts_as_interactive_until_answered(srv, keys, service_tier, counted):
    """What batch work waits for: a chat request from arrival to its last byte, unless it
    asked for batch priority (OpenAI's flex tier)."""
    assert interactive_in_flight(srv.url) == 0
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 48,
            "ignore_eos": True, "stream": True, "service_tier": service_tier}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=auth(keys["alpha"]), json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the stream is open
        # Counted at the HTTP layer and in the chat engine; a flex request in neither.
        assert (interactive_in_flight(srv.url) > 0) == counted
        assert [line for line in lines if line == "data: [DONE]"]
    deadline = time.monotonic() + 10  # the server closes the request just after its last byte
    while interactive_in_flight(srv.url) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)

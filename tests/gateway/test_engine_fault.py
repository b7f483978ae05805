"""Engine faults (issue 16 part 6), real servers over loopback.

The chat engine's thread is made to panic inside a step by the test-only hook
FERROSERVE_TEST_PANIC_AFTER_STEPS (read once when an engine starts, inert unless set): the
requests in flight end with a clear 503 `engine_unavailable` (a streamed one as an SSE error
event after what it already got), new chat requests get the same 503, `/health` and
`/v1/ready` answer 503 naming the model, `/v1/status` shows it down with the reason, and the
embedding model in the same process keeps serving."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CHAT = "SmolLM2-135M-Instruct"
PANIC_AFTER_STEPS = 100  # steps: long enough for both requests to be in flight at the panic


@pytest.fixture(scope="module")
def server():
    srv = Server(["--log-level", "warning"], env={"FERROSERVE_TEST_PANIC_AFTER_STEPS": str(PANIC_AFTER_STEPS)})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _body(stream: bool) -> dict:
    # Far more tokens than the engine has steps left: both requests are in flight at the panic.
    return {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def _stream_until_error(url: str) -> tuple[int, openai.APIError | None]:
    """Streams with the official client: (content deltas received, the error it raised)."""
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    deltas = 0
    try:
        body = _body(True)
        stream = client.chat.completions.create(model=body["model"], messages=body["messages"], max_tokens=body["max_tokens"],
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas += 1
    except openai.APIError as exc:
        return deltas, exc
    return deltas, None


def test_a_dead_chat_engine_fails_its_requests_with_503_and_the_probes_say_so(server):
    url = server.url
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(_stream_until_error, url)
        plain = pool.submit(httpx.post, url + "/v1/chat/completions", json=_body(False), timeout=60)
        deltas, error = streamed.result(timeout=90)
        r = plain.result(timeout=90)

    # The stream got tokens, then one clear error event (the client raises it), not a hang.
    # At most one token a step, and the engine stops after PANIC_AFTER_STEPS steps (a stream
    # admitted in the first step gets a token from every one of them).
    assert 0 < deltas <= PANIC_AFTER_STEPS, deltas
    assert error is not None and error.body is not None, error
    assert error.body["code"] == "engine_unavailable", error.body
    assert "test-only panic" in error.body["message"], error.body
    # The buffered request in flight: a 503 with the reason, not a 500.
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "engine_unavailable" and "test-only panic" in r.json()["error"]["message"], r.text

    # New chat requests: 503 at once, streaming or not, saying why (also once the breaker is open).
    for stream in (False, True, False):
        r = httpx.post(url + "/v1/chat/completions", json=_body(stream), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        assert "test-only panic" in r.json()["error"]["message"], r.text

    # The probes name the model whose engine stopped.
    for probe in ("/health", "/v1/ready"):
        r = httpx.get(url + probe, timeout=10)
        assert r.status_code == 503, (probe, r.text)
        error_body = r.json()["error"]
        assert error_body["code"] == "engine_unavailable" and CHAT in error_body["message"], error_body
        assert "test-only panic" in error_body["message"]
    status = httpx.get(url + "/v1/status", timeout=10).json()
    by_id = {m["id"]: m for m in status["models"]}
    assert by_id[CHAT]["health"] == "down" and by_id[CHAT]["available"] is False
    assert "test-only panic" in by_id[CHAT]["error"]
    assert status["status"] == "degraded"
    embedder = by_id["sentence-transformers/all-MiniLM-L6-v2"]
    assert embedder["health"] == "healthy" and embedder["available"] and "error" not in embedder
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert f'ferroserve_backend_up{{model="{CHAT}",backend="local",health="down"}} 0' in metrics

    # The other model keeps serving.
    r = httpx.post(url + "/v1/embeddings", json={"model": "all-minilm", "input": ["still here", "and here"]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"]) == 2

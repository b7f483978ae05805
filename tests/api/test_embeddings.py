"""/v1/embeddings through the official openai client against the reference vectors."""

from __future__ import annotations

import base64
import concurrent.futures

import numpy as np
import pytest

MODEL = "all-minilm"


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.isa_matrix
@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_matches_reference_one_request(client, minilm_reference, encoding):
    texts = [it["text"] for it in minilm_reference]
    resp = client.embeddings.create(model=MODEL, input=texts, encoding_format=encoding)
    assert resp.object == "list"
    assert resp.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert [d.index for d in resp.data] == list(range(len(texts)))
    assert resp.usage.prompt_tokens == sum(it["prompt_tokens"] for it in minilm_reference)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens
    for item, d in zip(minilm_reference, resp.data):
        vec = d.embedding
        if isinstance(vec, str):  # openai returns the raw string when asked for base64
            vec = np.frombuffer(base64.b64decode(vec), dtype="<f4")
        assert len(vec) == 384
        c = cosine(vec, item["embedding"])
        assert c >= 0.9999, (item["text"], c)


def test_raw_base64_is_little_endian_float32(server, minilm_reference):
    import httpx

    item = minilm_reference[1]
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": item["text"], "encoding_format": "base64"})
    assert r.status_code == 200
    raw = r.json()["data"][0]["embedding"]
    vec = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert vec.shape == (384,)
    assert cosine(vec, item["embedding"]) >= 0.9999


def test_float_and_base64_outputs_are_the_same_float32_bit_for_bit(server, minilm_reference):
    """The engine hands back float32 vectors; the HTTP layer writes them as JSON numbers or
    base64. Both must decode to the very same float32 values, also with `dimensions`
    (re-normalised in the engine)."""
    import httpx

    texts = [it["text"] for it in minilm_reference[:5]]
    for extra in ({}, {"dimensions": 64}):
        as_float = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": texts, **extra})
        as_b64 = httpx.post(server.url + "/v1/embeddings",
                            json={"model": MODEL, "input": texts, "encoding_format": "base64", **extra})
        assert as_float.status_code == 200 and as_b64.status_code == 200
        for f, b in zip(as_float.json()["data"], as_b64.json()["data"], strict=True):
            numbers = np.array(f["embedding"], dtype=np.float32)
            raw = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
            assert raw.shape == (extra.get("dimensions", 384),)
            assert numbers.tobytes() == raw.tobytes()


@pytest.mark.isa_matrix
def test_single_and_batched_give_identical_vectors(client, minilm_reference):
    texts = [it["text"] for it in minilm_reference[:12]]
    batched = client.embeddings.create(model=MODEL, input=texts).data
    for i, text in enumerate(texts):
        single = client.embeddings.create(model=MODEL, input=text)
        assert single.usage.prompt_tokens == minilm_reference[i]["prompt_tokens"]
        assert single.data[0].embedding == batched[i].embedding, text


def test_order_preserved_with_repeated_and_reversed_inputs(client, minilm_reference):
    texts = [it["text"] for it in minilm_reference[:6]]
    fwd = client.embeddings.create(model=MODEL, input=texts).data
    rev = client.embeddings.create(model=MODEL, input=list(reversed(texts))).data
    for i in range(len(texts)):
        assert fwd[i].embedding == rev[len(texts) - 1 - i].embedding


def test_token_id_inputs_match_text(client):
    text = client.embeddings.create(model=MODEL, input="hello world").data[0].embedding
    # bert-base-uncased ids: hello=7592 world=2088; [CLS]=101 [SEP]=102 are added if absent.
    ids = client.embeddings.create(model=MODEL, input=[7592, 2088])
    assert ids.usage.prompt_tokens == 4
    assert ids.data[0].embedding == text
    lists = client.embeddings.create(model=MODEL, input=[[7592, 2088], [101, 7592, 2088, 102]]).data
    assert lists[0].embedding == text and lists[1].embedding == text


def test_dimensions_truncate_and_renormalise(client, minilm_reference):
    full = np.array(client.embeddings.create(model=MODEL, input=minilm_reference[0]["text"]).data[0].embedding)
    short = np.array(client.embeddings.create(model=MODEL, input=minilm_reference[0]["text"], dimensions=64).data[0].embedding)
    assert short.shape == (64,)
    assert abs(np.linalg.norm(short) - 1.0) < 1e-5
    expected = full[:64] / np.linalg.norm(full[:64])
    assert np.allclose(short, expected, atol=1e-6)


def test_user_field_accepted(client):
    resp = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input="hi", user="user-123")
    assert len(resp.data) == 1


def test_long_input_truncated_at_256_tokens(client):
    resp = client.embeddings.create(model=MODEL, input="word " * 1000)
    assert resp.usage.prompt_tokens == 256


def test_64_concurrent_clients_get_their_own_vectors(client, server):
    from openai import OpenAI

    texts = [f"Concurrent request number {i} talks about topic {i * 7 % 13}." for i in range(64)]
    expected = [client.embeddings.create(model=MODEL, input=t).data[0].embedding for t in texts]

    def one(i: int):
        c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        inp = texts[i] if i % 2 == 0 else [texts[i], texts[(i + 1) % 64]]
        return i, c.embeddings.create(model=MODEL, input=inp).data

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(64)))
    for i, data in results:
        assert data[0].embedding == expected[i], i
        if i % 2 == 1:
            assert data[1].embedding == expected[(i + 1) % 64], i

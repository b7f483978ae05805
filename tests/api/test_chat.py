"""Chat and text completions on the bundled SmolLM2 through the official openai client."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"

MODEL = "smollm2"


@pytest.fixture(scope="module")
def smollm_reference():
    return json.loads((FIXTURES / "smollm2_reference.json").read_text())


# Share of fixture prompts whose whole greedy continuation must equal llama.cpp's (the
# issue's 90 %). The engine reproduces llama.cpp's CPU arithmetic op by op, so all 14 match
# today (crates/ferroserve-core/tests/llama_reference.rs says how); a miss must still be a
# near-tie (< NEAR_TIE logits).
IDENTICAL_SHARE = 0.9
NEAR_TIE = 0.5


def _top5(server, prompt_ids: list[int]) -> dict[str, float]:
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "logprobs": 5, "ignore_eos": True}, timeout=60).json()
    return r["choices"][0]["logprobs"]["top_logprobs"][0]


def _piece(server, token_id: int) -> str:
    return httpx.post(server.url + "/v1/detokenize", json={"model": MODEL, "tokens": [token_id]}).json()["prompt"]


@pytest.mark.isa_matrix
def test_greedy_completions_reproduce_llama_cpp(client, server, smollm_reference):
    """Fixture continuations: identical, or diverging only at a near-tie shown in the logits."""
    items = smollm_reference["completions"] + smollm_reference["chats"]
    identical, ties = 0, []
    for item in items:
        r = client.completions.create(model=MODEL, prompt=item["prompt_tokens"], max_tokens=32, temperature=0)
        assert r.usage.prompt_tokens == len(item["prompt_tokens"])
        if r.choices[0].text == item["completion"]:
            identical += 1
            continue
        # Walk llama.cpp's tokens until our argmax differs; there its token must be our
        # top five, within NEAR_TIE logits of our pick.
        ref = item["completion_tokens"]
        # Where llama.cpp stopped at end-of-turn, its last "token" is <|im_end|> (id 2).
        steps = ref + ([2] if item["stop_type"] == "eos" else [])
        for i, want in enumerate(steps):
            top = _top5(server, item["prompt_tokens"] + ref[:i])
            ours = max(top, key=top.get)
            piece = _piece(server, want)
            if ours != piece:
                assert piece in top, (item["prompt"][:40], i, top, piece)
                gap = top[ours] - top[piece]
                assert gap < NEAR_TIE, (item["prompt"][:40], i, top, piece)
                ties.append(gap)
                break
    print(f"{identical}/{len(items)} identical; divergences at near-ties of {sorted(round(g, 3) for g in ties)}")
    assert identical >= IDENTICAL_SHARE * len(items), f"{identical}/{len(items)} identical"


def test_chat_renders_template_like_fixture(server, smollm_reference):
    for chat in smollm_reference["chats"]:
        r = httpx.post(server.url + "/v1/tokenize", json={"model": MODEL, "messages": chat["messages"]})
        assert r.status_code == 200
        assert r.json()["tokens"] == chat["prompt_tokens"]


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_whole_answers_equal_streamed_ones_sampled_with_logprobs_and_stops(client):
    """A non-streamed answer leaves the engine whole (one event per choice at its end), a
    streamed one token by token: the same seeded choices, logprobs, finish reasons and usage."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=40, temperature=0.9,
              seed=11, n=3, logprobs=True, top_logprobs=2, stop=[". "])
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text, logprobs, finish = ["", "", ""], [[], [], []], [None, None, None]
    for chunk in chunks:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                logprobs[c.index] += [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in c.logprobs.content]
            finish[c.index] = c.finish_reason or finish[c.index]
    assert [c.message.content for c in full.choices] == text
    assert [[(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in c.logprobs.content]
            for c in full.choices] == logprobs
    assert [c.finish_reason for c in full.choices] == finish
    assert "stop" in finish and len(set(text)) > 1, (finish, text)  # the stop string and the seeds did something
    assert full.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_content_as_text_parts(client):
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0)
    b = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}], max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_seed_reproducibility(client):
    kw = dict(model=MODEL, prompt="The best thing about rivers is", max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_n_choices_and_usage(client):
    # ignore_eos: every choice runs its 10 tokens, so the usage must count all three.
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=7, n=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage.completion_tokens == 30, r.usage
    assert len({c.text for c in r.choices}) > 1, "three samples at temperature 0.8 all alike"


def test_stop_string_across_token_boundary(client):
    base = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
    # A stop string that starts inside one token and ends inside the next.
    m = re.search(r"[a-z]{2} [a-z]", base)
    assert m, base
    stop = m.group(0)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: m.start()]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_chat(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-6  # greedy picks the top one


async def _stream_text(url: str, body: dict) -> str:
    async with httpx.AsyncClient(timeout=300) as c:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            text = []
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ev = json.loads(line[6:])
                    for ch in ev["choices"]:
                        text.append((ch["text"], json.dumps(ch["logprobs"])))
            return "".join(t for t, _ in text), [lp for _, lp in text]


@pytest.mark.isa_matrix
def test_32_concurrent_streams_equal_each_alone(server):
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "stream": True, "logprobs": 1} for p in prompts]
    alone = [asyncio.run(_stream_text(server.url, b)) for b in bodies[:8]]

    async def all_at_once():
        return await asyncio.gather(*(_stream_text(server.url, b) for b in bodies))

    together = asyncio.run(all_at_once())
    assert together[:8] == alone  # bitwise: same text and the same logprobs
    assert len({t for t, _ in together}) > 8


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf'^{name}{{model="SmolLM2-135M-Instruct"}} (\S+)$', text, re.M)
    assert m, text
    return float(m.group(1))


def test_cancelled_streams_free_kv(server):
    async def cancel_one(i: int):
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", server.url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": f"Tell a long story number {i}."}],
                "max_tokens": 400, "stream": True, "temperature": 0.7}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # got the first chunk; drop the connection

    async def run():
        await asyncio.gather(*(cancel_one(i) for i in range(50)))

    asyncio.run(run())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _metric(server, "ferroserve_running_sequences") == 0 and _metric(server, "ferroserve_waiting_sequences") == 0:
            break
        time.sleep(0.2)
    assert _metric(server, "ferroserve_running_sequences") == 0
    assert _metric(server, "ferroserve_kv_cache_blocks_free") == _metric(server, "ferroserve_kv_cache_blocks_total") or \
        _metric(server, "ferroserve_kv_cache_usage_ratio") == 0.0


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_parameters_400(server, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_context_length_exceeded(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 100_000})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_image_part_rejected(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"


def test_chat_unknown_model_and_embedding_model(server):
    for model in ("nope", "all-minilm"):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"


def test_tokenize_detokenize(server, smollm_reference):
    item = smollm_reference["completions"][0]
    r = httpx.post(server.url + "/v1/tokenize", json={"model": "SmolLM2-135M-Instruct", "prompt": item["prompt"]}).json()
    assert r["tokens"] == item["prompt_tokens"] and r["count"] == len(item["prompt_tokens"])
    assert r["max_model_len"] >= 8192
    d = httpx.post(server.url + "/v1/detokenize", json={"model": MODEL, "tokens": item["prompt_tokens"]}).json()
    assert d["prompt"] == item["prompt"]

"""The upstream backend against a real second ferroserve process and against the fault server.

Everything goes over loopback HTTP; each test drives `UpstreamBackend` in its own event loop
(`asyncio.run`), with its own pools (httpx connections belong to one loop)."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import httpx
import msgspec
import numpy as np
import pytest

from ferroserve.backends.base import (
    DEGRADED,
    DOWN,
    HEALTHY,
    Admitted,
    ChatRequest,
    Delta,
    EmbedRequest,
    Failed,
    Finished,
    Message,
    SamplingParams,
    Unavailable,
)
from ferroserve.backends.upstream import UpstreamBackend, _split_tokens, _SseStream, create
from ferroserve.config import BackendSpec, ModelSpec
from ferroserve.errors import ApiError
from tests.backends.fault_server import FaultServer
from tests.conftest import Server, free_port

CHAT = "smollm2"
EMBED = "all-minilm"


@pytest.fixture(scope="module")
def upstream():
    srv = Server(["--insecure-no-auth", "--log-level", "warning"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def fault_module():
    with FaultServer() as server:
        yield server


@pytest.fixture
def fault(fault_module):
    fault_module.reset()
    return fault_module


def backend(base_url: str, name: str = "big", upstream_model: str | None = CHAT, kind: str = "chat",
            pools: dict | None = None, client: str = "http1", **backend_fields) -> UpstreamBackend:
    """`client="httpx"` sends plain-http requests through the httpx client that https upstreams
    use (TLS aside, the same code path)."""
    spec = ModelSpec(name=name, path="", kind=kind, backend="up", upstream_model=upstream_model, device=base_url)
    b = create(spec, BackendSpec(name="up", kind="upstream", base_url=base_url, **backend_fields),
               {} if pools is None else pools)
    b.pool.plain_http = client == "http1"
    return b


CLIENTS = pytest.mark.parametrize("client", ["http1", "httpx"])


def chat_request(content: str = "Name three colors.", **params) -> ChatRequest:
    return ChatRequest(messages=[Message("user", content)], params=SamplingParams(**params), stream=True)


async def events_of(b: UpstreamBackend, request: ChatRequest) -> list:
    try:
        return [e async for e in b.generate(request)]
    finally:
        await b.pool.aclose()


def run_events(b: UpstreamBackend, request: ChatRequest) -> list:
    return asyncio.run(events_of(b, request))


def texts(events: list, n: int = 1) -> list[str]:
    return ["".join(e.text for e in events if isinstance(e, Delta) and e.index == i) for i in range(n)]


def check_shape(events: list, n: int = 1) -> tuple[Admitted, list[Finished]]:
    """Deltas, then one Admitted, then one Finished per choice (in index order)."""
    kinds = [type(e).__name__ for e in events]
    assert "Failed" not in kinds, events
    first_admitted = kinds.index("Admitted")
    assert set(kinds[:first_admitted]) <= {"Delta"} and kinds[first_admitted + 1:] == ["Finished"] * n, kinds
    finished = [e for e in events if isinstance(e, Finished)]
    assert [f.index for f in finished] == list(range(n))
    return events[first_admitted], finished


def the_failure(events: list):
    assert isinstance(events[-1], Failed), events
    assert not any(isinstance(e, (Finished, Admitted)) for e in events)
    return events[-1].error


# (a) A real ferroserve upstream -----------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_chat_equals_upstream_answer(upstream, stream):
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 12, "temperature": 0}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=60).json()
    request = chat_request(max_tokens=12, temperature=0)
    request.stream = stream
    events = run_events(backend(upstream.url + "/v1"), request)
    admitted, [finished] = check_shape(events)
    assert texts(events) == [direct["choices"][0]["message"]["content"]]
    assert finished.reason == direct["choices"][0]["finish_reason"]
    assert finished.completion_tokens == direct["usage"]["completion_tokens"]
    assert admitted.prompt_tokens == finished.prompt_tokens == direct["usage"]["prompt_tokens"]


def test_chat_content_parts_and_logprobs(upstream):
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    body = {"model": CHAT, "messages": [{"role": "user", "content": parts}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=60).json()
    request = ChatRequest(messages=[Message("user", [("text", "Say "), ("text", "hi.")])],
                          params=SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=2))
    events = run_events(backend(upstream.url + "/v1"), request)
    check_shape(events)
    logprobs = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]
    want = direct["choices"][0]["logprobs"]["content"]
    assert [(t, b, lp) for t, b, lp, _ in logprobs] == [(-1, bytes(w["bytes"]), w["logprob"]) for w in want]
    assert [[(t, b, lp) for t, b, lp in top] for *_, top in logprobs] == [
        [(-1, bytes(a["bytes"]), a["logprob"]) for a in w["top_logprobs"]] for w in want]


def test_chat_n2_usage_sums(upstream):
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell a joke."}], "max_tokens": 10, "temperature": 0, "n": 2}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=60).json()
    events = run_events(backend(upstream.url + "/v1"), chat_request("Tell a joke.", max_tokens=10, temperature=0, n=2))
    admitted, finished = check_shape(events, n=2)
    assert texts(events, 2) == [c["message"]["content"] for c in sorted(direct["choices"], key=lambda c: c["index"])]
    assert sum(f.completion_tokens for f in finished) == direct["usage"]["completion_tokens"]
    assert admitted.prompt_tokens == direct["usage"]["prompt_tokens"]


def test_completions_prompt_and_logprobs(upstream):
    body = {"model": CHAT, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    direct = httpx.post(upstream.url + "/v1/completions", json=body, timeout=60).json()
    request = ChatRequest(prompt="The capital of France is",
                          params=SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=2))
    events = run_events(backend(upstream.url + "/v1"), request)
    admitted, [finished] = check_shape(events)
    assert texts(events) == [direct["choices"][0]["text"]]
    assert finished.completion_tokens == direct["usage"]["completion_tokens"]
    assert admitted.prompt_tokens == direct["usage"]["prompt_tokens"]
    want = direct["choices"][0]["logprobs"]
    got = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]
    assert [(b.decode(), lp) for _, b, lp, _ in got] == list(zip(want["tokens"], want["token_logprobs"]))
    assert [{b.decode(): lp for _, b, lp in top} for *_, top in got] == want["top_logprobs"]


def test_completions_token_prompt(upstream):
    ids = httpx.post(upstream.url + "/v1/tokenize", json={"model": CHAT, "prompt": "Once upon a time"}).json()["tokens"]
    request = ChatRequest(prompt=ids, params=SamplingParams(max_tokens=4, temperature=0))
    admitted, _ = check_shape(run_events(backend(upstream.url + "/v1"), request))
    assert admitted.prompt_tokens == len(ids)


def test_upstream_400_is_the_clients_error(upstream):
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Name three colors."}], "temperature": -1.0}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=60)
    assert direct.status_code == 400
    events = run_events(backend(upstream.url + "/v1"), chat_request(temperature=-1.0))
    error = the_failure(events)
    assert isinstance(error, ApiError) and error.status == 400, vars(error)
    want = direct.json()["error"]
    assert (error.message, error.param, error.code) == (want["message"], want["param"], want["code"])
    assert "temperature" in error.message


def test_unknown_upstream_model_is_unavailable(upstream):
    """A model the upstream does not serve is our configuration's fault, not the client's."""
    b = backend(upstream.url + "/v1", name="big", upstream_model=None)  # "big" is no model there
    error = the_failure(run_events(b, chat_request(max_tokens=2)))
    assert isinstance(error, Unavailable) and error.status == 404


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_bitwise_equal_upstream(upstream, encoding):
    inputs = ["hello world", "the quick brown fox", "ü"]
    answer = httpx.post(upstream.url + "/v1/embeddings", json={"model": EMBED, "input": inputs, "encoding_format": encoding})
    direct = answer.json()
    want = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if encoding == "base64"
                     else np.asarray(d["embedding"], np.float32) for d in direct["data"]])

    async def go():
        b = backend(upstream.url + "/v1", name="emb", upstream_model=EMBED, kind="embedding")
        try:
            return await b.embed(EmbedRequest(texts=inputs, encoding=encoding))
        finally:
            await b.pool.aclose()

    result = asyncio.run(go())
    vectors = result.as_array()
    assert vectors.dtype == np.float32 and vectors.shape == want.shape
    assert vectors.tobytes() == want.tobytes()
    # The upstream's data array is passed through byte for byte as it wrote it.
    assert b'"data":' + result.data_json(encoding) + b"," in answer.content
    assert result.prompt_tokens == direct["usage"]["prompt_tokens"]


def test_embeddings_token_lists(upstream):
    ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in MiniLM's BERT vocabulary
    direct = httpx.post(upstream.url + "/v1/embeddings", json={"model": EMBED, "input": [ids], "encoding_format": "base64"}).json()

    async def go():
        b = backend(upstream.url + "/v1", name="emb", upstream_model=EMBED, kind="embedding")
        try:
            return await b.embed(EmbedRequest(token_lists=[ids], encoding="base64"))
        finally:
            await b.pool.aclose()

    result = asyncio.run(go())
    assert result.as_array()[0].tobytes() == base64.b64decode(direct["data"][0]["embedding"])


# (b) The fault server ------------------------------------------------------------------------------
@CLIENTS
def test_fault_ok_stream_and_usage_split(fault, client):
    fault.prompt_tokens, fault.cached_tokens = 11, 3
    events = run_events(backend(fault.base_url, client=client), chat_request(n=3, max_tokens=3))
    admitted, finished = check_shape(events, n=3)
    assert texts(events, 3) == ["Hello, world"] * 3
    assert (admitted.prompt_tokens, admitted.cached_tokens) == (11, 3)
    assert [f.completion_tokens for f in finished] == [3, 3, 3]
    assert all(f.reason == "length" and f.prompt_tokens == 11 and f.cached_tokens == 3 for f in finished)
    sent = fault.requests[-1].json
    assert sent["model"] == CHAT and sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["n"] == 3 and "top_k" not in sent and "ignore_eos" not in sent


def test_sampling_fields_sent(fault):
    params = SamplingParams(max_tokens=5, temperature=0.3, top_p=0.9, top_k=40, min_p=0.05, seed=7, presence_penalty=0.5,
                            frequency_penalty=0.25, logit_bias={42: -100.0}, stop=["\n"], ignore_eos=True, logprobs=True, top_logprobs=1)
    run_events(backend(fault.base_url), ChatRequest(messages=[Message("user", "x")], params=params))
    run_events(backend(fault.base_url), ChatRequest(prompt="x", params=params))
    chat, completion = fault.requests[-2].json, fault.requests[-1].json
    common = {"max_tokens": 5, "temperature": 0.3, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7, "presence_penalty": 0.5,
              "frequency_penalty": 0.25, "logit_bias": {"42": -100.0}, "stop": ["\n"], "ignore_eos": True}
    assert {k: chat[k] for k in common} == common and {k: completion[k] for k in common} == common
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 1) and completion["logprobs"] == 1
    assert chat["messages"] == [{"role": "user", "content": "x"}] and completion["prompt"] == "x"


@CLIENTS
def test_keep_alive_and_shared_pool(fault, client):
    async def go():
        pools: dict = {}
        a = backend(fault.base_url, name="a", pools=pools, client=client)
        b = backend(fault.base_url, name="b", upstream_model="other", pools=pools, client=client)
        assert a.pool is b.pool
        try:
            for m in (a, b, a):
                check_shape([e async for e in m.generate(chat_request())])
        finally:
            await a.pool.aclose()

    asyncio.run(go())
    assert fault.connections == 1 and fault.completed == 3
    assert [r.json["model"] for r in fault.requests] == [CHAT, "other", CHAT]


def test_idle_connection_closed_by_upstream_is_replaced(fault):
    fault.keep_alive = False

    async def go():
        b = backend(fault.base_url)
        try:
            for _ in range(3):
                check_shape([e async for e in b.generate(chat_request())])
                await asyncio.sleep(0.02)  # the upstream's close arrives while the connection idles
        finally:
            await b.pool.aclose()

    asyncio.run(go())
    assert fault.connections == 3 and fault.completed == 3


@CLIENTS
def test_api_key_sent(fault, client):
    os.environ["FERROSERVE_TEST_UPSTREAM_KEY"] = "sk-test"
    try:
        run_events(backend(fault.base_url, api_key_env="FERROSERVE_TEST_UPSTREAM_KEY", client=client), chat_request())
    finally:
        del os.environ["FERROSERVE_TEST_UPSTREAM_KEY"]
    assert fault.requests[-1].headers["authorization"] == "Bearer sk-test"


@CLIENTS
@pytest.mark.parametrize("status", ["500", "503", "429", "408", "401", "403"])
def test_fault_statuses_are_unavailable(fault, status, client):
    fault.mode = status
    b = backend(fault.base_url, client=client)
    error = the_failure(run_events(b, chat_request()))
    assert isinstance(error, Unavailable) and error.status == int(status)
    assert error.retry_after == (2.0 if status in ("429", "503") else None)
    assert b.health() == (DEGRADED if status in ("500", "503", "429") else HEALTHY)


def test_retry_after_absent(fault):
    fault.mode, fault.retry_after = "429", None
    error = the_failure(run_events(backend(fault.base_url), chat_request()))
    assert error.status == 429 and error.retry_after is None


@CLIENTS
def test_fault_400_is_api_error(fault, client):
    fault.mode = "400"
    error = the_failure(run_events(backend(fault.base_url, client=client), chat_request()))
    assert isinstance(error, ApiError)
    assert (error.status, error.param, error.code) == (400, "temperature", "invalid_value")
    assert error.message == "fault server: Bad Request"


@CLIENTS
@pytest.mark.parametrize("mode", ["hang", "hang_after_headers", "hang_mid_stream", "close"])
def test_hangs_and_drops_are_unavailable(fault, mode, client):
    fault.mode = mode
    b = backend(fault.base_url, read_timeout_s=0.3, client=client)
    started = time.monotonic()
    events = run_events(b, chat_request())
    assert time.monotonic() - started < 3
    error = the_failure(events)
    assert isinstance(error, Unavailable) and error.status is None
    assert texts(events) == (["Hello"] if mode == "hang_mid_stream" else [""])
    assert b.health() == DEGRADED
    if mode != "close":  # the hanging response was given up: the connection closed
        assert fault.wait_for(lambda: fault.cancelled == 1)


@CLIENTS
def test_connection_refused_is_down(client):
    b = backend(f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1.0, client=client)
    error = the_failure(run_events(b, chat_request()))
    assert isinstance(error, Unavailable) and error.status is None and "connect" in error.reason
    assert b.health() == DOWN


@CLIENTS
@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_stopping_early_cancels_upstream(fault, how, client):
    fault.mode, fault.tokens, fault.token_delay_s = "slow", ["tok"] * 50, 0.05

    async def go():
        b = backend(fault.base_url, client=client)
        first = asyncio.Event()

        async def consume(gen):
            async for e in gen:
                if isinstance(e, Delta):
                    first.set()

        gen = b.generate(chat_request())
        try:
            if how == "aclose":
                assert isinstance(await anext(gen), Delta)
                await gen.aclose()
            else:
                task = asyncio.create_task(consume(gen))
                await first.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert b.stats().running == 0
        finally:
            await b.pool.aclose()

    started = time.monotonic()
    asyncio.run(go())
    assert fault.wait_for(lambda: fault.cancelled == 1, timeout_s=2.0)
    assert time.monotonic() - started < 1.5  # well before the 2.5 s the whole stream takes
    assert fault.completed == 0


def test_stats_count_waiting_and_running(fault):
    fault.mode, fault.token_delay_s = "slow", 0.1

    async def go():
        b = backend(fault.base_url, max_concurrent=1)
        try:
            tasks = [asyncio.create_task(events_of_open(b)) for _ in range(2)]
            await asyncio.sleep(0.1)
            seen = (b.stats().running, b.stats().queue_depth)
            await asyncio.gather(*tasks)
            return seen, (b.stats().running, b.stats().queue_depth)
        finally:
            await b.pool.aclose()

    async def events_of_open(b):
        return [e async for e in b.generate(chat_request())]

    assert asyncio.run(go()) == ((1, 1), (0, 0))


@CLIENTS
def test_embeddings_from_fault_server(fault, client):
    async def go(**kw):
        b = backend(fault.base_url, name="emb", upstream_model="fault-embed", kind="embedding", client=client)
        try:
            return await b.embed(EmbedRequest(texts=["a", "bb"], **kw))
        finally:
            await b.pool.aclose()

    result = asyncio.run(go(dimensions=4, encoding="base64"))
    assert result.as_array().shape == (2, 4) and result.as_array().dtype == np.float32
    assert fault.requests[-1].json == {"model": "fault-embed", "input": ["a", "bb"], "encoding_format": "base64", "dimensions": 4}
    fault.mode = "500"
    with pytest.raises(Unavailable) as unavailable:
        asyncio.run(go())
    assert unavailable.value.status == 500
    fault.mode = "400"
    with pytest.raises(ApiError) as invalid:
        asyncio.run(go())
    assert invalid.value.status == 400 and invalid.value.param == "temperature"


def test_info_and_kinds():
    spec = ModelSpec(name="big", path="", kind="chat", backend="up", owned_by="acme", options={"context_length": 4096},
                     input_usd_per_million_tokens=1.5, output_usd_per_million_tokens=2.0)
    b = create(spec, BackendSpec(name="up", kind="upstream", base_url="http://127.0.0.1:9/v1"), {})
    info = b.info()
    assert (info.kind, info.backend, info.capabilities, info.context_length) == ("upstream", "up", ["chat", "completions"], 4096)
    assert (info.device, info.owned_by, info.output_usd_per_million_tokens) == ("http://127.0.0.1:9/v1", "acme", 2.0)
    assert b.count_tokens(chat_request("x" * 40)) > 0
    with pytest.raises(ApiError):
        b.count_embed_tokens(EmbedRequest(texts=["x"]))
    emb = create(ModelSpec(name="e", path="", kind="embedding", backend="up"),
                 BackendSpec(name="up", kind="upstream", base_url="http://127.0.0.1:9/v1"), {})
    assert emb.info().capabilities == ["embeddings"] and emb.info().context_length is None
    with pytest.raises(ApiError):
        emb.generate(chat_request())


def test_split_tokens_sums_to_total():
    assert _split_tokens(6, [3, 3]) == [3, 3]
    assert _split_tokens(7, [3, 3]) in ([4, 3], [3, 4])
    assert _split_tokens(5, [0, 0]) == [3, 2]
    for total, counted in [(10, [1, 2, 3]), (0, [2, 1]), (1, [5, 5, 5]), (100, [1, 0, 7])]:
        split = _split_tokens(total, counted)
        assert sum(split) == total and min(split) >= 0


def test_sse_split_anywhere_and_crlf(upstream):
    """A real transcript gives the same events whole, byte by byte, and with CRLF lines,
    comments and an `event:` field mixed in."""
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1}
    transcript = httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=60).content
    request = chat_request("Hi", n=2)

    def events(pieces) -> list:
        stream = _SseStream(True, 2)
        out = [e for piece in pieces for e in stream.feed(piece)]
        return out + stream.finish(request)

    whole = events([transcript])
    check_shape(whole, n=2)
    assert events([transcript[i:i + 1] for i in range(len(transcript))]) == whole
    noisy = (b": keep-alive\r\n\r\nevent: message\r\n" + transcript.replace(b"\n", b"\r\n")).replace(b"data: [DONE]", b"data:[DONE]")
    assert events([noisy[i:i + 7] for i in range(0, len(noisy), 7)]) == whole

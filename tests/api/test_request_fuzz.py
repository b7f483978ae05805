"""Generated request bodies (hypothesis) against a real server: whatever JSON — or non-JSON —
a client sends to chat completions, completions, embeddings or responses, the answer is a
success or a clean 4xx with OpenAI's error shape, never a 500 from an exception the request
layer let through (issue 16 part 3: the Python side of the fuzzing).

Bodies are shaped like each endpoint's request (its field names, with values of every JSON
type, including integers past 32 and 64 bits and the edge values the engine's types have),
so most of them get past JSON decoding and into the checks behind it: the tool and message
conversion, the sampling parameters, the engine's own validation. The server caps generation
at 2 tokens, so the bodies that are valid run quickly.

Derandomized: the same cases every run. `FERROSERVE_FUZZ_EXAMPLES=N` runs N per endpoint
(default 200; bench/NOTES.md has a longer run)."""

from __future__ import annotations

import os

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server

EXAMPLES = int(os.environ.get("FERROSERVE_FUZZ_EXAMPLES", "200"))
CHAT_MODELS = ["SmolLM2-135M-Instruct", "smollm2"]
EMBEDDING_MODELS = ["all-minilm", "sentence-transformers/all-MiniLM-L6-v2"]

# Integers where a type changes: signed/unsigned 32 and 64 bits, and beyond (JSON has no limit).
EDGE_INTS = st.sampled_from([-(2**64), -(2**63) - 1, -(2**63), -(2**31) - 1, -2, -1, 0, 1, 2, 16, 17, 20, 21,
                             2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30])
EDGE_FLOATS = st.sampled_from([-1e308, -2.5, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.0, 2.0000001, 1e308])
NUMBERS = st.one_of(EDGE_INTS, st.integers(), EDGE_FLOATS, st.floats(allow_nan=False, allow_infinity=False))
TEXT = st.text(max_size=24)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
# A field's value: mostly a scalar of some type, sometimes any JSON.
VALUE = st.one_of(SCALARS, JSON)


INT = st.one_of(EDGE_INTS, st.integers(), VALUE)
FLOAT = st.one_of(EDGE_FLOATS, NUMBERS, VALUE)
BOOL = st.one_of(st.booleans(), VALUE)
STR = st.one_of(TEXT, VALUE)


def _object(required: dict, optional: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(required, optional=optional)


def _body(valid: dict, fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[bytes]:
    """Mostly a valid request with one to three fields replaced by generated values (so a
    value reaches the checks behind the others); also requests whose every field is
    generated, any JSON value, and bytes that are not JSON."""
    names = sorted(fields)
    mutated = st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: fields[n] for n in chosen})).map(lambda changes: valid | changes)
    generated = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(
        *[mutated.map(msgspec.json.encode)] * 6,
        generated.map(msgspec.json.encode),
        JSON.map(msgspec.json.encode),
        st.binary(max_size=64),
    )


FUNCTION = _object({"name": st.one_of(st.sampled_from(["get_weather", "f", "a-b_c"]), VALUE)},
                   {"description": VALUE, "parameters": st.one_of(st.just({"type": "object", "properties": {}}), JSON),
                    "strict": VALUE})
TOOLS = st.one_of(st.lists(_object({"type": st.one_of(st.just("function"), VALUE)}, {"function": st.one_of(FUNCTION, JSON)}),
                           max_size=3), VALUE)
TOOL_CHOICE = st.one_of(st.sampled_from(["none", "auto", "required"]),
                        _object({"type": st.just("function")}, {"function": _object({}, {"name": STR})}), VALUE)
TOOL_CALL = _object({}, {"id": STR, "type": st.one_of(st.just("function"), VALUE),
                         "function": st.one_of(_object({}, {"name": STR, "arguments": st.one_of(TEXT, JSON)}), JSON)})
CONTENT = st.one_of(TEXT, st.lists(_object({"type": st.one_of(st.sampled_from(["text", "image_url", "input_text"]), VALUE)},
                                           {"text": STR}), max_size=3), VALUE)
MESSAGE = _object(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), VALUE)},
    {"content": CONTENT, "name": VALUE, "tool_calls": st.one_of(st.lists(TOOL_CALL, max_size=2), VALUE),
     "tool_call_id": STR},
)
STOP = st.one_of(TEXT, st.lists(TEXT, max_size=5), VALUE)
SAMPLING = {
    "temperature": FLOAT, "top_p": FLOAT, "top_k": INT, "min_p": FLOAT, "n": INT, "stream": BOOL, "stop": STOP,
    "max_tokens": INT, "presence_penalty": FLOAT, "frequency_penalty": FLOAT, "seed": INT, "user": STR,
    "ignore_eos": BOOL, "route": st.one_of(_object({}, {"objective": STR, "fallbacks": VALUE, "max_latency_ms": FLOAT}), VALUE),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(EDGE_INTS.map(str), TEXT), NUMBERS, max_size=3), VALUE),
    "stream_options": st.one_of(_object({}, {"include_usage": BOOL}), VALUE),
    "model": st.one_of(st.sampled_from(CHAT_MODELS), VALUE),
}
RESPONSE_FORMAT = st.one_of(_object({"type": st.sampled_from(["text", "json_object", "json_schema"])},
                                    {"json_schema": st.one_of(_object({"name": STR}, {"schema": JSON, "strict": BOOL}), JSON)}),
                            VALUE)
CHAT_FIELDS = SAMPLING | {
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), VALUE), "max_completion_tokens": INT, "logprobs": BOOL,
    "top_logprobs": INT, "tools": TOOLS, "tool_choice": TOOL_CHOICE, "parallel_tool_calls": BOOL, "service_tier": STR,
    "store": BOOL, "metadata": VALUE, "modalities": VALUE, "reasoning_effort": STR, "verbosity": STR,
    "response_format": RESPONSE_FORMAT,
}
TOKEN_IDS = st.lists(st.one_of(EDGE_INTS, st.integers(0, 49_151)), max_size=6)
PROMPT = st.one_of(TEXT, TOKEN_IDS, st.lists(TEXT, max_size=3), st.lists(TOKEN_IDS, max_size=3), VALUE)
COMPLETION_FIELDS = SAMPLING | {
    "prompt": PROMPT, "logprobs": INT, "echo": BOOL, "suffix": STR, "best_of": INT, "response_format": RESPONSE_FORMAT,
}
EMBEDDING_FIELDS = {
    "model": st.one_of(st.sampled_from(EMBEDDING_MODELS), VALUE), "input": PROMPT,
    "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), VALUE), "dimensions": INT, "user": STR,
    "route": VALUE, "metadata": VALUE,
}
RESPONSE_ITEM = _object(
    {"type": st.one_of(st.sampled_from(["message", "function_call", "function_call_output"]), VALUE)},
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "developer"]), VALUE), "content": CONTENT,
     "call_id": STR, "name": STR, "arguments": st.one_of(TEXT, JSON), "output": STR},
)
RESPONSE_FIELDS = {
    "model": st.one_of(st.sampled_from(CHAT_MODELS), VALUE), "input": st.one_of(TEXT, st.lists(RESPONSE_ITEM, max_size=3), VALUE),
    "instructions": STR, "max_output_tokens": INT, "temperature": FLOAT, "top_p": FLOAT,
    "previous_response_id": STR, "stream": BOOL, "metadata": VALUE, "parallel_tool_calls": BOOL,
    "tool_choice": TOOL_CHOICE, "truncation": STR, "include": VALUE, "top_logprobs": INT, "reasoning": VALUE,
    "service_tier": STR, "user": STR, "tools": TOOLS, "store": BOOL,
    "text": st.one_of(_object({}, {"format": st.one_of(_object({"type": st.sampled_from(["text", "json_object", "json_schema"])},
                                                               {"name": STR, "schema": JSON}), JSON)}), VALUE),
}
VALID_CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
VALID_COMPLETION = {"model": "smollm2", "prompt": "Hi", "max_tokens": 1}
VALID_EMBEDDING = {"model": "all-minilm", "input": "Hi"}
VALID_RESPONSE = {"model": "smollm2", "input": "Hi", "max_output_tokens": 1, "store": False}


@pytest.fixture(scope="module")
def fuzz_server():
    srv = Server(["--max-tokens-limit", "2", "--log-level", "warning", "--device", "cpu"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _check(server: Server, path: str, body: bytes) -> None:
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, f"{path} -> {r.status_code} for {body!r}: {r.text[:500]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"], r.text
        assert isinstance(error["type"], str) and isinstance(error["code"], str), r.text


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=_body(VALID_CHAT, CHAT_FIELDS))
def test_chat_completions(fuzz_server, body):
    _check(fuzz_server, "/v1/chat/completions", body)


@FUZZ
@given(body=_body(VALID_COMPLETION, COMPLETION_FIELDS))
def test_completions(fuzz_server, body):
    _check(fuzz_server, "/v1/completions", body)


@FUZZ
@given(body=_body(VALID_EMBEDDING, EMBEDDING_FIELDS))
def test_embeddings(fuzz_server, body):
    _check(fuzz_server, "/v1/embeddings", body)


@FUZZ
@given(body=_body(VALID_RESPONSE, RESPONSE_FIELDS))
def test_responses(fuzz_server, body):
    _check(fuzz_server, "/v1/responses", body)


@pytest.mark.parametrize("path,body", [
    # Each was a 500 (an OverflowError converting to the engine's unsigned types) before the
    # request layer checked the ranges.
    ("/v1/chat/completions", {"top_k": -1}),
    ("/v1/chat/completions", {"top_k": -7}),
    ("/v1/chat/completions", {"logit_bias": {"-5": 1}}),
    ("/v1/chat/completions", {"logit_bias": {"99999999999999": 1}}),
    ("/v1/chat/completions", {"n": 2**64}),
    # n = 2**32 - 1 made the completions handler build that many choices before the engine
    # refused it: the worker grew to 22 GB and was OOM-killed. n is bounded (128) first now.
    ("/v1/completions", {"n": 129}),
    ("/v1/chat/completions", {"top_logprobs": 2**64, "logprobs": True}),
    ("/v1/chat/completions", {"max_tokens": 2**64}),
    ("/v1/completions", {"prompt": [99999999999]}),
    ("/v1/completions", {"prompt": [[1, -1]]}),
    ("/v1/responses", {"max_output_tokens": -1}),
    ("/v1/responses", {"max_output_tokens": 2**64}),
])
def test_found_cases(fuzz_server, path, body):
    base = {"/v1/chat/completions": VALID_CHAT, "/v1/completions": VALID_COMPLETION, "/v1/responses": VALID_RESPONSE}[path]
    r = httpx.post(fuzz_server.url + path, json=base | body, timeout=60)
    # top_k -1 is vLLM's "all tokens": accepted. The rest are the client's errors.
    expected = 200 if body == {"top_k": -1} else 400
    assert r.status_code == expected, r.text
    if "n" in body:
        assert "n must be between 1 and 128" in r.json()["error"]["message"], r.text

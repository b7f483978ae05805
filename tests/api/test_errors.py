"""Every bad input gets an OpenAI-shaped error with the right status, never a 500."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

MODEL = "all-minilm"


def post(server, body, path="/v1/embeddings", **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, *, code=None, param=None, type_="invalid_request_error"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["type"] == type_
    # Never null: OpenFPGA's schema requires a string, and clients switch on it.
    assert isinstance(err["code"], str) and err["code"], err
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert r.headers["x-request-id"]


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        ({"input": "hi"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": 3, "input": "hi"}, "model"),
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": [1.5]}, "input"),
        ({"model": MODEL, "input": ["a", 1]}, "input"),
        ({"model": MODEL, "input": [[1, "x"]]}, "input"),
        ({"model": MODEL, "input": [-1]}, "input"),
        ({"model": MODEL, "input": {"a": 1}}, "input"),
        ({"model": MODEL, "input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"model": MODEL, "input": "hi", "dimensions": "ten"}, "dimensions"),
    ],
)
def test_malformed_or_wrong_types_400(server, body, param):
    assert_error(post(server, body), 400, param=param)


@pytest.mark.parametrize(
    "inp",
    ["", [], [""], ["ok", ""], [[]], [[101], []]],
)
def test_empty_input_400(server, inp):
    assert_error(post(server, {"model": MODEL, "input": inp}), 400, param="input")


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("reasoning_effort", "high"),
    ("web_search_options", {}),
    ("prompt_cache_retention", "24h"),
    ("service_tier", "priority"),
    ("store", True),
    ("modalities", ["text", "audio"]),
    ("verbosity", "low"),
])
def test_openai_chat_fields_we_cannot_honour_are_400_naming_them(server, field, value):
    r = post(server, {**CHAT, field: value}, path="/v1/chat/completions")
    assert_error(r, 400, param=field, code="unsupported_parameter")
    assert field in r.json()["error"]["message"] or field in ("store", "modalities", "verbosity")


@pytest.mark.parametrize("extra", [
    {"service_tier": "auto"}, {"service_tier": "default"}, {"service_tier": "flex"}, {"store": False},
    {"modalities": ["text"]}, {"verbosity": "medium"}, {"metadata": {"run": "1"}}, {"prompt_cache_key": "k"},
    {"safety_identifier": "u-1"},
])
def test_openai_chat_fields_in_a_form_we_honour_are_accepted(server, extra):
    r = post(server, {**CHAT, **extra}, path="/v1/chat/completions")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "body,code",
    [
        (b"{not json", "invalid_json"),
        ({"input": "hi"}, "missing_required_parameter"),
        ({"model": 3, "input": "hi"}, "invalid_type"),
        ({"model": MODEL, "input": ""}, "invalid_value"),
        ({"model": MODEL, "input": "hi", "encoding_format": "int8"}, "invalid_value"),
    ],
)
def test_400s_carry_openai_codes(server, body, code):
    """Issue 16 (8): 400s sent `code: null`; now OpenAI's code for each kind of mistake."""
    assert_error(post(server, body), 400, code=code)


def test_unknown_model_404(server):
    assert_error(post(server, {"model": "gpt-9", "input": "hi"}), 404, code="model_not_found", param="model")


def test_dimensions_out_of_range_400(server):
    assert_error(post(server, {"model": MODEL, "input": "hi", "dimensions": 385}), 400, param="dimensions")
    assert_error(post(server, {"model": MODEL, "input": "hi", "dimensions": 0}), 400, param="dimensions")


def test_token_id_outside_vocabulary_400(server):
    assert_error(post(server, {"model": MODEL, "input": [[101, 999999]]}), 400, param="input")


def test_too_many_inputs_400(server):
    assert_error(post(server, {"model": MODEL, "input": ["x"] * 2049}), 400, param="input")
    ok = post(server, {"model": MODEL, "input": ["x"] * 2048})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2048


def test_body_over_limit_413(server):
    # The test server runs with --max-body-bytes 2 MiB.
    big = {"model": MODEL, "input": ["y" * 1000] * 2100}
    assert_error(post(server, big), 413, code="request_too_large")


def test_body_over_limit_without_content_length_413(server):
    def chunks():
        yield b'{"model": "all-minilm", "input": ["'
        for _ in range(300):
            yield b"z" * 8192
        yield b'"]}'

    r = httpx.post(server.url + "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 413, code="request_too_large")


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nope"), 404, code="not_found")
    assert_error(httpx.get(server.url + "/v1/embeddings"), 405, code="method_not_allowed")


def test_server_still_healthy_after_errors(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.embeddings.create(model=MODEL, input="still fine").data


def test_wrong_model_path_exits_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ferroserve", "serve", "--model", f"x={tmp_path}/missing"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "ferroserve", "serve", "--model", f"x={tmp_path}/empty"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert "missing config.json" in r.stderr

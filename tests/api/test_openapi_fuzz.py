"""Schemathesis against a real server (issue 16, part 2): our own `/v1/openapi.json` (every
route, positive and negative cases, stateful links) and the five seed specs, with the checks
not_a_server_error, status_code_conformance, content_type_conformance,
response_schema_conformance and response_headers_conformance. Bounded here
(FERROSERVE_FUZZ_EXAMPLES per operation, default 20); bench/fuzz_api.sh runs ≥ 10,000 cases."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.gateway.conftest import auth, create_key
from tests.specs import fuzz

EXAMPLES = int(os.environ.get("FERROSERVE_FUZZ_EXAMPLES", "20"))


@pytest.fixture(scope="module")
def fuzzed():
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-fuzz-"))
    key = create_key(data_dir, "ops", "--admin")
    srv = Server(["--log-level", "warning", "--max-tokens-limit", str(fuzz.MAX_TOKENS), "--default-max-tokens",
                  str(fuzz.MAX_TOKENS)], data_dir=data_dir)
    try:
        srv.wait_ready()
        srv.key = key
        yield srv
    finally:
        srv.stop()


# Schemathesis' own code hit CPython 3.11's "AST constructor recursion depth mismatch" on the
# larger specs (IPOP's is 327 KB); tests/specs/fuzz_hooks.py keeps that cosmetic failure out of
# the runs, so every spec is checked strictly.
_SPECS = fuzz.SPECS


@pytest.mark.parametrize("spec", _SPECS)
def test_schemathesis(fuzzed, spec):
    result = fuzz.run(spec, fuzzed.url, fuzzed.key, EXAMPLES, workers=2)
    assert result["cases"] > 0, result["output"]
    assert result["status"] == 0 and not result["failures"], "\n".join(result["failures"]) + "\n" + result["output"]
    # The run tested with a working key to the end (it cannot revoke the key it runs with).
    assert httpx.get(fuzzed.url + "/v1/models", headers=auth(fuzzed.key), timeout=30).status_code == 200
    assert "unhandled error" not in fuzzed.log_path.read_text()


def test_baselines_never_accept_a_server_error():
    for path in fuzz.BASELINES.glob("*.json"):
        entries = json.loads(path.read_text())["entries"]
        assert all(e["check"] != "not_a_server_error" for e in entries), path


def test_an_accepted_violation_is_accepted_under_either_schema_name():
    # CI once failed on GET /v1/responses/{id}'s `null` incomplete_details named through the
    # schema bundle, where the baseline had recorded it named in place.
    doc = json.loads((fuzz.BASELINES / "ipop.json").read_text())
    expanded = fuzz.expand_baseline(doc)
    keys = {(e["operation"], e["signature"]) for e in expanded["entries"]}
    get = "GET /v1/responses/{response_id}"
    assert (get, "properties/incomplete_details/type") in keys
    assert (get, "x-bundled/schema000001/properties/incomplete_details/type") in keys
    assert (get, "properties/previous_response_id/type") in keys
    # Nothing crosses operations or checks, and server errors stay unaccepted.
    assert (get, "required") not in keys
    assert ("POST /v1/responses/input_tokens", "x-bundled/schema000001/properties/previous_response_id/type") not in keys
    assert all(e["check"] != "not_a_server_error" for e in expanded["entries"])
    assert {(e["operation"], e["check"], e["failure"]) for e in expanded["entries"]} == \
        {(e["operation"], e["check"], e["failure"]) for e in doc["entries"]}

"""Schemathesis against a running ferroserve: our own `/v1/openapi.json` and the five specs in
../shared/specs (the two text ones as OpenAPI renditions here), each restricted to the routes
we serve, with its base path mapped to `/v1`, every request body's `model` constrained to our
model names and its token fields capped (else most cases stop at a 404, or generate to the
end of the context).

Used by tests/api/test_openapi_fuzz.py (a bounded run in `make test`) and by
bench/fuzz_api.sh (≥ 10,000 cases). As a command:

    python -m tests.specs.fuzz SPEC --url http://127.0.0.1:8000 --key KEY -n 200 [--seed S]

prints one JSON line: the spec, cases, failures (each check's name and the operation), exit
status.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
SHARED_SPECS = REPO.parent / "shared" / "specs"
HERE = Path(__file__).resolve().parent
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance")
# Each seed spec: its file and the path prefix its paths sit under on our server (its server
# URL's base path, mapped to /v1).
SEED_SPECS = {
    "ipop": (SHARED_SPECS / "ipop-public-api.openapi.json", "/v1"),
    "nurev": (SHARED_SPECS / "nurev-inference-api.openapi.json", ""),
    "openfpga": (SHARED_SPECS / "openfpga-inference-gateway.openapi.json", "/v1"),
    "neural-router": (HERE / "neural-router-api.openapi.json", "/v1"),
    "qubrid": (HERE / "qubrid-inference-api.openapi.json", "/v1"),
}
SPECS = ("ferroserve", *SEED_SPECS)
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The generation cap of the fuzzed server (--max-tokens-limit) and of the specs' token fields.
MAX_TOKENS = 8
_CHAT_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/input_tokens", "/v1/tokenize",
                "/v1/detokenize")
_EMBED_ROUTES = ("/v1/embeddings", "/v1/batch/embeddings")
_METHODS = ("get", "post", "put", "patch", "delete")


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def model_names(url: str, headers: dict[str, str]) -> tuple[list[str], list[str]]:
    """(chat names, embedding names): each model's name and aliases, from /v1/models."""
    data = httpx.get(url + "/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    chat = [n for m in data if "chat" in m["capabilities"] for n in [m["id"], *m.get("aliases", [])]]
    embed = [n for m in data if "embeddings" in m["capabilities"] for n in [m["id"], *m.get("aliases", [])]]
    return chat, embed


def _resolve(doc: dict, schema: Any, stack: tuple[str, ...] = ()) -> Any:
    """`schema` with its $refs inlined (a ref already being inlined stays a ref: recursion)."""
    if isinstance(schema, list):
        return [_resolve(doc, s, stack) for s in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and ref not in stack and len(stack) < 4:
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return _resolve(doc, {**target, **rest}, (*stack, ref))
    return {k: _resolve(doc, v, stack) for k, v in schema.items()}


def _constrain(schema: Any, models: list[str], extra: dict[str, Any]) -> None:
    """In place: every object's `model` property is one of `models`, token fields are capped,
    and `extra` replaces the named properties' schemas."""
    if isinstance(schema, list):
        for s in schema:
            _constrain(s, models, extra)
        return
    if not isinstance(schema, dict):
        return
    props = schema.get("properties")
    if isinstance(props, dict):
        if "model" in props and models:
            props["model"] = {"type": "string", "enum": models}
        for name in TOKEN_FIELDS:
            if name in props:
                props[name] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
        if "n" in props:
            props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        for name, value in extra.items():
            if name in props:
                props[name] = value
    for key, value in schema.items():
        if key != "enum" and key != "const" and key != "examples" and key != "example":
            _constrain(value, models, extra)


def prepare(doc: dict, prefix: str, ours: dict, chat: list[str], embed: list[str], extra: dict[str, Any] | None = None) -> dict:
    """A copy of `doc` with only the operations `ours` (our document) has, at our paths, and
    its request bodies constrained."""
    doc = copy.deepcopy(doc)
    claimed = {(method, _shape(path)) for path, ops in ours["paths"].items() for method in ops}
    paths: dict[str, dict] = {}
    for path, item in doc.get("paths", {}).items():
        full = prefix + path
        kept = {m: op for m, op in item.items() if m in _METHODS and (m, _shape(full)) in claimed}
        if not kept:
            continue
        shared_params = item.get("parameters")
        for method, op in kept.items():
            if shared_params:
                op["parameters"] = [*shared_params, *op.get("parameters", [])]
            body = op.get("requestBody")
            if body is not None:
                body = _resolve(doc, body)
                models = chat + embed if full == "/v1/estimate" else chat if full in _CHAT_ROUTES else embed if full in _EMBED_ROUTES else []
                _constrain(body, models, extra or {})
                op["requestBody"] = body
        paths[full] = kept
    doc["paths"] = paths
    doc["servers"] = [{"url": "/"}]
    return doc


def our_document(url: str) -> dict:
    return httpx.get(url + "/v1/openapi.json", timeout=30).raise_for_status().json()


# Our own document: keys it creates go to workspaces of their own (a budget set on the
# caller's workspace would turn the rest of the run into 402s), batches send no webhooks.
_OURS_EXTRA = {
    "workspace": {"type": "string", "enum": ["fuzz-a", "fuzz-b"]},
    "webhook_url": {"type": "null"},
}


def spec_for(name: str, url: str, headers: dict[str, str]) -> dict:
    ours = our_document(url)
    chat, embed = model_names(url, headers)
    if name == "ferroserve":
        return prepare(ours, "", ours, chat, embed, _OURS_EXTRA)
    path, prefix = SEED_SPECS[name]
    return prepare(json.loads(path.read_text()), prefix, ours, chat, embed, {"webhook_url": {"type": "null"}})


BASELINES = HERE / "baseline"


def run(name: str, url: str, key: str, max_examples: int, seed: int = 16, workers: int = 1, timeout_s: float = 1800,
        phases: str = "examples,coverage,fuzzing,stateful", update_baseline: bool = False) -> dict:
    """One schemathesis CLI run; returns {spec, cases, failures, status, output}.

    A seed spec's failures that are conflicts between it and OpenAI's wire format (listed, with
    the reason for each, in tests/specs/baseline/README.md) are accepted through
    schemathesis' baseline file for that spec; anything else fails the run. Our own document
    has no baseline: every failure counts. Server errors are never accepted."""
    baseline = BASELINES / f"{name}.json"
    headers = {"authorization": f"Bearer {key}"}
    spec = spec_for(name, url, headers)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        extra_args: list[str] = []
        if name != "ferroserve" and update_baseline:
            extra_args += ["--baseline", str(baseline), "--baseline-update"]
        elif name != "ferroserve" and baseline.exists():
            accepted = Path(tmp) / "baseline.json"
            accepted.write_text(json.dumps(expand_baseline(json.loads(baseline.read_text()))))
            extra_args += ["--baseline", str(accepted)]
        spec_path = Path(tmp) / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        events = Path(tmp) / "events.ndjson"
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", str(spec_path), "--url", url,
               "--checks", ",".join(CHECKS), "--mode", "all", "--phases", phases, "-n", str(max_examples),
               "--seed", str(seed), "--workers", str(workers), "--request-timeout", "120", "--no-color",
               "--header", f"Authorization: Bearer {key}", "--continue-on-failure", "--suppress-health-check", "all",
               "--report", "ndjson", "--report-ndjson-path", str(events), "--output-truncate", "true", *extra_args]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("fuzz_hooks.py"))}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp)
        cases = _count(events)
    return {"spec": name, "cases": cases, "failures": _failures(proc.stdout), "status": proc.returncode,
            "output": proc.stdout[-20000:] + proc.stderr[-5000:]}


_BUNDLED = re.compile(r"^(x-bundled/schema\d+/)?(.*)$")


def expand_baseline(doc: dict) -> dict:
    """`doc` with each accepted schema violation listed under every name the validator gives it.

    A response that breaks a seed spec in several known ways (IPOP's response object: `null`
    `error`, `incomplete_details` and `previous_response_id`, extra properties) fails on
    whichever of them the validator meets first, and schemathesis names the schema either in
    place (`properties/error/type`) or through its bundle (`x-bundled/schema000001/...`), which
    varies from run to run. So within one operation's accepted violations, every keyword
    location is accepted under every bundle name seen there; nothing new is accepted."""
    entries = doc["entries"]
    groups: dict[tuple[str, str, str], tuple[set[str], set[str]]] = {}
    for e in entries:
        if e["failure"] == "JsonSchemaError":
            prefix, rest = _BUNDLED.match(e["signature"]).groups()
            prefixes, rests = groups.setdefault((e["operation"], e["check"], e["failure"]), (set(), set()))
            prefixes.update({prefix or "", ""})
            rests.add(rest)
    known = {(e["operation"], e["check"], e["failure"], e["signature"]) for e in entries}
    extra = [{"operation": op, "check": check, "failure": failure, "signature": prefix + rest}
             for (op, check, failure), (prefixes, rests) in sorted(groups.items())
             for prefix in sorted(prefixes) for rest in sorted(rests)
             if (op, check, failure, prefix + rest) not in known]
    return {**doc, "entries": [*entries, *extra]}


def _count(events: Path) -> int:
    """Test cases sent, from schemathesis' ndjson event report."""
    cases = 0
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            finished = event.get("ScenarioFinished")
            if finished:
                cases += len(finished.get("recorder", {}).get("interactions", {}))
    return cases


_HEADER = re.compile(r"^_{3,} (.+?) _{3,}$")


def _failures(output: str) -> list[str]:
    """`operation: STxxx title` for each failure the CLI printed (baselined ones are not)."""
    found, operation = [], ""
    for line in output.splitlines():
        m = _HEADER.match(line)
        if m:
            operation = m.group(1)
        elif line.startswith("- ST"):
            found.append(f"{operation}: {line[2:]}")
    return sorted(set(found))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", choices=SPECS)
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("-n", "--max-examples", type=int, default=200)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--update-baseline", action="store_true", help="accept this run's failures (seed specs only)")
    args = p.parse_args()
    result = run(args.spec, args.url, args.key, args.max_examples, args.seed, args.workers, update_baseline=args.update_baseline)
    print(result["output"], file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "output"}))
    return 0 if result["status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Issue 13's structured-output targets, measured over HTTP against one ferroserve.

    .venv/bin/python bench/structured.py            # ≈ 3–6 min on 2 cores
    .venv/bin/python bench/structured.py --quick

1. Validity: for each schema, the constrained answer (`response_format: json_schema`) must
   parse and validate (target 100 %); the same prompt without the constraint (the schema given
   in the prompt, as users do without enforcement) shows how often the bare model manages it.
2. Throughput at c=16: the same prompts constrained and unconstrained, completion tokens per
   second of wall time (target: constrained ≥ 90 % of unconstrained).
3. Schema compile: `max_tokens: 1` requests with a schema never seen (compile) vs the same
   schema again (cache hit); the difference of medians and the p95 of the first-use latency
   over the hit latency (targets: compile ≤ 20 ms p95, hit ≤ 50 µs — the engine's own test
   `cargo test --release -p ferroserve-core --test structured -- --nocapture` prints the
   in-engine mask and compile costs; this is the end-to-end view).

Results: a table on stdout and bench/results/structured-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import free_port  # noqa: E402

MODEL = "smollm2"


def schemas() -> list[dict]:
    """Objects, arrays, enums, nested required properties, patterns and number bounds, each
    bounded (a 135M model otherwise repeats items until max_tokens)."""
    out = []
    colours = ["red", "green", "blue", "yellow"]
    for i in range(6):
        out.append({"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                      "age": {"type": "integer", "minimum": 0, "maximum": 120 + i}},
                    "required": ["name", "age"], "additionalProperties": False})
        out.append({"type": "object", "properties": {"colour": {"enum": colours[: 2 + i % 3]},
                                                      "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["colour", "count"], "additionalProperties": False})
        out.append({"type": "object", "properties": {
            "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                     "required": ["name", "zip"], "additionalProperties": False},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}},
            "required": ["city", "tags"], "additionalProperties": False})
        out.append({"type": "object", "properties": {"ok": {"type": "boolean"},
                                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
                    "required": ["ok", "score"], "additionalProperties": False})
    return out


PROMPTS = ["Describe a person.", "Pick a colour and a count.", "Give a city with a postal code and some tags.",
           "Is the sky blue? Answer with a score.", "Invent a record.", "Answer in JSON."]


def start_server(python: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    data = tempfile.mkdtemp(prefix="ferroserve-bench-structured-")
    proc = subprocess.Popen([python, "-m", "ferroserve", "serve", "--port", str(port), "--insecure-no-auth",
                             "--log-level", "warning", "--data-dir", data],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready")


def chat(client: httpx.Client, url: str, prompt: str, schema: dict | None, max_tokens: int, seed: int = 0,
         in_prompt: bool = False) -> dict:
    content = prompt
    if in_prompt and schema is not None:
        content = f"{prompt} Answer only with JSON matching this schema: {json.dumps(schema)}"
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                  "temperature": 0.7, "seed": seed, "frequency_penalty": 0.5}
    if schema is not None and not in_prompt:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    r = client.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer schemas and requests")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    args = ap.parse_args()
    all_schemas = schemas()[: 8 if args.quick else None]
    proc, url = start_server(args.python)
    results: dict = {"cpu": subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout.strip(),
                     "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                              text=True).stdout.strip()}
    try:
        client = httpx.Client()
        # 1. Validity.
        constrained_ok = bare_ok = cut = 0
        for i, schema in enumerate(all_schemas):
            prompt = PROMPTS[i % len(PROMPTS)]
            a = chat(client, url, prompt, schema, 96, seed=i)
            text = a["choices"][0]["message"]["content"]
            if a["choices"][0]["finish_reason"] == "length":
                cut += 1  # a valid prefix, cut by max_tokens: counted as invalid below unless it parses
            constrained_ok += valid(text, schema)
            b = chat(client, url, prompt, schema, 96, seed=i, in_prompt=True)
            bare_ok += valid(b["choices"][0]["message"]["content"], schema)
        n = len(all_schemas)
        results["validity"] = {"schemas": n, "constrained_valid": constrained_ok, "constrained_cut_by_length": cut,
                               "bare_valid": bare_ok}
        print(f"1. validity over {n} schemas: constrained {constrained_ok}/{n} valid ({cut} cut by max_tokens), "
              f"bare model with the schema in the prompt {bare_ok}/{n}")
        # 2. Throughput at c=16. A constrained answer ends when its document is complete, so
        # the unconstrained run generates exactly as many tokens per request (max_tokens = the
        # constrained answer's length, ignore_eos): same prompts, same token counts, A B A B.
        jobs = [(PROMPTS[i % len(PROMPTS)], all_schemas[i % n], i) for i in range(16 if args.quick else 48)]
        lengths: dict[int, int] = {}

        def run(job, constrained: bool) -> dict:
            prompt, schema, seed = job
            with httpx.Client() as c:
                if constrained:
                    a = chat(c, url, prompt, schema, 64, seed=seed)
                    lengths[seed] = a["usage"]["completion_tokens"]
                    return a
                body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0.7,
                        "seed": seed, "max_tokens": lengths[seed], "ignore_eos": True}
                r = c.post(url + "/v1/chat/completions", json=body, timeout=300)
                r.raise_for_status()
                return r.json()

        rates: dict[str, list[float]] = {}
        for label, constrained in (("constrained", True), ("unconstrained", False), ("constrained", True),
                                   ("unconstrained", False)):
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda j: run(j, constrained), jobs))
            wall = time.perf_counter() - started
            tokens = sum(a["usage"]["completion_tokens"] for a in answers)
            rates.setdefault(label, []).append(tokens / wall)
        tput = {k: statistics.mean(v) for k, v in rates.items()}
        results["throughput_c16"] = {**tput, "ratio": tput["constrained"] / tput["unconstrained"], "runs": rates,
                                     "tokens_per_request": statistics.mean(lengths.values())}
        print(f"2. c=16 completion tokens/s (same prompts and token counts, A B A B, mean): unconstrained "
              f"{tput['unconstrained']:.1f}, constrained {tput['constrained']:.1f}, ratio "
              f"{tput['constrained'] / tput['unconstrained']:.3f} (target ≥ 0.90); "
              f"{statistics.mean(lengths.values()):.1f} tokens a request")
        # 3. Compile on first use vs a cache hit (end to end, max_tokens 1).
        first, again = [], []
        for i in range(10 if args.quick else 40):
            schema = {"type": "object", "properties": {f"field_{i}_{j}": {"type": "integer"} for j in range(3)},
                      "required": [f"field_{i}_0"], "additionalProperties": False}
            for bucket in (first, again):
                t = time.perf_counter()
                chat(client, url, "Give numbers.", schema, 1, seed=i)
                bucket.append((time.perf_counter() - t) * 1000)
        first.sort()
        again.sort()
        p95 = first[int(0.95 * (len(first) - 1))]
        results["compile_ms"] = {"first_use_p50": statistics.median(first), "first_use_p95": p95,
                                 "cache_hit_p50": statistics.median(again),
                                 "compile_p50_estimate": statistics.median(first) - statistics.median(again)}
        print(f"3. max_tokens 1 request with a new schema p50 {statistics.median(first):.2f} ms (p95 {p95:.2f}), "
              f"the same schema again p50 {statistics.median(again):.2f} ms: compile ≈ "
              f"{statistics.median(first) - statistics.median(again):.2f} ms end to end")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"structured-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"{results['cpu']}; commit {results['commit']}\nresult: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

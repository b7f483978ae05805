"""`--numerics fast` over HTTP: the server starts with it, greedy output is deterministic and
the same alone or beside concurrent requests (batch invariance holds in this mode too), and a
wrong value is refused at start-up."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ferroserve import _core
from tests.conftest import Server

MODEL = "smollm2"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Water boils at",
]

pytestmark = pytest.mark.skipif(
    _core.cpu_isa() == "portable",
    reason="fast numerics need AVX2 or AVX-512; this process runs the portable level (the CPU or FERROSERVE_ISA)",
)


@pytest.fixture(scope="module")
def fast_server():
    srv = Server(["--numerics", "fast", "--log-level", "warning"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _complete(url: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2, "ignore_eos": True,
    }, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_fast_numerics_are_deterministic_and_batch_invariant(fast_server):
    alone = [_complete(fast_server.url, p) for p in PROMPTS]
    for c in alone:
        assert len(c["logprobs"]["tokens"]) == 24 and c["text"].strip()
    # Each prompt four times, all sixteen requests at once: same text and logprobs as alone.
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: _complete(fast_server.url, p), PROMPTS * 4))
    for i, c in enumerate(together):
        want = alone[i % len(PROMPTS)]
        assert c["text"] == want["text"], f"request {i}: {c['text']!r} vs alone {want['text']!r}"
        assert c["logprobs"]["token_logprobs"] == want["logprobs"]["token_logprobs"], f"request {i}: logprobs differ"


def test_unknown_numerics_is_refused():
    r = subprocess.run([sys.executable, "-m", "ferroserve", "serve", "--numerics", "approximate"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--numerics" in r.stderr

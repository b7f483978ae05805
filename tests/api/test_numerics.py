"""Chat numerics over HTTP and at start-up: which arithmetic a chat model gets when none is
configured (fast where its kernels exist — AVX2 and up — exact on the portable level and on
OpenCL), that an explicit `--numerics` / FERROSERVE_NUMERICS / config `numerics` wins, that
the default (fast) server's greedy output is deterministic and the same alone or beside
concurrent requests (batch invariance holds in this mode too), and that a wrong value is
refused at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ferroserve import _core
from ferroserve.config import default_numerics, resolve
from tests.conftest import Server, run_cli

MODEL = "smollm2"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Water boils at",
]
LEVEL = _core.cpu_isa()
needs_fast_kernels = pytest.mark.skipif(
    LEVEL == "portable",
    reason="fast numerics need AVX2 or AVX-512; this process runs the portable level (the CPU or FERROSERVE_ISA)",
)


@pytest.fixture(scope="module")
def default_server():
    """A server with no numerics configured (at this FERROSERVE_ISA level)."""
    srv = Server(["--log-level", "info"], env={"FERROSERVE_NUMERICS": ""})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _loaded(srv: Server) -> dict[str, dict]:
    """The "model loaded" log lines by model."""
    lines = [json.loads(ln) for ln in srv.log_path.read_text().splitlines() if '"msg":"model loaded"' in ln]
    return {ln["model"]: ln for ln in lines}


def _complete(url: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2, "ignore_eos": True,
    }, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_the_default_is_fast_on_cpus_with_its_kernels_and_exact_elsewhere():
    assert [default_numerics("cpu", level) for level in ("portable", "avx2", "avx512", "amx")] == ["exact", "fast", "fast", "fast"]
    for level in ("portable", "avx2", "avx512", "amx"):
        assert default_numerics("opencl:0", level) == default_numerics("opencl:3", level) == "exact"


def test_explicit_numerics_win_flag_over_environment_over_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FERROSERVE_NUMERICS", raising=False)
    monkeypatch.delenv("FERROSERVE_CONFIG", raising=False)
    assert resolve().numerics is None  # unset: each chat model gets its device's default at load
    cfg = tmp_path / "ferroserve.toml"
    cfg.write_text('numerics = "exact"\n')
    assert resolve(config_file=str(cfg)).numerics == "exact"
    monkeypatch.setenv("FERROSERVE_NUMERICS", "fast")
    assert resolve(config_file=str(cfg)).numerics == "fast"
    assert resolve(config_file=str(cfg), numerics="exact").numerics == "exact"


@pytest.mark.isa_matrix
def test_the_default_server_runs_this_levels_default(default_server):
    loaded = _loaded(default_server)
    assert loaded["SmolLM2-135M-Instruct"]["numerics"] == ("exact" if LEVEL == "portable" else "fast"), loaded
    assert loaded["SmolLM2-135M-Instruct"]["device"] == f"cpu({LEVEL})", loaded
    assert loaded["sentence-transformers/all-MiniLM-L6-v2"]["numerics"] == "f32", loaded  # embeddings: --embed-numerics


@pytest.mark.isa_matrix
def test_models_shows_each_chat_models_numerics():
    def numerics(*args: str) -> str:
        r = run_cli(["models", *args], env={"FERROSERVE_NUMERICS": "", "FERROSERVE_DEVICE": ""})
        assert r.returncode == 0, r.stderr
        chat = next(ln for ln in r.stdout.splitlines() if "\tchat\t" in ln)
        return chat.split("\tnumerics=")[1]

    cpu_default = "exact" if LEVEL == "portable" else "fast"
    assert numerics() == cpu_default
    assert numerics("--numerics", "exact") == "exact"
    assert numerics("--device", "smollm2=opencl") == "exact"
    assert numerics("--device", "auto") == ("exact" if LEVEL == "portable" else "exact on OpenCL, else fast on the CPU")
    assert numerics("--device", "auto", "--numerics", "fast") == "fast (on the CPU)"


@needs_fast_kernels
def test_fast_numerics_are_deterministic_and_batch_invariant(default_server):
    alone = [_complete(default_server.url, p) for p in PROMPTS]
    for c in alone:
        assert len(c["logprobs"]["tokens"]) == 24 and c["text"].strip()
    # Each prompt four times, all sixteen requests at once: same text and logprobs as alone.
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: _complete(default_server.url, p), PROMPTS * 4))
    for i, c in enumerate(together):
        want = alone[i % len(PROMPTS)]
        assert c["text"] == want["text"], f"request {i}: {c['text']!r} vs alone {want['text']!r}"
        assert c["logprobs"]["token_logprobs"] == want["logprobs"]["token_logprobs"], f"request {i}: logprobs differ"


def test_unknown_numerics_is_refused():
    r = subprocess.run([sys.executable, "-m", "ferroserve", "serve", "--numerics", "approximate"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--numerics" in r.stderr

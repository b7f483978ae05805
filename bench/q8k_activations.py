"""What quantising activations to 8 bits costs, against the f64 pass of a file (tests/llama_f64.py),
with nothing else changed: every matmul input in blocks of 32 with one scale each (ours, and
llama.cpp's Q8_0/Q5_0 products), versus the same but the ffn_down input in blocks of 256 (llama.cpp's
Q8_K, the activation type of its Q4_K/Q5_K/Q6_K dot products: ffn_down in the *_K_M files here).
Teacher-forced over each fixture prompt and its fixture continuation; KL(f64 ‖ variant) per position.

    PYTHONPATH=python .venv/bin/python bench/q8k_activations.py [GGUF]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.llama_f64 import LlamaF64  # noqa: E402


def q8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """Symmetric 8-bit, one scale per `block` values along the row, d = max|x|/127, round half even."""
    shape = x.shape
    b = x.reshape(-1, block)
    d = np.abs(b).max(axis=1, keepdims=True) / 127
    q = np.clip(np.round(np.divide(b, d, out=np.zeros_like(b), where=d > 0)), -127, 127)
    return (q * d).reshape(shape)


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "bench/.work/models/smollm2-135m-q4_k_m.gguf"
    m = LlamaF64(path)
    fx = json.loads((REPO.parent / "shared/fixtures/smollm2_reference.json").read_text())
    variants = {
        "all inputs q8/32": lambda name, x: q8_blocks(x, 32),
        "all q8/32, ffn_down q8/256": lambda name, x: q8_blocks(x, 256 if name == "ffn_down" else 32),
        "only ffn_down q8/32": lambda name, x: q8_blocks(x, 32) if name == "ffn_down" else x,
        "only ffn_down q8/256": lambda name, x: q8_blocks(x, 256) if name == "ffn_down" else x,
    }
    kls = {k: [] for k in variants}
    flips = {k: 0 for k in variants}
    n = 0
    for item in fx["completions"] + fx["chats"]:
        seq = item["prompt_tokens"] + item["completion_tokens"]
        start = len(item["prompt_tokens"]) - 1
        ref = m.log_probs(seq)[start:]
        n += len(ref)
        for k, f in variants.items():
            lp = m.log_probs(seq, f)[start:]
            kls[k] += list((np.exp(ref) * (ref - lp)).sum(axis=1))
            flips[k] += int((lp.argmax(1) != ref.argmax(1)).sum())
        print(item["prompt"][:24].replace("\n", " "), " ".join(f"{np.mean(v[-len(ref):]) * 1e3:.3f}" for v in kls.values()), flush=True)
    for k in variants:
        print(f"{k}: KL(f64 ‖ ·) mean {np.mean(kls[k]) * 1e3:.3f}e-3, max {np.max(kls[k]) * 1e3:.2f}e-3, "
              f"top-1 changed at {flips[k]}/{n} positions")


if __name__ == "__main__":
    main()

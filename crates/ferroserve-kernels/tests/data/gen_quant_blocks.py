"""Writes the GGUF block fixtures of `tests/quant_fixtures.rs`: an independent decoder
(the `gguf` package's numpy code, kept beside llama.cpp) checks ours bit for bit.

Regenerate (from the repository root; the output is deterministic):

    python3 -m venv /tmp/gguf-venv
    /tmp/gguf-venv/bin/pip install gguf==0.19.0 numpy==2.4.6
    /tmp/gguf-venv/bin/python crates/ferroserve-kernels/tests/data/gen_quant_blocks.py

For each format NAME it writes `NAME.blocks` (the blocks exactly as a GGUF tensor stores
them: ROWS rows of K weights) and `NAME.f32` (gguf's dequantisation of them, little-endian
f32, row-major). Q5_0 and Q5_1 blocks come from gguf's own numpy quantiser run on seeded
random weights; gguf has no quantiser for IQ4_NL and the K-quants, so theirs are seeded
random bytes with finite f16 scale fields (every code and 6-bit scale pattern is a valid
block). Rows are 576 weights (SmolLM2's width) for the 32-weight formats and 768 for the
256-weight ones.
"""

from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

GGUF_VERSION = "0.19.0"
ROWS = 4
OUT = Path(__file__).resolve().parent


def weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random weights whose magnitude and offset change every 16, plus an all-zero block
    (scale 0) and a block of exact ties for the rounding."""
    mag = np.repeat(0.05 + 2.0 * rng.random(n // 16), 16)
    offset = np.repeat(0.5 * rng.uniform(-1, 1, n // 16), 16)
    x = ((rng.uniform(-1, 1, n) + offset) * mag).astype(np.float32)
    x[32:64] = 0.0
    x[64:96] = np.arange(-16, 16, dtype=np.float32) * 0.5
    return x


def random_blocks(rng: np.random.Generator, qtype: T, k: int, f16_fields: list[int]) -> np.ndarray:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * k // block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for at in f16_fields:
        scale = (rng.uniform(1e-4, 2e-2, n_blocks) * rng.choice([1, 1, 1, -1], n_blocks)).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(ROWS, -1)


def main() -> None:
    assert version("gguf") == GGUF_VERSION, f"gguf {version('gguf')}, expected {GGUF_VERSION}"
    rng = np.random.default_rng(20261204)
    cases: list[tuple[str, T, np.ndarray]] = []
    for name, qtype in [("q5_0", T.Q5_0), ("q5_1", T.Q5_1)]:
        x = weights(rng, ROWS * 576).reshape(ROWS, 576)
        cases.append((name, qtype, quantize(x, qtype)))
    cases.append(("iq4_nl", T.IQ4_NL, random_blocks(rng, T.IQ4_NL, 576, [0])))
    cases.append(("q4_k", T.Q4_K, random_blocks(rng, T.Q4_K, 768, [0, 2])))
    cases.append(("q5_k", T.Q5_K, random_blocks(rng, T.Q5_K, 768, [0, 2])))
    cases.append(("q6_k", T.Q6_K, random_blocks(rng, T.Q6_K, 768, [208])))
    for name, qtype, blocks in cases:
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        values = dequantize(blocks, qtype).astype("<f4")
        assert values.shape[0] == ROWS and np.isfinite(values).all(), name
        (OUT / f"{name}.blocks").write_bytes(blocks.tobytes())
        (OUT / f"{name}.f32").write_bytes(values.tobytes())
        print(f"{name}: {ROWS} rows of {values.shape[1]} weights, {blocks.nbytes} bytes of blocks")


if __name__ == "__main__":
    main()

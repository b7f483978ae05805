#!/usr/bin/env python3
"""Write a llama-architecture GGUF with seeded random weights: Llama-3.2-1B's shape with
SmolLM2's vocabulary, tokenizer and chat template. A test and benchmark file for a model ~8x
the default's size (its speed, memory and loading); its text is noise. bench/make_models.sh
quantises it to Q4_K_M with llama-quantize.

    .venv/bin/python bench/make_random_llama.py --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf \
        --out bench/.work/models/llama-1b-random-f16.gguf

Shape (Llama-3.2-1B's config.json): 16 layers, hidden 2048, 32 query heads and 8 KV heads of 64,
FFN 8192, RoPE theta 500,000, RMS-norm eps 1e-5, tied input/output embeddings (no
output.weight). Not copied: Llama 3's "llama3" RoPE frequency scaling (a rope_freqs tensor) and
its 128k context; the file says 8,192 tokens (SmolLM2's) and plain RoPE, which is all random
weights need. Vocabulary: SmolLM2's 49,152 tokens instead of Llama 3's 128,256, so any
server can run the prompts it runs on SmolLM2.

Weights: normal(0, --std) in float32 from numpy's PCG64 seeded with (--seed, tensor index),
stored as F16 (--dtype f32 for F32); RMS-norm weights are 1. The same seed and gguf version
give the same bytes. Tensors are generated and written one at a time (peak memory ≈ the
largest tensor, token_embd: 49,152 × 2,048).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("the `gguf` package is missing: `make bench-setup` (or pip install -r bench/requirements.txt)")

LAYERS = 16
HIDDEN = 2048
HEADS = 32
KV_HEADS = 8
HEAD_DIM = HIDDEN // HEADS  # 64
FFN = 8192
ROPE_THETA = 500_000.0
RMS_EPS = 1e-5
CONTEXT = 8192


def tensor_plan(vocab: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, is_norm) in file order. Numpy shapes are (out, in): ggml's ne reversed."""
    plan: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (vocab, HIDDEN), False)]
    for i in range(LAYERS):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (HIDDEN,), True),
            (b + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), False),
            (b + "attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), False),
            (b + "attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), False),
            (b + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), False),
            (b + "ffn_norm.weight", (HIDDEN,), True),
            (b + "ffn_gate.weight", (FFN, HIDDEN), False),
            (b + "ffn_up.weight", (FFN, HIDDEN), False),
            (b + "ffn_down.weight", (HIDDEN, FFN), False),
        ]
    plan.append(("output_norm.weight", (HIDDEN,), True))
    return plan


def copy_tokenizer(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> int:
    """Copy every tokenizer.* key (tokenizer.ggml.* and tokenizer.chat_template); returns the
    vocabulary size."""
    vocab = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
        if key == "tokenizer.ggml.tokens":
            vocab = len(field.data)
    if vocab is None:
        sys.exit("the tokenizer source has no tokenizer.ggml.tokens")
    return vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-from", required=True, metavar="GGUF",
                   help="GGUF whose tokenizer.* keys (vocabulary, merges, chat template) are copied")
    p.add_argument("--out", required=True, metavar="GGUF")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights")
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16")
    a = p.parse_args(argv)

    dtype = np.float16 if a.dtype == "f16" else np.float32
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")

    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(f"Random Llama-3.2-1B shape, SmolLM2 vocabulary (seed {a.seed}, std {a.std})")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if a.dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    vocab = copy_tokenizer(gguf.GGUFReader(a.tokenizer_from), writer)
    writer.add_vocab_size(vocab)

    plan = tensor_plan(vocab)
    for name, shape, is_norm in plan:
        # Norm weights stay F32, as llama.cpp's converter keeps 1-D tensors.
        item = np.dtype(np.float32 if is_norm else dtype).itemsize
        writer.add_tensor_info(name, shape, np.dtype(np.float32 if is_norm else dtype),
                               int(np.prod(shape)) * item)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    params = 0
    for index, (name, shape, is_norm) in enumerate(plan):
        if is_norm:
            data = np.ones(shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([a.seed, index])
            data = (rng.standard_normal(shape, dtype=np.float32) * np.float32(a.std)).astype(dtype)
        writer.write_tensor_data(data)
        params += data.size
        del data
    writer.close()
    tmp.replace(out)
    print(f"wrote {out}: {params / 1e9:.3f} B parameters, {out.stat().st_size / 1e6:.0f} MB, vocabulary {vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

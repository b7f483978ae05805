"""An f64 forward pass of a llama-family GGUF in NumPy: the referee when two implementations
(ours and llama.cpp) disagree on a quantised file. The Rust one
(crates/ferroserve-core/tests/common/llama_f64.rs) needs a Rust build; this one needs only
the `gguf` package to read the file.

Weights are the file's own blocks decoded here straight to f64 (the stored value, e.g. Q4_K's
`d·sc·q − dmin·m`, computed exactly from the f16 scales: nothing rounded to f32); every
activation, accumulation, norm, rotary angle and softmax is f64, and no activation is ever
quantised (both implementations quantise activations to 8 bits for the integer dot products;
this is what they approximate). The graph is the textbook llama one, as in llama_f64.rs:
RMSNorm, RoPE on adjacent pairs (GGUF's llama Q/K layout), grouped-query causal attention,
SwiGLU, tied or separate output. Teacher-forced: a whole sequence at once, no KV cache.
The decoders cover the formats `bench/make_models.sh` writes (F32, F16, Q8_0, Q5_0, Q5_1,
Q4_0, Q4_1, Q4_K, Q5_K, Q6_K); anything else raises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

F64 = np.float64
QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian f16 bytes `[..., 2]` → f64 (exact: every f16 is an f64)."""
    return np.ascontiguousarray(b).view(np.float16).astype(F64)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block → 32 4-bit values: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes → eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(F64), mn.astype(F64)


def _q8_0(b):
    return _f16(b[:, 0:2]) * b[:, 2:34].view(np.int8).astype(F64)


def _q4_0(b):
    return _f16(b[:, 0:2]) * (_nibbles32(b[:, 2:18]).astype(F64) - 8)


def _q4_1(b):
    return _f16(b[:, 0:2]) * _nibbles32(b[:, 4:20]).astype(F64) + _f16(b[:, 2:4])


def _q5_0(b):
    qh = np.ascontiguousarray(b[:, 2:6]).view("<u4")  # bit j: the fifth bit of element j
    hi = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = _nibbles32(b[:, 6:22]).astype(np.int64) | (hi.astype(np.int64) << 4)
    return _f16(b[:, 0:2]) * (q - 16).astype(F64)


def _q5_1(b):
    qh = np.ascontiguousarray(b[:, 4:8]).view("<u4")
    hi = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = _nibbles32(b[:, 8:24]).astype(np.int64) | (hi.astype(np.int64) << 4)
    return _f16(b[:, 0:2]) * q.astype(F64) + _f16(b[:, 2:4])


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    # 128 bytes as four 32-byte chunks; chunk j holds sub-blocks 2j (low nibbles) and 2j+1 (high).
    qs = b[:, 16:144].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32).astype(F64)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j: sub-block j
    ql = b[:, 48:176].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 1) << 4)).astype(F64)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].view(np.int8).astype(F64)
    d = _f16(b[:, 208:210])
    # Two halves of 128 values; in each, ql's 64 bytes give low nibbles (values 0..63) and
    # high nibbles (64..127), qh's 32 bytes give two bits per value for the four 32-value runs.
    lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    lo = (lo & 0x0F).reshape(n, 2, 4, 32)
    hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hi = hi & 0x03
    q = ((lo | (hi << 4)).astype(np.int64) - 32).reshape(n, 16, 16).astype(F64)
    return ((d * scales)[:, :, None] * q).reshape(n, QK_K)  # one int8 scale per 16 values


_DECODERS = {  # name: (values per block, bytes per block, decoder)
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}


def dequantize_f64(tensor) -> np.ndarray:
    """A `gguf.GGUFReader` tensor as an f64 array `[rows, cols]` (or `[cols]`)."""
    kind = tensor.tensor_type.name
    cols = int(tensor.shape[0])
    rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
    if kind in ("F32", "F16"):
        out = np.asarray(tensor.data).astype(F64)
    elif kind in _DECODERS:
        block, nbytes, decode = _DECODERS[kind]
        blocks = np.asarray(tensor.data).reshape(-1, nbytes)
        out = decode(blocks)
    else:
        raise ValueError(f"llama_f64: no f64 decoder for {kind} ({tensor.name})")
    return out.reshape(rows, cols) if rows > 1 else out.reshape(cols)


class LlamaF64:
    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        arch = r.fields["general.architecture"].contents()
        f = lambda k, default=None: r.fields[k].contents() if k in r.fields else default  # noqa: E731
        self.dim = int(f(f"{arch}.embedding_length"))
        self.heads = int(f(f"{arch}.attention.head_count"))
        self.kv_heads = int(f(f"{arch}.attention.head_count_kv", self.heads))
        self.head_dim = self.dim // self.heads
        self.rope_dims = int(f(f"{arch}.rope.dimension_count", self.head_dim))
        self.rope_base = float(f(f"{arch}.rope.freq_base", 10000.0))
        self.eps = float(f(f"{arch}.attention.layer_norm_rms_epsilon"))
        n_layers = int(f(f"{arch}.block_count"))
        if f(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise ValueError("llama_f64: rope scaling is not implemented")
        t = {x.name: x for x in r.tensors}
        if "rope_freqs.weight" in t:
            raise ValueError("llama_f64: rope frequency factors are not implemented")
        w = lambda name: dequantize_f64(t[name])  # noqa: E731
        self.layers = [
            {k: w(f"blk.{i}.{k}.weight") for k in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            for i in range(n_layers)
        ]
        self.token_embd = w("token_embd.weight")
        self.output_norm = w("output_norm.weight")
        self.output = w("output.weight") if "output.weight" in t else self.token_embd
        self.vocab = self.output.shape[0]

    def _rms_norm(self, x, g):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps) * g

    def _rope(self, x, n_heads):
        """Rotate the first rope_dims of every head as adjacent pairs by pos·base^(−2i/rope_dims)."""
        n = x.shape[0]
        x = x.reshape(n, n_heads, self.head_dim).copy()
        i = np.arange(self.rope_dims // 2, dtype=F64)
        theta = np.arange(n, dtype=F64)[:, None] * self.rope_base ** (-2.0 * i / self.rope_dims)
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        a, b = x[:, :, 0:self.rope_dims:2].copy(), x[:, :, 1:self.rope_dims:2].copy()
        x[:, :, 0:self.rope_dims:2] = a * c - b * s
        x[:, :, 1:self.rope_dims:2] = a * s + b * c
        return x

    def logits(self, tokens: list[int], act=None) -> np.ndarray:
        """Teacher-forced: row i holds the logits of the token after tokens[:i + 1].
        `act(name, x)`, if given, replaces the input `x` of the matmul with weight `name`
        (e.g. "ffn_down"): to measure what quantising one activation does, and nothing else."""
        n, hd = len(tokens), self.head_dim
        a = act or (lambda name, x: x)
        group = self.heads // self.kv_heads
        x = self.token_embd[np.asarray(tokens)]
        mask = np.triu(np.full((n, n), -np.inf), k=1)
        for L in self.layers:
            h = self._rms_norm(x, L["attn_norm"])
            q = self._rope(a("attn_q", h) @ L["attn_q"].T, self.heads)
            k = self._rope(a("attn_k", h) @ L["attn_k"].T, self.kv_heads)
            v = (a("attn_v", h) @ L["attn_v"].T).reshape(n, self.kv_heads, hd)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head h reads kv head h // group
            scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attn = np.einsum("hij,jhd->ihd", scores, v).reshape(n, self.heads * hd)
            x = x + a("attn_output", attn) @ L["attn_output"].T
            h = self._rms_norm(x, L["ffn_norm"])
            gate, up = a("ffn_gate", h) @ L["ffn_gate"].T, a("ffn_up", h) @ L["ffn_up"].T
            x = x + a("ffn_down", gate / (1.0 + np.exp(-gate)) * up) @ L["ffn_down"].T
        return a("output", self._rms_norm(x, self.output_norm)) @ self.output.T

    def log_probs(self, tokens: list[int], act=None) -> np.ndarray:
        z = self.logits(tokens, act)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

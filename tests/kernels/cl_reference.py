"""NumPy references for the OpenCL kernels.

Two kinds: straightforward float64 maths (what every kernel must approach within a
tolerance derived from its arithmetic), and float32 re-implementations of the CPU kernels'
exact operation order (crates/ferroserve-kernels), for the kernels that claim to give the
CPU's bits. NumPy float32 arithmetic is IEEE (round to nearest even, correctly rounded
division and sqrt); it has no fma, so `fma32` computes one exactly.
"""

from __future__ import annotations

from pathlib import Path

import math

import numpy as np

KERNELS = Path(__file__).resolve().parents[2] / "kernels"

F32 = np.float32
F64 = np.float64
QK = 32
Q4_1_BLOCK_BYTES = 20
Q8_0_BLOCK_BYTES = 34


def f16_round(x) -> np.ndarray:
    """Round to the nearest half (ties to even; NumPy's conversion) and widen back."""
    return np.asarray(x, F32).astype(np.float16).astype(F32)


def fma32(a, b, c) -> np.ndarray:
    """Correctly rounded float32 a*b + c. The f32 product is exact in f64 (24 + 24 bits);
    p + c rounded to f64 and then to f32 can only go wrong when the f64 sum sits exactly on
    an f32 midpoint while the exact sum does not (a two-sum error term says which way)."""
    a, b, c = (np.asarray(v, F32) for v in (a, b, c))
    a, b, c = np.broadcast_arrays(a, b, c)
    p = a.astype(F64) * b.astype(F64)
    c64 = c.astype(F64)
    s = p + c64
    bp = s - p
    err = (p - (s - bp)) + (c64 - bp)
    with np.errstate(over="ignore", invalid="ignore"):
        r = s.astype(F32)
        r64 = r.astype(F64)
        other = np.nextafter(r, np.where(s > r64, F32(np.inf), F32(-np.inf)).astype(F32))
        mid = (r64 + other.astype(F64)) / 2
        on_mid = (s != r64) & (mid == s) & (err != 0) & np.isfinite(s)
        away = np.sign(err) == np.sign(s - r64)
    return np.where(on_mid & away, other, r).astype(F32)


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple (global sizes for a given work-group size)."""
    return -(-n // multiple) * multiple


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Bitwise equal, except that any NaN matches any NaN (payloads are not specified)."""
    want = np.asarray(want, F32)
    both_nan = np.isnan(got) & np.isnan(want)
    return got.shape == want.shape and bool(np.all((got.view(np.uint32) == want.view(np.uint32)) | both_nan))


# --- GGUF block formats ------------------------------------------------------------------


def random_f16_scales(rng, shape, scale=0.05, signed=False) -> np.ndarray:
    """f16 scales as bytes-to-be: magnitudes spread over a decade, both signs if asked."""
    v = scale * rng.uniform(0.1, 1.0, shape)
    if signed:
        v *= rng.choice([-1.0, 1.0], shape)
    return v.astype(np.float16)


def random_q4_1(rng, n: int, k: int) -> np.ndarray:
    """n rows of k weights as raw Q4_1 bytes: random d, m (f16) and random nibbles."""
    nb = k // QK
    blocks = np.zeros((n, nb, Q4_1_BLOCK_BYTES), np.uint8)
    blocks[:, :, 0:2] = random_f16_scales(rng, (n, nb)).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 2:4] = random_f16_scales(rng, (n, nb), 0.5, signed=True).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return blocks.reshape(n, nb * Q4_1_BLOCK_BYTES)


def q4_1_parts(w: np.ndarray, k: int):
    """(d, m, codes) of Q4_1 rows: d, m as float32 [n, nb]; codes uint8 [n, nb, 32]."""
    n = w.shape[0]
    b = w.reshape(n, k // QK, Q4_1_BLOCK_BYTES)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(F32)
    m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(F32)
    nib = b[:, :, 4:]
    codes = np.concatenate([nib & 0x0F, nib >> 4], axis=2)
    return d, m, codes


def dequantize_q4_1(w: np.ndarray, k: int) -> np.ndarray:
    d, m, codes = q4_1_parts(w, k)
    return (codes.astype(F64) * d[..., None] + m[..., None]).reshape(w.shape[0], k)


def random_q8_0(rng, n: int, k: int) -> np.ndarray:
    """n rows of k weights as raw Q8_0 bytes: random d (f16, both signs) and random int8
    codes, -128 included (the format allows it; llama.cpp's quantiser never writes it)."""
    nb = k // QK
    blocks = np.zeros((n, nb, Q8_0_BLOCK_BYTES), np.uint8)
    blocks[:, :, 0:2] = random_f16_scales(rng, (n, nb), 0.01, signed=True).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 2:] = rng.integers(0, 256, (n, nb, QK), dtype=np.uint8)
    return blocks.reshape(n, nb * Q8_0_BLOCK_BYTES)


def q8_0_parts(w: np.ndarray, k: int):
    n = w.shape[0]
    b = w.reshape(n, k // QK, Q8_0_BLOCK_BYTES)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(F32)
    q = b[:, :, 2:].view(np.int8)
    return d, q


def dequantize_q8_0(w: np.ndarray, k: int) -> np.ndarray:
    d, q = q8_0_parts(w, k)
    return (q.astype(F64) * d[..., None]).reshape(w.shape[0], k)


# --- Q8 activations (quant/q8_0.rs `quantize_block`) --------------------------------------


def quantize_q8(x: np.ndarray):
    """The CPU's Q8Activations, bit for bit: (qs int8 [m, k], scales f32 [m, nb, 2] as
    [d, d*isum], sums f32 [m, nb] (q8_1's f16-rounded s))."""
    m, k = x.shape
    xb = x.astype(F32).reshape(m, k // QK, QK)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.max(np.abs(xb), axis=2)
        finite = np.all(np.isfinite(xb), axis=2)
        amax = np.where(finite, amax, F32(0)).astype(F32)
        inv = np.where(amax > 0, F32(127) / np.where(amax > 0, amax, F32(1)), F32(0)).astype(F32)
        q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int32)
        q[~finite] = 0
        isum = q.sum(axis=2)
        d_exact = (amax / F32(127)).astype(F32)
        d = f16_round(d_exact)
        ds = (d * isum.astype(F32)).astype(F32)
        s = f16_round(d_exact * isum.astype(F32))
    nan = F32(np.nan)
    d, ds, s = (np.where(finite, v, nan).astype(F32) for v in (d, ds, s))
    return q.astype(np.int8).reshape(m, k), np.stack([d, ds], axis=2), s


def dequantize_acts(qs: np.ndarray, scales: np.ndarray) -> np.ndarray:
    m, k = qs.shape
    return (qs.reshape(m, k // QK, QK).astype(F64) * scales[:, :, 0:1]).reshape(m, k)


# --- Quantised dot products in the CPU kernels' order -------------------------------------


def hsum8(lanes: np.ndarray) -> np.ndarray:
    """Last axis of 8 summed as llama.cpp's hsum_float_8 (float32)."""
    l = lanes.astype(F32)
    h = [l[..., 4 + i] + l[..., i] for i in range(4)]
    return ((h[0] + h[2]) + (h[1] + h[3])).astype(F32)


def matmul_q4_1_cpu_order(w: np.ndarray, k: int, qs, scales, sums) -> np.ndarray:
    """q4_1.rs `dot_portable` (every CPU ISA level's bits) for all (row, column) pairs."""
    d, mw, codes = q4_1_parts(w, k)  # [n, nb], [n, nb], [n, nb, 32]
    m_rows, n = qs.shape[0], w.shape[0]
    a = qs.reshape(m_rows, k // QK, QK).astype(np.int32)
    lanes = np.zeros((m_rows, n, 8), F32)
    mins = np.zeros((m_rows, n), F32)
    for b in range(k // QK):
        dd = (d[None, :, b] * scales[:, None, b, 0]).astype(F32)  # [m, n]
        prod = codes[None, :, b, :].astype(np.int32) * a[:, None, b, :]  # [m, n, 32]
        isum = prod.reshape(m_rows, n, 8, 4).sum(axis=3).astype(F32)
        lanes = fma32(dd[..., None], isum, lanes)
        mins = fma32(mw[None, :, b], sums[:, None, b], mins)
    return (hsum8(lanes) + mins).astype(F32)


def _q8_0_block_products(q: np.ndarray, a: np.ndarray, b: int) -> np.ndarray:
    """Exact int32 [m, n, 32]: weight codes q [n, nb, 32] times activation codes a
    [m, nb, 32] for block b."""
    return q[None, :, b, :].astype(np.int32) * a[:, None, b, :].astype(np.int32)


def matmul_q8_0_portable_order(w: np.ndarray, k: int, qs, scales) -> np.ndarray:
    """q8_0.rs `dot_portable` (the CPU's portable level) for all (row, column) pairs:
    per block in order, acc = acc + ((d * dx) * (float)isum), isum the block's exact sum."""
    d, q = q8_0_parts(w, k)
    nb = k // QK
    m_rows, n = qs.shape[0], w.shape[0]
    a = qs.reshape(m_rows, nb, QK)
    acc = np.zeros((m_rows, n), F32)
    with np.errstate(invalid="ignore", over="ignore"):
        for b in range(nb):
            isum = _q8_0_block_products(q, a, b).sum(axis=2).astype(F32)  # exact: < 2^24
            dd = (d[None, :, b] * scales[:, None, b, 0]).astype(F32)
            acc = (acc + (dd * isum).astype(F32)).astype(F32)
    return acc


def matmul_q8_0_avx2_order(w: np.ndarray, k: int, qs, scales) -> np.ndarray:
    """q8_0.rs `avx2::dot` / `block` (the CPU's AVX2 level) for all pairs: 8 lanes of four
    code products each, lane = fma((float)lane_sum, d * dx, lane), even blocks into one
    accumulator and odd ones into another (an odd count's last block is even), then
    hsum8(even + odd) (matmul.rs `x86::hsum`)."""
    d, q = q8_0_parts(w, k)
    nb = k // QK
    m_rows, n = qs.shape[0], w.shape[0]
    a = qs.reshape(m_rows, nb, QK)
    acc = np.zeros((2, m_rows, n, 8), F32)  # even, odd
    with np.errstate(invalid="ignore", over="ignore"):
        for b in range(nb):
            lanes = _q8_0_block_products(q, a, b).reshape(m_rows, n, 8, 4).sum(axis=3).astype(F32)
            scale = (d[None, :, b] * scales[:, None, b, 0]).astype(F32)
            acc[b % 2] = fma32(lanes, scale[..., None], acc[b % 2])
        return hsum8((acc[0] + acc[1]).astype(F32))


def matmul_q8_0_avx512_order(w: np.ndarray, k: int, qs, scales) -> np.ndarray:
    """The CPU's AVX-512 Q8_0 kernel (matmul.rs `group_step` / `finish`) for all pairs:
    weights as d*(q + 128) - 128 d, blocks in groups of four, 16-lane accumulators."""
    d, q = q8_0_parts(w, k)
    nb = k // QK
    m_rows, n = qs.shape[0], w.shape[0]
    u = (q.astype(np.int32) + 128)  # [n, nb, 32]
    a = qs.reshape(m_rows, nb, QK).astype(np.int32)
    acc = np.zeros((2, m_rows, n, 16), F32)
    off = np.zeros((m_rows, n, 8), F32)
    for b0 in range(0, nb, 4):
        n_in = min(4, nb - b0)
        p = np.zeros((m_rows, n, 8), F32)
        p[..., 1::2] = F32(-0.0)
        for i in range(n_in):
            b = b0 + i
            p[..., 2 * i] = d[None, :, b] * scales[:, None, b, 0]
            p[..., 2 * i + 1] = (d[None, :, b] * F32(-128)) * scales[:, None, b, 1]
        for reg in range(2 if n_in > 2 else 1):
            dots = np.zeros((m_rows, n, 16), np.int32)
            scale = np.zeros((m_rows, n, 16), F32)
            for half_ in range(2):
                blk = 2 * reg + half_
                lanes = slice(8 * half_, 8 * half_ + 8)
                scale[..., lanes] = p[..., 2 * blk : 2 * blk + 1]
                if blk < n_in:
                    prod = u[None, :, b0 + blk, :] * a[:, None, b0 + blk, :]
                    dots[..., lanes] = prod.reshape(m_rows, n, 8, 4).sum(axis=3)
            acc[reg] = fma32(dots.astype(F32), scale, acc[reg])
        off = (off + p).astype(F32)
    v = (acc[0] + acc[1]).astype(F32)
    dots = hsum8(v[..., :8] + v[..., 8:])
    offsets = (off[..., 1] + off[..., 5]) + (off[..., 3] + off[..., 7])
    return (dots + offsets).astype(F32)


# --- Row-wise ops in the CPU kernels' order ------------------------------------------------


def rms_norm_cpu_order(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """llama_ops::rms_norm_rows: f32 squares summed in f64 in order (cumsum is sequential),
    mean rounded to f32, scale = 1 / sqrt(mean + eps) in f32, (x * scale) * w."""
    x = x.astype(F32)
    sq = (x * x).astype(F64)
    total = np.cumsum(sq, axis=1)[:, -1]
    mean = (total / F64(x.shape[1])).astype(F32)
    scale = (F32(1) / np.sqrt(mean + F32(eps))).astype(F32)
    return ((x * scale[:, None]).astype(F32) * w.astype(F32)).astype(F32)


def _bits(b: int) -> np.float32:
    return np.array(b, np.uint32).view(F32)[()]


def ggml_expf(x: np.ndarray) -> np.ndarray:
    """llama_ops::ggml_expf, bit for bit: j * 2^n rounded once (exact in f64)."""
    x = np.asarray(x, F32)
    shift = F32(12582912.0)
    c0, c1, c2, c3, c4 = (_bits(v) for v in (0x3F7FFFF6, 0x3EFFFEDB, 0x3E2AAF33, 0x3D2B9F17, 0x3C072010))
    z = fma32(x, _bits(0x3FB8AA3B), shift)
    n = (z - shift).astype(F32)
    b = fma32(-n, _bits(0x35BFBE8E), fma32(-n, _bits(0x3F317200), x))
    u = (b * b).astype(F32)
    j = fma32(fma32(fma32(c4, b, c3), u, fma32(c2, b, c1)), u, fma32(c0, b, F32(1)))
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (j.astype(F64) * np.exp2(np.where(np.isfinite(n), n, 0).astype(F64))).astype(F32)
    saturated = np.where(n <= 0, F32(0), F32(np.inf))
    return np.where(np.abs(n) > 192, saturated, scaled).astype(F32)


def silu_mul_cpu_order(g: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = g.astype(F32)
    return ((g / (F32(1) + ggml_expf(F32(0) - g))).astype(F32) * up.astype(F32)).astype(F32)


def rope_cpu_order(x: np.ndarray, positions, cos_sin: np.ndarray, heads: int, head_dim: int, rope_dims: int) -> np.ndarray:
    """llama_ops::rope_pairs: (a, b) -> (fma(a, c, -(b s)), fma(a, s, b c))."""
    out = x.astype(F32).reshape(len(positions), heads, head_dim).copy()
    cs = cos_sin[np.asarray(positions)].reshape(len(positions), 1, rope_dims // 2, 2)
    c, s = cs[..., 0], cs[..., 1]
    a, b = out[:, :, 0:rope_dims:2].copy(), out[:, :, 1:rope_dims:2].copy()
    out[:, :, 0:rope_dims:2] = fma32(a, c, -(b * s).astype(F32))
    out[:, :, 1:rope_dims:2] = fma32(a, s, (b * c).astype(F32))
    return out.reshape(x.shape)


def rope_cos_sin(max_pos: int, dims: int, base: float) -> np.ndarray:
    """A [cos, sin] table as llama_ops::rope_cos_sin (f32 angle recurrence; NumPy's f32
    cos/sin stand in for libm's: the kernel only reads the table)."""
    theta_scale = F32(base) ** F32(-2.0 / dims)
    out = np.zeros((max_pos, dims), F32)
    theta = np.arange(max_pos, dtype=F32)
    for i in range(dims // 2):
        out[:, 2 * i] = np.cos(theta)
        out[:, 2 * i + 1] = np.sin(theta)
        theta = (theta * theta_scale).astype(F32)
    return out


def paged_attention_cpu_order(q: np.ndarray, k: np.ndarray, v: np.ndarray, seq_start, positions, heads: int, kv_heads: int, d: int, exp) -> np.ndarray:
    """llama_ops::attend_one for every (row, head), head widths a multiple of 64 (the CPU
    adds other widths' leftovers in f64). k, v: [keys, kv_heads * d] as cached (f16 values);
    row r attends to keys seq_start[r] .. seq_start[r] + positions[r]. `exp` is the CPU's
    exponential, libm's expf (the tests pass glibc's through ctypes)."""
    assert d % 64 == 0
    group = heads // kv_heads
    rows = q.shape[0]
    q16 = f16_round(q).reshape(rows, heads, d)
    k3 = k.astype(F32).reshape(-1, kv_heads, d)
    v3 = v.astype(F32).reshape(-1, kv_heads, d)
    scale = F32(1) / np.sqrt(F32(d))
    out = np.zeros((rows, heads, d), F32)
    g_of_h = np.arange(heads) // group
    for r in range(rows):
        n = int(positions[r]) + 1
        keys = k3[seq_start[r] : seq_start[r] + n][:, g_of_h, :].transpose(1, 0, 2)  # [H, n, d]
        vals = v3[seq_start[r] : seq_start[r] + n][:, g_of_h, :].transpose(1, 0, 2)
        prod = (q16[r][:, None, :] * keys).astype(F32)  # exact
        e = prod[..., 0:64].copy()
        for step in range(64, d, 64):
            e = (e + prod[..., step : step + 64]).astype(F32)
        x0 = [(e[..., i] + e[..., 32 + i]) + (e[..., 16 + i] + e[..., 48 + i]) for i in range(16)]
        t = [x0[8 + i] + x0[i] for i in range(8)]
        u = [t[4] + t[0], t[5] + t[1], t[6] + t[2], t[7] + t[3]]
        scores = (((u[0] + u[2]) + (u[1] + u[3])) * scale).astype(F32)  # [H, n]
        m = np.full(heads, -np.inf, F32)
        total = np.zeros(heads, F32)
        acc = np.zeros((heads, d), F32)
        with np.errstate(invalid="ignore", over="ignore"):
            for j in range(n):
                s = scores[:, j]
                new = s > m
                ms = np.where(new, exp(m - s), F32(1)).astype(F32)
                vs = np.where(new, F32(1), exp(s - m)).astype(F32)
                m = np.where(new, s, m)
                acc = np.where(new[:, None], f16_round(acc * ms[:, None]), acc)
                acc = f16_round(fma32(vals[:, j, :], vs[:, None], acc))
                total = fma32(total, ms, vs)
        inv = np.where(total == 0, F32(0), F32(1) / np.where(total == 0, F32(1), total)).astype(F32)
        out[r] = acc * inv[:, None]
    return out.reshape(rows, heads * d)


def gelu64(x: np.ndarray) -> np.ndarray:
    """Exact GELU in f64."""
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def linear_f32_reference(x: np.ndarray, w: np.ndarray, b, act: int):
    """(f64 result, error bound) of an f32 `act(x wᵀ + b)` computed as one serial fma chain
    of k terms per output: at most k roundings of the running sum, each bounded by U times
    sum |x w| (+ the bias addition); GELU's slope is at most ~1.13, plus erf's 16 ulp and the
    final roundings."""
    u = 2.0**-24
    k = x.shape[1]
    lin = x.astype(np.float64) @ w.astype(np.float64).T + (b if b is not None else 0)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + (np.abs(b) if b is not None else 0)
    tol = mag * (k + 1) * u
    if act == 1:
        want = gelu64(lin)
        return want, 1.13 * tol + 0.5 * np.abs(lin) * 16 * 2.0**-23 + np.abs(want) * 4 * u
    return lin, tol

"""The chat model's row-wise kernels (RMSNorm, RoPE, SiLU-gate, residual add, row gather)
and its KV-cache write and paged attention, against float64 maths and, where they claim
the CPU kernels' bits, against NumPy re-implementations of the CPU order."""

from __future__ import annotations

import math

import numpy as np
import pytest

import cl_reference as R
from cl_reference import round_up, same_bits

pytestmark = pytest.mark.opencl

F32 = np.float32


# --- RMSNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,dim,eps", [(1, 1, 1e-5), (3, 576, 1e-5), (5, 17, 1e-5), (2, 1000, 1e-6), (4, 576, 0.0)])
def test_rms_norm(clenv, bitwise, rng, rows, dim, eps):
    # Rows of different magnitudes: the f64 sum is exercised far from f32's range limits
    # and, with eps = 0, the emulated f64 mean (including an f32-subnormal one) shows
    # directly in the scale.
    mags = np.exp(rng.uniform(-6, 6, (rows, 1)))
    x = (rng.standard_normal((rows, dim)) * mags).astype(F32)
    if rows >= 4:
        x[1] = rng.standard_normal(dim) * 1e-21  # squares ~1e-42: subnormal f32, summed exactly as f64
        x[2, dim // 2] = F32(3e18)  # one square near f32's top
    w = rng.uniform(-2, 2, dim).astype(F32)
    out, like = clenv.poisoned((rows, dim))
    local = 32
    clenv.run(clenv.kernel("rms_norm_f32"), (local * rows,), (local,), clenv.to_device(x), clenv.to_device(w), out, np.uint32(dim), F32(eps))
    got = clenv.read(out, like)
    want_bits = R.rms_norm_cpu_order(x, w, eps)
    assert same_bits(got, want_bits), f"differs from the CPU order at {np.argwhere(got.view(np.uint32) != want_bits.view(np.uint32))[:5].tolist()}"
    x64 = x.astype(np.float64)
    sumsq = (x64**2).sum(axis=1, keepdims=True)
    want = x64 / np.sqrt(sumsq / dim + eps) * w
    # f32 square, mean and scale roundings plus two products: a few 2^-24 relative; squares
    # in f32's subnormal range are off by up to 2^-150 each in absolute terms, which moves
    # the scale by half the relative error of the sum.
    rel = 8 * 2.0**-24 + 0.5 * dim * 2.0**-150 / sumsq
    assert np.all(np.abs(got - want) <= np.abs(want) * rel + 1e-37)


def test_rms_norm_non_finite_rows(clenv, bitwise):
    x = np.ones((2, 40), F32)
    x[0, 7] = np.inf  # mean inf -> scale 0 -> finite * 0 = 0, inf * 0 = NaN (as the CPU)
    x[1, 3] = np.nan
    w = np.ones(40, F32)
    out, like = clenv.poisoned((2, 40))
    clenv.run(clenv.kernel("rms_norm_f32"), (32 * 2,), (32,), clenv.to_device(x), clenv.to_device(w), out, np.uint32(40), F32(1e-5))
    got = clenv.read(out, like)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference, on purpose
        want = R.rms_norm_cpu_order(x, w, 1e-5)
    assert np.isnan(got[0, 7]) and np.all(got[0, np.arange(40) != 7] == 0) and np.isnan(got[1]).all()
    assert same_bits(got, want)


# --- RoPE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,heads,head_dim,rope_dims", [(1, 1, 64, 64), (5, 9, 64, 64), (3, 3, 64, 32), (2, 2, 80, 80)])
def test_rope(clenv, bitwise, rng, rows, heads, head_dim, rope_dims):
    max_pos = 8192
    table = R.rope_cos_sin(max_pos, rope_dims, 100000.0)
    positions = rng.integers(0, max_pos, rows).astype(np.uint32)
    positions[0] = 0  # the identity rotation
    x0 = rng.standard_normal((rows, heads * head_dim)).astype(F32)
    buf = clenv.to_device(x0)
    clenv.run(
        clenv.kernel("rope_f32"), (rope_dims // 2, heads, rows), None, buf, clenv.to_device(positions), clenv.to_device(table),
        np.uint32(heads), np.uint32(head_dim), np.uint32(rope_dims),
    )
    got = clenv.read(buf, x0)
    want_bits = R.rope_cpu_order(x0, positions, table, heads, head_dim, rope_dims)
    assert np.array_equal(got.view(np.uint32), want_bits.view(np.uint32))
    # The rotation itself, in f64 with the table's cos/sin: the kernel rounds twice.
    x = x0.reshape(rows, heads, head_dim).astype(np.float64)
    cs = table[positions].astype(np.float64).reshape(rows, 1, rope_dims // 2, 2)
    a, b = x[:, :, 0:rope_dims:2], x[:, :, 1:rope_dims:2]
    want = x.copy()
    want[:, :, 0:rope_dims:2] = a * cs[..., 0] - b * cs[..., 1]
    want[:, :, 1:rope_dims:2] = a * cs[..., 1] + b * cs[..., 0]
    tol = (np.abs(a) + np.abs(b)).repeat(2, axis=2) * 2.0**-23
    diff = np.abs(got.reshape(rows, heads, head_dim)[:, :, :rope_dims] - want[:, :, :rope_dims])
    assert np.all(diff <= tol)
    assert np.array_equal(got.reshape(rows, heads, head_dim)[:, :, rope_dims:], x0.reshape(rows, heads, head_dim)[:, :, rope_dims:])


# --- SiLU-gated product, residual add, row gather -----------------------------------------


@pytest.mark.parametrize("count", [1, 33, 1536 * 3 + 1])
def test_silu_mul(clenv, bitwise, rng, count):
    g0 = (rng.standard_normal(count) * 12).astype(F32)
    if count > 8:
        g0[:8] = [0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 250.0, -250.0]  # saturation of e^-g
    up = rng.standard_normal(count).astype(F32)
    g = clenv.to_device(g0)
    clenv.run(clenv.kernel("silu_mul_f32"), (round_up(count, 64),), (64,), g, clenv.to_device(up), np.uint32(count))
    got = clenv.read(g, g0)
    want_bits = R.silu_mul_cpu_order(g0, up)
    assert same_bits(got, want_bits), f"differs from the CPU order at {np.argwhere(got.view(np.uint32) != want_bits.view(np.uint32))[:5].tolist()}"
    g64 = g0.astype(np.float64)
    with np.errstate(over="ignore"):
        want = g64 / (1 + np.exp(-g64)) * up
    # ggml_expf is within ~1.5 ulp; a division and a product add two roundings.
    assert np.all(np.abs(got - want) <= np.abs(want) * 2.0**-20 + 1e-38)


def test_add_and_gather_rows(clenv, rng):
    rows, dim = 7, 577
    x0 = rng.standard_normal((rows, dim)).astype(F32)
    y = rng.standard_normal((rows, dim)).astype(F32)
    x = clenv.to_device(x0)
    clenv.run(clenv.kernel("add_f32"), (round_up(rows * dim, 64),), (64,), x, clenv.to_device(y), np.uint32(rows * dim))
    summed = clenv.read(x, x0)
    assert np.array_equal(summed, x0 + y)  # one IEEE addition each, as NumPy's
    pick = np.array([6, 0, 3], np.uint32)
    out, like = clenv.poisoned((3, dim))
    clenv.run(clenv.kernel("gather_rows_f32"), (round_up(dim, 64), 3), (64, 1), x, clenv.to_device(pick), out, np.uint32(dim))
    assert np.array_equal(clenv.read(out, like), summed[pick])


# --- KV cache and paged attention ---------------------------------------------------------


def kv_index_k(block, g, c, slot, kv_heads, d, bt):
    return block * kv_heads * d * bt + (g * d + c) * bt + slot


def kv_index_v(block, g, c, slot, kv_heads, d, bt):
    return block * kv_heads * d * bt + (g * bt + slot) * d + c


class PagedFixture:
    """Sequences of the given lengths on scrambled blocks of a poisoned cache (f16 NaN:
    reading an unwritten slot would show), filled through kv_write_f16_f32."""

    def __init__(self, clenv, rng, lens, kv_heads, d, bt):
        self.lens, self.kv_heads, self.d, self.bt = lens, kv_heads, d, bt
        need = [math.ceil(n / bt) for n in lens]
        self.num_blocks = sum(need) + 3
        order = rng.permutation(self.num_blocks)
        self.max_blocks = max(need)
        self.tables = np.zeros((len(lens), self.max_blocks), np.uint32)
        at = 0
        for s, nb in enumerate(need):
            self.tables[s, :nb] = order[at : at + nb]
            at += nb
        width = kv_heads * d
        total = sum(lens)
        self.k = rng.uniform(-1, 1, (total, width)).astype(F32)
        self.v = rng.uniform(-1, 1, (total, width)).astype(F32)
        self.row_seq = np.repeat(np.arange(len(lens)), lens).astype(np.uint32)
        self.row_pos = np.concatenate([np.arange(n) for n in lens]).astype(np.uint32)
        slots = self.tables[self.row_seq, self.row_pos // bt] * bt + self.row_pos % bt
        size = self.num_blocks * kv_heads * d * bt
        self.k_cache, like = clenv.poisoned((size,), np.uint16)
        self.v_cache, _ = clenv.poisoned((size,), np.uint16)
        clenv.run(
            clenv.kernel("kv_write_f16_f32"), (round_up(width, 32), total), (32, 1), clenv.to_device(self.k), clenv.to_device(self.v),
            clenv.to_device(slots.astype(np.uint32)), self.k_cache, self.v_cache, np.uint32(kv_heads), np.uint32(d), np.uint32(bt),
        )
        self.k_bits, self.v_bits = clenv.read(self.k_cache, like), clenv.read(self.v_cache, like)
        # What the cache must hold: the rows rounded to f16 at the layout's places.
        want_k = np.full(size, 0x7E00, np.uint16)
        want_v = want_k.copy()
        blocks = self.tables[self.row_seq, self.row_pos // bt].astype(np.int64)[:, None, None]
        slot = (self.row_pos % bt).astype(np.int64)[:, None, None]
        g = np.arange(kv_heads)[None, :, None]
        c = np.arange(d)[None, None, :]
        want_k[kv_index_k(blocks, g, c, slot, kv_heads, d, bt)] = self.k.reshape(total, kv_heads, d).astype(np.float16).view(np.uint16)
        want_v[kv_index_v(blocks, g, c, slot, kv_heads, d, bt)] = self.v.reshape(total, kv_heads, d).astype(np.float16).view(np.uint16)
        assert np.array_equal(self.k_bits, want_k), "K cache contents differ from PagedKvLayout::write_token"
        assert np.array_equal(self.v_bits, want_v), "V cache contents differ from PagedKvLayout::write_token"


def attention_f64(fx: PagedFixture, q: np.ndarray, heads: int) -> np.ndarray:
    """softmax(q16 . K^T / sqrt(d)) . V per (row, head) in f64, from the f16-rounded query
    (the kernel rounds it first, as llama.cpp) and the cached (f16) keys and values."""
    d, group = fx.d, heads // fx.kv_heads
    k16 = R.f16_round(fx.k).astype(np.float64).reshape(-1, fx.kv_heads, d)
    v16 = R.f16_round(fx.v).astype(np.float64).reshape(-1, fx.kv_heads, d)
    q16 = R.f16_round(q).astype(np.float64).reshape(-1, heads, d)
    out = np.zeros_like(q16)
    starts = np.concatenate([[0], np.cumsum(fx.lens)[:-1]])
    for r in range(q16.shape[0]):
        s0, pos = starts[fx.row_seq[r]], fx.row_pos[r]
        keys, vals = k16[s0 : s0 + pos + 1], v16[s0 : s0 + pos + 1]
        for h in range(heads):
            sc = keys[:, h // group, :] @ q16[r, h] / math.sqrt(d)
            p = np.exp(sc - sc.max())
            out[r, h] = (p / p.sum()) @ vals[:, h // group, :]
    return out.reshape(q.shape)


def run_attention(clenv, fx: PagedFixture, q: np.ndarray, heads: int, rows_sel: np.ndarray, variant: str, **defines) -> np.ndarray:
    d = fx.d
    n = len(rows_sel)
    out, like = clenv.poisoned((n, heads * d))
    args = [
        clenv.to_device(q[rows_sel]), fx.k_cache, fx.v_cache, clenv.to_device(fx.tables), clenv.to_device(fx.row_seq[rows_sel]),
        clenv.to_device(fx.row_pos[rows_sel]), out, np.uint32(heads), np.uint32(fx.kv_heads), np.uint32(fx.bt), np.uint32(fx.max_blocks),
    ]
    kern = clenv.kernel(f"attention_paged_f16_{variant}", HEAD_DIM=d, **defines)
    if variant == "decode":
        clenv.run(kern, (heads * d, n), (d, 1), *args)
    else:
        clenv.run(kern, (heads, n), None, *args)
    return clenv.read(out, like)


# (head_dim, heads, kv_heads, block_tokens): the chat model's 64 / 9 / 3 / 16, a head width
# below the 64-wide tree (32), one with a leftover (80), two tree steps (128), 32-token blocks.
ATTENTION_CASES = [(64, 9, 3, 16), (32, 4, 4, 32), (80, 2, 1, 16), (128, 4, 2, 16)]


@pytest.mark.parametrize("d,heads,kv_heads,bt", ATTENTION_CASES)
def test_paged_attention(clenv, rng, d, heads, kv_heads, bt):
    # Lengths around block boundaries, one past a decode chunk of d keys, one long.
    lens = [1, bt - 1, bt, bt + 1, 2 * bt + 1, 150]
    fx = PagedFixture(clenv, rng, lens, kv_heads, d, bt)
    total = sum(lens)
    q = (rng.uniform(-1, 1, (total, heads * d)) * 3).astype(F32)  # peaked softmaxes
    rows = np.arange(total)
    prefill = run_attention(clenv, fx, q, heads, rows, "prefill")
    decode = run_attention(clenv, fx, q, heads, rows, "decode")
    want = attention_f64(fx, q, heads)
    # The value sum is kept in f16: each of a query's n keys adds one f16 rounding
    # (<= 2^-11 relative) to a sum bounded by the weights' total times max |v| (<= 1), so
    # |error| <= (n + 1) 2^-11 after normalising (the CPU kernel's own bound); exp's 3 ulp
    # and the score roundings are far below that.
    tol = (fx.row_pos.astype(np.float64) + 2)[:, None] * 2.0**-11
    for name, got in (("prefill", prefill), ("decode", decode)):
        assert not np.isnan(got).any(), f"{name}: NaN (an unwritten output or cache slot was read)"
        err = np.abs(got - want)
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        assert np.all(err <= tol), f"{name}: row {worst[0]} (pos {fx.row_pos[worst[0]]}) err {err[worst]:.3e} > {tol[worst[0], 0]:.3e}"
    # Both kernels run the same per-(row, head) arithmetic: the same bits.
    assert np.array_equal(prefill.view(np.uint32), decode.view(np.uint32)), "decode and prefill kernels disagree"
    # Batch invariance: the last row of each sequence alone (a decode step) and a chunk
    # of rows of the long sequence give the bits they had in the full batch.
    last = np.cumsum(lens) - 1
    alone = run_attention(clenv, fx, q, heads, last, "decode")
    assert np.array_equal(alone.view(np.uint32), prefill[last].view(np.uint32))
    chunk = np.arange(total - 40, total - 33)
    assert np.array_equal(run_attention(clenv, fx, q, heads, chunk, "prefill").view(np.uint32), prefill[chunk].view(np.uint32))


@pytest.mark.parametrize("d,heads,kv_heads,bt", [c for c in ATTENTION_CASES if c[0] % 64 == 0])
def test_paged_attention_cpu_order(clenv, bitwise, libm_expf, rng, d, heads, kv_heads, bt):
    """Bit for bit: both kernels, as built by default, must give the NumPy transcription of
    the CPU kernel's order (f16 query, score tree, online softmax with the f16 value
    accumulator) with glibc's expf, the CPU's exponential."""
    lens = [1, bt + 1, 2 * bt + 3, 70]
    fx = PagedFixture(clenv, rng, lens, kv_heads, d, bt)
    q = (rng.uniform(-1, 1, (sum(lens), heads * d)) * 3).astype(F32)
    rows = np.arange(sum(lens))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])[fx.row_seq]
    want = R.paged_attention_cpu_order(q, R.f16_round(fx.k), R.f16_round(fx.v), starts, fx.row_pos, heads, kv_heads, d, exp=libm_expf)
    for variant in ("prefill", "decode"):
        got = run_attention(clenv, fx, q, heads, rows, variant)
        bad = np.argwhere(got.view(np.uint32) != want.view(np.uint32))
        assert bad.size == 0, f"{variant}: {len(bad)} values differ from the CPU order, first at {bad[0].tolist()}: {got[tuple(bad[0])]!r} vs {want[tuple(bad[0])]!r}"


LIBM_EXPF_PROBE = """
#include "common.h"
__kernel void probe(const __global float *x, __global float *y, const uint n) {
    const uint i = get_global_id(0);
    if (i < n)
        y[i] = libm_expf(x[i]);
}
"""


def test_libm_expf_matches_glibc(clenv, bitwise, libm_expf, rng):
    """common.h's libm_expf (glibc's algorithm with emulated double arithmetic) against
    glibc's expf itself: the attention softmax's arguments (<= 0, down to underflow), small
    magnitudes (down to subnormal floats), and the special cases."""
    n = 200_000
    x = np.concatenate([
        rng.uniform(-110, 0, n // 2),
        -np.exp(rng.uniform(-100, 4.7, n // 4)),
        rng.uniform(-1, 89, n // 4),
        [0.0, -0.0, -np.inf, np.inf, np.nan, 88.5, 88.72, 88.73, -103.9, -103.97, -103.98, -104.0, -1e-42, 1e-45,
         -63.09946],  # the last: z - k unfused gives the wrong last bit (glibc fuses it)
    ]).astype(F32)
    y, like = clenv.poisoned(x.shape)
    kern = clenv.kernel_from_source(LIBM_EXPF_PROBE, "probe")
    clenv.run(kern, (round_up(len(x), 64),), (64,), clenv.to_device(x), y, np.uint32(len(x)))
    got = clenv.read(y, like)
    want = libm_expf(x)
    bad = np.argwhere((got.view(np.uint32) != want.view(np.uint32)) & ~(np.isnan(got) & np.isnan(want)))[:, 0]
    assert bad.size == 0, f"{len(bad)} differ, e.g. expf({x[bad[0]]!r}) = {got[bad[0]]!r}, glibc {want[bad[0]]!r}"

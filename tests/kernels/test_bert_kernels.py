"""The embedding model's kernels (input embeddings, LayerNorm, f32 linear with bias and
GELU, encoder attention, softmax, mean pooling) against float64 maths, within tolerances
derived from their f32 arithmetic. None claims the CPU's bits (README.md says why)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cl_reference import gelu64, linear_f32_reference, round_up

pytestmark = pytest.mark.opencl

F32 = np.float32
U = 2.0**-24  # f32 unit roundoff


def test_embedding_lookup_f32(clenv, rng):
    vocab, max_pos, dim, rows = 40, 16, 384, 9
    word = rng.standard_normal((vocab, dim)).astype(F32)
    pos = rng.standard_normal((max_pos, dim)).astype(F32)
    type0 = rng.standard_normal(dim).astype(F32)
    tokens = rng.integers(0, vocab, rows).astype(np.uint32)
    positions = np.array([0, 1, 2, 3, 0, 1, 0, 1, max_pos - 1], np.uint32)  # three sequences
    x, like = clenv.poisoned((rows, dim))
    clenv.run(
        clenv.kernel("embedding_lookup_f32"), (round_up(dim, 64), rows), (64, 1), clenv.to_device(word), clenv.to_device(pos),
        clenv.to_device(type0), clenv.to_device(tokens), clenv.to_device(positions), x, np.uint32(dim),
    )
    # (word + pos) + type0, IEEE additions in the CPU's order: NumPy's are the same.
    assert np.array_equal(clenv.read(x, like), (word[tokens] + pos[positions]) + type0)


@pytest.mark.parametrize("rows,dim,residual", [(1, 1, False), (3, 384, True), (5, 17, True), (2, 1000, False)])
def test_layer_norm(clenv, rng, rows, dim, residual):
    x0 = (rng.standard_normal((rows, dim)) * 3 + rng.uniform(-5, 5, (rows, 1))).astype(F32)
    res = rng.standard_normal((rows, dim)).astype(F32)
    gamma, beta = rng.standard_normal(dim).astype(F32), rng.standard_normal(dim).astype(F32)
    eps = 1e-12
    x = clenv.to_device(x0)
    local = 64
    clenv.run(
        clenv.kernel("layer_norm_f32"), (local * rows,), (local,), x, clenv.to_device(res) if residual else None,
        clenv.to_device(gamma), clenv.to_device(beta), np.uint32(dim), F32(eps), clenv.cl.LocalMemory(4 * local),
    )
    got = clenv.read(x, x0)
    if dim == 1:  # x - mean is exactly 0: the output is beta
        assert np.array_equal(got, np.broadcast_to(beta, got.shape))
        return
    h = x0.astype(np.float64) + (res if residual else 0)
    mean = h.mean(axis=1, keepdims=True)
    std = np.sqrt(((h - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    want = (h - mean) / std * gamma + beta
    # f32 sums of dim terms (tree: log2 roundings each, plus each work-item's serial part)
    # perturb mean and variance by ~dim U relative to the row's magnitudes; the normalised
    # value (x - mean) / std then errs by that times (|h| + |mean|) / std, scaled by gamma.
    spread = (np.abs(h).max(axis=1, keepdims=True) + np.abs(mean)) / std
    tol = (np.abs(gamma) * spread + np.abs(beta)) * (dim + 16) * U
    print("LN", np.max(np.abs(got - want)), np.min(tol), np.max(np.abs(got-want)/tol))
    assert np.all(np.abs(got - want) <= tol), f"max excess {np.max(np.abs(got - want) - tol)}"


@pytest.mark.parametrize("count", [1, 63, 1536 * 5 + 3])
def test_gelu(clenv, rng, count):
    x0 = (rng.standard_normal(count) * 4).astype(F32)
    if count > 4:
        x0[:4] = [0.0, -10.0, 10.0, -0.5]
    x = clenv.to_device(x0)
    clenv.run(clenv.kernel("gelu_f32"), (round_up(count, 64),), (64,), x, np.uint32(count))
    got = clenv.read(x, x0)
    want = gelu64(x0.astype(np.float64))
    # OpenCL's erf is allowed 16 ulp of erf (|erf| <= 1): absolute 16 * 2^-23 inside the
    # bracket, times 0.5 |x|, plus a few roundings of the result.
    tol = 0.5 * np.abs(x0) * 16 * 2.0**-23 + np.abs(want) * 4 * U + 1e-30
    assert np.all(np.abs(got - want) <= tol)


@pytest.mark.parametrize("m,n,k,bias,act", [(1, 1, 1, False, 0), (3, 65, 384, True, 0), (7, 33, 17, True, 1), (2, 1536, 384, True, 1)])
def test_matmul_f32(clenv, rng, m, n, k, bias, act):
    x = rng.standard_normal((m, k)).astype(F32)
    w = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    y, like = clenv.poisoned((m, n))
    clenv.run(
        clenv.kernel("matmul_f32_f32"), (round_up(n, 16), m), (16, 1), clenv.to_device(x), clenv.to_device(w),
        clenv.to_device(b) if bias else None, y, np.uint32(n), np.uint32(k), np.uint32(act),
    )
    got = clenv.read(y, like)
    want, tol = linear_f32_reference(x, w, b if bias else None, act)
    assert np.all(np.abs(got - want) <= tol + 1e-30)


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 49152), (3, 17), (2, 1000)])
def test_softmax(clenv, rng, rows, cols):
    x0 = (rng.standard_normal((rows, cols)) * 5).astype(F32)
    x = clenv.to_device(x0)
    local = 64
    clenv.run(clenv.kernel("softmax_f32"), (local * rows,), (local,), x, np.uint32(cols), clenv.cl.LocalMemory(4 * local))
    got = clenv.read(x, x0)
    x64 = x0.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True)
    # exp's 3 ulp and the sum's cols roundings (relative to the sum), then two roundings.
    tol = want * ((cols + 8) * U + 3 * 2.0**-23)
    assert np.all(np.abs(got - want) <= tol + 1e-45)
    assert np.allclose(got.astype(np.float64).sum(axis=1), 1.0, atol=(cols + 8) * 4 * U)


@pytest.mark.parametrize("head_dim,heads,lens", [(32, 12, [1, 7, 16, 33]), (64, 2, [5]), (16, 3, [2, 130])])
def test_encoder_attention(clenv, rng, head_dim, heads, lens):
    hidden = heads * head_dim
    rows = sum(lens)
    qkv0 = rng.standard_normal((rows, 3 * hidden)).astype(F32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.uint32)
    row_seq = np.repeat(np.arange(len(lens)), lens).astype(np.uint32)
    out, like = clenv.poisoned((rows, hidden))
    clenv.run(
        clenv.kernel("attention_encoder_f32", HEAD_DIM=head_dim), (heads, rows), None, clenv.to_device(qkv0), clenv.to_device(offsets),
        clenv.to_device(row_seq), out, np.uint32(heads),
    )
    got = clenv.read(out, like)
    qkv = qkv0.astype(np.float64).reshape(rows, 3, heads, head_dim)
    want = np.zeros((rows, heads, head_dim))
    for s in range(len(lens)):
        a, b = offsets[s], offsets[s + 1]
        q, k, v = qkv[a:b, 0], qkv[a:b, 1], qkv[a:b, 2]  # [len, heads, d]
        sc = np.einsum("ihc,jhc->hij", q, k) / math.sqrt(head_dim)
        p = np.exp(sc - sc.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        want[a:b] = np.einsum("hij,jhc->ihc", p, v)
    # Per (row, head): each score errs by at most (d + 2) U sum_c |q_c k_c| / sqrt(d)
    # (the scaled query's rounding and d additions); the softmax weights then err by about
    # twice that relative (plus exp's 3 ulp and the n-term sum), and the output by that
    # times the largest |v| of the sequence.
    tol = np.zeros((rows, heads))
    for s in range(len(lens)):
        a, b = offsets[s], offsets[s + 1]
        absqk = np.einsum("ihc,jhc->hij", np.abs(qkv[a:b, 0]), np.abs(qkv[a:b, 1])) / math.sqrt(head_dim)
        e_s = (head_dim + 2) * U * absqk.max(axis=2).T  # [len, heads]
        vmax = np.abs(qkv[a:b, 2]).max(axis=(0, 2))  # [heads]
        tol[a:b] = 2 * (2 * e_s + (2 * (b - a) + 8) * U) * vmax
    err = np.abs(got.reshape(rows, heads, head_dim) - want).max(axis=2)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol)}"


POOL_MODES = {"mean": 0, "cls": 1, "max": 2, "mean_sqrt_len": 3}


@pytest.mark.parametrize("mode", list(POOL_MODES))
@pytest.mark.parametrize("dim,lens,normalize", [(384, [1, 5, 17], 1), (17, [3], 0), (1000, [2, 1, 64], 1)])
def test_pool(clenv, rng, dim, lens, normalize, mode):
    rows = sum(lens)
    hidden = rng.standard_normal((rows, dim)).astype(F32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.uint32)
    out, like = clenv.poisoned((len(lens), dim))
    local = 64
    clenv.run(
        clenv.kernel("pool_f32"), (local * len(lens),), (local,), clenv.to_device(hidden), clenv.to_device(offsets), out,
        np.uint32(dim), np.uint32(POOL_MODES[mode]), np.uint32(normalize), clenv.cl.LocalMemory(4 * local),
    )
    got = clenv.read(out, like)
    # Before normalising, the CPU's arithmetic (rows added in order in f32, then one
    # division; the first row; the running maximum): bitwise against the same NumPy loop.
    pooled = np.zeros((len(lens), dim), F32)
    for s in range(len(lens)):
        block = hidden[offsets[s]:offsets[s + 1]]
        if mode == "cls":
            pooled[s] = block[0]
        elif mode == "max":
            pooled[s] = block.max(axis=0)
        else:
            acc = np.zeros(dim, F32)
            for row in block:
                acc = acc + row
            pooled[s] = acc / (F32(lens[s]) if mode == "mean" else np.sqrt(F32(lens[s])))
    if not normalize:
        assert np.array_equal(got, pooled)
        return
    m64 = pooled.astype(np.float64)
    want = m64 / np.linalg.norm(m64, axis=1, keepdims=True)
    # The norm's f32 sum of dim squares (tree) and sqrt, then a division: (dim + 4) U.
    assert np.all(np.abs(got - want) <= np.abs(want) * (dim + 4) * U + 1e-30)
    assert np.allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=(dim + 4) * U)

"""The tiled f32 linear layer (matmul_f32_f32_tiled, the embedding model's matmuls) against
float64 maths within the bound of its f32 arithmetic, against the untiled kernel (the same
fma chain per output: the same bits without GELU), for batch invariance, and for writing
nothing outside y. Several tile shapes, since the defaults are tuned for PoCL and a GPU
would build others; the shapes cover one row, odd n, k not a multiple of 4 or of the chunk,
partial tiles in both directions and the model's widths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cl_reference import linear_f32_reference, round_up

pytestmark = pytest.mark.opencl

F32 = np.float32

# (defines, (TILE_M, TILE_N, WORK_M, WORK_N)): the kernel's defaults (what ops.rs builds), the
# same with a row's 16 columns in two float8s and in four float4s (what x86 CPUs with AVX but
# no AVX-512, and without AVX, compile; -DMAX_VW forces it on any host), a GPU-style shape
# (4 x 4 per work-item, padded local rows), and a deliberately odd one (tiles that are not
# powers of two, more work-items than float4s to stage).
DEFAULT = {}
TILES = {
    "default": (DEFAULT, (64, 64, 8, 16)),
    "default_vec8": (dict(MAX_VW=8), (64, 64, 8, 16)),
    "default_vec4": (dict(MAX_VW=4), (64, 64, 8, 16)),
    "gpu4x4": (dict(WORK_M=4, WORK_N=4, TILE_K=16, PAD_X=1, PAD_W=4), (64, 64, 4, 4)),
    "odd": (dict(TILE_M=3, TILE_N=6, TILE_K=4, WORK_M=1, WORK_N=2), (3, 6, 1, 2)),
}

SHAPES = [
    (1, 1, 1, False, 0),
    (1, 65, 384, True, 0),  # one row
    (3, 33, 17, True, 1),  # odd n, k not a multiple of 4
    (7, 1536, 384, True, 1),  # the FFN input width, GELU
    (65, 130, 70, True, 0),  # one row past a 64-row tile; k = 64 + 6
    (130, 1152, 384, True, 0),  # packed QKV
    (70, 384, 1536, False, 0),  # the FFN output: long k
    (5, 7, 129, False, 1),
]


def run_tiled(clenv, tiles, x, w, b, act, guard=0):
    """y = the kernel's output for x [m, k], w [n, k], bias b or None; the buffer has `guard`
    poisoned floats after y, returned too (they must stay NaN)."""
    defines, (tm, tn, wm, wn) = TILES[tiles]
    m, k = x.shape
    n = w.shape[0]
    y, like = clenv.poisoned((m * n + guard,))
    clenv.run(
        clenv.kernel("matmul_f32_f32_tiled", **defines), (round_up(n, tn) // wn, round_up(m, tm) // wm), (tn // wn, tm // wm),
        clenv.to_device(x), clenv.to_device(w), clenv.to_device(b) if b is not None else None, y,
        np.uint32(n), np.uint32(k), np.uint32(act), np.uint32(m),
    )
    out = clenv.read(y, like)
    return out[: m * n].reshape(m, n), out[m * n :]


def inputs(rng, m, n, k, bias):
    x = rng.standard_normal((m, k)).astype(F32)
    w = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(F32)
    b = rng.standard_normal(n).astype(F32) if bias else None
    return x, w, b


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("m,n,k,bias,act", SHAPES)
def test_matmul_f32_tiled(clenv, rng, tiles, m, n, k, bias, act):
    x, w, b = inputs(rng, m, n, k, bias)
    got, guard = run_tiled(clenv, tiles, x, w, b, act, guard=67)
    assert np.all(np.isnan(guard)), "wrote past y"
    # The untiled kernel's bound: each output is still one serial fma chain in k order.
    want, tol = linear_f32_reference(x, w, b if bias else None, act)
    assert np.all(np.abs(got - want) <= tol + 1e-30), f"max err/tol {np.max(np.abs(got - want) / (tol + 1e-30))}"


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("m,n,k,bias", [(1, 65, 384, True), (3, 33, 17, False), (65, 130, 70, True), (9, 1536, 384, True)])
def test_tiled_equals_untiled(clenv, rng, tiles, m, n, k, bias):
    """Each output is the untiled kernel's fma chain in k order, + bias: the same bits. With
    GELU the erf is a vector call here and a scalar one there, which an implementation may
    round differently: within 16 ulp of erf (as test_matmul_f32_tiled checks), not compared."""
    x, w, b = inputs(rng, m, n, k, bias)
    got, _ = run_tiled(clenv, tiles, x, w, b, 0)
    y, like = clenv.poisoned((m, n))
    clenv.run(
        clenv.kernel("matmul_f32_f32"), (round_up(n, 16), m), (16, 1), clenv.to_device(x), clenv.to_device(w),
        clenv.to_device(b) if bias else None, y, np.uint32(n), np.uint32(k), np.uint32(0),
    )
    assert np.array_equal(got, clenv.read(y, like))


@pytest.mark.parametrize("tiles", ["default", "odd"])
@pytest.mark.parametrize("act", [0, 1])
def test_tiled_batch_invariant(clenv, rng, tiles, act):
    """A row's output does not depend on the batch around it (its place in a tile, the
    number of rows): each output is its own chain."""
    m, n, k = 77, 96, 100
    x, w, b = inputs(rng, m, n, k, True)
    whole, _ = run_tiled(clenv, tiles, x, w, b, act)
    for r in (0, 1, 63, 64, 76):
        alone, _ = run_tiled(clenv, tiles, x[r : r + 1], w, b, act)
        assert np.array_equal(alone[0], whole[r]), f"row {r}"
    part, _ = run_tiled(clenv, tiles, x[5:40], w, b, act)
    assert np.array_equal(part, whole[5:40])

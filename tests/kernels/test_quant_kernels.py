"""Q8 activation quantisation, the Q4_1 and Q8_0 matmuls and the Q8_0 embedding lookup,
against float64 maths (within a bound derived from the quantisation) and, bit for bit,
against NumPy re-implementations of the CPU kernels' operation order."""

from __future__ import annotations

import numpy as np
import pytest

import cl_reference as R
from cl_reference import round_up, same_bits

pytestmark = pytest.mark.opencl

F32 = np.float32
# Work-group width for the matmuls: shapes below include n not a multiple of it, so the
# kernels' bounds guard runs.
MATMUL_LOCAL = 16

# (m activation rows, n weight rows, k): one row (decode), k of one block, of several
# blocks, of block counts 1, 2, 3 mod 4 (the AVX-512 Q8_0 order's short last group), odd n,
# and the chat model's own widths (576 = 18 blocks, 1536 = 48 blocks).
SHAPES = [(1, 1, 32), (1, 7, 64), (3, 33, 96), (5, 17, 160), (1, 45, 576), (4, 20, 1536), (2, 3, 224)]


def activations(rng, m: int, k: int) -> np.ndarray:
    """Rows with per-block magnitudes spread over decades (as hidden states are), so blocks
    differ in scale and the f16 scale rounding is exercised."""
    x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-4, 3, (m, k // 32, 1))).repeat(32, axis=1).reshape(m, k)
    return x.astype(F32)


def quantize_on_device(clenv, x: np.ndarray):
    m, k = x.shape
    nb = k // 32
    kern = clenv.kernel("quantize_q8_f32")
    qs, qs_like = clenv.poisoned((m, k), np.int8)
    scales, sc_like = clenv.poisoned((m, nb, 2))
    sums, su_like = clenv.poisoned((m, nb))
    clenv.run(kern, (nb, m), None, clenv.to_device(x), qs, scales, sums, np.uint32(k))
    return (qs, scales, sums), (clenv.read(qs, qs_like), clenv.read(scales, sc_like), clenv.read(sums, su_like))


@pytest.mark.parametrize("m,k", [(1, 32), (3, 96), (2, 576), (7, 1536)])
def test_quantize_q8_matches_cpu_bits(clenv, bitwise, rng, m, k):
    x = activations(rng, m, k)
    # Edge blocks: a NaN, an infinity, all zeros, exact ties (amax 127 -> scale 1, so
    # x.5 values round half to even), a negative maximum.
    if k >= 64 and m >= 2:
        x[0, 3] = np.nan
        x[1, 32 + 5] = np.inf
    if m >= 3:
        x[2, :32] = 0.0
        x[2, 32:64] = np.array([127.0, -0.5, 0.5, 1.5, 2.5, -2.5, 126.5] + [0.25] * 25, F32)
        x[2, 64:96] = -rng.uniform(0, 3, 32).astype(F32)
    _, (qs, scales, sums) = quantize_on_device(clenv, x)
    want_qs, want_scales, want_sums = R.quantize_q8(x)
    assert np.array_equal(qs, want_qs), "codes differ from the CPU's quantisation"
    assert same_bits(scales, want_scales), "block scales [d, d*isum] differ from the CPU's bits"
    assert same_bits(sums, want_sums), "q8_1 sums differ from the CPU's bits"
    # And the codes are a quantisation of x: |x - q*d| <= d/2 plus the f16 rounding of d
    # (<= 2^-11 relative, times |q| <= 127).
    ok = np.isfinite(want_scales[:, :, 0])
    deq = R.dequantize_acts(qs, scales)
    err = np.abs(deq - x).reshape(m, k // 32, 32).max(axis=2)
    d = want_scales[:, :, 0].astype(np.float64)
    assert np.all(err[ok] <= d[ok] * (0.5 + 127 * 2.0**-11) * (1 + 1e-6) + 1e-30)
    if k >= 64 and m >= 2:
        assert np.isnan(scales[0, 0]).all() and np.isnan(scales[1, 1]).all() and (qs[0, :32] == 0).all()


def matmul_bound(w64: np.ndarray, x: np.ndarray, scales: np.ndarray, extra: np.ndarray | float = 0.0) -> np.ndarray:
    """|y - x.w^T| bound from the arithmetic: each activation is off by at most
    d_x (1/2 + 127 * 2^-11) (code rounding, then the f16 rounding of d_x), so an output
    by sum |w| * that; f32 accumulation adds about (k/32 + 8) roundings of 2^-24 relative
    to sum |w x|; `extra` carries format-specific terms."""
    m, k = x.shape
    per_elem = np.repeat(scales[:, :, 0].astype(np.float64) * (0.5 + 127 * 2.0**-11), 32, axis=1)  # [m, k]
    quant = per_elem @ np.abs(w64).T
    mag = np.abs(x.astype(np.float64)) @ np.abs(w64).T
    return quant + mag * (k / 32 + 8) * 2.0**-23 + extra + 1e-30


def run_matmul(clenv, name: str, w: np.ndarray, n: int, k: int, acts, m: int, with_sums: bool, rows: int = 4, **defines) -> np.ndarray:
    """Both kernels take `rows` activation rows per work-item (-DROWS); only Q4_1 reads `sums`.
    `defines` are further -D options (Q8_0_ORDER)."""
    qs, scales, sums = acts
    y, like = clenv.poisoned((m, n))
    args = [clenv.to_device(w), qs, scales] + ([sums] if with_sums else []) + [y, np.uint32(n), np.uint32(k), np.uint32(m)]
    clenv.run(clenv.kernel(name, ROWS=rows, **defines), (round_up(n, MATMUL_LOCAL), -(-m // rows)), (MATMUL_LOCAL, 1), *args)
    return clenv.read(y, like)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul_q4_1(clenv, bitwise, rng, m, n, k):
    w = R.random_q4_1(rng, n, k)
    x = activations(rng, m, k)
    dev_acts, (qs, scales, sums) = quantize_on_device(clenv, x)
    y = run_matmul(clenv, "matmul_q4_1_q8_1", w, n, k, dev_acts, m, with_sums=True)
    assert not np.isnan(y).any(), "an output was not written (still NaN)"
    # Bitwise: the CPU kernel's order (q4_1.rs dot_portable = every ISA level's bits).
    want_bits = R.matmul_q4_1_cpu_order(w, k, qs, scales, sums)
    diff = np.argwhere(y.view(np.uint32) != want_bits.view(np.uint32))
    assert diff.size == 0, f"{len(diff)} outputs differ from the CPU order, first {diff[0]}: {y[tuple(diff[0])]!r} vs {want_bits[tuple(diff[0])]!r}"
    # Maths: x.w^T in f64. Q4_1's m term uses the f16-rounded q8_1 sum s (off by <= |s|
    # 2^-11 from d_x * sum q): add |m| * that per block.
    w64 = R.dequantize_q4_1(w, k)
    _, mw, _ = R.q4_1_parts(w, k)
    extra = (np.abs(sums.astype(np.float64)) * 2.0**-11) @ np.abs(mw.astype(np.float64)).T
    want = x.astype(np.float64) @ w64.T
    bound = matmul_bound(w64, x, scales, extra)
    assert np.all(np.abs(y - want) <= bound), f"max excess {np.max(np.abs(y - want) - bound)}"


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("m,n,k", [(1, 7, 32), (5, 65, 96), (17, 130, 576)])
def test_matmul_q4_1_rows_per_item_give_the_same_bits(clenv, bitwise, rng, rows, m, n, k):
    """Any -DROWS, with m not a multiple of it: each output is still the CPU order's bits."""
    w = R.random_q4_1(rng, n, k)
    x = activations(rng, m, k)
    acts, (qs, scales, sums) = quantize_on_device(clenv, x)
    y = run_matmul(clenv, "matmul_q4_1_q8_1", w, n, k, acts, m, with_sums=True, rows=rows)
    want_bits = R.matmul_q4_1_cpu_order(w, k, qs, scales, sums)
    assert np.array_equal(y.view(np.uint32), want_bits.view(np.uint32))


# matmul_q8_0_q8_0's -DQ8_0_ORDER: the CPU level whose bits it reproduces, and that level's
# NumPy transcription (the CPU's Q8_0 bits depend on its ISA level; see the kernel's header).
Q8_0_ORDERS = {
    0: ("portable", R.matmul_q8_0_portable_order),
    1: ("AVX2", R.matmul_q8_0_avx2_order),
    2: ("AVX-512", R.matmul_q8_0_avx512_order),
}


@pytest.mark.parametrize("order", sorted(Q8_0_ORDERS))
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("m,n,k", [(1, 7, 32), (3, 11, 64), (5, 65, 96), (17, 130, 576), (2, 9, 224)])
def test_matmul_q8_0_rows_per_item_give_the_same_bits(clenv, bitwise, rng, order, rows, m, n, k):
    """Any -DROWS, m not a multiple of it, odd block counts and counts 1-3 mod 4: each
    order's bits."""
    w = R.random_q8_0(rng, n, k)
    x = activations(rng, m, k)
    acts, (qs, scales, _) = quantize_on_device(clenv, x)
    y = run_matmul(clenv, "matmul_q8_0_q8_0", w, n, k, acts, m, with_sums=False, rows=rows, Q8_0_ORDER=order)
    want_bits = Q8_0_ORDERS[order][1](w, k, qs, scales)
    assert np.array_equal(y.view(np.uint32), want_bits.view(np.uint32))


@pytest.mark.parametrize("order", sorted(Q8_0_ORDERS))
@pytest.mark.parametrize("m,n,k", SHAPES + [(2, 5, 128)])
def test_matmul_q8_0(clenv, bitwise, rng, order, m, n, k):
    w = R.random_q8_0(rng, n, k)
    x = activations(rng, m, k)
    dev_acts, (qs, scales, _) = quantize_on_device(clenv, x)
    y = run_matmul(clenv, "matmul_q8_0_q8_0", w, n, k, dev_acts, m, with_sums=False, Q8_0_ORDER=order)
    assert not np.isnan(y).any(), "an output was not written (still NaN)"
    label, reference = Q8_0_ORDERS[order]
    want_bits = reference(w, k, qs, scales)
    diff = np.argwhere(y.view(np.uint32) != want_bits.view(np.uint32))
    assert diff.size == 0, f"{len(diff)} outputs differ from the CPU's {label} order, first {diff[0]}: {y[tuple(diff[0])]!r} vs {want_bits[tuple(diff[0])]!r}"
    w64 = R.dequantize_q8_0(w, k)
    want = x.astype(np.float64) @ w64.T
    extra = 0.0
    if order == 2:
        # The offset form d(q + 128) - 128 d sums two terms each up to 128 |d d_x| * sum|q_x|
        # that cancel: their f32 roundings add 2^-24 of that magnitude per block.
        d, _ = R.q8_0_parts(w, k)
        cancel = (np.abs(scales[:, :, 1].astype(np.float64)) * 128 * 2.0**-22) @ np.abs(d.astype(np.float64)).T
        extra = cancel * (k / 32 + 2)
    bound = matmul_bound(w64, x, scales, extra)
    assert np.all(np.abs(y - want) <= bound), f"max excess {np.max(np.abs(y - want) - bound)}"


def test_matmul_q8_0_default_order_is_avx512_and_orders_differ(clenv, bitwise, rng):
    """Without -DQ8_0_ORDER the kernel is the AVX-512 order (binaries built before the
    define keep their meaning); and the three orders round differently, so the tests above
    do tell a build for the wrong CPU level apart."""
    m, n, k = 4, 64, 576
    w = R.random_q8_0(rng, n, k)
    x = activations(rng, m, k)
    acts, (qs, scales, _) = quantize_on_device(clenv, x)
    default = run_matmul(clenv, "matmul_q8_0_q8_0", w, n, k, acts, m, with_sums=False)
    assert np.array_equal(default.view(np.uint32), R.matmul_q8_0_avx512_order(w, k, qs, scales).view(np.uint32))
    bits = {o: ref(w, k, qs, scales).view(np.uint32) for o, (_, ref) in Q8_0_ORDERS.items()}
    for a in bits:
        for b in bits:
            if a < b:
                assert not np.array_equal(bits[a], bits[b]), f"orders {a} and {b} agree on every output"


def test_matmul_q8_0_rows_are_batch_invariant(clenv, rng):
    """Each order: a row's result does not depend on how many rows share the call."""
    n, k, m = 19, 224, 6
    w = R.random_q8_0(rng, n, k)
    x = activations(rng, m, k)
    acts, _ = quantize_on_device(clenv, x)
    for order in Q8_0_ORDERS:
        full = run_matmul(clenv, "matmul_q8_0_q8_0", w, n, k, acts, m, with_sums=False, Q8_0_ORDER=order)
        for r in (0, m - 1):
            one_acts, _ = quantize_on_device(clenv, x[r : r + 1])
            one = run_matmul(clenv, "matmul_q8_0_q8_0", w, n, k, one_acts, 1, with_sums=False, Q8_0_ORDER=order)
            assert np.array_equal(one.view(np.uint32), full[r : r + 1].view(np.uint32)), f"order {order}, row {r}"


def test_matmul_q4_1_rows_are_batch_invariant(clenv, rng):
    """A row's result does not depend on how many rows share the call."""
    n, k, m = 19, 192, 6
    w = R.random_q4_1(rng, n, k)
    x = activations(rng, m, k)
    acts, _ = quantize_on_device(clenv, x)
    full = run_matmul(clenv, "matmul_q4_1_q8_1", w, n, k, acts, m, with_sums=True)
    for r in (0, m - 1):
        one_acts, _ = quantize_on_device(clenv, x[r : r + 1])
        one = run_matmul(clenv, "matmul_q4_1_q8_1", w, n, k, one_acts, 1, with_sums=True)
        assert np.array_equal(one.view(np.uint32), full[r : r + 1].view(np.uint32))


@pytest.mark.parametrize("vocab,dim,rows", [(5, 32, 1), (50, 576, 7), (3, 96, 4)])
def test_embedding_lookup_q8_0(clenv, rng, vocab, dim, rows):
    table = R.random_q8_0(rng, vocab, dim)
    tokens = rng.integers(0, vocab, rows).astype(np.uint32)
    tokens[-1] = vocab - 1  # the last row of the table too
    x, like = clenv.poisoned((rows, dim))
    clenv.run(clenv.kernel("embedding_lookup_q8_0"), (round_up(dim, 64), rows), (64, 1), clenv.to_device(table), clenv.to_device(tokens), x, np.uint32(dim))
    got = clenv.read(x, like)
    # One f32 product q * d per weight: exact against f64 (8 + 11 bits), hence bitwise.
    want = R.dequantize_q8_0(table, dim)[tokens]
    assert np.array_equal(got.astype(np.float64), want)

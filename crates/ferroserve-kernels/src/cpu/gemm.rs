//! f32 GEMM for linear layers: `C[m, n] = A[m, k] · Bᵀ + bias`, B being the weight
//! `[n, k]`.
//!
//! Hand-written because it is our edge: the weights are packed once at load into
//! column panels so the micro-kernel streams them contiguously, the bias is fused into
//! the accumulator initialisation, and each output element is reduced over k in one
//! fixed order whatever `m` is (batch invariance), which BLAS libraries do not promise.
//!
//! Packed layout: panels of `NR` output columns; panel `p` holds, for each `kk` in
//! `0..k`, the `NR` weights `B[p·NR + j][kk]` (zero-padded past `n`).

use rayon::prelude::*;

use super::elementwise::gelu_slice;
use super::{dispatch_isa, Isa};
use crate::{Activation, PackedLinear};

/// Output columns per packed panel (two AVX-512 registers, four AVX2 registers).
pub const NR: usize = 32;

/// Columns `c0..c0 + ncols` of `bias`, zero-padded to a panel's width (no bias: zeros).
pub(super) fn bias_tile(bias: Option<&[f32]>, c0: usize, ncols: usize) -> [f32; NR] {
    let mut tile = [0.0f32; NR];
    if let Some(b) = bias {
        tile[..ncols].copy_from_slice(&b[c0..c0 + ncols]);
    }
    tile
}

/// Bias and activation over a contiguous tile of `NR`-wide rows in one vectorised pass (the
/// same code as `Device::gelu`, so fused and separate GELU agree bit for bit): the bf16
/// kernels' epilogue.
pub(super) fn bias_and_activation(tile: &mut [f32], bias_tile: &[f32; NR], act: Activation) {
    dispatch_isa!(Isa::Avx512, || {
        for row in tile.chunks_exact_mut(NR) {
            for (v, &bb) in row.iter_mut().zip(bias_tile) {
                *v += bb;
            }
        }
        if act == Activation::Gelu {
            gelu_slice(tile);
        }
    });
}
/// Rows of A per parallel task (its slice of A stays in L2 while panels stream by).
const MC: usize = 96;

/// Packs a row-major `[n, k]` weight into `NR`-column panels.
pub fn pack_b(weight: &[f32], n: usize, k: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut packed = vec![0.0f32; panels * k * NR];
    for p in 0..panels {
        let panel = &mut packed[p * k * NR..(p + 1) * k * NR];
        for j in 0..NR.min(n - p * NR) {
            let row = &weight[(p * NR + j) * k..(p * NR + j + 1) * k];
            for (kk, &w) in row.iter().enumerate() {
                panel[kk * NR + j] = w;
            }
        }
    }
    packed
}

#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint (row-block, column-panel) tiles of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Rows per A tile (the micro-kernel's MR) on the AVX-512 and portable paths: A is packed
/// in tiles of `MR_PACK` rows, interleaved by k (`[k][MR_PACK]`), so the kernel's
/// broadcasts read one sequential stream.
const MR_PACK: usize = 8;
/// Rows per A tile on the AVX2 path: its kernel is 6 rows × 16 columns (12 ymm
/// accumulators + 2 weight vectors + 1 broadcast = 15 of 16 registers), so one weight load
/// feeds 6 FMAs instead of the 4 of an 8-row tile cut into 4-row sub-tiles. Its tiles are
/// packed unpadded (`[k][h]` for a tile of h rows), so a short last tile can be re-cut.
const MR_AVX2: usize = 6;
/// k-block: a 256×32 slice of a panel (32 KiB) stays in L1 while all A tiles of the
/// row block pass by. Fixed, so the reduction order never depends on the shapes of a call.
const KC: usize = 256;
// Row blocks must hold whole A tiles of either height (the packed-A slicing relies on it).
const _: () = assert!(MC % MR_PACK == 0 && MC % MR_AVX2 == 0);

/// The A tile height `isa`'s kernel reads.
fn tile_rows(isa: Isa) -> usize {
    if isa.has_avx2() && !isa.has_avx512() {
        MR_AVX2
    } else {
        MR_PACK
    }
}

/// The A tiles of a row block of `rows` rows (≤ `MC`) for kernels of height `mr`, in order, as
/// `(first row, rows, packed row stride)`; a tile starting at row s of the block starts at
/// `s·k` in the packed block. `MR_PACK` tiles are zero-padded to 8 rows. AVX2 tiles are
/// exact, and a 1- or 2-row remainder is merged with the tile before it and re-cut 4 + 3 or
/// 4 + 4: a 1-row tile has only 2 FMA chains against Zen 1's 5-cycle FMA latency (2 FMAs
/// per 5 cycles), a 3-row one 6 (one FMA a cycle). Rows' results do not depend on the cut.
fn for_each_tile(mr: usize, rows: usize, mut f: impl FnMut(usize, usize, usize)) {
    if mr != MR_AVX2 {
        for s in (0..rows).step_by(mr) {
            f(s, mr.min(rows - s), mr);
        }
        return;
    }
    let (full, rest) = (rows / MR_AVX2, rows % MR_AVX2);
    let recut = full > 0 && rest <= 2 && rest > 0;
    let whole = if recut { full - 1 } else { full };
    for t in 0..whole {
        f(t * MR_AVX2, MR_AVX2, MR_AVX2);
    }
    let s = whole * MR_AVX2;
    if recut {
        f(s, 4, 4);
        f(s + 4, 2 + rest, 2 + rest);
    } else if rest > 0 {
        f(s, rest, rest);
    }
}

/// Packs `rows` rows of `x` into the tiles of [`for_each_tile`], row block by row block
/// (`[tile][k][stride]`), at the start of `packed` (grown as needed, never shrunk); the packed
/// rows of block b start at `b·MC·k`.
fn pack_a(packed: &mut Vec<f32>, x: &[f32], rows: usize, k: usize, mr: usize) {
    let mut tiles = Vec::with_capacity(rows.div_ceil(4));
    for r0 in (0..rows).step_by(MC) {
        for_each_tile(mr, MC.min(rows - r0), |s, h, stride| tiles.push((r0 + s, h, stride)));
    }
    let len = tiles.last().map_or(0, |&(s, _, stride)| (s + stride) * k);
    if packed.len() < len {
        packed.resize(len, 0.0);
    }
    if mr != MR_AVX2 {
        // 8-row tiles are zero-padded past the last row; AVX2 tiles are exact, every
        // element is written below.
        packed[..len].fill(0.0);
    }
    let mut dsts = Vec::with_capacity(tiles.len());
    let mut rest = &mut packed[..len];
    for &(_, _, stride) in &tiles {
        let (dst, tail) = rest.split_at_mut(stride * k);
        dsts.push(dst);
        rest = tail;
    }
    let pack_tile = |(&(s, h, stride), dst): (&(usize, usize, usize), &mut &mut [f32])| {
        for i in 0..h {
            let src = &x[(s + i) * k..(s + i + 1) * k];
            for (kk, &v) in src.iter().enumerate() {
                dst[kk * stride + i] = v;
            }
        }
    };
    if rows * k >= 64 * 1024 {
        tiles.par_iter().zip(dsts.par_iter_mut()).for_each(pack_tile);
    } else {
        tiles.iter().zip(dsts.iter_mut()).for_each(pack_tile);
    }
}

thread_local! {
    /// The packed A of the calling thread's last `linear`, reused: a fresh `vec!` per call
    /// was 126 MB a passage pass (8 × 256 tokens) of page faults and zeroing, ≈ 2.5 % of its
    /// samples (bench/NOTES.md, session 17). Taken out for the call and put back after, so a
    /// `linear` run by this thread while it waits in another one's parallel loop (a stolen job
    /// of a concurrent pass) just allocates its own.
    static PACKED_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packed-A buffers up to this many floats (16 MiB: a 2,048-row pass's FFN-out input) are kept
/// for the thread's next call; larger ones (big batch passes) are freed.
const KEEP_PACKED_A: usize = 4 << 20;

/// `out[rows, n] = act(x[rows, k] · Wᵀ + bias)`, `data` being `w`'s f32 panels ([`pack_b`]).
pub fn linear(isa: Isa, x: &[f32], rows: usize, w: &PackedLinear, data: &[f32], act: Activation, out: &mut [f32]) {
    let (n, k) = (w.out_features, w.in_features);
    assert!(x.len() >= rows * k, "x too short");
    assert!(out.len() >= rows * n, "out too short");
    isa.assert_supported(); // `block` runs `isa`'s instructions
    if rows == 0 || n == 0 {
        return;
    }
    assert_eq!(data.len(), n.div_ceil(NR) * k * NR, "weights packed for another ISA");
    let mr = tile_rows(isa);
    let mut a = PACKED_A.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    pack_a(&mut a, x, rows, k, mr);
    let panels = n.div_ceil(NR);
    let row_blocks = rows.div_ceil(MC);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let bias = w.bias.as_deref();
    let a_ref = &a;
    let task = |t: usize| {
        let (rb, p) = (t / panels, t % panels);
        let r0 = rb * MC;
        let r1 = (r0 + MC).min(rows);
        let c0 = p * NR;
        let ncols = NR.min(n - c0);
        let panel = &data[p * k * NR..(p + 1) * k * NR];
        let bias_tile = bias_tile(bias, c0, ncols);
        let a_block = &a_ref[r0 * k..];
        let out_ptr = out_ptr;
        // SAFETY: this task alone writes rows r0..r1 × columns c0..c0+ncols.
        unsafe { block(isa, mr, a_block, r1 - r0, k, panel, &bias_tile, act, out_ptr.0.add(r0 * n + c0), n, ncols) };
    };
    let tasks = row_blocks * panels;
    if tasks == 1 || rows * n * k < 64 * 1024 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    if a.len() <= KEEP_PACKED_A {
        PACKED_A.with(|cell| *cell.borrow_mut() = a);
    }
}

/// One row block (packed A tiles of `mr` rows) against one panel, k-block by k-block.
///
/// # Safety
/// `c` must be valid for writes of `rows` rows of stride `ldc` and `ncols` columns.
#[allow(clippy::too_many_arguments)]
unsafe fn block(isa: Isa, mr: usize, a: &[f32], rows: usize, k: usize, panel: &[f32], bias: &[f32; NR], act: Activation, c: *mut f32, ldc: usize, ncols: usize) {
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let (first, last) = (k0 == 0, k0 + kc == k);
        let b = &panel[k0 * NR..(k0 + kc) * NR];
        for_each_tile(mr, rows, |s, tile_rows, stride| {
            let a_tile = &a[s * k + k0 * stride..s * k + (k0 + kc) * stride];
            let c_tile = c.add(s * ldc);
            match isa {
                #[cfg(target_arch = "x86_64")]
                _ if isa.has_avx512() => x86::tile_avx512(a_tile, tile_rows, kc, b, bias, first, c_tile, ldc, ncols),
                #[cfg(target_arch = "x86_64")]
                _ if isa.has_avx2() => {
                    // GELU is applied to the accumulators before the last k-block's store.
                    let gelu = last && act == Activation::Gelu;
                    x86::tile_avx2(a_tile, tile_rows, kc, b, bias, first, gelu, s == 0, c_tile, ldc, ncols);
                    return;
                }
                _ => tile_portable(a_tile, tile_rows, kc, b, bias, first, c_tile, ldc, ncols),
            }
            if last && act == Activation::Gelu {
                for i in 0..tile_rows {
                    let row = std::slice::from_raw_parts_mut(c_tile.add(i * ldc), ncols);
                    dispatch_isa!(isa, || gelu_slice(row));
                }
            }
        });
        k0 += kc;
    }
}

/// Portable tile: MR_PACK rows × NR columns, plain loops (auto-vectorised).
#[allow(clippy::too_many_arguments)]
unsafe fn tile_portable(a: &[f32], rows: usize, kc: usize, b: &[f32], bias: &[f32; NR], first: bool, c: *mut f32, ldc: usize, ncols: usize) {
    let mut acc = [[0.0f32; NR]; MR_PACK];
    for (i, row) in acc.iter_mut().enumerate().take(rows) {
        if first {
            *row = *bias;
        } else {
            std::ptr::copy_nonoverlapping(c.add(i * ldc), row.as_mut_ptr(), ncols);
        }
    }
    for kk in 0..kc {
        let bv = &b[kk * NR..kk * NR + NR];
        let av = &a[kk * MR_PACK..kk * MR_PACK + MR_PACK];
        for i in 0..MR_PACK {
            for j in 0..NR {
                acc[i][j] = av[i].mul_add(bv[j], acc[i][j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(rows) {
        std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(i * ldc), ncols);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::math::x86::exp8x;
    use super::{MR_AVX2, MR_PACK, NR};

    /// MR_PACK×32 tile: 16 zmm accumulators, A broadcast from the packed stream.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx512(a: &[f32], rows: usize, kc: usize, b: &[f32], bias: &[f32; NR], first: bool, c: *mut f32, ldc: usize, ncols: usize) {
        let m0: __mmask16 = if ncols >= 16 { 0xFFFF } else { ((1u32 << ncols) - 1) as u16 };
        let m1: __mmask16 = if ncols >= 32 { 0xFFFF } else if ncols <= 16 { 0 } else { ((1u32 << (ncols - 16)) - 1) as u16 };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR_PACK];
        for (i, row) in acc.iter_mut().enumerate() {
            if first {
                row[0] = _mm512_loadu_ps(bias.as_ptr());
                row[1] = _mm512_loadu_ps(bias.as_ptr().add(16));
            } else if i < rows {
                row[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                row[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
            }
        }
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(MR_PACK);
            bp = bp.add(NR);
        }
        for (i, row) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, row[0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, row[1]);
        }
    }

    /// AVX2: a ≤ 6-row tile (A packed unpadded, `[k][rows]`) as two halves of 16 columns, each one
    /// `sub_avx2` of 6 rows: 12 ymm accumulators + 2 weight vectors + 1 broadcast = 15 of 16
    /// registers, no spill, and one weight load per 6 FMAs (the 4 × 16 sub-tiles of an 8-row
    /// tile before needed one per 4). Each output element is still one FMA chain from the bias
    /// over k in order: the same bits as every earlier tiling. `gelu`: apply GELU to the
    /// accumulators before storing (the last k-block of a GELU linear), the same operations as
    /// `gelu_slice` so fused and separate GELU agree bit for bit. `prefetch`: this is the first
    /// tile of the row block, the first to touch this k-block of the panel; a full tile then
    /// prefetches the weights `PF_K` k-rows ahead (an encoder pass streams 42.5 MB of weights
    /// that no cache holds: at m = 19, cold weights cost ≈ 14 % of the tile's rate, and this
    /// prefetch won back ≈ 8 %, bench/NOTES.md session 15). Later tiles find the lines in L1/L2.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2(a: &[f32], rows: usize, kc: usize, b: &[f32], bias: &[f32; NR], first: bool, gelu: bool, prefetch: bool, c: *mut f32, ldc: usize, ncols: usize) {
        debug_assert!((1..=MR_AVX2).contains(&rows) && a.len() == kc * rows && b.len() >= kc * NR);
        for half in 0..2 {
            let c0 = 16 * half;
            if c0 >= ncols {
                break;
            }
            let w = 16.min(ncols - c0);
            let (ap, cp, bp, bias) = (a.as_ptr(), c.add(c0), b.as_ptr().add(c0), bias.as_ptr().add(c0));
            match rows {
                1 => sub_avx2::<1, false>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
                2 => sub_avx2::<2, false>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
                3 => sub_avx2::<3, false>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
                4 => sub_avx2::<4, false>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
                5 => sub_avx2::<5, false>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
                _ if prefetch && half == 0 => sub_avx2::<6, true>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
                _ => sub_avx2::<6, false>(ap, kc, bp, bias, first, gelu, cp, ldc, w),
            }
        }
    }

    /// k-rows of weights (128 B each) the first tile prefetches ahead: ≈ 3 KiB, a few hundred
    /// cycles of that tile's FMAs, about a DRAM latency. 12, 48 and 96 measured the same within
    /// ±4 % at m = 19 on cold weights (bench/NOTES.md, session 17).
    const PF_K: usize = 24;

    /// `MR` rows × 16 columns; `a` points at the packed A tile (`[k][MR]`), `b` at
    /// the half panel (row stride `NR`), `bias` at its 16 bias values; `w` ≤ 16 columns are live.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn sub_avx2<const MR: usize, const PF: bool>(a: *const f32, kc: usize, b: *const f32, bias: *const f32, first: bool, gelu: bool, c: *mut f32, ldc: usize, w: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut tmp = [0.0f32; 16];
        for (i, row) in acc.iter_mut().enumerate() {
            let src = if first {
                bias
            } else if w == 16 {
                c.add(i * ldc) as *const f32
            } else {
                std::ptr::copy_nonoverlapping(c.add(i * ldc), tmp.as_mut_ptr(), w);
                tmp.as_ptr()
            };
            row[0] = _mm256_loadu_ps(src);
            row[1] = _mm256_loadu_ps(src.add(8));
        }
        let (mut ap, mut bp) = (a, b);
        for _ in 0..kc {
            if PF {
                // Both 64-byte lines of the k-row (the second half's too: the half-1 pass
                // follows this one and reads them from L1). `wrapping_add`: past the panel's end
                // the address is only a hint, never dereferenced.
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF_K * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF_K * NR + 16) as *const i8);
            }
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        if gelu {
            // Two rows (four vectors) at a time: their GELU chains interleaved.
            for rows in acc.chunks_mut(2) {
                if let [r0, r1] = rows {
                    [r0[0], r0[1], r1[0], r1[1]] = gelu8x([r0[0], r0[1], r1[0], r1[1]]);
                } else {
                    [rows[0][0], rows[0][1]] = gelu8x([rows[0][0], rows[0][1]]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            if w == 16 {
                _mm256_storeu_ps(c.add(i * ldc), row[0]);
                _mm256_storeu_ps(c.add(i * ldc + 8), row[1]);
            } else {
                _mm256_storeu_ps(tmp.as_mut_ptr(), row[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), row[1]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), c.add(i * ldc), w);
            }
        }
    }

    /// `gelu_slice` on `N` vectors of 8 lanes: `0.5·v·(1 + erf(v/√2))` with `math::erf` and
    /// `math::fast_exp` written out operation by operation in their order (Rust never
    /// contracts `a·b + c` into an FMA, so neither does this), hence the same bits as the
    /// auto-vectorised loop. Each step runs on all `N` vectors before the next, so `N` of the
    /// ≈ 40-deep dependent chains are interleaved: one at a time, Zen 1's window held about
    /// two of a tile's twelve (bench/NOTES.md, session 18).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn gelu8x<const N: usize>(v: [__m256; N]) -> [__m256; N] {
        let one = _mm256_set1_ps(1.0);
        let e = erf8x(v.map(|v| _mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2))));
        let mut out = v;
        for i in 0..N {
            out[i] = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), v[i]), _mm256_add_ps(one, e[i]));
        }
        out
    }

    /// `math::erf` on `N` vectors of 8 lanes (Abramowitz & Stegun 7.1.26).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn erf8x<const N: usize>(x: [__m256; N]) -> [__m256; N] {
        let sign = _mm256_set1_ps(-0.0);
        let (one, two) = (_mm256_set1_ps(1.0), _mm256_set1_ps(2.0));
        let a = x.map(|x| _mm256_andnot_ps(sign, x));
        // recip(d): bit-trick seed, three Newton steps.
        let d = a.map(|a| _mm256_add_ps(one, _mm256_mul_ps(_mm256_set1_ps(0.327_591_1), a)));
        let mut t = d.map(|d| _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(0x7EF3_11C3), _mm256_castps_si256(d))));
        for _ in 0..3 {
            for i in 0..N {
                t[i] = _mm256_mul_ps(t[i], _mm256_sub_ps(two, _mm256_mul_ps(d[i], t[i])));
            }
        }
        let mut p = t.map(|t| _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(1.061_405_4), t), _mm256_set1_ps(1.453_152_1)));
        for i in 0..N {
            p[i] = _mm256_add_ps(_mm256_mul_ps(p[i], t[i]), _mm256_set1_ps(1.421_413_8));
        }
        for i in 0..N {
            p[i] = _mm256_sub_ps(_mm256_mul_ps(p[i], t[i]), _mm256_set1_ps(0.284_496_74));
        }
        for i in 0..N {
            p[i] = _mm256_add_ps(_mm256_mul_ps(p[i], t[i]), _mm256_set1_ps(0.254_829_6));
        }
        let ex = exp8x(a.map(|a| _mm256_mul_ps(_mm256_xor_ps(a, sign), a)));
        let mut y = x;
        for i in 0..N {
            let yi = _mm256_sub_ps(one, _mm256_mul_ps(_mm256_mul_ps(p[i], t[i]), ex[i]));
            // copysign(y, x)
            y[i] = _mm256_or_ps(_mm256_andnot_ps(sign, yi), _mm256_and_ps(sign, x[i]));
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::test_util::{assert_close, levels, Rng};
    use crate::{Activation, CpuDevice, Device, Isa};

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn linear_matches_f64_reference_on_every_isa() {
        let mut rng = Rng::new(0x5eed_0001 ^ std::process::id() as u64);
        let shapes = [(1, 1, 1), (1, 32, 384), (3, 7, 5), (8, 33, 17), (9, 64, 64), (17, 100, 129), (19, 70, 1536), (97, 31, 384), (200, 65, 40)];
        for isa in levels("linear_matches_f64_reference_on_every_isa") {
            let dev = CpuDevice::with_isa(isa).expect("a level this CPU has");
            // bf16 inputs carry 8 significant bits: compare against the f64 product of
            // the bf16-rounded operands tightly, and loosely against the exact one.
            let bf16 = dev.isa().has_bf16();
            let tol = if bf16 { 2e-2 } else { 1e-5 };
            for &(m, n, k) in &shapes {
                let x = rng.vec(m * k);
                let w = rng.vec(n * k);
                let b = rng.vec(n);
                for bias in [None, Some(&b[..])] {
                    let packed = dev.pack_linear(&w, n, k, bias);
                    let mut out = vec![f32::NAN; m * n + 3];
                    dev.linear(&x, m, &packed, Activation::None, &mut out);
                    let want = reference(&x, m, &w, n, k, bias);
                    assert_close(&out[..m * n], &want, tol, &format!("{isa:?} m={m} n={n} k={k}"));
                    if bf16 {
                        let xr: Vec<f32> = x.iter().map(|&v| crate::cpu::gemm_amx::round_bf16(v)).collect();
                        let wr: Vec<f32> = w.iter().map(|&v| crate::cpu::gemm_amx::round_bf16(v)).collect();
                        let exact = reference(&xr, m, &wr, n, k, bias);
                        assert_close(&out[..m * n], &exact, 1e-5, &format!("{isa:?} vs bf16-rounded m={m} n={n} k={k}"));
                    }
                    assert!(out[m * n..].iter().all(|v| v.is_nan()), "wrote past the output");
                }
            }
        }
    }

    #[test]
    fn fused_gelu_matches_separate_gelu() {
        let mut rng = Rng::new(3 ^ std::process::id() as u64);
        let (m, n, k) = (37, 70, 400);
        for isa in levels("fused_gelu_matches_separate_gelu") {
            let dev = CpuDevice::with_isa(isa).expect("a level this CPU has");
            let w = dev.pack_linear(&rng.vec(n * k), n, k, Some(&rng.vec(n)));
            let x = rng.vec(m * k);
            let mut fused = vec![f32::NAN; m * n];
            dev.linear(&x, m, &w, Activation::Gelu, &mut fused);
            let mut plain = vec![f32::NAN; m * n];
            dev.linear(&x, m, &w, Activation::None, &mut plain);
            dev.gelu(&mut plain);
            assert_eq!(fused, plain, "{isa:?}");
        }
    }

    /// The AVX2 6-row tiles (edge tiles of 1–5 rows, partial panels, two k-blocks) and their
    /// fused GELU give the portable kernel's bits: each output is the same FMA chain over k.
    #[test]
    fn avx2_tiles_give_the_portable_bits() {
        let Some(avx2) = CpuDevice::with_isa(Isa::Avx2) else {
            eprintln!("avx2_tiles_give_the_portable_bits: skipping: this CPU lacks avx2");
            return;
        };
        let portable = CpuDevice::with_isa(Isa::Portable).expect("portable runs anywhere");
        let mut rng = Rng::new(0x6a16 ^ std::process::id() as u64);
        for &(m, n, k) in &[(1, 16, 8), (5, 40, 300), (6, 32, 256), (7, 48, 257), (8, 20, 31), (14, 33, 256), (19, 70, 384), (23, 33, 600), (101, 64, 40)] {
            let (w, b, x) = (rng.vec(n * k), rng.vec(n), rng.vec(m * k));
            for act in [Activation::None, Activation::Gelu] {
                let mut want = vec![0.0f32; m * n];
                portable.linear(&x, m, &portable.pack_linear(&w, n, k, Some(&b)), act, &mut want);
                let mut got = vec![0.0f32; m * n];
                avx2.linear(&x, m, &avx2.pack_linear(&w, n, k, Some(&b)), act, &mut got);
                assert_eq!(got, want, "m={m} n={n} k={k} {act:?}");
            }
        }
    }

    /// The fused epilogue's 8-lane GELU equals `Device::gelu` (the auto-vectorised
    /// `gelu_slice`) bit for bit over a dense range, the extremes and random bit patterns.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_gelu8_gives_gelu_slice_bits() {
        use std::arch::x86_64::{_mm256_loadu_ps, _mm256_storeu_ps};
        if !Isa::Avx2.is_supported() {
            eprintln!("avx2_gelu8_gives_gelu_slice_bits: skipping: this CPU lacks avx2");
            return;
        }
        let mut xs = vec![0.0f32, -0.0, 1e-40, -1e-40, f32::MIN_POSITIVE, 1e-8, -1e-8, 9.0, -9.0, 100.0, -100.0, 1e30, -1e30, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY];
        let mut v = -12.0f32;
        while v < 12.0 {
            xs.push(v);
            v += 3.7e-4;
        }
        let mut rng = Rng::new(0x9e1 ^ std::process::id() as u64);
        xs.extend((0..50_000).map(|_| f32::from_bits(rng.next_u64() as u32)).filter(|v| !v.is_nan()));
        xs.resize(xs.len().next_multiple_of(32), 0.5);
        let mut want = xs.clone();
        crate::cpu::elementwise::gelu(Isa::Avx2, &mut want);
        // One vector at a time, and four interleaved (as the tile's epilogue runs them).
        let mut got = xs.clone();
        for c in got.chunks_exact_mut(8) {
            // SAFETY: the CPU has AVX2 (checked above); `c` holds 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), super::x86::gelu8x([_mm256_loadu_ps(c.as_ptr())])[0]) };
        }
        let mut got4 = xs.clone();
        for c in got4.chunks_exact_mut(32) {
            let p = c.as_mut_ptr();
            // SAFETY: the CPU has AVX2 (checked above); `c` holds 32 floats.
            unsafe {
                let g = super::x86::gelu8x([0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o))));
                for (o, v) in [0, 8, 16, 24].into_iter().zip(g) {
                    _mm256_storeu_ps(p.add(o), v);
                }
            }
        }
        assert!(got.iter().zip(&got4).all(|(a, b)| a.to_bits() == b.to_bits()), "four interleaved gave other bits than one");
        for ((&x, &g), &w) in xs.iter().zip(&got).zip(&want) {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "gelu({x:e}): fused {g:e}, separate {w:e}");
        }
    }

    #[test]
    fn rows_do_not_depend_on_batch() {
        let mut rng = Rng::new(42);
        let (n, k) = (70, 96);
        let (wf, x) = (rng.vec(n * k), rng.vec(130 * k));
        for isa in levels("rows_do_not_depend_on_batch") {
            let dev = CpuDevice::with_isa(isa).expect("a level this CPU has");
            let w = dev.pack_linear(&wf, n, k, None);
            let mut all = vec![0.0; 130 * n];
            dev.linear(&x, 130, &w, Activation::None, &mut all);
            for r in [0, 5, 96, 129] {
                let mut one = vec![0.0; n];
                dev.linear(&x[r * k..(r + 1) * k], 1, &w, Activation::None, &mut one);
                assert_eq!(one, all[r * n..(r + 1) * n], "{isa:?} row {r}");
            }
        }
    }
}

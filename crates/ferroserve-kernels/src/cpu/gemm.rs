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

/// Rows per A tile (the micro-kernel's MR): A is packed in tiles of `MR_PACK` rows,
/// interleaved by k (`[k][MR_PACK]`), so the kernel's broadcasts read one sequential
/// stream. Every ISA path uses this packing; narrower kernels take sub-tiles.
const MR_PACK: usize = 8;
/// k-block: a 256×32 slice of a panel (32 KiB) stays in L1 while all A tiles of the
/// row block pass by. Fixed, so the reduction order never depends on the shapes of a call.
const KC: usize = 256;
// Row blocks must hold whole A tiles (the packed-A slicing relies on it).
const _: () = assert!(MC % MR_PACK == 0);

/// Packs `rows` rows of `x` into MR_PACK-row tiles (zero-padded), `[tile][k][MR_PACK]`.
fn pack_a(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let tiles = rows.div_ceil(MR_PACK);
    let mut packed = vec![0.0f32; tiles * k * MR_PACK];
    let pack_tile = |(t, dst): (usize, &mut [f32])| {
        for i in 0..MR_PACK.min(rows - t * MR_PACK) {
            let src = &x[(t * MR_PACK + i) * k..(t * MR_PACK + i + 1) * k];
            for (kk, &v) in src.iter().enumerate() {
                dst[kk * MR_PACK + i] = v;
            }
        }
    };
    if rows * k >= 64 * 1024 {
        packed.par_chunks_mut(k * MR_PACK).enumerate().for_each(pack_tile);
    } else {
        packed.chunks_mut(k * MR_PACK).enumerate().for_each(pack_tile);
    }
    packed
}

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
    let a = pack_a(x, rows, k);
    let panels = n.div_ceil(NR);
    let row_blocks = rows.div_ceil(MC);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let bias = w.bias.as_deref();
    let task = |t: usize| {
        let (rb, p) = (t / panels, t % panels);
        let r0 = rb * MC;
        let r1 = (r0 + MC).min(rows);
        let c0 = p * NR;
        let ncols = NR.min(n - c0);
        let panel = &data[p * k * NR..(p + 1) * k * NR];
        let bias_tile = bias_tile(bias, c0, ncols);
        let a_block = &a[r0 * k..r1.div_ceil(MR_PACK) * MR_PACK * k];
        let out_ptr = out_ptr;
        // SAFETY: this task alone writes rows r0..r1 × columns c0..c0+ncols.
        unsafe { block(isa, a_block, r1 - r0, k, panel, &bias_tile, act, out_ptr.0.add(r0 * n + c0), n, ncols) };
    };
    let tasks = row_blocks * panels;
    if tasks == 1 || rows * n * k < 64 * 1024 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// One row block (packed A tiles) against one panel, k-block by k-block.
///
/// # Safety
/// `c` must be valid for writes of `rows` rows of stride `ldc` and `ncols` columns.
#[allow(clippy::too_many_arguments)]
unsafe fn block(isa: Isa, a: &[f32], rows: usize, k: usize, panel: &[f32], bias: &[f32; NR], act: Activation, c: *mut f32, ldc: usize, ncols: usize) {
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let first = k0 == 0;
        for t in 0..rows.div_ceil(MR_PACK) {
            let tile_rows = MR_PACK.min(rows - t * MR_PACK);
            let a_tile = &a[t * k * MR_PACK + k0 * MR_PACK..t * k * MR_PACK + (k0 + kc) * MR_PACK];
            let b = &panel[k0 * NR..(k0 + kc) * NR];
            let c_tile = c.add(t * MR_PACK * ldc);
            match isa {
                #[cfg(target_arch = "x86_64")]
                _ if isa.has_avx512() => x86::tile_avx512(a_tile, tile_rows, kc, b, bias, first, c_tile, ldc, ncols),
                #[cfg(target_arch = "x86_64")]
                _ if isa.has_avx2() => x86::tile_avx2(a_tile, tile_rows, kc, b, bias, first, c_tile, ldc, ncols),
                _ => tile_portable(a_tile, tile_rows, kc, b, bias, first, c_tile, ldc, ncols),
            }
            if k0 + kc == k && act == Activation::Gelu {
                for i in 0..tile_rows {
                    let row = std::slice::from_raw_parts_mut(c_tile.add(i * ldc), ncols);
                    dispatch_isa!(isa, || gelu_slice(row));
                }
            }
        }
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

    use super::{MR_PACK, NR};

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

    /// AVX2: the 8-row tile as sub-tiles of ≤ 4 rows × 16 columns (half a panel): 8 ymm
    /// accumulators + 2 weight vectors + 1 broadcast, so nothing spills on 16 registers. The
    /// previous 3 × 32 sub-tile needed 12 + 4 + 1 = 17 and kept two accumulators on the stack
    /// (a load, FMA and store per k step in the hot loop, bench/NOTES.md "Embeddings on Zen 1").
    /// Each output element is still one FMA chain from the bias over k in order: the same bits.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2(a: &[f32], rows: usize, kc: usize, b: &[f32], bias: &[f32; NR], first: bool, c: *mut f32, ldc: usize, ncols: usize) {
        for half in 0..2 {
            let c0 = 16 * half;
            if c0 >= ncols {
                break;
            }
            let w = 16.min(ncols - c0);
            let mut r = 0;
            while r < rows {
                let mr = 4.min(rows - r);
                let (cp, bp, bias) = (c.add(r * ldc + c0), b.as_ptr().add(c0), bias.as_ptr().add(c0));
                match mr {
                    1 => sub_avx2::<1>(a, r, kc, bp, bias, first, cp, ldc, w),
                    2 => sub_avx2::<2>(a, r, kc, bp, bias, first, cp, ldc, w),
                    3 => sub_avx2::<3>(a, r, kc, bp, bias, first, cp, ldc, w),
                    _ => sub_avx2::<4>(a, r, kc, bp, bias, first, cp, ldc, w),
                }
                r += mr;
            }
        }
    }

    /// `MR` rows × 16 columns; `b` points at the half panel (row stride `NR`), `bias` at its
    /// 16 bias values, `w` ≤ 16 columns are live.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn sub_avx2<const MR: usize>(a: &[f32], r0: usize, kc: usize, b: *const f32, bias: *const f32, first: bool, c: *mut f32, ldc: usize, w: usize) {
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
        let (mut ap, mut bp) = (a.as_ptr().add(r0), b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(MR_PACK);
            bp = bp.add(NR);
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
}

#[cfg(test)]
mod tests {
    use crate::cpu::test_util::{assert_close, levels, Rng};
    use crate::{Activation, CpuDevice, Device};

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

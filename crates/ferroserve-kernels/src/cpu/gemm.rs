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

use super::Isa;
use crate::PackedLinear;

/// Output columns per packed panel (two AVX-512 registers, four AVX2 registers).
pub const NR: usize = 32;
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
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint (row-block, column-panel) tiles of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out[rows, n] = x[rows, k] · Wᵀ + bias`.
pub fn linear(isa: Isa, x: &[f32], rows: usize, w: &PackedLinear, out: &mut [f32]) {
    let (n, k) = (w.out_features, w.in_features);
    assert!(x.len() >= rows * k, "x too short");
    assert!(out.len() >= rows * n, "out too short");
    if rows == 0 || n == 0 {
        return;
    }
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
        let panel = &w.data[p * k * NR..(p + 1) * k * NR];
        let bias_tile: [f32; NR] = {
            let mut t = [0.0f32; NR];
            if let Some(b) = bias {
                t[..ncols].copy_from_slice(&b[c0..c0 + ncols]);
            }
            t
        };
        let out_ptr = out_ptr;
        // SAFETY: this task alone writes rows r0..r1 × columns c0..c0+ncols.
        unsafe { block(isa, &x[r0 * k..r1 * k], r1 - r0, k, panel, &bias_tile, out_ptr.0.add(r0 * n + c0), n, ncols) };
    };
    let tasks = row_blocks * panels;
    if tasks == 1 || rows * n * k < 64 * 1024 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// One row block against one panel, with the ISA's micro-kernels.
///
/// # Safety
/// `c` must be valid for writes of `rows` rows of stride `ldc` and `ncols` columns.
unsafe fn block(isa: Isa, a: &[f32], rows: usize, k: usize, panel: &[f32], bias: &[f32; NR], c: *mut f32, ldc: usize, ncols: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::block_avx512(a, rows, k, panel, bias, c, ldc, ncols),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::block_avx2(a, rows, k, panel, bias, c, ldc, ncols),
        _ => block_portable(a, rows, k, panel, bias, c, ldc, ncols),
    }
}

unsafe fn block_portable(a: &[f32], rows: usize, k: usize, panel: &[f32], bias: &[f32; NR], c: *mut f32, ldc: usize, ncols: usize) {
    const MR: usize = 4;
    let mut r = 0;
    while r < rows {
        let mr = MR.min(rows - r);
        let mut acc = [*bias; MR];
        for kk in 0..k {
            let b = &panel[kk * NR..kk * NR + NR];
            for i in 0..mr {
                let av = a[(r + i) * k + kk];
                for j in 0..NR {
                    acc[i][j] = av.mul_add(b[j], acc[i][j]);
                }
            }
        }
        for i in 0..mr {
            std::ptr::copy_nonoverlapping(acc[i].as_ptr(), c.add((r + i) * ldc), ncols);
        }
        r += mr;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::NR;

    macro_rules! for_each_mr {
        ($mr:expr, $f:ident, $($arg:expr),*) => {
            match $mr {
                1 => $f::<1>($($arg),*), 2 => $f::<2>($($arg),*), 3 => $f::<3>($($arg),*),
                4 => $f::<4>($($arg),*), 5 => $f::<5>($($arg),*), 6 => $f::<6>($($arg),*),
                7 => $f::<7>($($arg),*), _ => $f::<8>($($arg),*),
            }
        };
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_avx512(a: &[f32], rows: usize, k: usize, panel: &[f32], bias: &[f32; NR], c: *mut f32, ldc: usize, ncols: usize) {
        const MR: usize = 8;
        let mut r = 0;
        while r < rows {
            let mr = MR.min(rows - r);
            let a_ptr = a.as_ptr().add(r * k);
            let c_ptr = c.add(r * ldc);
            for_each_mr!(mr, kernel_avx512, a_ptr, k, panel.as_ptr(), bias, c_ptr, ldc, ncols);
            r += mr;
        }
    }

    /// MR×32 micro-kernel: 2·MR zmm accumulators, A broadcast from memory.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel_avx512<const MR: usize>(a: *const f32, k: usize, b: *const f32, bias: &[f32; NR], c: *mut f32, ldc: usize, ncols: usize) {
        let bias0 = _mm512_loadu_ps(bias.as_ptr());
        let bias1 = _mm512_loadu_ps(bias.as_ptr().add(16));
        let mut acc = [[bias0, bias1]; MR];
        for kk in 0..k {
            let b0 = _mm512_loadu_ps(b.add(kk * NR));
            let b1 = _mm512_loadu_ps(b.add(kk * NR + 16));
            for i in 0..MR {
                let av = _mm512_set1_ps(*a.add(i * k + kk));
                acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
            }
        }
        let m0: __mmask16 = if ncols >= 16 { 0xFFFF } else { ((1u32 << ncols) - 1) as u16 };
        let m1: __mmask16 = if ncols >= 32 { 0xFFFF } else if ncols <= 16 { 0 } else { ((1u32 << (ncols - 16)) - 1) as u16 };
        for i in 0..MR {
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, acc[i][0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, acc[i][1]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_avx2(a: &[f32], rows: usize, k: usize, panel: &[f32], bias: &[f32; NR], c: *mut f32, ldc: usize, ncols: usize) {
        const MR: usize = 3;
        let mut r = 0;
        while r < rows {
            let mr = MR.min(rows - r);
            let a_ptr = a.as_ptr().add(r * k);
            let c_ptr = c.add(r * ldc);
            match mr {
                1 => kernel_avx2::<1>(a_ptr, k, panel.as_ptr(), bias, c_ptr, ldc, ncols),
                2 => kernel_avx2::<2>(a_ptr, k, panel.as_ptr(), bias, c_ptr, ldc, ncols),
                _ => kernel_avx2::<3>(a_ptr, k, panel.as_ptr(), bias, c_ptr, ldc, ncols),
            }
            r += mr;
        }
    }

    /// MR×32 micro-kernel: 4·MR ymm accumulators.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn kernel_avx2<const MR: usize>(a: *const f32, k: usize, b: *const f32, bias: &[f32; NR], c: *mut f32, ldc: usize, ncols: usize) {
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        for row in acc.iter_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(bias.as_ptr().add(8 * j));
            }
        }
        for kk in 0..k {
            let bv = [
                _mm256_loadu_ps(b.add(kk * NR)),
                _mm256_loadu_ps(b.add(kk * NR + 8)),
                _mm256_loadu_ps(b.add(kk * NR + 16)),
                _mm256_loadu_ps(b.add(kk * NR + 24)),
            ];
            for i in 0..MR {
                let av = _mm256_broadcast_ss(&*a.add(i * k + kk));
                for j in 0..4 {
                    acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
                }
            }
        }
        for i in 0..MR {
            if ncols == NR {
                for j in 0..4 {
                    _mm256_storeu_ps(c.add(i * ldc + 8 * j), acc[i][j]);
                }
            } else {
                let mut tmp = [0.0f32; NR];
                for j in 0..4 {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * j), acc[i][j]);
                }
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), c.add(i * ldc), ncols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, Rng};
    use crate::{CpuDevice, Device};

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
        let shapes = [(1, 1, 1), (1, 32, 384), (3, 7, 5), (8, 33, 17), (9, 64, 64), (17, 100, 129), (97, 31, 384), (200, 65, 40)];
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            let dev = CpuDevice::with_isa(isa);
            for &(m, n, k) in &shapes {
                let x = rng.vec(m * k);
                let w = rng.vec(n * k);
                let b = rng.vec(n);
                for bias in [None, Some(&b[..])] {
                    let packed = dev.pack_linear(&w, n, k, bias);
                    let mut out = vec![f32::NAN; m * n + 3];
                    dev.linear(&x, m, &packed, &mut out);
                    let want = reference(&x, m, &w, n, k, bias);
                    assert_close(&out[..m * n], &want, 1e-5, &format!("{isa:?} m={m} n={n} k={k}"));
                    assert!(out[m * n..].iter().all(|v| v.is_nan()), "wrote past the output");
                }
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_batch() {
        let mut rng = Rng::new(42);
        let (n, k) = (70, 96);
        let dev = CpuDevice::new();
        let w = dev.pack_linear(&rng.vec(n * k), n, k, None);
        let x = rng.vec(130 * k);
        let mut all = vec![0.0; 130 * n];
        dev.linear(&x, 130, &w, &mut all);
        for r in [0, 5, 96, 129] {
            let mut one = vec![0.0; n];
            dev.linear(&x[r * k..(r + 1) * k], 1, &w, &mut one);
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }
}

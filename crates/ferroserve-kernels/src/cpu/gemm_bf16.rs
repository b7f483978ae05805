//! Linear layers with AVX512_BF16 dot products: `vdpbf16ps` multiplies 16 pairs of bf16
//! values and adds both products to 16 f32 accumulators, twice the multiply-adds of an f32
//! FMA per instruction. On AMD Zen 5 it issues at the FMA's rate (measured: ≈ 1.7 per
//! cycle for both, bench/NOTES.md "Encoder speed on Zen 5"), so it doubles the arithmetic
//! of the encoder's linear layers; on Intel cores without AMX it issues at half rate and
//! buys nothing (NOTES "Embeddings", v3), so there `amx` is the bf16 level.
//!
//! Hand-written for the same reasons as gemm.rs: panels packed once at load, a fixed k
//! order per output element whatever the batch (batch invariance). Numerics: weights and
//! activations rounded to bf16 (round to nearest even), products exact, sums in f32 — the
//! same operands as the AMX path (embeddings at cosine ≥ 0.9999 to sentence-transformers,
//! tests/bert_reference.rs).
//!
//! Layouts (k padded to a multiple of 32 with zeros):
//! - weights: gemm_amx's panels, `[panel][k/2][32]` bf16 pairs along k in one u32, so one
//!   k-pair of a panel is two zmm registers of 16 columns;
//! - activations: tiles of `MR` rows interleaved by k-pair, `[tile][k/2][MR]`, so the
//!   micro-kernel's broadcasts read one sequential stream.

use rayon::prelude::*;

use super::gemm::{bias_and_activation, bias_tile, SendPtr, NR};
use super::gemm_amx::{padded_k, to_bf16};
use super::{dispatch_isa, Isa};
use crate::{Activation, PackedLinear};

/// Rows per A tile: MR × 32 columns is 16 zmm accumulators.
const MR: usize = 8;
/// Rows of A per parallel task (their tiles stay in L2 while the panel streams by).
const MC: usize = 96;
const _: () = assert!(MC % MR == 0);

/// Rows of `x` as bf16 pairs in MR-row tiles, `[tile][k2][MR]` (zero padding).
fn pack_a(x: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let k2 = padded_k(k) / 2;
    let tiles = rows.div_ceil(MR);
    let mut packed = vec![0u32; tiles * k2 * MR];
    let pack_tile = |(t, dst): (usize, &mut [u32])| {
        // Each row converted into contiguous pairs (vectorises), then interleaved.
        let mut pairs = vec![0u32; k2];
        dispatch_isa!(Isa::Avx512, || {
            for i in 0..MR.min(rows - t * MR) {
                let src = &x[(t * MR + i) * k..(t * MR + i + 1) * k];
                for (p, s) in pairs.iter_mut().zip(src.chunks_exact(2)) {
                    *p = to_bf16(s[0]) as u32 | (to_bf16(s[1]) as u32) << 16;
                }
                if k % 2 == 1 {
                    pairs[k / 2] = to_bf16(src[k - 1]) as u32;
                }
                for (q, &p) in pairs.iter().enumerate() {
                    dst[q * MR + i] = p;
                }
            }
        })
    };
    if rows * k >= 64 * 1024 {
        packed.par_chunks_mut(k2 * MR).enumerate().for_each(pack_tile);
    } else {
        packed.chunks_mut(k2 * MR).enumerate().for_each(pack_tile);
    }
    packed
}

/// `out[rows, n] = act(x[rows, k] · Wᵀ + bias)` with `vdpbf16ps`, `data` being `w`'s bf16 panels.
pub fn linear(x: &[f32], rows: usize, w: &PackedLinear, data: &[u32], act: Activation, out: &mut [f32]) {
    Isa::Avx512Bf16.assert_supported();
    let (n, k) = (w.out_features, w.in_features);
    let k2 = padded_k(k) / 2;
    assert!(x.len() >= rows * k && out.len() >= rows * n);
    assert_eq!(data.len(), n.div_ceil(NR) * k2 * NR, "weights packed for another ISA");
    if rows == 0 || n == 0 {
        return;
    }
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
        let panel = &data[p * k2 * NR..(p + 1) * k2 * NR];
        let bias_tile = bias_tile(bias, c0, ncols);
        let out_ptr = out_ptr;
        let mut tile = [0.0f32; MR * NR];
        for t in r0 / MR..r1.div_ceil(MR) {
            let a_tile = &a[t * k2 * MR..(t + 1) * k2 * MR];
            // SAFETY: the level's features were asserted above; the slices hold k2 pairs.
            unsafe { x86::tile(a_tile, k2, panel, &mut tile) };
            let live_rows = MR.min(r1 - t * MR);
            let live = &mut tile[..live_rows * NR];
            bias_and_activation(live, &bias_tile, act);
            for i in 0..live_rows {
                // SAFETY: this task alone writes rows r0..r1 × columns c0..c0+ncols.
                unsafe { std::ptr::copy_nonoverlapping(live.as_ptr().add(i * NR), out_ptr.0.add((t * MR + i) * n + c0), ncols) };
            }
        }
    };
    let tasks = row_blocks * panels;
    if tasks == 1 || rows * n * k < 64 * 1024 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// C[MR × 32] = A tile (`[k2][MR]` pairs) · panel (`[k2][32]` pairs), f32 sums in k order.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile(a: &[u32], k2: usize, b: &[u32], c: &mut [f32; MR * NR]) {
        assert!(a.len() >= k2 * MR && b.len() >= k2 * NR);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        for _ in 0..k2 {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
            for (i, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.as_mut_ptr().add(i * NR), row[0]);
            _mm512_storeu_ps(c.as_mut_ptr().add(i * NR + 16), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{MR, NR};
    pub unsafe fn tile(_: &[u32], _: usize, _: &[u32], _: &mut [f32; MR * NR]) {
        unreachable!("the avx512bf16 level exists only on x86-64")
    }
}

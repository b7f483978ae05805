//! Q5_K: super-blocks of 256 weights, 176 bytes:
//! - f16 `d` and f16 `dmin`, and 12 bytes of eight 6-bit scales `sc[j]` and minimums
//!   `m[j]`, exactly as Q4_K (see [`super::q4_k::scale_min`]),
//! - `qh`, 32 bytes: bit `j` of `qh[l]` is the 5th bit of weight `32j + l`,
//! - `qs`, 128 bytes of nibbles laid out as Q4_K's: byte `32c + l` holds the low 4 bits of
//!   weight `64c + l` in its low nibble and of weight `64c + 32 + l` in its high nibble.
//!
//! weight = d·sc[j]·q − dmin·m[j], q in 0..32, for sub-block `j` (weights `32j..32j + 32`).
//!
//! Like Q4_K, the kernels multiply against the 8-bit activation blocks of 32
//! ([`Q8Activations`]), not llama.cpp's per-256 Q8_K, so they cannot take llama.cpp's order;
//! they fix their own (see [`dot_portable`]), which every ISA level reproduces bit for bit.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow};
use super::half::read_f16;
use super::q4_k::{quantize_super_block, scale_min};
use super::toolkit::{block_format, fma_lanes, hsum8, zip_blocks};

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 4 + 12 + BLOCK_ELEMS / 8 + BLOCK_ELEMS / 2;

block_format!("Q5_K", ggml_type: 13, avx512: avx2::matmul_cols);
const SUB: usize = 32;
const QH: usize = 16;
const QS: usize = QH + 32;

/// The 5-bit code (0..32) of weight `i` (0..256) of a super-block.
#[inline]
fn code(blk: &[u8], i: usize) -> u8 {
    let (c, l) = (i / 64, i % 64);
    let low = if l < 32 {
        blk[QS + 32 * c + l] & 0x0f
    } else {
        blk[QS + 32 * c + l - 32] >> 4
    };
    low | ((blk[QH + i % 32] >> (i / 32)) & 1) << 4
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in zip_blocks(bytes, BLOCK_BYTES, out, BLOCK_ELEMS) {
        let subs = sub_scales(blk);
        for (j, ys) in y.chunks_exact_mut(SUB).enumerate() {
            let [scale, min] = subs[j];
            for (l, v) in ys.iter_mut().enumerate() {
                *v = scale * code(blk, SUB * j + l) as f32 - min;
            }
        }
    }
}

/// Round to nearest: each sub-block spans [min(0, lo), hi] in 31 steps (see
/// [`quantize_super_block`]).
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        blk[QH..].fill(0);
        quantize_super_block(xb, 31, blk, |blk, i, q| {
            let (c, l) = (i / 64, i % 64);
            if l < 32 {
                blk[QS + 32 * c + l] |= q & 0x0f;
            } else {
                blk[QS + 32 * c + l - 32] |= (q & 0x0f) << 4;
            }
            blk[QH + i % 32] |= (q >> 4) << (i / SUB);
        });
    }
}

/// The super-block's eight `[d·sc[j], dmin·m[j]]` (both exact in f32).
#[inline]
fn sub_scales(blk: &[u8]) -> [[f32; 2]; 8] {
    let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
    std::array::from_fn(|j| {
        let (sc, m) = scale_min(&blk[4..QH], j);
        [d * sc as f32, dmin * m as f32]
    })
}

/// The reference order, which every level reproduces bit for bit: the order of
/// `q5_1::dot_portable` with a sub-block in place of a block. Per sub-block `j` (activation
/// block `b`), eight integer dots over groups of four codes, each accumulated into its own
/// f32 lane as `fma((d·sc[j])·d_x, dot, lane)` in sub-block order; the lanes summed as
/// `hsum8`; minus the minimum terms `fma(dmin·m[j], d_x·Σa, Σ)` in sub-block order (with
/// the activation block's exact f32 `d_x·Σa`).
fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    let nsb = w_row.len() / BLOCK_BYTES;
    assert_rows_match(acts, nsb * 8);
    let mut lanes = [[0f32; 8]; R];
    let mut mins = [0f32; R];
    for (s, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
        let subs = sub_scales(blk);
        let q: [i32; BLOCK_ELEMS] = std::array::from_fn(|i| code(blk, i) as i32);
        for (r, a) in acts.iter().enumerate() {
            for (j, qj) in q.chunks_exact(SUB).enumerate() {
                let b = 8 * s + j;
                let aq = &a.qs[b * SUB..(b + 1) * SUB];
                let [dx, dx_sum] = a.scales[b];
                fma_lanes(&mut lanes[r], subs[j][0] * dx, qj, aq);
                mins[r] = subs[j][1].mul_add(dx_sum, mins[r]);
            }
        }
    }
    core::array::from_fn(|r| hsum8(&lanes[r]) - mins[r])
}

/// Also the AVX-512 level's kernel: it already gives the reference bits, which is what the
/// level must give.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use super::{assert_rows_match, sub_scales, ActRow, BLOCK_BYTES, QH, QS, SUB};
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// `dot_portable`'s order with eight lanes in one register per row (codes ≤ 31, so
    /// `vpmaddubsw` pairs stay below 2¹⁵ and `vpmaddwd` sums groups of four exactly).
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nsb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nsb * 8);
        let low4 = _mm256_set1_epi8(0x0f);
        let fifth_bit = _mm256_set1_epi8(0x10);
        let mut lanes = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        for (s, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
            let subs = sub_scales(blk);
            let p = blk.as_ptr();
            // SAFETY: the loads below stay inside the 176-byte block; activation blocks
            // 8s..8s + 8 exist (checked above).
            let qh = _mm256_loadu_si256(p.add(QH).cast());
            for j in 0..8 {
                let raw = _mm256_loadu_si256(p.add(QS + 32 * (j / 2)).cast());
                let low = if j % 2 == 0 {
                    _mm256_and_si256(raw, low4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)
                };
                let bit = _mm256_set1_epi8(1 << j);
                let high =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), fifth_bit);
                let q = _mm256_or_si256(low, high);
                let b = 8 * s + j;
                for r in 0..R {
                    let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * SUB).cast());
                    let [dx, dx_sum] = *acts[r].scales.get_unchecked(b);
                    let scale = _mm256_set1_ps(subs[j][0] * dx);
                    lanes[r] =
                        _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot_u8i8_avx2(q, a)), lanes[r]);
                    mins[r] = subs[j][1].mul_add(dx_sum, mins[r]);
                }
            }
        }
        core::array::from_fn(|r| hsum(lanes[r]) - mins[r])
    }

    crate::quant::toolkit::avx2_matmul_cols!();
}

//! Q5_1: blocks of 32 weights, 24 bytes: f16 scale `d`, f16 minimum `m`, a little-endian
//! u32 `qh` whose bit `i` is the 5th bit of weight `i`, then 16 bytes whose low nibbles
//! are the low 4 bits of weights 0..16 and high nibbles those of weights 16..32;
//! weight = q·d + m, q in 0..32.
//!
//! llama.cpp's K-quant mixes store tensors whose rows are not a multiple of 256 in this
//! format instead of Q5_K. As for Q4_1, a block's dot product with 8-bit activations is
//! `d·d_x·Σ q·a + m·s`, with `s` the activation block's f16-rounded `d_x·Σa`.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow};
use super::half::{read_f16, round_half_even, write_f16};
use super::toolkit::{block_format, hsum8};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 4 + 4 + BLOCK_ELEMS / 2;

block_format!("Q5_1", ggml_type: 7, avx512: avx2::matmul_cols);

/// The 5-bit code (0..32) of weight `i` of a block.
#[inline]
fn code(blk: &[u8], i: usize) -> u8 {
    // The same `qh` and nibbles as Q5_0, two bytes further on.
    super::q5_0::code(&blk[2..], i)
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK_ELEMS))
    {
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        for (i, v) in y.iter_mut().enumerate() {
            *v = code(blk, i) as f32 * d + m;
        }
    }
}

/// Round to nearest on the block's [min, max] range in 31 steps.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in x
        .chunks_exact(BLOCK_ELEMS)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        let min = xb.iter().fold(f32::INFINITY, |a, &v| a.min(v));
        let max = xb.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        write_f16(blk, 0, (max - min) / 31.0);
        write_f16(blk, 2, min);
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        let codes: [u8; BLOCK_ELEMS] =
            std::array::from_fn(|i| round_half_even((xb[i] - m) * inv).clamp(0.0, 31.0) as u8);
        super::q5_0::pack_codes(&codes, &mut blk[2..]);
    }
}

/// The reference order, which every level reproduces bit for bit: llama.cpp's
/// `ggml_vec_dot_q5_1_q8_1` on x86 (AVX2), the order of `q4_1::dot_portable` with 5-bit
/// codes: per block eight lanes `fma(d·d_x, Σ₄ q·a, lane)`, summed as `hsum_float_8`, plus
/// the `m` terms `fma(m, s, Σ)` in block order.
fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    let nb = w_row.len() / BLOCK_BYTES;
    assert_rows_match(acts, nb);
    let mut lanes = [[0f32; 8]; R];
    let mut mins = [0f32; R];
    for (b, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        let q: [i32; BLOCK_ELEMS] = std::array::from_fn(|i| code(blk, i) as i32);
        for (r, a) in acts.iter().enumerate() {
            let aq = &a.qs[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let dd = d * a.scales[b][0];
            for (g, lane) in lanes[r].iter_mut().enumerate() {
                let isum: i32 = (4 * g..4 * g + 4).map(|i| q[i] * aq[i] as i32).sum();
                *lane = dd.mul_add(isum as f32, *lane);
            }
            mins[r] = m.mul_add(a.q81_sums[b], mins[r]);
        }
    }
    core::array::from_fn(|r| hsum8(&lanes[r]) + mins[r])
}

/// Also the AVX-512 level's kernel: it already gives the reference bits, which is what the
/// level must give.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use super::{assert_rows_match, ActRow, BLOCK_BYTES, BLOCK_ELEMS};
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// `dot_portable`'s order with eight lanes in one register per row (`vpmaddubsw` +
    /// `vpmaddwd` sum groups of four codes exactly; `hsum` is `hsum8`).
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nb);
        let w = w_row.as_ptr();
        let fifth_bit = _mm256_set1_epi8(0x10);
        let mut lanes = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        for b in 0..nb {
            // SAFETY: b < nb blocks of the row; the activation rows hold nb blocks (checked).
            let blk = w.add(b * BLOCK_BYTES);
            let dm = load_f16x2(blk);
            let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
            let high = _mm256_and_si256(bytes_from_bits(blk.add(4)), fifth_bit);
            let q = _mm256_or_si256(unpack_nibbles(blk.add(8)), high);
            for r in 0..R {
                let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * BLOCK_ELEMS).cast());
                let dd = _mm256_set1_ps(d * acts[r].scales.get_unchecked(b)[0]);
                lanes[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot_u8i8_avx2(q, a)), lanes[r]);
                mins[r] = m.mul_add(*acts[r].q81_sums.get_unchecked(b), mins[r]);
            }
        }
        core::array::from_fn(|r| hsum(lanes[r]) + mins[r])
    }

    crate::quant::toolkit::avx2_matmul_cols!();
}

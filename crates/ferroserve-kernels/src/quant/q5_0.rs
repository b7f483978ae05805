//! Q5_0: blocks of 32 weights, 22 bytes: f16 scale `d`, a little-endian u32 `qh` whose bit
//! `i` is the 5th bit of weight `i`, then 16 bytes whose low nibbles are the low 4 bits of
//! weights 0..16 and high nibbles those of weights 16..32; weight = (q − 16)·d, q in 0..32.
//!
//! llama.cpp's K-quant mixes store tensors whose rows are not a multiple of 256 (SmolLM2's
//! 576) in this format instead of Q4_K.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow};
use super::half::{read_f16, round_half_even};
use super::toolkit::{block_format, dequantize_scaled, fma_lanes, hsum8, write_signed_scale, zip_blocks};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 2 + 4 + BLOCK_ELEMS / 2;

block_format!("Q5_0", ggml_type: 6, avx512: avx2::matmul_cols);

/// The 5-bit code (0..32) of weight `i` of a block.
#[inline]
pub(crate) fn code(blk: &[u8], i: usize) -> u8 {
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let low = if i < 16 {
        blk[6 + i] & 0x0f
    } else {
        blk[6 + i - 16] >> 4
    };
    low | ((qh >> i) as u8 & 1) << 4
}

/// Packs 32 codes (0..32) into `qh` and the nibbles of a block (bytes 2..22).
pub(crate) fn pack_codes(codes: &[u8; BLOCK_ELEMS], blk: &mut [u8]) {
    let mut qh = 0u32;
    for (i, &q) in codes.iter().enumerate() {
        qh |= ((q >> 4) as u32 & 1) << i;
    }
    blk[2..6].copy_from_slice(&qh.to_le_bytes());
    for i in 0..16 {
        blk[6 + i] = (codes[i] & 0x0f) | ((codes[i + 16] & 0x0f) << 4);
    }
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    dequantize_scaled(bytes, out, BLOCK_BYTES, |blk, i| code(blk, i) as i32 - 16);
}

/// Round to nearest with ggml's choice of scale: the largest-magnitude weight maps to −16,
/// the one code with no positive twin.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let inv = write_signed_scale(xb, blk, -16.0);
        let codes: [u8; BLOCK_ELEMS] =
            std::array::from_fn(|i| (round_half_even(xb[i] * inv) + 16.0).clamp(0.0, 31.0) as u8);
        pack_codes(&codes, blk);
    }
}

/// The reference order, which every level reproduces bit for bit: llama.cpp's
/// `ggml_vec_dot_q5_0_q8_0` on x86 (AVX2). Per block, eight integer dots over groups of
/// four signed weights `q − 16` (groups 0–3 weights 0–15, 4–7 weights 16–31), each
/// accumulated into its own f32 lane as `fma(d·d_x, dot, lane)` in block order; the lanes
/// summed as llama.cpp's `hsum_float_8`.
fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    let nb = w_row.len() / BLOCK_BYTES;
    assert_rows_match(acts, nb);
    let mut lanes = [[0f32; 8]; R];
    for (b, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = read_f16(blk, 0);
        let w: [i32; BLOCK_ELEMS] = std::array::from_fn(|i| code(blk, i) as i32 - 16);
        for (r, a) in acts.iter().enumerate() {
            let aq = &a.qs[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            fma_lanes(&mut lanes[r], d * a.scales[b][0], &w, aq);
        }
    }
    core::array::from_fn(|r| hsum8(&lanes[r]))
}

/// Also the AVX-512 level's kernel: it already gives the reference bits, which is what the
/// level must give.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use super::{assert_rows_match, ActRow, BLOCK_BYTES, BLOCK_ELEMS};
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// A block's signed weights `q − 16` as 32 bytes: the nibbles, with 0xf0 or'ed in
    /// where the 5th bit is clear (as llama.cpp builds them).
    ///
    /// # Safety
    /// Reads the 22-byte block at `blk`; needs AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn weights(blk: *const u8) -> __m256i {
        let high = _mm256_andnot_si256(bytes_from_bits(blk.add(2)), _mm256_set1_epi8(0xf0u8 as i8));
        _mm256_or_si256(unpack_nibbles(blk.add(6)), high)
    }

    /// `dot_portable`'s order with eight lanes in one register per row (the sign trick
    /// and `vpmaddubsw` + `vpmaddwd` sum groups of four exactly; `hsum` is `hsum8`).
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nb);
        let w = w_row.as_ptr();
        let mut lanes = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: b < nb blocks of the row; the activation rows hold nb blocks (checked).
            let blk = w.add(b * BLOCK_BYTES);
            let d = _mm_cvtss_f32(load_f16(blk));
            let q = weights(blk);
            let q_abs = _mm256_sign_epi8(q, q);
            for r in 0..R {
                let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * BLOCK_ELEMS).cast());
                let dot = dot_u8i8_avx2(q_abs, _mm256_sign_epi8(a, q));
                let dd = _mm256_set1_ps(d * acts[r].scales.get_unchecked(b)[0]);
                lanes[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot), lanes[r]);
            }
        }
        core::array::from_fn(|r| hsum(lanes[r]))
    }

    crate::quant::toolkit::avx2_matmul_cols!();
}

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

use super::activations::ActRow;
use super::half::round_half_even;
use super::toolkit::{affine_dot_portable, block_format, dequantize_affine, write_affine_scale, zip_blocks};

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
    dequantize_affine(bytes, out, BLOCK_BYTES, code);
}

/// Round to nearest on the block's [min, max] range in 31 steps.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let (m, inv) = write_affine_scale(xb, blk, 31.0);
        let codes: [u8; BLOCK_ELEMS] =
            std::array::from_fn(|i| round_half_even((xb[i] - m) * inv).clamp(0.0, 31.0) as u8);
        super::q5_0::pack_codes(&codes, &mut blk[2..]);
    }
}

/// The reference order, which every level reproduces bit for bit: llama.cpp's
/// `ggml_vec_dot_q5_1_q8_1` on x86 (AVX2), Q4_1's order with 5-bit codes
/// ([`affine_dot_portable`]).
fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    affine_dot_portable(w_row, acts, BLOCK_BYTES, |blk| {
        std::array::from_fn(|i| code(blk, i) as i32)
    })
}

/// Also the AVX-512 level's kernel: it already gives the reference bits, which is what the
/// level must give.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// The block's 32 codes (0..32): the nibbles with the 5th bits of `qh` or'ed in.
    ///
    /// # Safety
    /// Reads the 24-byte block at `blk`; needs AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn codes(blk: *const u8) -> __m256i {
        let high = _mm256_and_si256(bytes_from_bits(blk.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(unpack_nibbles(blk.add(8)), high)
    }

    crate::quant::toolkit::affine_blocks_avx2!();
}

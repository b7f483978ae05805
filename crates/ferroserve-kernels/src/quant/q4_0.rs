//! Q4_0: blocks of 32 weights, 18 bytes: f16 scale `d`, then 16 bytes whose low nibbles
//! are weights 0..16 and high nibbles weights 16..32; weight = (q − 8)·d.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow, Q8Activations};
use super::half::{read_f16, round_half_even};
use super::toolkit::{block_format, dequantize_scaled, nibble, signed_dot_portable, write_signed_scale, zip_blocks};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 2 + BLOCK_ELEMS / 2;

block_format!("Q4_0", ggml_type: 2, avx512: avx512::matmul_cols);

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    dequantize_scaled(bytes, out, BLOCK_BYTES, |blk, i| nibble(&blk[2..], i) as i32 - 8);
}

/// Round to nearest with ggml's choice of scale: the largest-magnitude weight maps to −8,
/// the one code with no positive twin.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let inv = write_signed_scale(xb, blk, -8.0);
        let code = |v: f32| (round_half_even(v * inv) + 8.0).clamp(0.0, 15.0) as u8;
        for i in 0..16 {
            blk[2 + i] = code(xb[i]) | (code(xb[i + 16]) << 4);
        }
    }
}

fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    signed_dot_portable(
        w_row,
        acts,
        BLOCK_BYTES,
        |blk, w: &mut [i32; BLOCK_ELEMS]| {
            for (i, wi) in w.iter_mut().enumerate() {
                *wi = nibble(&blk[2..], i) as i32 - 8;
            }
            read_f16(blk, 0)
        },
    )
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// Codes minus 8: signed weights in −8..=7.
    ///
    /// # Safety
    /// Reads the 18-byte block at `blk`; needs AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn weights(blk: *const u8) -> __m256i {
        _mm256_sub_epi8(unpack_nibbles(blk.add(2)), _mm256_set1_epi8(8))
    }

    crate::quant::toolkit::signed_blocks_avx2!();
}

/// Groups of four blocks (see `matmul::x86::avx512`), as `d·q + m` with m = −8d.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{assert_rows_match, ActRow, Q8Activations, BLOCK_BYTES};
    use crate::quant::toolkit::x86::avx512::{
        byte_mask, group_kernel, nibble_words, unpack_nibble_pair, Group, Spread,
        NIBBLE_PAIR_SPREAD,
    };
    use crate::quant::toolkit::OutMatrix;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// A block is 9 words: d, then the nibbles in words 1..9.
    static NIBBLES: [u16; 32] = nibble_words(1, 10);
    static SPREAD: Spread = NIBBLE_PAIR_SPREAD;
    /// Words 0 and 9 of each pair (indices ≥ 32 read the second pair), each twice.
    static SCALE_WORDS: [u16; 32] = [
        0, 0, 9, 9, 32, 32, 41, 41, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0,
    ];

    /// Blocks `p[0..n]` (n ≤ 4) of `readable` bytes at `p`: plain 64-byte loads where they
    /// stay inside, else masked loads that read no byte past the blocks and zero the rest.
    ///
    /// # Safety
    /// `readable` bytes from `p` must be readable (at least the `n` blocks); needs AVX-512.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn load_group<const TAIL: bool>(p: *const u8, n: usize, readable: usize) -> Group {
        let pair = 2 * BLOCK_BYTES;
        let (raw0, raw1) = if !TAIL && readable >= pair + 64 {
            (
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(pair).cast()),
            )
        } else {
            let bytes = if TAIL {
                n * BLOCK_BYTES
            } else {
                4 * BLOCK_BYTES
            };
            let raw0 = _mm512_maskz_loadu_epi8(byte_mask(bytes.min(pair)), p.cast());
            (
                raw0,
                _mm512_maskz_loadu_epi8(byte_mask(bytes.saturating_sub(pair)), p.add(pair).cast()),
            )
        };
        // Each block's d, twice, for [d, −8d].
        let idx = _mm512_loadu_si512(SCALE_WORDS.as_ptr().cast());
        let dd = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi16(
            raw0, idx, raw1,
        )));
        Group {
            u: [
                unpack_nibble_pair(raw0, &NIBBLES),
                unpack_nibble_pair(raw1, &NIBBLES),
            ],
            w: _mm256_mul_ps(
                dd,
                _mm256_setr_ps(1.0, -8.0, 1.0, -8.0, 1.0, -8.0, 1.0, -8.0),
            ),
        }
    }

    group_kernel!(BLOCK_BYTES);
}

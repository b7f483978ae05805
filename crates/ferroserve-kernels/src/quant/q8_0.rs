//! Q8_0: blocks of 32 weights, 34 bytes: f16 scale `d`, then 32 signed bytes `q`;
//! weight = q·d.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow, Q8Activations};
use super::half::{read_f16, round_half_even, write_f16};
use super::toolkit::{block_format, dequantize_scaled, signed_dot_portable, zip_blocks};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 2 + BLOCK_ELEMS;

block_format!("Q8_0", ggml_type: 8, avx512: avx512::matmul_cols);

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    dequantize_scaled(bytes, out, BLOCK_BYTES, |blk, i| blk[2 + i] as i8 as i32);
}

/// Round to nearest with `d = max|x| / 127`.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        write_f16(blk, 0, amax / 127.0);
        let d = read_f16(blk, 0); // quantise against the stored (rounded) scale
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in blk[2..].iter_mut().zip(xb) {
            *q = round_half_even(v * inv).clamp(-127.0, 127.0) as i8 as u8;
        }
    }
}

fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    signed_dot_portable(
        w_row,
        acts,
        BLOCK_BYTES,
        |blk, w: &mut [i32; BLOCK_ELEMS]| {
            for (wi, &q) in w.iter_mut().zip(&blk[2..]) {
                *wi = q as i8 as i32;
            }
            read_f16(blk, 0)
        },
    )
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// The block's 32 signed bytes, as stored.
    ///
    /// # Safety
    /// Reads the 34-byte block at `blk`; needs AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn weights(blk: *const u8) -> __m256i {
        _mm256_loadu_si256(blk.add(2).cast())
    }

    crate::quant::toolkit::signed_blocks_avx2!();
}

/// Groups of four blocks (see `matmul::x86::avx512`), as `d·u + m` with u = q + 128
/// (unsigned for `vpdpbusd`) and m = −128d.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{assert_rows_match, ActRow, Q8Activations, BLOCK_BYTES};
    use crate::quant::toolkit::x86::avx512::{group_kernel, Group, Spread};
    use crate::quant::toolkit::OutMatrix;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Code registers hold whole blocks: lanes 0..8 the first, 8..16 the second.
    static SPREAD: Spread = [
        [0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2],
        [4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6],
    ];

    /// Blocks `p[0..n]` (n ≤ 4); missing blocks get code 128 and scale 0.
    ///
    /// # Safety
    /// `readable` bytes from `p` must be readable (at least the `n` blocks); needs AVX-512.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn load_group<const TAIL: bool>(p: *const u8, n: usize, _readable: usize) -> Group {
        let n = if TAIL { n } else { 4 };
        let mut q = [_mm256_setzero_si256(); 4];
        let mut d = 0u64;
        for (i, qi) in q.iter_mut().enumerate().take(n) {
            let blk = p.add(i * BLOCK_BYTES);
            *qi = _mm256_loadu_si256(blk.add(2).cast());
            d |= (blk.cast::<u16>().read_unaligned() as u64) << (16 * i);
        }
        let flip = _mm512_set1_epi8(-128);
        let u0 = _mm512_xor_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(q[0]), q[1], 1),
            flip,
        );
        let u1 = _mm512_xor_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(q[2]), q[3], 1),
            flip,
        );
        let halves = _mm_cvtsi64_si128(d as i64);
        let dd = _mm256_cvtph_ps(_mm_unpacklo_epi16(halves, halves));
        Group {
            u: [u0, u1],
            w: _mm256_mul_ps(
                dd,
                _mm256_setr_ps(1.0, -128.0, 1.0, -128.0, 1.0, -128.0, 1.0, -128.0),
            ),
        }
    }

    group_kernel!(BLOCK_BYTES);
}

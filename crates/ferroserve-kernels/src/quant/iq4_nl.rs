//! IQ4_NL: blocks of 32 weights, 18 bytes, shaped as Q4_0: f16 scale `d`, then 16 bytes
//! whose low nibbles are weights 0..16 and high nibbles weights 16..32; the 4-bit code
//! indexes a fixed non-linear table, weight = d·[`VALUES`][q].
//!
//! llama.cpp's low-bit mixes (IQ4_XS, Q2_K, Q3_K) fall back to this format for tensors whose
//! rows are not a multiple of 256.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow};
use super::half::read_f16;
use super::toolkit::{block_format, dequantize_scaled, hsum8, nibble, write_signed_scale, zip_blocks};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 2 + BLOCK_ELEMS / 2;

block_format!("IQ4_NL", ggml_type: 20, avx512: avx2::matmul_cols);

/// ggml's `kvalues_iq4nl`.
pub const VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The table value (−127..=113) of weight `i` (0..32) of a block.
#[inline]
fn value(blk: &[u8], i: usize) -> i32 {
    VALUES[nibble(&blk[2..], i) as usize] as i32
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    dequantize_scaled(bytes, out, BLOCK_BYTES, value);
}

/// Nearest table entry with the largest-magnitude weight mapped to −127 (the table's
/// widest end); it does not search scales as llama.cpp's quantiser does.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let inv = write_signed_scale(xb, blk, -127.0);
        let code = |v: f32| {
            let t = v * inv;
            (0..16u8)
                .min_by(|&a, &b| {
                    let da = (VALUES[a as usize] as f32 - t).abs();
                    let db = (VALUES[b as usize] as f32 - t).abs();
                    da.total_cmp(&db)
                })
                .unwrap_or(0)
        };
        for i in 0..16 {
            blk[2 + i] = code(xb[i]) | (code(xb[i + 16]) << 4);
        }
    }
}

/// The reference order, which every level reproduces bit for bit: llama.cpp's
/// `ggml_vec_dot_iq4_nl_q8_0` on x86 (AVX2). Blocks go in pairs: the even block of a pair
/// into eight lanes, the odd one into eight others, each lane `fma(d_x·d, Σ₄ v·a, lane)`
/// over groups of four weights; the two sets added lane by lane and summed as `hsum8`; a
/// last unpaired block then adds `fma(d_x·d, Σ v·a, Σ)`.
fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    let nb = w_row.len() / BLOCK_BYTES;
    assert_rows_match(acts, nb);
    let mut lanes = [[[0f32; 8]; 2]; R];
    let paired = nb - nb % 2;
    let block_dots = |b: usize, a: &ActRow<'_>| -> (f32, [i32; 8]) {
        let blk = &w_row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
        let aq = &a.qs[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
        let dots = std::array::from_fn(|g| {
            (4 * g..4 * g + 4)
                .map(|i| value(blk, i) * aq[i] as i32)
                .sum()
        });
        (a.scales[b][0] * read_f16(blk, 0), dots)
    };
    for b in 0..paired {
        for (r, a) in acts.iter().enumerate() {
            let (dd, dots) = block_dots(b, a);
            for (lane, dot) in lanes[r][b % 2].iter_mut().zip(dots) {
                *lane = dd.mul_add(dot as f32, *lane);
            }
        }
    }
    core::array::from_fn(|r| {
        let [even, odd] = lanes[r];
        let mut sum = hsum8(&std::array::from_fn(|g| even[g] + odd[g]));
        if paired < nb {
            let (dd, dots) = block_dots(paired, &acts[r]);
            sum = dd.mul_add(dots.iter().sum::<i32>() as f32, sum);
        }
        sum
    })
}

/// Also the AVX-512 level's kernel: it already gives the reference bits, which is what the
/// level must give.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use super::{assert_rows_match, ActRow, BLOCK_BYTES, BLOCK_ELEMS, VALUES};
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// The block at `blk`: its weights' table values as 32 signed bytes, and `d`.
    ///
    /// # Safety
    /// Reads the 18-byte block at `blk`; needs AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block(blk: *const u8, table: __m256i) -> (__m256i, f32) {
        let v = _mm256_shuffle_epi8(table, unpack_nibbles(blk.add(2)));
        (v, _mm_cvtss_f32(load_f16(blk)))
    }

    /// Σ₄ v·a per lane: the sign trick, then `vpmaddubsw` (|v|, |a| ≤ 127: pairs stay
    /// below 2¹⁵) and `vpmaddwd`, exact.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dots(v: __m256i, a: __m256i) -> __m256i {
        dot_u8i8_avx2(_mm256_sign_epi8(v, v), _mm256_sign_epi8(a, v))
    }

    /// `dot_portable`'s order: even and odd blocks in two registers of eight lanes per row.
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nb);
        let w = w_row.as_ptr();
        let table128 = _mm_loadu_si128(VALUES.as_ptr().cast());
        let table = _mm256_set_m128i(table128, table128);
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let act = |r: usize, b: usize| {
            _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * BLOCK_ELEMS).cast())
        };
        let mut b = 0;
        // SAFETY (loads): b + 1 < nb blocks of the row; the activation rows hold nb blocks.
        while b + 1 < nb {
            let (v0, d0) = block(w.add(b * BLOCK_BYTES), table);
            let (v1, d1) = block(w.add((b + 1) * BLOCK_BYTES), table);
            for r in 0..R {
                let dd0 = _mm256_set1_ps(acts[r].scales.get_unchecked(b)[0] * d0);
                let dd1 = _mm256_set1_ps(acts[r].scales.get_unchecked(b + 1)[0] * d1);
                even[r] = _mm256_fmadd_ps(dd0, _mm256_cvtepi32_ps(dots(v0, act(r, b))), even[r]);
                odd[r] = _mm256_fmadd_ps(dd1, _mm256_cvtepi32_ps(dots(v1, act(r, b + 1))), odd[r]);
            }
            b += 2;
        }
        let mut out: [f32; R] = core::array::from_fn(|r| hsum(_mm256_add_ps(even[r], odd[r])));
        if b < nb {
            // SAFETY: block b < nb, as above.
            let (v, d) = block(w.add(b * BLOCK_BYTES), table);
            for r in 0..R {
                let lanes = dots(v, act(r, b));
                let s = _mm_add_epi32(
                    _mm256_castsi256_si128(lanes),
                    _mm256_extracti128_si256(lanes, 1),
                );
                let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
                let isum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
                out[r] = (acts[r].scales.get_unchecked(b)[0] * d).mul_add(isum as f32, out[r]);
            }
        }
        out
    }

    crate::quant::toolkit::avx2_matmul_cols!();
}

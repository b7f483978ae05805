//! Q6_K: super-blocks of 256 weights, 210 bytes:
//! - `ql`, 128 bytes: low 4 bits of the codes,
//! - `qh`, 64 bytes: high 2 bits of the codes,
//! - 16 signed 8-bit scales, one per 16 weights,
//! - f16 `d`.
//!
//! Each half `h` (weights `128h..128h + 128`) uses `ql[64h..64h + 64]` and
//! `qh[32h..32h + 32]`. Weight `128h + 32g + l` (group `g` in 0..4, `l` in 0..32) takes its
//! low bits from `ql[64h + l + 32·(g & 1)]` (low nibble for g < 2, high nibble otherwise)
//! and its high bits from bits `2g..2g + 2` of `qh[32h + l]`; its scale is
//! `scales[8h + 2g + l / 16]`. weight = d·scale·(q − 32), q in 0..64.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow};
use super::half::{read_f16, round_half_even, write_f16};
use super::toolkit::{block_format, signed_dot_portable, zip_blocks};

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 128 + 64 + 16 + 2;

block_format!("Q6_K", ggml_type: 14, avx512: avx2::matmul_cols);
const QH: usize = 128;
const SCALES: usize = 192;
pub(crate) const D: usize = 208;

/// The signed weight code (q − 32, in −32..32) of weight `i` (0..256) of a super-block.
#[inline]
pub(crate) fn code(blk: &[u8], i: usize) -> i32 {
    let (h, g, l) = (i / 128, (i % 128) / 32, i % 32);
    let low_byte = blk[64 * h + l + 32 * (g & 1)];
    let low = if g < 2 {
        low_byte & 0x0f
    } else {
        low_byte >> 4
    };
    let high = (blk[QH + 32 * h + l] >> (2 * g)) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Scale of weight `i`: `scales[i / 16]` (16-weight groups are contiguous in weight order).
#[inline]
pub(crate) fn scale(blk: &[u8], i: usize) -> i32 {
    blk[SCALES + i / 16] as i8 as i32
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in zip_blocks(bytes, BLOCK_BYTES, out, BLOCK_ELEMS) {
        let d = read_f16(blk, D);
        for (i, v) in y.iter_mut().enumerate() {
            *v = d * scale(blk, i) as f32 * code(blk, i) as f32;
        }
    }
}

/// Round to nearest: each 16-weight group gets scale max|x|/31 (so codes stay in −31..=31,
/// leaving −32 unused like a symmetric quantiser); the scales are quantised to i8 against
/// `d = max scale / 127`.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let group_scales: [f32; 16] = std::array::from_fn(|g| {
            xb[16 * g..16 * g + 16]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()))
                / 31.0
        });
        let max_scale = group_scales.iter().fold(0f32, |a, &v| a.max(v));
        write_f16(blk, D, max_scale / 127.0);
        let d = read_f16(blk, D);
        for (g, &s) in group_scales.iter().enumerate() {
            let sc = if d > 0.0 {
                round_half_even(s / d).clamp(-128.0, 127.0) as i8
            } else {
                0
            };
            blk[SCALES + g] = sc as u8;
        }
        blk[..SCALES].fill(0);
        for (i, &v) in xb.iter().enumerate() {
            let unit = d * scale(blk, i) as f32;
            let q = if unit != 0.0 {
                round_half_even(v / unit).clamp(-32.0, 31.0) as i32
            } else {
                0
            };
            let q = (q + 32) as u8;
            let (h, g, l) = (i / 128, (i % 128) / 32, i % 32);
            let low = &mut blk[64 * h + l + 32 * (g & 1)];
            *low |= if g < 2 { q & 0x0f } else { (q & 0x0f) << 4 };
            blk[QH + 32 * h + l] |= (q >> 4) << (2 * g);
        }
    }
}

fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    signed_dot_portable(
        w_row,
        acts,
        BLOCK_BYTES,
        |blk, w: &mut [i32; BLOCK_ELEMS]| {
            // Codes pre-multiplied by their integer scale: the sum stays exact in i32.
            for (i, wi) in w.iter_mut().enumerate() {
                *wi = code(blk, i) * scale(blk, i);
            }
            read_f16(blk, D)
        },
    )
}

#[cfg(target_arch = "x86_64")]
/// Also the AVX-512 level's kernel: `vpmaddubsw` then `vpmaddwd` by the i16 scales applies
/// the per-16 scales for free, where a VNNI dot would need an extra multiply.
pub(crate) mod avx2 {
    use super::{assert_rows_match, ActRow, BLOCK_BYTES, D, QH, SCALES};
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// 32 weights (activation block `b`) with signed codes `w` and the i16 scales
    /// `sc16` (first 16 weights' scale in the low half, the next 16's in the high).
    ///
    /// # Safety
    /// Activation block `b` must exist in every row; needs AVX2/FMA/F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn group<const R: usize>(
        w: __m256i,
        sc16: __m256i,
        d: __m128,
        b: usize,
        acts: &[ActRow<'_>; R],
        acc: &mut [__m256; R],
    ) {
        let w_abs = _mm256_sign_epi8(w, w);
        for r in 0..R {
            let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * 32).cast());
            // |w| ≤ 32, |a| ≤ 127: pairs stay below 2¹⁵; then ×scale (|sc| ≤ 128) into i32.
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(a, w)), sc16);
            let scale = _mm_mul_ps(d, load_act_scales(acts[r].scales.as_ptr().add(b)));
            acc[r] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dot),
                _mm256_broadcastss_ps(scale),
                acc[r],
            );
        }
    }

    /// The i16 scales of 16-weight groups `first` and `first + 1` as `[lo ×8, hi ×8]`.
    ///
    /// # Safety
    /// `blk` must be a whole 210-byte block.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales16(blk: *const u8, first: usize) -> __m256i {
        let lo = _mm_set1_epi16(*blk.add(SCALES + first).cast::<i8>() as i16);
        let hi = _mm_set1_epi16(*blk.add(SCALES + first + 1).cast::<i8>() as i16);
        _mm256_set_m128i(hi, lo)
    }

    /// Groups 0 and 2 of each half accumulate in `even`, 1 and 3 in `odd`.
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nsb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nsb * 8);
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let low4 = _mm256_set1_epi8(0x0f);
        let high2 = _mm256_set1_epi8(0x30);
        let bias = _mm256_set1_epi8(32);
        for (s, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
            let p = blk.as_ptr();
            // SAFETY: all offsets below stay inside the 210-byte block; activation
            // blocks 8s..8s + 8 exist (checked above).
            let d = load_f16(p.add(D));
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(p.add(64 * h).cast());
                let ql1 = _mm256_loadu_si256(p.add(64 * h + 32).cast());
                let qh = _mm256_loadu_si256(p.add(QH + 32 * h).cast());
                let g0 = _mm256_or_si256(
                    _mm256_and_si256(ql0, low4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 4), high2),
                );
                let g1 = _mm256_or_si256(
                    _mm256_and_si256(ql1, low4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 2), high2),
                );
                let g2 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                    _mm256_and_si256(qh, high2),
                );
                let g3 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), high2),
                );
                let b = 8 * s + 4 * h;
                group(
                    _mm256_sub_epi8(g0, bias),
                    scales16(p, 8 * h),
                    d,
                    b,
                    acts,
                    &mut even,
                );
                group(
                    _mm256_sub_epi8(g1, bias),
                    scales16(p, 8 * h + 2),
                    d,
                    b + 1,
                    acts,
                    &mut odd,
                );
                group(
                    _mm256_sub_epi8(g2, bias),
                    scales16(p, 8 * h + 4),
                    d,
                    b + 2,
                    acts,
                    &mut even,
                );
                group(
                    _mm256_sub_epi8(g3, bias),
                    scales16(p, 8 * h + 6),
                    d,
                    b + 3,
                    acts,
                    &mut odd,
                );
            }
        }
        core::array::from_fn(|r| hsum(_mm256_add_ps(even[r], odd[r])))
    }

    crate::quant::toolkit::avx2_matmul_cols!();
}

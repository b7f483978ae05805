//! Q4_1: blocks of 32 weights, 20 bytes: f16 scale `d`, f16 minimum `m`, then 16 bytes
//! whose low nibbles are weights 0..16 and high nibbles weights 16..32; weight = q·d + m.
//!
//! Against 8-bit activations a block's dot product is `d·d_x·Σ q·a + m·(d_x·Σ a)`: the
//! integer part uses the codes unsigned as stored, the second term the activation block's
//! precomputed `d_x·Σa`.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::matmul::OutMatrix;
use super::q8_0::{assert_rows_match, ActRow, Q8Activations};
use super::{read_f16, round_half_even, write_f16};
use std::ops::Range;

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 4 + BLOCK_ELEMS / 2;

#[inline]
fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    }
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK_ELEMS))
    {
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        for (i, v) in y.iter_mut().enumerate() {
            *v = nibble(&blk[4..], i) as f32 * d + m;
        }
    }
}

/// Round to nearest on the block's [min, max] range in 15 steps.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in x
        .chunks_exact(BLOCK_ELEMS)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        let min = xb.iter().fold(f32::INFINITY, |a, &v| a.min(v));
        let max = xb.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        write_f16(blk, 0, (max - min) / 15.0);
        write_f16(blk, 2, min);
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        let code = |v: f32| round_half_even((v - m) * inv).clamp(0.0, 15.0) as u8;
        for i in 0..16 {
            blk[4 + i] = code(xb[i]) | (code(xb[i + 16]) << 4);
        }
    }
}

fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    let nb = w_row.len() / BLOCK_BYTES;
    assert_rows_match(acts, nb);
    let mut acc = [0f32; R];
    for (b, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        let mut q = [0i32; BLOCK_ELEMS];
        for (i, qi) in q.iter_mut().enumerate() {
            *qi = nibble(&blk[4..], i) as i32;
        }
        for (r, a) in acts.iter().enumerate() {
            let aq = &a.qs[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let isum: i32 = q.iter().zip(aq).map(|(&qi, &x)| qi * x as i32).sum();
            let [dx, dx_sum] = a.scales[b];
            acc[r] += d * dx * isum as f32 + m * dx_sum;
        }
    }
    acc
}

pub(crate) fn matmul_cols_portable(
    w: &[u8],
    row_bytes: usize,
    acts: &Q8Activations,
    cols: Range<usize>,
    out: &OutMatrix,
) {
    super::matmul::drive_columns!(4, dot_portable, [], w, row_bytes, acts, cols, out);
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use super::{assert_rows_match, ActRow, Q8Activations, BLOCK_BYTES, BLOCK_ELEMS};
    use crate::quant::matmul::x86::*;
    use crate::quant::matmul::OutMatrix;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Per row: the lanes of Σq·a scaled by d·d_x, and in lane 1 of `mins` the
    /// running Σ m·(d_x·Σa) (one multiply of `[d, m]` by `[d_x, d_x·Σa]` gives both).
    struct Acc<const R: usize> {
        dots: [__m256; R],
        mins: [__m128; R],
    }

    ///
    /// # Safety
    /// Reads the block at `blk` and activation block `b` of every row; needs AVX2/FMA/F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const R: usize>(
        blk: *const u8,
        b: usize,
        acts: &[ActRow<'_>; R],
        acc: &mut Acc<R>,
    ) {
        let dm = load_f16x2(blk);
        let q = unpack_nibbles(blk.add(4));
        for r in 0..R {
            let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * BLOCK_ELEMS).cast());
            let dot = dot_u8i8_avx2(q, a);
            let scales = _mm_mul_ps(dm, load_act_scales(acts[r].scales.as_ptr().add(b)));
            acc.dots[r] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dot),
                _mm256_broadcastss_ps(scales),
                acc.dots[r],
            );
            acc.mins[r] = _mm_add_ps(acc.mins[r], scales);
        }
    }

    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nb);
        let w = w_row.as_ptr();
        let zero = || Acc {
            dots: [_mm256_setzero_ps(); R],
            mins: [_mm_setzero_ps(); R],
        };
        let (mut even, mut odd) = (zero(), zero());
        let mut b = 0;
        // SAFETY (pointer reads in `block`): b < nb, and the rows were checked above.
        while b + 2 <= nb {
            block(w.add(b * BLOCK_BYTES), b, acts, &mut even);
            block(w.add((b + 1) * BLOCK_BYTES), b + 1, acts, &mut odd);
            b += 2;
        }
        if b < nb {
            block(w.add(b * BLOCK_BYTES), b, acts, &mut even);
        }
        core::array::from_fn(|r| {
            let mins = _mm_add_ps(even.mins[r], odd.mins[r]);
            hsum(_mm256_add_ps(even.dots[r], odd.dots[r])) + _mm_cvtss_f32(_mm_movehdup_ps(mins))
        })
    }

    /// # Safety
    /// The CPU must support this module's features; the caller owns columns `cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn matmul_cols(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Activations,
        cols: Range<usize>,
        out: &OutMatrix,
    ) {
        crate::quant::matmul::drive_columns!(TILE, dot, [], w, row_bytes, acts, cols, out);
    }
}

/// Groups of four blocks (see `matmul::x86::avx512`); Q4_1 is already `d·q + m`.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{assert_rows_match, ActRow, Q8Activations, BLOCK_BYTES};
    use crate::quant::matmul::x86::avx512::{
        byte_mask, group_kernel, nibble_words, unpack_nibble_pair, Group, Spread,
        NIBBLE_PAIR_SPREAD,
    };
    use crate::quant::matmul::OutMatrix;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// A block is 10 words: d, m, then the nibbles in words 2..10.
    static NIBBLES: [u16; 32] = nibble_words(2, 12);
    static SPREAD: Spread = NIBBLE_PAIR_SPREAD;

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
        // [d, m] of each block is dword 0 or 5 of its pair.
        let dm = _mm512_permutex2var_epi32(
            raw0,
            _mm512_setr_epi32(0, 5, 16, 21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            raw1,
        );
        Group {
            u: [
                unpack_nibble_pair(raw0, &NIBBLES),
                unpack_nibble_pair(raw1, &NIBBLES),
            ],
            w: _mm256_cvtph_ps(_mm512_castsi512_si128(dm)),
        }
    }

    group_kernel!(BLOCK_BYTES);
}

//! Q4_K: super-blocks of 256 weights, 144 bytes:
//! - f16 `d` and f16 `dmin` (super-block scales for the sub-block scales and minimums),
//! - 12 bytes packing eight 6-bit scales `sc[j]` and eight 6-bit minimums `m[j]`, one pair
//!   per 32-weight sub-block `j` (see [`scale_min`]),
//! - 128 bytes of nibbles: byte `32c + l` holds weight `64c + l` in its low nibble and
//!   weight `64c + 32 + l` in its high nibble (so sub-block `2c` is the low nibbles of
//!   32 consecutive bytes and sub-block `2c + 1` their high nibbles).
//!
//! weight = d·sc[j]·q − dmin·m[j].
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow, Q8Activations};
use super::half::{read_f16, round_half_even, write_f16};
use super::toolkit::{block_format, zip_blocks};

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 4 + 12 + BLOCK_ELEMS / 2;

block_format!("Q4_K", ggml_type: 12, avx512: avx512::matmul_cols);
const SUB: usize = 32;

/// Scale and minimum of sub-block `j` (0..8) from the 12 packed bytes: sub-blocks 0..4
/// keep theirs in the low 6 bits of bytes `j` and `j + 4`; sub-blocks 4..8 put their low
/// 4 bits in byte `j + 4` (scale low nibble, minimum high nibble) and their top 2 bits in
/// the spare top bits of bytes `j − 4` and `j`.
#[inline]
pub fn scale_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`scale_min`] for eight 6-bit pairs.
pub(crate) fn pack_scale_min(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut p = [0u8; 12];
    for j in 0..4 {
        p[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        p[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        p[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    p
}

/// The code of weight `i` (0..256) of a super-block's 128 nibble bytes.
#[inline]
pub(crate) fn nibble(qs: &[u8], i: usize) -> u8 {
    let (c, l) = (i / 64, i % 64);
    if l < 32 {
        qs[32 * c + l] & 0x0f
    } else {
        qs[32 * c + l - 32] >> 4
    }
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in zip_blocks(bytes, BLOCK_BYTES, out, BLOCK_ELEMS) {
        let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
        for (j, ys) in y.chunks_exact_mut(SUB).enumerate() {
            let (sc, m) = scale_min(&blk[4..16], j);
            let (scale, min) = (d * sc as f32, dmin * m as f32);
            for (l, v) in ys.iter_mut().enumerate() {
                *v = scale * nibble(&blk[16..], SUB * j + l) as f32 - min;
            }
        }
    }
}

/// Round to nearest: each sub-block spans [min(0, lo), hi] in 15 steps (see
/// [`quantize_super_block`]).
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        blk[16..].fill(0);
        quantize_super_block(xb, 15, blk, |blk, i, q| {
            let (c, l) = (i / 64, i % 64);
            if l < 32 {
                blk[16 + 32 * c + l] |= q;
            } else {
                blk[16 + 32 * c + l - 32] |= q << 4;
            }
        });
    }
}

/// The round-to-nearest quantiser of the affine K-quant super-blocks (Q4_K, Q5_K): each
/// 32-weight sub-block spans [min(0, lo), hi] in `top` steps; the sub-block scales and
/// (negated) minimums are quantised to 6 bits against `d`, `dmin` (written with them to
/// `blk[0..16]`), and each weight's code `q` in `0..=top`, rounded against its sub-block's
/// quantised pair, goes to `put(blk, i, q)`, which ORs it into the format's code bytes.
pub(crate) fn quantize_super_block(xb: &[f32], top: u8, blk: &mut [u8], mut put: impl FnMut(&mut [u8], usize, u8)) {
    let top_f = top as f32;
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, xs) in xb.chunks_exact(SUB).enumerate() {
        let lo = xs.iter().fold(0f32, |a, &v| a.min(v));
        let hi = xs.iter().fold(lo, |a, &v| a.max(v));
        scales[j] = (hi - lo) / top_f;
        mins[j] = -lo;
    }
    let max_scale = scales.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = mins.iter().fold(0f32, |a, &v| a.max(v));
    write_f16(blk, 0, max_scale / 63.0);
    write_f16(blk, 2, max_min / 63.0);
    let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
    let six_bits = |v: f32, unit: f32| {
        if unit > 0.0 {
            round_half_even(v / unit).clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let sc: [u8; 8] = std::array::from_fn(|j| six_bits(scales[j], d));
    let m: [u8; 8] = std::array::from_fn(|j| six_bits(mins[j], dmin));
    blk[4..16].copy_from_slice(&pack_scale_min(&sc, &m));
    for (i, &v) in xb.iter().enumerate() {
        let j = i / SUB;
        let (scale, min) = (d * sc[j] as f32, dmin * m[j] as f32);
        let q = if scale > 0.0 {
            round_half_even((v + min) / scale).clamp(0.0, top_f) as u8
        } else {
            0
        };
        put(blk, i, q);
    }
}

/// The super-block's eight `[d·sc[j], dmin·m[j]]`, the weight half of each sub-block's
/// scale pair (multiplied by the activation block's `[d_x, d_x·Σa]`).
#[inline]
fn sub_scales(blk: &[u8]) -> [[f32; 2]; 8] {
    let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
    std::array::from_fn(|j| {
        let (sc, m) = scale_min(&blk[4..16], j);
        [d * sc as f32, dmin * m as f32]
    })
}

fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    let nsb = w_row.len() / BLOCK_BYTES;
    assert_rows_match(acts, nsb * 8);
    let mut acc = [0f32; R];
    for (s, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
        let subs = sub_scales(blk);
        let mut q = [0i32; BLOCK_ELEMS];
        for (i, qi) in q.iter_mut().enumerate() {
            *qi = nibble(&blk[16..], i) as i32;
        }
        for (r, a) in acts.iter().enumerate() {
            for (j, qj) in q.chunks_exact(SUB).enumerate() {
                let b = 8 * s + j;
                let aq = &a.qs[b * SUB..(b + 1) * SUB];
                let isum: i32 = qj.iter().zip(aq).map(|(&qi, &x)| qi * x as i32).sum();
                let [dx, dx_sum] = a.scales[b];
                acc[r] += subs[j][0] * dx * isum as f32 - subs[j][1] * dx_sum;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use super::{assert_rows_match, sub_scales, ActRow, BLOCK_BYTES, SUB};
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// As Q4_1: lanes of Σq·a scaled by d·sc·d_x, and the minimum terms in lane 1.
    struct Acc<const R: usize> {
        dots: [__m256; R],
        mins: [__m128; R],
    }

    /// Sub-block `b` (activation block index) with codes `q` and weight scales `ws`.
    ///
    /// # Safety
    /// Activation block `b` must exist in every row; needs AVX2/FMA/F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub_block<const R: usize>(
        q: __m256i,
        ws: __m128,
        b: usize,
        acts: &[ActRow<'_>; R],
        acc: &mut Acc<R>,
    ) {
        for r in 0..R {
            let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * SUB).cast());
            let dot = dot_u8i8_avx2(q, a);
            let scales = _mm_mul_ps(ws, load_act_scales(acts[r].scales.as_ptr().add(b)));
            acc.dots[r] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dot),
                _mm256_broadcastss_ps(scales),
                acc.dots[r],
            );
            acc.mins[r] = _mm_add_ps(acc.mins[r], scales);
        }
    }

    /// Low-nibble sub-blocks accumulate in `even`, high-nibble ones in `odd`.
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
        let nsb = w_row.len() / BLOCK_BYTES;
        assert_rows_match(acts, nsb * 8);
        let zero = || Acc {
            dots: [_mm256_setzero_ps(); R],
            mins: [_mm_setzero_ps(); R],
        };
        let (mut even, mut odd) = (zero(), zero());
        let mask = _mm256_set1_epi8(0x0f);
        for (s, blk) in w_row.chunks_exact(BLOCK_BYTES).enumerate() {
            let subs = sub_scales(blk);
            for c in 0..4 {
                // SAFETY: bytes 16 + 32c .. 48 + 32c lie inside the 144-byte block;
                // activation block 8s + 2c + 1 < 8·nsb (checked above).
                let raw = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c).cast());
                let lo = _mm256_and_si256(raw, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                let ws_lo = load_act_scales(&subs[2 * c]);
                let ws_hi = load_act_scales(&subs[2 * c + 1]);
                sub_block(lo, ws_lo, 8 * s + 2 * c, acts, &mut even);
                sub_block(hi, ws_hi, 8 * s + 2 * c + 1, acts, &mut odd);
            }
        }
        core::array::from_fn(|r| {
            let mins = _mm_add_ps(even.mins[r], odd.mins[r]);
            hsum(_mm256_add_ps(even.dots[r], odd.dots[r])) - _mm_cvtss_f32(_mm_movehdup_ps(mins))
        })
    }

    crate::quant::toolkit::avx2_matmul_cols!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_matches_ggml_bit_layout() {
        // Hand-decoded: j = 0 → (0x41 & 63, 0x85 & 63) = (1, 5);
        // j = 4 → (0x9A & 15 | (0x41 >> 6) << 4, 0x9A >> 4 | (0x85 >> 6) << 4) = (26, 41).
        let packed = [
            0x41, 0x02, 0x03, 0x04, 0x85, 0x06, 0x07, 0x08, 0x9A, 0xBC, 0xDE, 0xF1,
        ];
        assert_eq!(scale_min(&packed, 0), (1, 5));
        assert_eq!(scale_min(&packed, 4), (26, 41));
        assert_eq!(scale_min(&packed, 7), ((0xF1 & 15), (0xF1 >> 4)));
        let sc = [1, 63, 17, 0, 26, 33, 48, 62];
        let m = [5, 0, 63, 31, 41, 7, 16, 59];
        let p = pack_scale_min(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min(&p, j), (sc[j], m[j]), "sub-block {j}");
        }
    }
}

/// Groups of four sub-blocks (see `matmul::x86::avx512`): the low and high nibbles of one
/// 32-byte run are sub-blocks 2c and 2c + 1, adjacent in the activations.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{assert_rows_match, sub_scales, ActRow, Q8Activations, BLOCK_BYTES};
    use crate::quant::toolkit::x86::avx512::{finish, group_step, Acc, Group, Spread};
    use crate::quant::toolkit::OutMatrix;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Code registers are `[lo (sub-block 2c), 16·hi (sub-block 2c + 1)]`.
    static SPREAD: Spread = [
        [0, 0, 0, 0, 0, 0, 0, 0, 18, 18, 18, 18, 18, 18, 18, 18],
        [4, 4, 4, 4, 4, 4, 4, 4, 22, 22, 22, 22, 22, 22, 22, 22],
    ];

    /// `C` consecutive weight rows from the start of `w` against `R` activation rows.
    ///
    /// # Safety
    /// Needs the AVX-512 level; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot<const C: usize, const R: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>; R],
    ) -> [[f32; R]; C] {
        let nsb = row_bytes / BLOCK_BYTES;
        assert!(w.len() >= C * row_bytes);
        assert_rows_match(acts, nsb * 8);
        let mut acc = Acc::<C, R>::zero();
        let mut groups = [Group::zero(); C];
        let keep = _mm512_inserti64x4(_mm512_set1_epi8(0x0f), _mm256_set1_epi8(0xf0u8 as i8), 1);
        for s in 0..nsb {
            let mut subs = [[[0f32; 2]; 8]; C];
            for (c, sc) in subs.iter_mut().enumerate() {
                // As `d·q + m` per sub-block: m = −dmin·m[j].
                let blk = &w[c * row_bytes + s * BLOCK_BYTES..][..BLOCK_BYTES];
                *sc = sub_scales(blk).map(|[scale, min]| [scale, -min]);
            }
            for half in 0..2 {
                for (c, g) in groups.iter_mut().enumerate() {
                    // SAFETY: bytes 16 + 64·half .. 80 + 64·half of the 144-byte block.
                    let blk = w
                        .as_ptr()
                        .add(c * row_bytes + s * BLOCK_BYTES + 16 + 64 * half);
                    let run = |i: usize| {
                        let raw = _mm256_loadu_si256(blk.add(32 * i).cast());
                        _mm512_and_si512(
                            _mm512_inserti64x4(_mm512_castsi256_si512(raw), raw, 1),
                            keep,
                        )
                    };
                    *g = Group {
                        u: [run(0), run(1)],
                        w: _mm256_loadu_ps(subs[c][4 * half].as_ptr()),
                    };
                }
                // SAFETY: activation blocks 8s + 4·half .. + 4 exist (checked above).
                group_step::<C, R, false>(&groups, &SPREAD, 8 * s + 4 * half, 4, acts, &mut acc);
            }
        }
        finish(&acc)
    }

    /// # Safety
    /// The CPU must support the AVX-512 level; the caller owns columns `cols`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(crate) unsafe fn matmul_cols(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Activations,
        cols: Range<usize>,
        out: &OutMatrix,
    ) {
        crate::quant::toolkit::drive_tiles!(dot, w, row_bytes, acts, cols, out);
    }
}

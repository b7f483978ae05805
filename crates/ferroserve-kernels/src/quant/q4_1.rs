//! Q4_1: blocks of 32 weights, 20 bytes: f16 scale `d`, f16 minimum `m`, then 16 bytes
//! whose low nibbles are weights 0..16 and high nibbles weights 16..32; weight = q·d + m.
//!
//! Against 8-bit activations a block's dot product is `d·d_x·Σ q·a + m·(d_x·Σ a)`: the
//! integer part uses the codes unsigned as stored, the second term the activation block's
//! precomputed `d_x·Σa`.
//!
//! The kernels below are hand-written: no library multiplies these blocks in place with a
//! reduction order fixed per output element (see `matmul.rs` for the strategy and why).

use super::activations::{assert_rows_match, ActRow, Q8Activations};
use super::half::round_half_even;
use super::toolkit::{affine_dot_portable, block_format, dequantize_affine, nibble, write_affine_scale, zip_blocks};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 4 + BLOCK_ELEMS / 2;

block_format!("Q4_1", ggml_type: 3, avx512: avx512::matmul_cols);

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    dequantize_affine(bytes, out, BLOCK_BYTES, |blk, i| nibble(&blk[4..], i));
}

/// Round to nearest on the block's [min, max] range in 15 steps.
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    for (xb, blk) in zip_blocks(x, BLOCK_ELEMS, out, BLOCK_BYTES) {
        let (m, inv) = write_affine_scale(xb, blk, 15.0);
        let code = |v: f32| round_half_even((v - m) * inv).clamp(0.0, 15.0) as u8;
        for i in 0..16 {
            blk[4 + i] = code(xb[i]) | (code(xb[i + 16]) << 4);
        }
    }
}

/// The reference order, which every level reproduces bit for bit ([`affine_dot_portable`]).
/// Matching llama.cpp's keeps this model's greedy decoding on its path (see
/// `tests/llama_reference.rs`).
fn dot_portable<const R: usize>(w_row: &[u8], acts: &[ActRow<'_>; R]) -> [f32; R] {
    affine_dot_portable(w_row, acts, BLOCK_BYTES, |blk| {
        std::array::from_fn(|i| nibble(&blk[4..], i) as i32)
    })
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over per-row register arrays
pub(crate) mod avx2 {
    use crate::quant::toolkit::x86::*;
    use std::arch::x86_64::*;

    /// The block's 32 codes, unsigned as stored.
    ///
    /// # Safety
    /// Reads the 20-byte block at `blk`; needs AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn codes(blk: *const u8) -> __m256i {
        unpack_nibbles(blk.add(4))
    }

    crate::quant::toolkit::affine_blocks_avx2!();
}

/// `dot_portable`'s order on AVX-512. Every (weight row, activation row) "unit" keeps its own
/// 8-lane chain, and two units share a 512-bit register (lanes 0–7 and 8–15), so one
/// `vpdpbusd` sums the groups of four codes of two units exactly. Batches go through
/// [`row_group`] (rows prepared once, each weight block unpacked once for 4–16 rows);
/// single rows (decode) through [`four_columns`], which streams four weight rows at once
/// (a ragged last column takes the AVX2 kernel).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over the tile's register arrays
pub(crate) mod avx512 {
    use super::{assert_rows_match, ActRow, Q8Activations, BLOCK_BYTES, BLOCK_ELEMS};
    use crate::quant::toolkit::x86::*;
    use crate::quant::toolkit::OutMatrix;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Bytes ahead of the current block to prefetch: the hardware prefetcher alone leaves
    /// these loops waiting on memory. A prefetch past the end is dropped (no fault).
    const PREFETCH_AHEAD: usize = 1024;

    /// Weight rows `0..4` of `w` against one activation row: per block, one multiply gives
    /// the four `d·d_x` and one fused multiply-add advances the four `m·s` chains.
    ///
    /// # Safety
    /// Needs the AVX-512 level (with VNNI); the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn four_columns(w: &[u8], row_bytes: usize, act: &ActRow<'_>) -> [f32; 4] {
        let nb = row_bytes / BLOCK_BYTES;
        assert!(w.len() >= 4 * row_bytes);
        assert_rows_match(std::slice::from_ref(act), nb);
        let wp = w.as_ptr();
        // Register p holds columns 2p (lanes 0–7) and 2p + 1 (lanes 8–15).
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut mins = _mm256_setzero_ps();
        let lo8_hi8 = |a: i32, b: i32| _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
        let (idx0, idx1) = (lo8_hi8(0, 2), lo8_hi8(4, 6));
        let pair = |lo: __m256i, hi: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        for b in 0..nb {
            // SAFETY (all loads): block b of each of the four weight rows lies inside `w`,
            // and the activation row holds nb > b blocks (both checked above).
            let blk = |c: usize| wp.add(c * row_bytes + b * BLOCK_BYTES);
            for c in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(blk(c).add(PREFETCH_AHEAD).cast());
            }
            let header = |c: usize| blk(c).cast::<i32>().read_unaligned();
            // [d, m] per column and [d_x, s] repeated, interleaved.
            let dm = _mm256_cvtph_ps(_mm_setr_epi32(header(0), header(1), header(2), header(3)));
            let (dx, sx) = (act.scales.get_unchecked(b)[0], *act.q81_sums.get_unchecked(b));
            let xs = _mm256_setr_ps(dx, sx, dx, sx, dx, sx, dx, sx);
            let q = |c: usize| unpack_nibbles(blk(c).add(4));
            let a = _mm256_loadu_si256(act.qs.as_ptr().add(b * BLOCK_ELEMS).cast());
            let a = pair(a, a);
            let codes = [pair(q(0), q(1)), pair(q(2), q(3))];
            let dd = _mm512_castps256_ps512(_mm256_mul_ps(dm, xs));
            mins = _mm256_fmadd_ps(dm, xs, mins);
            let scale = [_mm512_permutexvar_ps(idx0, dd), _mm512_permutexvar_ps(idx1, dd)];
            for p in 0..2 {
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[p], a);
                acc[p] = _mm512_fmadd_ps(scale[p], _mm512_cvtepi32_ps(dot), acc[p]);
            }
        }
        let mut m = [0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), mins);
        let mut out = [0f32; 4];
        for p in 0..2 {
            let lo = _mm512_castps512_ps256(acc[p]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[p])));
            out[2 * p] = hsum(lo) + m[4 * p + 1];
            out[2 * p + 1] = hsum(hi) + m[4 * p + 3];
        }
        out
    }

    /// Activation rows `r0..r0 + R` (R = 2·P = 4·Q) laid out for [`row_group`] once per call:
    /// per block, P 512-bit code pairs (rows 2p, 2p + 1), P vectors `[d_x ×8 | d_x' ×8]`, and Q
    /// vectors `[0, s, 0, s', …]` (four rows each) for the `m·s` chains.
    struct Prepared<const P: usize, const Q: usize> {
        pairs: Vec<[__m512i; P]>,
        scales: Vec<[__m512; P]>,
        sums: Vec<[__m256; Q]>,
    }

    /// # Safety
    /// Rows `r0..r0 + 2P` must exist; needs the AVX-512 level.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn prepare<const P: usize, const Q: usize>(acts: &Q8Activations, r0: usize, nb: usize) -> Prepared<P, Q> {
        let rows: [ActRow<'_>; 16] = core::array::from_fn(|i| acts.row(r0 + i.min(2 * P - 1)));
        let mut prep = Prepared { pairs: Vec::with_capacity(nb), scales: Vec::with_capacity(nb), sums: Vec::with_capacity(nb) };
        for b in 0..nb {
            let a = |r: usize| _mm256_loadu_si256(rows[r].qs.as_ptr().add(b * BLOCK_ELEMS).cast());
            let dx = |r: usize| rows[r].scales[b][0];
            let s = |r: usize| rows[r].q81_sums[b];
            prep.pairs.push(core::array::from_fn(|p| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a(2 * p)), a(2 * p + 1))));
            prep.scales.push(core::array::from_fn(|p| {
                _mm512_insertf32x8::<1>(_mm512_set1_ps(dx(2 * p)), _mm256_set1_ps(dx(2 * p + 1)))
            }));
            prep.sums.push(core::array::from_fn(|q| {
                let r = 4 * q;
                _mm256_setr_ps(0.0, s(r), 0.0, s(r + 1), 0.0, s(r + 2), 0.0, s(r + 3))
            }));
        }
        prep
    }

    /// Columns `cols` × the prepared rows `r0..r0 + 2P`: per weight block, its codes are
    /// unpacked once and broadcast to both halves, and each pair of rows takes one
    /// `vpdpbusd`, one multiply (`d·d_x` for both rows, exact) and one fused multiply-add.
    ///
    /// # Safety
    /// As `matmul_cols`; `prep` was made from rows `r0..r0 + 2P` of this call's activations.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn row_group<const P: usize, const Q: usize>(
        w: &[u8],
        row_bytes: usize,
        prep: &Prepared<P, Q>,
        r0: usize,
        cols: Range<usize>,
        out: &OutMatrix,
    ) {
        let nb = row_bytes / BLOCK_BYTES;
        assert!(prep.pairs.len() == nb && w.len() >= cols.end * row_bytes);
        for j in cols {
            let mut acc = [_mm512_setzero_ps(); P];
            let mut mins = [_mm256_setzero_ps(); Q];
            for b in 0..nb {
                // SAFETY: block b of weight row j lies inside `w` (checked above).
                let blk = w.as_ptr().add(j * row_bytes + b * BLOCK_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH_AHEAD).cast());
                let dm = _mm256_cvtph_ps(_mm_set1_epi32(blk.cast::<i32>().read_unaligned()));
                let d = _mm512_broadcastss_ps(_mm256_castps256_ps128(dm));
                let q = _mm512_broadcast_i64x4(unpack_nibbles(blk.add(4)));
                let (pairs, scales, sums) = (&prep.pairs[b], &prep.scales[b], &prep.sums[b]);
                for i in 0..Q {
                    mins[i] = _mm256_fmadd_ps(dm, sums[i], mins[i]);
                }
                for p in 0..P {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, pairs[p]);
                    acc[p] = _mm512_fmadd_ps(_mm512_mul_ps(d, scales[p]), _mm512_cvtepi32_ps(dot), acc[p]);
                }
            }
            let mut m = [[0f32; 8]; Q];
            for i in 0..Q {
                _mm256_storeu_ps(m[i].as_mut_ptr(), mins[i]);
            }
            for p in 0..P {
                let lo = _mm512_castps512_ps256(acc[p]);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[p])));
                for (r, half) in [(2 * p, lo), (2 * p + 1, hi)] {
                    // SAFETY: the caller gave this call columns `cols` alone.
                    out.set(r0 + r, j, hsum(half) + m[r / 4][2 * (r % 4) + 1]);
                }
            }
        }
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
        let m = acts.rows();
        let nb = row_bytes / BLOCK_BYTES;
        // Rows in groups of sixteen, eight, then four, sharing each unpacked weight block (the
        // per-block unpacking and scale set-up are ≈ 8 µops against ≈ 2 per row); the rest
        // (all of a decode step's single row) four columns at a time.
        let mut r0 = 0;
        while m - r0 >= 16 {
            row_group(w, row_bytes, &prepare::<8, 4>(acts, r0, nb), r0, cols.clone(), out);
            r0 += 16;
        }
        if m - r0 >= 8 {
            row_group(w, row_bytes, &prepare::<4, 2>(acts, r0, nb), r0, cols.clone(), out);
            r0 += 8;
        }
        if m - r0 >= 4 {
            row_group(w, row_bytes, &prepare::<2, 1>(acts, r0, nb), r0, cols.clone(), out);
            r0 += 4;
        }
        for r in r0..m {
            let row = acts.row(r);
            let mut j = cols.start;
            while j < cols.end {
                if cols.end - j >= 4 {
                    for (c, v) in four_columns(&w[j * row_bytes..], row_bytes, &row).into_iter().enumerate() {
                        // SAFETY: the caller gave this call columns `cols` alone.
                        out.set(r, j + c, v);
                    }
                    j += 4;
                } else {
                    // The AVX2 kernel's bits are these kernels' bits (same order, exact dots).
                    let y = super::avx2::dot::<1>(&w[j * row_bytes..(j + 1) * row_bytes], &[row]);
                    // SAFETY: as above.
                    out.set(r, j, y[0]);
                    j += 1;
                }
            }
        }
    }
}

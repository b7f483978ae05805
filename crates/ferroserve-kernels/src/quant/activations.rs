//! The activations every block kernel multiplies against: rows quantised to 8 bits in
//! blocks of 32 (ggml's q8_0/q8_1 activation blocks: the scale `d` rounded to f16, kept as
//! f32), once per matmul call or once for several weights applied to one input.
//!
//! Hand-written for the same reason as the kernels (see `matmul.rs`): ggml's roundings,
//! bitwise the same on every ISA level, which no library promises.

use super::half::round_half_even;
use crate::isa::QuantLevel;

/// Values per activation block (the 32 of ggml's q8_0/q8_1).
pub const BLOCK_ELEMS: usize = 32;

/// Activation rows quantised to 8 bits in blocks of 32: `q = round(x / d)` with
/// `d = max|x| / 127`, so |q| ≤ 127 (the kernels' saturation bounds rely on it); the stored
/// `d` is then rounded to f16 as ggml does (see [`block_scales`]). Each block also keeps
/// `d·Σq`, the activation sum that weights of the form `d·q + m` need for their
/// `m` term (Q4_1 and Q4_K; on AVX-512 also Q4_0 and Q8_0, see `matmul::x86::avx512`).
/// A block holding NaN or ±inf gets `d = NaN`, so the outputs it feeds are NaN.
#[derive(Debug, Default, Clone)]
pub struct Q8Activations {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    /// Per block `[d, d·Σq]`, interleaved so one 8-byte load fetches both.
    scales: Vec<[f32; 2]>,
    /// Per block ggml's q8_1 `s`: `d·Σq` with the unrounded `d`, rounded to f16 (see
    /// [`q81_sum`]); what llama.cpp's Q4_1 dot product multiplies the weights' `m` by.
    q81_sums: Vec<f32>,
}

/// One activation row as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [[f32; 2]],
    pub q81_sums: &'a [f32],
}

/// Rows times `k` below which quantising on one thread beats waking the pool.
const PARALLEL_ELEMS: usize = 1 << 14;

impl Q8Activations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantises `x` (`rows × k`, row-major; `k` a multiple of 32), reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize) {
        self.quantize_with_isa(QuantLevel::selected(), x, rows, k);
    }

    /// [`Q8Activations::quantize`] on an explicit ISA level. Every level gives the same
    /// bits (same roundings, exact max and sums), so the level never changes a result.
    pub fn quantize_with_isa(&mut self, isa: QuantLevel, x: &[f32], rows: usize, k: usize) {
        assert!(
            isa.is_supported(),
            "ISA level {} is not supported by this CPU",
            isa.as_str()
        );
        assert!(
            k.is_multiple_of(BLOCK_ELEMS),
            "activation length {k} is not a multiple of {BLOCK_ELEMS}"
        );
        assert_eq!(x.len(), rows * k, "activation length for [{rows}, {k}]");
        self.rows = rows;
        self.k = k;
        self.qs.resize(rows * k, 0);
        self.scales.resize(rows * k / BLOCK_ELEMS, [0.0; 2]);
        self.q81_sums.resize(rows * k / BLOCK_ELEMS, 0.0);
        if rows * k >= PARALLEL_ELEMS {
            use rayon::prelude::*;
            const CHUNK_BLOCKS: usize = 256;
            let xs = x.par_chunks(CHUNK_BLOCKS * BLOCK_ELEMS);
            let qs = self.qs.par_chunks_mut(CHUNK_BLOCKS * BLOCK_ELEMS);
            xs.zip(qs)
                .zip(self.scales.par_chunks_mut(CHUNK_BLOCKS))
                .zip(self.q81_sums.par_chunks_mut(CHUNK_BLOCKS))
                .for_each(|(((x, q), s), s1)| quantize_blocks(isa, x, q, s, s1));
        } else {
            quantize_blocks(isa, x, &mut self.qs, &mut self.scales, &mut self.q81_sums);
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The values the kernels actually multiply by: `q·d` (tests bound the error with it).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k, "output length");
        let row = self.row(r);
        for ((y, q), s) in out
            .chunks_exact_mut(BLOCK_ELEMS)
            .zip(row.qs.chunks_exact(BLOCK_ELEMS))
            .zip(row.scales)
        {
            for (v, &qi) in y.iter_mut().zip(q) {
                *v = qi as f32 * s[0];
            }
        }
    }

    #[inline]
    pub(crate) fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.k / BLOCK_ELEMS;
        ActRow {
            qs: &self.qs[r * self.k..(r + 1) * self.k],
            scales: &self.scales[r * nb..(r + 1) * nb],
            q81_sums: &self.q81_sums[r * nb..(r + 1) * nb],
        }
    }
}

fn quantize_blocks(isa: QuantLevel, x: &[f32], q: &mut [i8], s: &mut [[f32; 2]], s1: &mut [f32]) {
    assert!(x.len() == q.len() && x.len() == s.len() * BLOCK_ELEMS && s1.len() == s.len());
    match isa {
        // SAFETY: the caller checked that the CPU supports `isa`.
        #[cfg(target_arch = "x86_64")]
        QuantLevel::Avx512 => unsafe { avx512::quantize_blocks(x, q, s, s1) },
        #[cfg(target_arch = "x86_64")]
        QuantLevel::Avx2 => unsafe { avx2::quantize_blocks(x, q, s, s1) },
        _ => {
            for (((xb, qb), sb), s1b) in x
                .chunks_exact(BLOCK_ELEMS)
                .zip(q.chunks_exact_mut(BLOCK_ELEMS))
                .zip(s)
                .zip(s1)
            {
                (*sb, *s1b) = quantize_block(xb, qb);
            }
        }
    }
}

/// The reference for the SIMD versions, which must match it bit for bit.
fn quantize_block(x: &[f32], q: &mut [i8]) -> ([f32; 2], f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !x.iter().all(|v| v.is_finite()) {
        q.fill(0);
        return ([f32::NAN; 2], f32::NAN);
    }
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qi, v) in q.iter_mut().zip(x) {
        // |v·inv| ≤ 127 up to one rounding, so the clamp only guards that last ulp.
        *qi = round_half_even(v * inv).clamp(-127.0, 127.0) as i8;
        sum += *qi as i32;
    }
    (block_scales(amax, sum), q81_sum(amax, sum))
}

/// A block's `[d, d·Σq]`: `d = amax / 127` rounded to f16 (to nearest even), as ggml stores
/// it in its q8_0/q8_1 activation blocks (the codes are quantised with the unrounded
/// `127 / amax`, as ggml does), so the block products `d_w·d_x` are ggml's. `d·Σq` uses that
/// rounded `d` and stays f32: the AVX-512 kernels subtract `128·d_w·(d·Σq)` from a larger
/// term and need it exact (ggml's q8_1 rounds this sum to f16: Q4_1 reads that version,
/// [`q81_sum`]). Rounding
/// `d` costs no accuracy worth measuring (the 8-bit codes already err by up to 1/254 of
/// `amax`). A block whose `amax / 127` is beyond the f16 range
/// (≥ 65520) gets an infinite `d`, as in ggml.
#[inline]
pub(crate) fn block_scales(amax: f32, sum: i32) -> [f32; 2] {
    use super::half::{f16_to_f32, f32_to_f16};
    let d = f16_to_f32(f32_to_f16(amax / 127.0));
    [d, d * sum as f32]
}

/// ggml's q8_1 block sum `s = f16(d·Σq)` with `d = amax / 127` before its own f16 rounding:
/// Q4_1 weights (`w = d_w·q + m`) take their `m` term as `m·s`, and matching llama.cpp's
/// roundings there keeps greedy decoding on its path (see `q4_1::dot_portable`).
#[inline]
pub(crate) fn q81_sum(amax: f32, sum: i32) -> f32 {
    use super::half::{f16_to_f32, f32_to_f16};
    f16_to_f32(f32_to_f16(amax / 127.0 * sum as f32))
}

/// [`block_scales`] and [`q81_sum`] with F16C's conversions, the same roundings (to nearest
/// even, overflow to infinity, subnormals kept): the software f16 round trips, branchy and
/// called out of line, were ≈ 70 % of the activation quantisation in the c=16 profile.
///
/// # Safety
/// Needs F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
pub(crate) unsafe fn scales_f16c(amax: f32, sum: i32) -> ([f32; 2], f32) {
    use std::arch::x86_64::*;
    let round = |x: f32| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))));
    let d = round(amax / 127.0);
    ([d, d * sum as f32], round(amax / 127.0 * sum as f32))
}

/// Checks the shapes the unchecked pointer arithmetic in the kernels relies on.
#[inline]
pub(crate) fn assert_rows_match(acts: &[ActRow<'_>], blocks32: usize) {
    for a in acts {
        assert!(
            a.qs.len() == blocks32 * BLOCK_ELEMS && a.scales.len() == blocks32,
            "activation/weight length mismatch"
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK_ELEMS;
    use std::arch::x86_64::*;

    /// `quantize_block` over many blocks, eight lanes at a time (same bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_blocks(x: &[f32], q: &mut [i8], s: &mut [[f32; 2]], s1: &mut [f32]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let finite_max = _mm256_set1_ps(f32::MAX);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (((xb, qb), sb), s1b) in x
            .chunks_exact(BLOCK_ELEMS)
            .zip(q.chunks_exact_mut(BLOCK_ELEMS))
            .zip(s)
            .zip(s1)
        {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let a = v.map(|vi| _mm256_and_ps(vi, abs_mask));
            let mut bad = 0;
            for ai in a {
                bad |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(ai, finite_max));
            }
            if bad != 0 {
                qb.fill(0);
                *sb = [f32::NAN; 2];
                *s1b = f32::NAN;
                continue;
            }
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            // `cvtps` rounds half to even under the default MXCSR, as `round_half_even`.
            let i = v.map(|vi| _mm256_cvtps_epi32(_mm256_mul_ps(vi, inv)));
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            _mm256_storeu_si256(
                qb.as_mut_ptr().cast(),
                _mm256_permutevar8x32_epi32(packed, order),
            );
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 1)));
            (*sb, *s1b) = super::scales_f16c(amax, sum);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `quantize_block` over many blocks, sixteen lanes at a time (same bits).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(crate) unsafe fn quantize_blocks(x: &[f32], q: &mut [i8], s: &mut [[f32; 2]], s1: &mut [f32]) {
        let finite_max = _mm512_set1_ps(f32::MAX);
        for (((xb, qb), sb), s1b) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(s).zip(s1) {
            let v0 = _mm512_loadu_ps(xb.as_ptr());
            let v1 = _mm512_loadu_ps(xb.as_ptr().add(16));
            let (a0, a1) = (_mm512_abs_ps(v0), _mm512_abs_ps(v1));
            let bad = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a0, finite_max)
                | _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a1, finite_max);
            if bad != 0 {
                qb.fill(0);
                *sb = [f32::NAN; 2];
                *s1b = f32::NAN;
                continue;
            }
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)); // exact in any order
            let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            // `cvtps` rounds half to even under the default MXCSR, as `round_half_even`.
            let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
            let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            _mm_storeu_si128(qb.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128(qb.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(i1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            (*sb, *s1b) = super::scales_f16c(amax, sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16c_scales_round_as_the_software_conversion() {
        if !std::arch::is_x86_feature_detected!("f16c") {
            eprintln!("skipped: this CPU has no F16C, so no kernel here uses scales_f16c");
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut amaxes = vec![0.0, f32::MIN_POSITIVE, 1e-30, 6e-8 * 127.0, 65504.0 * 127.0, 65520.0 * 127.0, 65519.0 * 127.0, f32::MAX];
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Every exponent an activation block's amax can have, every mantissa.
            amaxes.push(f32::from_bits((seed as u32) & 0x7f7f_ffff));
        }
        for (i, &amax) in amaxes.iter().enumerate() {
            let sum = (i as i32 * 7919) % 8129 - 4064; // within ±32·127
            let hw = unsafe { scales_f16c(amax, sum) };
            let sw = (block_scales(amax, sum), q81_sum(amax, sum));
            let bits = |(s, t): ([f32; 2], f32)| (s[0].to_bits(), s[1].to_bits(), t.to_bits());
            assert_eq!(bits(hw), bits(sw), "amax {amax:e} sum {sum}");
        }
    }

    #[test]
    fn every_isa_quantises_activations_to_the_same_bits() {
        let mut seed = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                * [1.0, 1e-3, 300.0][(seed % 3) as usize]
        };
        let (rows, k) = (37, 96);
        let mut x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
        x[5] = f32::NAN;
        x[k + 40] = f32::INFINITY;
        x[2 * k..2 * k + 32].fill(0.0);
        x[3 * k] = 127.5; // ties and exact maxima
        x[3 * k + 1] = -0.5;
        let reference = {
            let mut a = Q8Activations::new();
            a.quantize_with_isa(QuantLevel::Portable, &x, rows, k);
            a
        };
        for isa in QuantLevel::available() {
            let mut a = Q8Activations::new();
            a.quantize_with_isa(isa, &x, rows, k);
            assert_eq!(a.qs, reference.qs, "{isa:?}");
            let bits = |v: &Q8Activations| {
                v.scales
                    .iter()
                    .flat_map(|s| s.map(f32::to_bits))
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&a), bits(&reference), "{isa:?}");
        }
        assert!(reference.scales[0][0].is_nan() && reference.scales[k / 32 + 1][0].is_nan());
    }
}

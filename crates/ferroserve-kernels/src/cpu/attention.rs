//! Bidirectional multi-head attention over packed variable-length sequences (BERT).
//!
//! One task per (sequence, head): K is copied transposed and V contiguous into a small
//! scratch buffer so both products are unit-stride AXPYs, with no horizontal reductions.
//!
//! AVX-512 (head dimension a multiple of 16, as every BERT has): query rows go in groups
//! of `QR`; each register tile holds `QR` rows × two 16-lane blocks (of keys for the
//! scores, of the head dimension for the output), 8 independent FMA chains. The one-row
//! form below ran one dependent chain over the head dimension: 29 % of a 256-token pass
//! for 10 % of its arithmetic (bench/NOTES.md, "Encoder speed on Zen 5"). Keys are padded
//! to a multiple of 32 there; padded keys are excluded from the softmax.
//!
//! AVX2 (head dimension a multiple of 16): `QR2` rows × two 8-lane blocks per register
//! tile, or 2 rows × four blocks.
//!
//! Every form computes each score and output element as one fused multiply-add chain in the
//! one-row form's order (`f32::mul_add` there), and the same softmax, so all levels give the
//! same bits (`every_level_gives_the_portable_bits`, tests/bert_int8.rs). On Zen 1 a separate
//! multiply and add issue to different pipes at the FMA's rate, but twice the µops kept the
//! AVX2 loops at ≈ 70 % of it; with FMA a 256-token pass is −3 % (bench/NOTES.md, session
//! 18). A level without FMA pays a libm `fmaf` per multiply-add; only a pre-2013 x86 runs it.
//!
//! Other levels (and odd head sizes): one query row at a time, scores and outputs in
//! 16-lane blocks the compiler vectorises, keys padded to a multiple of 16.

use rayon::prelude::*;

use super::math::fast_exp;
use super::{dispatch_isa, Isa};
use crate::SeqLayout;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each task writes only its own sequence's rows × its own head's columns.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

pub fn encoder_attention(isa: Isa, qkv: &[f32], layout: &SeqLayout<'_>, heads: usize, head_dim: usize, out: &mut [f32]) {
    let hidden = heads * head_dim;
    let rows = layout.total_rows();
    assert!(qkv.len() >= rows * 3 * hidden && out.len() >= rows * hidden);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let tasks = layout.num_seqs() * heads;
    let tiled = isa.has_avx512() && head_dim % LANES == 0;
    let tiled_avx2 = !tiled && isa.has_avx2() && head_dim % LANES == 0;
    let run = |t: usize| {
        let (s, h) = (t / heads, t % heads);
        let (start, end) = (layout.offsets[s], layout.offsets[s + 1]);
        let out_ptr = out_ptr;
        if tiled {
            isa.assert_supported();
            // SAFETY: the CPU has AVX-512 F (asserted); head_dim is a multiple of 16.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::head_attention_tiled(qkv, start, end, h, heads, head_dim, out_ptr.0)
            }
        } else if tiled_avx2 {
            isa.assert_supported();
            // SAFETY: the CPU has AVX2 and FMA (asserted); head_dim is a multiple of 16.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::head_attention_avx2(qkv, start, end, h, heads, head_dim, out_ptr.0)
            }
        } else {
            dispatch_isa!(isa, || head_attention(qkv, start, end, h, heads, head_dim, out_ptr.0))
        }
    };
    if tasks <= 1 || rows * hidden < 4096 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

thread_local! {
    /// Per-thread scratch (Kᵀ, V, scores, query and output rows), reused across tasks and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Score and output lanes per register-resident block (one AVX-512 register of f32).
const LANES: usize = 16;

/// Softmax of one score row over its first `len` (live) keys, in place; padded keys get
/// probability 0. Returns 1 / Σ (the caller scales the output instead of the probabilities).
/// `exp_shifted(live, m)` sets each live score s to `fast_exp(s − m)` (a SIMD form with the
/// same bits may be passed); the sum is then a second pass over the stored row, in the
/// one-row form's lanes and order, so the same bits. (Fused with the exponentials, the sum
/// kept about two of `fast_exp`'s ≈ 14-deep dependent chains in Zen 1's window: ≈ 24 % of
/// the attention's samples at 256 tokens, bench/NOTES.md session 18.)
#[inline(always)]
fn softmax_live(row: &mut [f32], len: usize, exp_shifted: impl FnOnce(&mut [f32], f32)) -> f32 {
    let full = len / LANES * LANES;
    let mut max = [f32::NEG_INFINITY; LANES];
    for block in row[..full].chunks_exact(LANES) {
        for l in 0..LANES {
            max[l] = if block[l] > max[l] { block[l] } else { max[l] };
        }
    }
    let m = row[full..len].iter().chain(&max).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let (live, padded) = row.split_at_mut(len);
    exp_shifted(live, m);
    padded.fill(0.0);
    // Σ per lane over the blocks in order; the padded zeros leave a lane's sum as it was.
    let mut sum = [0.0f32; LANES];
    let mut blocks = row.chunks_exact(LANES);
    for block in &mut blocks {
        for l in 0..LANES {
            sum[l] += block[l];
        }
    }
    for (l, &e) in blocks.remainder().iter().enumerate() {
        sum[l] += e;
    }
    1.0 / sum.iter().sum::<f32>()
}

/// `fast_exp(s − m)` over a row, left to the compiler's vectoriser.
#[inline(always)]
fn exp_shifted(row: &mut [f32], m: f32) {
    for v in row {
        *v = fast_exp(*v - m);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::math::x86::exp_shifted_avx2;
    use super::{exp_shifted, softmax_live, LANES, SCRATCH};

    /// The scratch of one (sequence, head) for the register-tiled forms.
    struct Staged<'a> {
        /// K transposed: `d` rows of `padded` keys, zeros past the sequence.
        kt: &'a mut [f32],
        /// V rows as in the sequence, `len × d`.
        v: &'a mut [f32],
        /// `qr` rows of `padded` scores.
        scores: &'a mut [f32],
        /// `qr` scaled query rows.
        qs: &'a mut [f32],
        /// `qr` output rows before they are written out.
        acc: &'a mut [f32],
    }

    /// Sizes `buf` and fills the K and V parts for head `h` of rows `start..start + len`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn stage<'a>(buf: &'a mut Vec<f32>, qkv: &[f32], start: usize, len: usize, h: usize, heads: usize, d: usize, padded: usize, qr: usize) -> Staged<'a> {
        let hidden = heads * d;
        let stride = 3 * hidden;
        let need = d * padded + len * d + qr * padded + 2 * qr * d;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (kt, rest) = buf.split_at_mut(d * padded);
        let (v, rest) = rest.split_at_mut(len * d);
        let (scores, rest) = rest.split_at_mut(qr * padded);
        let (qs, rest) = rest.split_at_mut(qr * d);
        let acc = &mut rest[..qr * d];
        kt.fill(0.0);
        for j in 0..len {
            let row = &qkv[(start + j) * stride..];
            for c in 0..d {
                kt[c * padded + j] = row[hidden + h * d + c];
            }
            v[j * d..(j + 1) * d].copy_from_slice(&row[2 * hidden + h * d..2 * hidden + (h + 1) * d]);
        }
        Staged { kt, v, scores, qs, acc }
    }

    /// `qr` query rows from row `first` (columns `col..col + d`) times `scale`, as the one-row
    /// form's `q[c] * scale`; a partial group (`rows < qr`) repeats its last row (computed,
    /// not stored).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn scale_queries(qs: &mut [f32], qkv: &[f32], first: usize, rows: usize, qr: usize, stride: usize, col: usize, d: usize, scale: f32) {
        for r in 0..qr {
            let i = first + r.min(rows - 1);
            let q = &qkv[i * stride + col..i * stride + col + d];
            for (dst, &qc) in qs[r * d..(r + 1) * d].iter_mut().zip(q) {
                *dst = qc * scale;
            }
        }
    }

    /// Query rows per register tile.
    const QR: usize = 4;
    /// Keys are padded to a multiple of this (two blocks per register tile).
    const KEY_PAD: usize = 2 * LANES;

    /// One (sequence, head) with `QR` × 32 register tiles.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `d` must be a multiple of 16; `out` must be valid for
    /// the sequence's rows at stride `heads · d`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn head_attention_tiled(qkv: &[f32], start: usize, end: usize, h: usize, heads: usize, d: usize, out: *mut f32) {
        assert!(d % LANES == 0);
        let len = end - start;
        if len == 0 {
            return;
        }
        let padded = len.div_ceil(KEY_PAD) * KEY_PAD;
        let hidden = heads * d;
        let stride = 3 * hidden;
        let scale = 1.0 / (d as f32).sqrt();
        let mut buf = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        let Staged { kt, v, scores, qs, acc } = stage(&mut buf, qkv, start, len, h, heads, d, padded, QR);
        let (ktp, vp, sp, qp) = (kt.as_ptr(), v.as_ptr(), scores.as_mut_ptr(), qs.as_ptr());
        let mut i0 = 0;
        while i0 < len {
            let rows = QR.min(len - i0);
            scale_queries(qs, qkv, start + i0, rows, QR, stride, h * d, d, scale);
            // Scores: QR rows × 32 keys per tile, summed over the head dimension.
            for b in (0..padded).step_by(KEY_PAD) {
                let mut s = [[_mm512_setzero_ps(); 2]; QR];
                for c in 0..d {
                    let k0 = _mm512_loadu_ps(ktp.add(c * padded + b));
                    let k1 = _mm512_loadu_ps(ktp.add(c * padded + b + LANES));
                    for (r, sr) in s.iter_mut().enumerate() {
                        let qc = _mm512_set1_ps(*qp.add(r * d + c));
                        sr[0] = _mm512_fmadd_ps(qc, k0, sr[0]);
                        sr[1] = _mm512_fmadd_ps(qc, k1, sr[1]);
                    }
                }
                for (r, sr) in s.iter().enumerate() {
                    _mm512_storeu_ps(sp.add(r * padded + b), sr[0]);
                    _mm512_storeu_ps(sp.add(r * padded + b + LANES), sr[1]);
                }
            }
            let mut inv = [0.0f32; QR];
            for (r, row) in scores.chunks_exact_mut(padded).enumerate() {
                inv[r] = softmax_live(row, len, exp_shifted);
            }
            // out = P · V: QR rows × 32 (then 16) head-dimension columns per tile.
            let mut c0 = 0;
            while c0 < d {
                let pair = c0 + 2 * LANES <= d;
                let mut a = [[_mm512_setzero_ps(); 2]; QR];
                for j in 0..len {
                    let v0 = _mm512_loadu_ps(vp.add(j * d + c0));
                    let v1 = if pair { _mm512_loadu_ps(vp.add(j * d + c0 + LANES)) } else { _mm512_setzero_ps() };
                    for (r, ar) in a.iter_mut().enumerate() {
                        let p = _mm512_set1_ps(*sp.add(r * padded + j));
                        ar[0] = _mm512_fmadd_ps(p, v0, ar[0]);
                        ar[1] = _mm512_fmadd_ps(p, v1, ar[1]);
                    }
                }
                for (r, ar) in a.iter().enumerate() {
                    let s = _mm512_set1_ps(inv[r]);
                    _mm512_storeu_ps(acc.as_mut_ptr().add(r * d + c0), _mm512_mul_ps(ar[0], s));
                    if pair {
                        _mm512_storeu_ps(acc.as_mut_ptr().add(r * d + c0 + LANES), _mm512_mul_ps(ar[1], s));
                    }
                }
                c0 += if pair { 2 * LANES } else { LANES };
            }
            for r in 0..rows {
                // SAFETY: row start+i0+r, columns h*d..(h+1)*d belong to this task only.
                std::ptr::copy_nonoverlapping(acc.as_ptr().add(r * d), out.add((start + i0 + r) * hidden + h * d), d);
            }
            i0 += QR;
        }
        SCRATCH.with(|cell| *cell.borrow_mut() = buf);
    }

    /// Query rows per AVX2 register tile: 4 rows × two 8-lane blocks = 8 accumulators, 8
    /// independent FMA chains (16 ymm registers in all).
    const QR2: usize = 4;

    /// One (sequence, head) on AVX2 with `QR2` × 16 register tiles, computing **the same bits
    /// as the one-row form** (`head_attention`): every score and output element is the same
    /// FMA chain in the same order, the same softmax lanes, keys padded to 16 as there. So
    /// `avx2` and `portable` keep giving identical vectors (tests/bert_int8.rs). The one-row
    /// form ran one or two dependent chains over the head dimension per query row.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `d` must be a multiple of 16; `out` must be valid for
    /// the sequence's rows at stride `heads · d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn head_attention_avx2(qkv: &[f32], start: usize, end: usize, h: usize, heads: usize, d: usize, out: *mut f32) {
        assert!(d % LANES == 0);
        let len = end - start;
        if len == 0 {
            return;
        }
        let padded = len.div_ceil(LANES) * LANES;
        let hidden = heads * d;
        let stride = 3 * hidden;
        let scale = 1.0 / (d as f32).sqrt();
        let mut buf = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        let Staged { kt, v, scores, qs, acc } = stage(&mut buf, qkv, start, len, h, heads, d, padded, QR2);
        let (ktp, vp, sp, qp) = (kt.as_ptr(), v.as_ptr(), scores.as_mut_ptr(), qs.as_ptr());
        let mut i0 = 0;
        while i0 < len {
            let rows = QR2.min(len - i0);
            scale_queries(qs, qkv, start + i0, rows, QR2, stride, h * d, d, scale);
            // Scores: QR2 rows × 16 keys per tile, s = s + q·k over the head dimension; or,
            // while 32 keys are left, two tiles of 2 rows × 32 keys (half the broadcasts: on
            // Zen 1 −4 to −5 % of the attention's time at 256 tokens, bench/NOTES.md session 17).
            let mut b = 0;
            while b < padded {
                if b + 2 * LANES <= padded {
                    for r0 in (0..QR2).step_by(2) {
                        scores_2x32(ktp.add(b), padded, qp.add(r0 * d), d, sp.add(r0 * padded + b), padded);
                    }
                    b += 2 * LANES;
                    continue;
                }
                let mut s = [[_mm256_setzero_ps(); 2]; QR2];
                for c in 0..d {
                    let k0 = _mm256_loadu_ps(ktp.add(c * padded + b));
                    let k1 = _mm256_loadu_ps(ktp.add(c * padded + b + 8));
                    for (r, sr) in s.iter_mut().enumerate() {
                        let qc = _mm256_broadcast_ss(&*qp.add(r * d + c));
                        sr[0] = _mm256_fmadd_ps(qc, k0, sr[0]);
                        sr[1] = _mm256_fmadd_ps(qc, k1, sr[1]);
                    }
                }
                for (r, sr) in s.iter().enumerate() {
                    _mm256_storeu_ps(sp.add(r * padded + b), sr[0]);
                    _mm256_storeu_ps(sp.add(r * padded + b + 8), sr[1]);
                }
                b += LANES;
            }
            let mut inv = [0.0f32; QR2];
            for (r, row) in scores.chunks_exact_mut(padded).enumerate() {
                inv[r] = softmax_live(row, len, |live, m| exp_shifted_avx2(live, m));
            }
            // out = (Σ_j p_j · V_j) · inv: QR2 rows × 16 head-dimension columns per tile, or two
            // tiles of 2 rows × 32 columns while 32 are left.
            let mut c0 = 0;
            while c0 < d {
                if c0 + 2 * LANES <= d {
                    for r0 in (0..QR2).step_by(2) {
                        pv_2x32(sp.add(r0 * padded), padded, vp.add(c0), d, len, &inv[r0..r0 + 2], acc.as_mut_ptr().add(r0 * d + c0), d);
                    }
                    c0 += 2 * LANES;
                    continue;
                }
                let mut a = [[_mm256_setzero_ps(); 2]; QR2];
                for j in 0..len {
                    let v0 = _mm256_loadu_ps(vp.add(j * d + c0));
                    let v1 = _mm256_loadu_ps(vp.add(j * d + c0 + 8));
                    for (r, ar) in a.iter_mut().enumerate() {
                        let p = _mm256_broadcast_ss(&*sp.add(r * padded + j));
                        ar[0] = _mm256_fmadd_ps(p, v0, ar[0]);
                        ar[1] = _mm256_fmadd_ps(p, v1, ar[1]);
                    }
                }
                for (r, ar) in a.iter().enumerate() {
                    let s = _mm256_set1_ps(inv[r]);
                    _mm256_storeu_ps(acc.as_mut_ptr().add(r * d + c0), _mm256_mul_ps(ar[0], s));
                    _mm256_storeu_ps(acc.as_mut_ptr().add(r * d + c0 + 8), _mm256_mul_ps(ar[1], s));
                }
                c0 += LANES;
            }
            for r in 0..rows {
                // SAFETY: row start+i0+r, columns h*d..(h+1)*d belong to this task only.
                std::ptr::copy_nonoverlapping(acc.as_ptr().add(r * d), out.add((start + i0 + r) * hidden + h * d), d);
            }
            i0 += QR2;
        }
        SCRATCH.with(|cell| *cell.borrow_mut() = buf);
    }

    /// Scores of 2 query rows × 32 keys: `s[r][j] = Σ_c q[r][c]·kt[c][j]` as one FMA chain
    /// in c order (the bits of the 4 × 16 tile and of the one-row form). Four key vectors per
    /// broadcast instead of two: 8 FMAs per 2 broadcasts and 4 loads (14 ymm registers).
    ///
    /// # Safety
    /// AVX2; `kt` valid for `d` rows of stride `ld_k` × 32 keys, `q` for 2 rows of `d`, `s` for
    /// 2 rows of stride `ld_s` × 32.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scores_2x32(kt: *const f32, ld_k: usize, q: *const f32, d: usize, s: *mut f32, ld_s: usize) {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        for c in 0..d {
            let kr = kt.add(c * ld_k);
            let k = [_mm256_loadu_ps(kr), _mm256_loadu_ps(kr.add(8)), _mm256_loadu_ps(kr.add(16)), _mm256_loadu_ps(kr.add(24))];
            for (r, ar) in acc.iter_mut().enumerate() {
                let qc = _mm256_broadcast_ss(&*q.add(r * d + c));
                for (x, a) in ar.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qc, k[x], *a);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (x, a) in ar.iter().enumerate() {
                _mm256_storeu_ps(s.add(r * ld_s + 8 * x), *a);
            }
        }
    }

    /// Output of 2 query rows × 32 head columns: `(Σ_j p[r][j]·v[j][c]) · inv[r]`, one FMA
    /// chain in j order (the 4 × 16 tile's bits).
    ///
    /// # Safety
    /// AVX2; `p` valid for 2 rows of stride `ld_p` × `len`, `v` for `len` rows of stride `ld_v`
    /// × 32, `out` for 2 rows of stride `ld_o` × 32.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_2x32(p: *const f32, ld_p: usize, v: *const f32, ld_v: usize, len: usize, inv: &[f32], out: *mut f32, ld_o: usize) {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        for j in 0..len {
            let vr = v.add(j * ld_v);
            let vv = [_mm256_loadu_ps(vr), _mm256_loadu_ps(vr.add(8)), _mm256_loadu_ps(vr.add(16)), _mm256_loadu_ps(vr.add(24))];
            for (r, ar) in acc.iter_mut().enumerate() {
                let pj = _mm256_broadcast_ss(&*p.add(r * ld_p + j));
                for (x, a) in ar.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pj, vv[x], *a);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            let s = _mm256_set1_ps(inv[r]);
            for (x, a) in ar.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ld_o + 8 * x), _mm256_mul_ps(*a, s));
            }
        }
    }
}

#[inline(always)]
fn head_attention(qkv: &[f32], start: usize, end: usize, h: usize, heads: usize, d: usize, out: *mut f32) {
    let len = end - start;
    // Key positions padded to a multiple of LANES so the score loops have no scalar tail;
    // padded scores are excluded from the softmax below.
    let padded = len.div_ceil(LANES) * LANES;
    let hidden = heads * d;
    let stride = 3 * hidden;
    let scale = 1.0 / (d as f32).sqrt();
    // Take the buffer out of the thread-local rather than working inside `with`'s
    // closure: that closure would be compiled without this function's ISA features.
    let mut buf = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    {
        let need = d * padded + len * d + padded + d;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (kt, rest) = buf.split_at_mut(d * padded);
        let (v, rest) = rest.split_at_mut(len * d);
        let (scores, rest) = rest.split_at_mut(padded);
        let acc = &mut rest[..d];
        kt.fill(0.0);
        for j in 0..len {
            let row = &qkv[(start + j) * stride..];
            for c in 0..d {
                kt[c * padded + j] = row[hidden + h * d + c];
            }
            v[j * d..(j + 1) * d].copy_from_slice(&row[2 * hidden + h * d..2 * hidden + (h + 1) * d]);
        }
        for i in 0..len {
            let q = &qkv[(start + i) * stride + h * d..(start + i) * stride + (h + 1) * d];
            // Scores for LANES keys at a time, accumulated in a register over the head
            // dimension rather than re-loaded and re-stored from memory for every c.
            let mut max = [f32::NEG_INFINITY; LANES];
            for (b, block) in scores.chunks_exact_mut(LANES).enumerate() {
                let mut s = [0.0f32; LANES];
                for c in 0..d {
                    let qc = q[c] * scale;
                    let k: &[f32; LANES] = kt[c * padded + b * LANES..c * padded + (b + 1) * LANES].try_into().unwrap();
                    for l in 0..LANES {
                        s[l] = qc.mul_add(k[l], s[l]);
                    }
                }
                for l in 0..LANES {
                    // Padded keys (score 0) must not win the max.
                    let live = b * LANES + l < len;
                    max[l] = if live && s[l] > max[l] { s[l] } else { max[l] };
                }
                block.copy_from_slice(&s);
            }
            let m = max.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            let mut sum = [0.0f32; LANES];
            for (b, block) in scores.chunks_exact_mut(LANES).enumerate() {
                for l in 0..LANES {
                    let e = if b * LANES + l < len { fast_exp(block[l] - m) } else { 0.0 };
                    block[l] = e;
                    sum[l] += e;
                }
            }
            let inv = 1.0 / sum.iter().sum::<f32>();
            // out = Σ_j p_j · V_j, one register block of the head dimension at a time.
            let mut c0 = 0;
            while c0 + LANES <= d {
                let mut a = [0.0f32; LANES];
                for j in 0..len {
                    let p = scores[j];
                    let vv: &[f32; LANES] = v[j * d + c0..j * d + c0 + LANES].try_into().unwrap();
                    for l in 0..LANES {
                        a[l] = p.mul_add(vv[l], a[l]);
                    }
                }
                for l in 0..LANES {
                    acc[c0 + l] = a[l] * inv;
                }
                c0 += LANES;
            }
            for c in c0..d {
                acc[c] = (0..len).fold(0.0f32, |a, j| scores[j].mul_add(v[j * d + c], a)) * inv;
            }
            // SAFETY: row start+i, columns h*d..(h+1)*d belong to this task only.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add((start + i) * hidden + h * d), d) };
        }
    }
    SCRATCH.with(|cell| *cell.borrow_mut() = buf);
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, levels, Rng};

    #[test]
    fn attention_matches_f64() {
        let mut rng = Rng::new(99 ^ std::process::id() as u64);
        // d = 8 and 40 take the one-row form (d = 8 only the scalar tail of its output loop;
        // 40 two blocks + tail); d = 32 and 48 the AVX-512 register tiles (a pair of blocks;
        // a pair + one block). Sequence lengths cover partial query groups, one and several
        // 32-key tiles, and padded keys.
        for (heads, d) in [(3usize, 8usize), (2, 40), (2, 32), (2, 48)] {
            let hidden = heads * d;
            let offsets = [0usize, 1, 6, 6 + 33, 6 + 33 + 2, 6 + 33 + 2 + 70];
            let rows = *offsets.last().unwrap();
            let qkv = rng.vec(rows * 3 * hidden);
            for isa in levels("attention_matches_f64") {
                let mut out = vec![f32::NAN; rows * hidden];
                encoder_attention(isa, &qkv, &SeqLayout { offsets: &offsets }, heads, d, &mut out);
                let mut want = vec![0.0f64; rows * hidden];
                for s in 0..offsets.len() - 1 {
                    let (a, b) = (offsets[s], offsets[s + 1]);
                    for h in 0..heads {
                        for i in a..b {
                            let q = |c: usize| qkv[i * 3 * hidden + h * d + c] as f64;
                            let sc: Vec<f64> = (a..b).map(|j| (0..d).map(|c| q(c) * qkv[j * 3 * hidden + hidden + h * d + c] as f64).sum::<f64>() / (d as f64).sqrt()).collect();
                            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                            for c in 0..d {
                                want[i * hidden + h * d + c] = (a..b).zip(&sc).map(|(j, x)| (x - m).exp() / z * qkv[j * 3 * hidden + 2 * hidden + h * d + c] as f64).sum();
                            }
                        }
                    }
                }
                assert_close(&out, &want, 1e-5, &format!("attention {isa:?} d={d}"));
            }
        }
    }

    /// Every level's register tiles compute the one-row form's bits (the embeddings are
    /// compared bit for bit across levels, tests/bert_int8.rs), incl. padded keys and
    /// partial query groups: one FMA chain per element in the same order and the same
    /// softmax (AVX-512's too since session 18, when the others took up its FMA).
    #[test]
    fn every_level_gives_the_portable_bits() {
        let mut rng = Rng::new(7 ^ std::process::id() as u64);
        for isa in levels("every_level_gives_the_portable_bits") {
            for (heads, d) in [(2usize, 16usize), (3, 32), (2, 64)] {
                let hidden = heads * d;
                let offsets = [0usize, 1, 4, 4 + 17, 4 + 17 + 16, 4 + 17 + 16 + 259];
                let rows = *offsets.last().unwrap();
                let qkv: Vec<f32> = rng.vec(rows * 3 * hidden).iter().map(|v| v * 4.0).collect();
                let mut want = vec![f32::NAN; rows * hidden];
                encoder_attention(Isa::Portable, &qkv, &SeqLayout { offsets: &offsets }, heads, d, &mut want);
                let mut got = vec![f32::NAN; rows * hidden];
                encoder_attention(isa, &qkv, &SeqLayout { offsets: &offsets }, heads, d, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{isa:?} d={d} index {i}: {g} vs {w}");
                }
            }
        }
    }
}

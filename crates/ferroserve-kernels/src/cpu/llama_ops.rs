//! The row-wise ops of a Llama-family decoder: RMSNorm, rotary embeddings, the SiLU-gated
//! product, and causal attention over a paged KV cache.
//!
//! Why hand-written: the matmuls are the quantised kernels in `crate::quant`; what is left is
//! small, but it must read our paged KV layout in place and keep one property no library
//! offers: **a token's result depends only on its own inputs and position**, never on how
//! many tokens share the call, where it sits in the batch, or how its sequence's prompt was
//! chunked. The scheduler batches and chunks freely, and a request must give the same logits
//! alone or in company. Concretely:
//! - RMSNorm, RoPE and SiLU work per row / per element, with a fixed in-row summation order;
//! - attention for the query at position `p` reduces over keys `0..=p` read from the cache
//!   (the step's own keys are written there first), in a key order and with lane splits fixed
//!   by absolute positions, whatever rows or tasks the call holds;
//! - threads split whole (query, head) units, never a reduction.
//!
//! The arithmetic is llama.cpp's CPU backend's, operation for operation (each function says
//! which), because this tie-prone model's greedy output follows every rounding: the fixture
//! continuations come out identical to llama.cpp's only so. Rust neither re-associates nor
//! contracts float arithmetic, so equal source-level operation sequences give equal bits;
//! fused multiply-adds are written out (`mul_add`) where llama.cpp's compiler fuses, and every
//! ISA level gives the portable code's bits (tested).

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::Isa;
use crate::kv_layout::{PagedKvLayout, KV_LANES};
use crate::quant::f16::{f16_to_f32, f32_to_f16};

/// Elements below which a row-wise op runs on the calling thread (waking the pool costs more).
const PAR_MIN_ELEMS: usize = 32 * 1024;
/// The same for RMSNorm (a sequential f64 sum, ≈ 1 µs per 576-wide row) and SiLU·up (an
/// `expf` and a division per element): a 16-stream decode step's 16 rows are worth splitting.
const NORM_PAR_MIN_ELEMS: usize = 4 * 1024;
const SILU_PAR_MIN_ELEMS: usize = 4 * 1024;

/// Score lanes: keys are scored sixteen at a time (one 512-bit register, two 256-bit ones).
const LANES: usize = KV_LANES;

/// Head widths the attention kernel is compiled for (the accumulators live in registers,
/// so the width is a compile-time constant).
pub const SUPPORTED_HEAD_DIMS: [usize; 6] = [32, 64, 80, 96, 128, 256];

/// What an instantiation `$body::<…, LEVEL>` may assume (the levels differ only in which
/// instructions do the f16 conversions; `mul_add` is a libm call on the portable one).
const PORTABLE: u8 = 0;
/// AVX2 + FMA + F16C.
const AVX2: u8 = 1;
/// AVX-512 F/BW/VL + FMA.
const AVX512: u8 = 2;

/// The instantiation level for `isa`.
fn level(isa: Isa) -> u8 {
    isa.assert_supported();
    // Every AVX-512 CPU has F16C; an AVX2 one is asked (`Isa::has_f16c`).
    if isa.has_avx512() {
        AVX512
    } else if isa.has_f16c() {
        AVX2
    } else {
        PORTABLE
    }
}

/// Runs `$body::<…, LEVEL>` compiled for `$isa`'s level (the usual multiversioning: the
/// generic body is instantiated inside a `#[target_feature]` function).
macro_rules! dispatch_level {
    ($isa:expr, $body:ident $(::<$($gen:tt),*>)? ($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            match level($isa) {
                // SAFETY: `level` asserted that the CPU has the features.
                AVX512 => unsafe { run_avx512(|| $body::<$($($gen,)*)? AVX512>($($arg),*)) },
                AVX2 => unsafe { run_avx2(|| $body::<$($($gen,)*)? AVX2>($($arg),*)) },
                _ => $body::<$($($gen,)*)? PORTABLE>($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            $body::<$($($gen,)*)? PORTABLE>($($arg),*)
        }
    }};
}

/// `out[i] = f32_to_f16(x[i])` (round to nearest even), by `vcvtps2ph` on the SIMD levels:
/// IEEE rounding gives the software conversion's bits, NaN payloads included.
#[inline(always)]
fn f32_to_f16_slice<const L: u8>(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if L == AVX512 || L == AVX2 {
            done = x.len() / 8 * 8;
            for at in (0..done).step_by(8) {
                // SAFETY: both levels include F16C (checked by `level`), instantiated only
                // inside their `#[target_feature]` wrappers; 8 floats read and 8 halves
                // written inside the slices.
                unsafe {
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(at)));
                    _mm_storeu_si128(out.as_mut_ptr().add(at).cast(), h);
                }
            }
        }
    }
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = f32_to_f16(v);
    }
}

/// Sixteen IEEE halves widened to f32 (exact): one `vcvtph2ps` on x86.
#[inline(always)]
fn widen16<const L: u8>(h: &[u16; LANES]) -> [f32; LANES] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if L == AVX512 {
            // SAFETY: LEVEL AVX512 is only instantiated inside `run_avx512` (AVX-512F); the
            // load reads the 32 bytes of `h`; __m512 and [f32; 16] have the same layout.
            return unsafe { std::mem::transmute::<__m512, [f32; LANES]>(_mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast()))) };
        }
        if L == AVX2 {
            // SAFETY: as above with `run_avx2` (F16C); two 16-byte loads inside `h`.
            return unsafe {
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().add(8).cast()));
                std::mem::transmute::<[__m256; 2], [f32; LANES]>([lo, hi])
            };
        }
    }
    h.map(f16_to_f32)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// Row-wise `out = x / sqrt(mean(x²) + eps) · weight` over rows of `dim` (llama.cpp's order:
/// normalise, then scale by the weight).
pub fn rms_norm(isa: Isa, x: &[f32], dim: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rms_norm: length {} is not whole rows of {dim}", x.len());
    assert_eq!(weight.len(), dim, "rms_norm: weight length");
    assert_eq!(out.len(), x.len(), "rms_norm: output length");
    let run = |x: &[f32], out: &mut [f32]| dispatch_level!(isa, rms_norm_rows(x, dim, weight, eps, out));
    if x.len() <= NORM_PAR_MIN_ELEMS || x.len() == dim {
        run(x, out);
    } else {
        let rows = x.len() / dim;
        let chunk = rows.div_ceil(rayon::current_num_threads().max(1)).max((NORM_PAR_MIN_ELEMS / 2 / dim).max(1)) * dim;
        x.par_chunks(chunk).zip(out.par_chunks_mut(chunk)).for_each(|(x, out)| run(x, out));
    }
}

/// llama.cpp's arithmetic (`ggml_compute_forward_rms_norm_f32`), which greedy decoding on
/// this model is sensitive to: squares rounded to f32 and summed in f64 in order, the mean
/// rounded to f32, `scale = 1 / sqrt(mean + eps)` in f32, then `x · scale · w`. The f64 chain
/// is sequential (≈ 1 µs per 576-wide row), small beside the matmuls. (Interleaving eight
/// rows' chains, each in its own order, was tried: no faster in the profile, bench/NOTES.md
/// session 10.)
#[inline(always)]
fn rms_norm_rows<const L: u8>(x: &[f32], dim: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    for (row, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mut sum = 0f64;
        for &v in row {
            sum += (v * v) as f64;
        }
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary position embeddings

/// How rotary angles are derived from positions: `θᵢ = pos · freq_scale · base^(−2i/dims) /
/// factor[i]` — plain RoPE with `freq_scale = 1` and no factors; linear position
/// interpolation sets `freq_scale`; Llama 3's per-frequency factors come as `rope_freqs`.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    /// Values rotated per head (even, at most the head width).
    pub dims: usize,
    pub base: f32,
    pub freq_scale: f32,
    /// `dims / 2` divisors, one per frequency, or empty.
    pub freq_factors: Vec<f32>,
}

/// Fills `out` (`rope.dims` values) with `[cos θ₀, sin θ₀, cos θ₁, sin θ₁, …]` for position
/// `pos`, from the position alone (so a token's rotation cannot depend on the rows around
/// it), in llama.cpp's f32 arithmetic (`ggml_rope_cache_init`): `θ₀ = pos`, each next angle
/// the previous times `base^(−2/dims)` (f32 `powf`), divided by its frequency factor and
/// times `freq_scale`, then libm's `cosf`/`sinf`.
pub fn rope_cos_sin(pos: usize, rope: &RopeParams, out: &mut [f32]) {
    let dims = rope.dims;
    assert!(dims.is_multiple_of(2) && out.len() == dims, "rope_cos_sin: {dims} dims into {}", out.len());
    assert!(rope.freq_factors.is_empty() || rope.freq_factors.len() == dims / 2, "rope_cos_sin: {} frequency factors", rope.freq_factors.len());
    let theta_scale = rope.base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    for (i, cs) in out.chunks_exact_mut(2).enumerate() {
        let ff = rope.freq_factors.get(i).copied().unwrap_or(1.0);
        let t = rope.freq_scale * (theta / ff);
        cs[0] = t.cos();
        cs[1] = t.sin();
        theta *= theta_scale;
    }
}

/// Rotates, in every head of every row, the first `rope_dims` values as adjacent pairs
/// `(x[2i], x[2i+1])` — llama.cpp's `LLAMA_ROPE_TYPE_NORM`, which GGUF's llama Q/K weights
/// are permuted for — using each row's `[cos, sin]` table from [`rope_cos_sin`]
/// (`cos_sin[row · rope_dims..]`). `x` rows are `heads · head_dim` wide.
pub fn rope_pairs(x: &mut [f32], heads: usize, head_dim: usize, rope_dims: usize, cos_sin: &[f32]) {
    let width = heads * head_dim;
    assert!(rope_dims <= head_dim && rope_dims.is_multiple_of(2), "rope_pairs: rope_dims {rope_dims}, head_dim {head_dim}");
    assert!(width > 0 && x.len().is_multiple_of(width), "rope_pairs: length {} is not whole rows of {width}", x.len());
    assert_eq!(cos_sin.len(), x.len() / width * rope_dims, "rope_pairs: cos/sin table length");
    // Compiled for the CPU's level so that `mul_add` is one instruction, not a libm call (an
    // fma is exact either way: the same bits).
    dispatch_level!(Isa::selected(), rope_rows(x, width, head_dim, rope_dims, cos_sin));
}

#[inline(always)]
fn rope_rows<const L: u8>(x: &mut [f32], width: usize, head_dim: usize, rope_dims: usize, cos_sin: &[f32]) {
    for (row, cs) in x.chunks_exact_mut(width).zip(cos_sin.chunks_exact(rope_dims.max(1))) {
        for head in row.chunks_exact_mut(head_dim) {
            for (pair, cs) in head[..rope_dims].chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                let (a, b, c, s) = (pair[0], pair[1], cs[0], cs[1]);
                // As llama.cpp's `rotate_pairs` compiles (GCC contracts each expression into one
                // fused multiply-add); bitwise checked against its intermediates.
                pair[0] = a.mul_add(c, -(b * s));
                pair[1] = a.mul_add(s, b * c);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated product

/// `gate = silu(gate) · up`, element-wise, `silu(x) = x / (1 + e^−x)`.
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths");
    let run = |g: &mut [f32], u: &[f32]| dispatch_level!(isa, silu_mul_slice(g, u));
    if gate.len() <= SILU_PAR_MIN_ELEMS {
        run(gate, up);
    } else {
        let chunk = gate.len().div_ceil(rayon::current_num_threads().max(1)).clamp(SILU_PAR_MIN_ELEMS / 2, PAR_MIN_ELEMS);
        gate.par_chunks_mut(chunk).zip(up.par_chunks(chunk)).for_each(|(g, u)| run(g, u));
    }
}

#[inline(always)]
fn silu_mul_slice<const L: u8>(gate: &mut [f32], up: &[f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if L == AVX512 {
        // SAFETY: LEVEL AVX512 is only instantiated inside `run_avx512` (AVX-512F).
        done = unsafe { silu_mul_avx512(gate, up) };
    }
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + ggml_expf(0.0 - *g)) * u;
    }
}

/// [`silu_mul_slice`] sixteen lanes at a time, [`ggml_expf`]'s operations one for one (the
/// compiler vectorised the scalar form only in part: the saturating `n as i64` of the 2ⁿ
/// scale stayed scalar per element); `vscalefps` is the one-rounding `j·2ⁿ` the scalar code
/// gets through f64. The same bits. Returns how many leading elements it did (whole vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n_vec = gate.len().min(up.len()) / LANES * LANES;
    let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
    let (shift, log2e, ln2_hi, ln2_lo) = (_mm512_set1_ps(12_582_912.0), c(0x3fb8_aa3b), c(0x3f31_7200), c(0x35bf_be8e));
    let (c0, c1, c2, c3, c4) = (c(0x3f7f_fff6), c(0x3efffedb), c(0x3e2aaf33), c(0x3d2b9f17), c(0x3c072010));
    let (one, zero, inf, limit) = (_mm512_set1_ps(1.0), _mm512_setzero_ps(), _mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(192.0));
    let (abs_mask, sign_mask) = (_mm512_set1_epi32(0x7fff_ffff), _mm512_set1_epi32(i32::MIN));
    for at in (0..n_vec).step_by(LANES) {
        let g = _mm512_loadu_ps(gate.as_ptr().add(at));
        let x = _mm512_sub_ps(zero, g);
        let z = _mm512_fmadd_ps(x, log2e, shift);
        let n = _mm512_sub_ps(z, shift);
        let neg_n = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(n), sign_mask));
        let b = _mm512_fmadd_ps(neg_n, ln2_lo, _mm512_fmadd_ps(neg_n, ln2_hi, x));
        let u = _mm512_mul_ps(b, b);
        let p4 = _mm512_fmadd_ps(c4, b, c3);
        let p2 = _mm512_fmadd_ps(c2, b, c1);
        let p0 = _mm512_fmadd_ps(c0, b, one);
        let j = _mm512_fmadd_ps(_mm512_fmadd_ps(p4, u, p2), u, p0);
        let mut e = _mm512_scalef_ps(j, n);
        // |n| > 192 saturates: 0 for n ≤ 0, ∞ above (as the scalar code's early return).
        let abs_n = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(n), abs_mask));
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs_n, limit);
        let nonpos = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero);
        e = _mm512_mask_blend_ps(big, e, _mm512_mask_blend_ps(nonpos, inf, zero));
        let y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up.as_ptr().add(at)));
        _mm512_storeu_ps(gate.as_mut_ptr().add(at), y);
    }
    n_vec
}

/// `eˣ` as llama.cpp's vectorised `ggml_v_expf` computes it (Arm's optimized-routines
/// algorithm: `x = n·ln2 + b` with `n` rounded by the 1.5·2²³ shift, a degree-5 polynomial
/// in `b` evaluated with fused multiply-adds, scaled by `2ⁿ`; |n| > 192 saturates to 0 or
/// ∞). Same constants and operation order, so the same bits: llama.cpp's SwiGLU uses it, and
/// greedy decoding here follows llama.cpp's roundings (max error ≈ 1.5 ulp).
#[inline(always)]
pub(crate) fn ggml_expf(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 0x1.8p23
    const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
    const C0: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1
    const C1: f32 = f32::from_bits(0x3efffedb); // 0x1.fffdb6p-2
    const C2: f32 = f32::from_bits(0x3e2aaf33); // 0x1.555e66p-3
    const C3: f32 = f32::from_bits(0x3d2b9f17); // 0x1.573e2ep-5
    const C4: f32 = f32::from_bits(0x3c072010); // 0x1.0e4020p-7
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = C4.mul_add(b, C3).mul_add(u, C2.mul_add(b, C1)).mul_add(u, C0.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // j·2ⁿ with one rounding (as `vscalefps`): exact in f64, then rounded once.
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

// ---------------------------------------------------------------------------------------------
// Paged KV cache writes and causal attention over it

/// The CPU's writes and reads of the paged KV cache ([`PagedKvLayout`] says where a token goes).
impl PagedKvLayout {
    /// Stores one token's `k` and `v` (`kv_heads · head_dim` each, head after head) into slot
    /// `slot` of block `block`, rounded to half precision (to nearest even).
    pub fn write_token(&self, k_cache: &mut [u16], v_cache: &mut [u16], block: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (bt, d) = (self.block_tokens, self.head_dim);
        let width = self.kv_heads * d;
        assert!(slot < bt && k.len() == width && v.len() == width, "write_token: slot {slot}, row widths {} {}", k.len(), v.len());
        let base = block * self.block_elems();
        let k_block = &mut k_cache[base..base + self.block_elems()];
        let v_block = &mut v_cache[base..base + self.block_elems()];
        // Rounded first, by `vcvtps2ph` where the CPU has it (the software conversion was
        // most of this function's time: 2.8 % of a 16-stream step); the same bits.
        let mut k16 = [0u16; 8 * 256];
        let mut v16 = [0u16; 8 * 256];
        let (k16, v16): (&mut [u16], &mut [u16]) = if width <= k16.len() {
            (&mut k16[..width], &mut v16[..width])
        } else {
            return self.write_token_wide(k_block, v_block, slot, k, v);
        };
        dispatch_level!(Isa::selected(), f32_to_f16_slice(k, k16));
        dispatch_level!(Isa::selected(), f32_to_f16_slice(v, v16));
        for g in 0..self.kv_heads {
            let kt = &mut k_block[g * d * bt..(g + 1) * d * bt];
            for (c, &h) in k16[g * d..(g + 1) * d].iter().enumerate() {
                kt[c * bt + slot] = h;
            }
            let at = g * bt * d + slot * d;
            v_block[at..at + d].copy_from_slice(&v16[g * d..(g + 1) * d]);
        }
    }

    /// [`PagedKvLayout::write_token`] for rows wider than its stack buffers, converting
    /// value by value.
    fn write_token_wide(&self, k_block: &mut [u16], v_block: &mut [u16], slot: usize, k: &[f32], v: &[f32]) {
        let (bt, d) = (self.block_tokens, self.head_dim);
        for g in 0..self.kv_heads {
            let kt = &mut k_block[g * d * bt..(g + 1) * d * bt];
            for (c, &val) in k[g * d..(g + 1) * d].iter().enumerate() {
                kt[c * bt + slot] = f32_to_f16(val);
            }
            let at = g * bt * d + slot * d;
            for (dst, &val) in v_block[at..at + d].iter_mut().zip(&v[g * d..(g + 1) * d]) {
                *dst = f32_to_f16(val);
            }
        }
    }

    /// One token's K and V back out of the cache (tests, debugging).
    pub fn read_token(&self, k_cache: &[u16], v_cache: &[u16], block: usize, slot: usize, k: &mut [f32], v: &mut [f32]) {
        let (bt, d) = (self.block_tokens, self.head_dim);
        let base = block * self.block_elems();
        for g in 0..self.kv_heads {
            for c in 0..d {
                k[g * d + c] = f16_to_f32(k_cache[base + g * d * bt + c * bt + slot]);
            }
            let at = base + g * bt * d + slot * d;
            for (dst, &h) in v[g * d..(g + 1) * d].iter_mut().zip(&v_cache[at..at + d]) {
                *dst = f16_to_f32(h);
            }
        }
    }
}

/// One sequence's part of an attention call.
#[derive(Debug, Clone)]
pub struct PagedSeq<'a> {
    /// This sequence's rows of `q` and `out`.
    pub rows: Range<usize>,
    /// Position of the first row; row `rows.start + i` is at `start_pos + i` and attends to
    /// keys `0..=start_pos + i`, which must all be in the cache already.
    pub start_pos: usize,
    /// The sequence's cache blocks, position `p` in block `block_table[p / block_tokens]`.
    pub block_table: &'a [u32],
}

mod grouped;

/// Queries of one sequence per task: enough to amortise the task, few enough to spread a
/// single prompt over the threads.
const QUERY_TILE: usize = 16;

/// Multiply-adds below which attention runs on the calling thread (≈ 10 µs of work).
const ATTENTION_PAR_MIN_WORK: usize = 64 * 1024;

thread_local! {
    /// Per-thread score buffer, grown to the longest context seen and reused.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own (row, head) slices of `out`; tasks are disjoint.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the `Sync` wrapper, not the bare pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The arithmetic of [`paged_attention`]'s softmax and value sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionArith {
    /// llama.cpp's flash attention (online softmax with libm `expf`, value sum kept in f16):
    /// the same bits as llama.cpp, one sequential `expf` per key.
    LlamaCpp,
    /// f32 throughout (`grouped.rs` has the exact order): each score two FMA chains over the
    /// head's elements, the maximum, `fast_exp` of all scores (vectorised), the value sum as
    /// an FMA chain in position order, one multiplication by the sum's reciprocal. Within
    /// ≈ 1e-6 relative of exact softmax; no f16 roundings. Batch-invariant all the same.
    Fast,
}

/// Causal multi-head attention with grouped KV heads over a paged cache:
/// `out[row, head] = softmax(q[row, head] · Kᵀ / √head_dim) · V` over the keys of the row's
/// sequence at positions `0..=pos`, where head `h` reads KV head `h / (heads / kv_heads)`.
/// `q` and `out` are `[rows, heads · head_dim]`. Panics if `head_dim` is not one of
/// [`SUPPORTED_HEAD_DIMS`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    isa: Isa,
    arith: AttentionArith,
    q: &[f32],
    seqs: &[PagedSeq<'_>],
    heads: usize,
    layout: &PagedKvLayout,
    k_cache: &[u16],
    v_cache: &[u16],
    out: &mut [f32],
) {
    let (d, kv_heads, bt) = (layout.head_dim, layout.kv_heads, layout.block_tokens);
    assert!(heads > 0 && heads.is_multiple_of(kv_heads), "heads {heads} must be a multiple of kv_heads {kv_heads}");
    assert!(SUPPORTED_HEAD_DIMS.contains(&d), "head_dim {d} is not one of {SUPPORTED_HEAD_DIMS:?}");
    let width = heads * d;
    assert_eq!(q.len() % width, 0, "q is not whole rows of {width}");
    assert_eq!(out.len(), q.len(), "out length");
    assert_eq!(k_cache.len(), v_cache.len(), "K and V caches differ in size");
    assert_eq!(k_cache.len() % layout.block_elems(), 0, "cache is not whole blocks");
    let rows = q.len() / width;
    let num_blocks = k_cache.len() / layout.block_elems();
    for s in seqs {
        assert!(s.rows.start <= s.rows.end && s.rows.end <= rows, "sequence rows {:?} outside {rows}", s.rows);
        let keys = s.start_pos + s.rows.len();
        assert!(
            s.block_table.len() * bt >= keys,
            "block table of {} blocks cannot hold {keys} positions",
            s.block_table.len()
        );
        if let Some(&b) = s.block_table[..keys.div_ceil(bt)].iter().find(|&&b| b as usize >= num_blocks) {
            panic!("block {b} is outside the cache ({num_blocks} blocks)");
        }
    }

    match arith {
        AttentionArith::Fast => grouped::paged_attention_grouped(isa, q, seqs, heads, layout, k_cache, v_cache, out),
        AttentionArith::LlamaCpp => paged_attention_by_head(isa, q, seqs, heads, layout, k_cache, v_cache, out),
    }
}

/// [`paged_attention`] for [`AttentionArith::LlamaCpp`]: one (sequence, query head, query
/// tile) per task, the keys and values read once per query head (the caller checked the
/// arguments).
#[allow(clippy::too_many_arguments)]
fn paged_attention_by_head(
    isa: Isa,
    q: &[f32],
    seqs: &[PagedSeq<'_>],
    heads: usize,
    layout: &PagedKvLayout,
    k_cache: &[u16],
    v_cache: &[u16],
    out: &mut [f32],
) {
    let (d, kv_heads, bt) = (layout.head_dim, layout.kv_heads, layout.block_tokens);
    let width = heads * d;
    // Tasks: (sequence, head, query tile). Per head rather than per KV head, so that even a
    // single decoding sequence spreads evenly over the threads; the KV head's blocks are read
    // once per query head, from cache after the first.
    let mut tasks = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for h in 0..heads {
            for t in (0..s.rows.len()).step_by(QUERY_TILE) {
                tasks.push((si, h, t));
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let group = heads / kv_heads;
    let run = |&(si, h, t): &(usize, usize, usize)| {
        let s = &seqs[si];
        let tile = t..(t + QUERY_TILE).min(s.rows.len());
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            let keys = s.start_pos + tile.end;
            let need = keys.div_ceil(bt) * bt;
            if scores.len() < need {
                scores.resize(need, 0.0);
            }
            let task = Task { q, width, layout, k_cache, v_cache, seq: s, head: h, kv_head: h / group, tile, out: out_ptr.get() };
            macro_rules! with_dim {
                ($($dim:literal),*) => {
                    match d {
                        $($dim => dispatch_level!(isa, attend_tile::<$dim>(&task, &mut scores)),)*
                        _ => unreachable!("head_dim checked above"),
                    }
                };
            }
            with_dim!(32, 64, 80, 96, 128, 256)
        });
    };
    // Multiply-adds of the call (scores and weighted sums), to decide whether to wake the pool.
    let work: usize = seqs.iter().map(|s| s.rows.len() * (s.start_pos + s.rows.len()) * width * 2).sum();
    if tasks.len() > 1 && work >= ATTENTION_PAR_MIN_WORK {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

struct Task<'a> {
    q: &'a [f32],
    width: usize,
    layout: &'a PagedKvLayout,
    k_cache: &'a [u16],
    v_cache: &'a [u16],
    seq: &'a PagedSeq<'a>,
    head: usize,
    kv_head: usize,
    /// Indices into the sequence's rows.
    tile: Range<usize>,
    out: *mut f32,
}

#[inline(always)]
fn attend_tile<const D: usize, const L: u8>(task: &Task<'_>, scores: &mut [f32]) {
    for i in task.tile.clone() {
        let row = task.seq.rows.start + i;
        let n_keys = task.seq.start_pos + i + 1;
        let at = row * task.width + task.head * D;
        let q: &[f32; D] = task.q[at..at + D].try_into().unwrap();
        let mut o = [0f32; D];
        score_keys::<D, L>(q, n_keys, task, scores);
        softmax_values::<D, L>(n_keys, task, scores, &mut o);
        // SAFETY: (row, head) belongs to this task alone; `at + D <= out.len()` because `out`
        // has the length of `q`, which was just sliced at the same place.
        unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), task.out.add(at), D) };
    }
}

/// Sixteen f32 values rounded to the nearest IEEE half (ties to even) and widened back:
/// `vcvtps2ph` + `vcvtph2ps` on x86.
#[inline(always)]
fn round_f16_16<const L: u8>(x: [f32; LANES]) -> [f32; LANES] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if L == AVX512 {
            // SAFETY: LEVEL AVX512 is only instantiated inside `run_avx512` (AVX-512F);
            // __m512 and [f32; 16] have the same layout.
            return unsafe {
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(std::mem::transmute::<[f32; LANES], __m512>(x));
                std::mem::transmute::<__m512, [f32; LANES]>(_mm512_cvtph_ps(h))
            };
        }
        if L == AVX2 {
            // SAFETY: as above with `run_avx2` (F16C).
            return unsafe {
                let [lo, hi] = std::mem::transmute::<[f32; LANES], [__m256; 2]>(x);
                let lo = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(lo));
                let hi = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(hi));
                std::mem::transmute::<[__m256; 2], [f32; LANES]>([lo, hi])
            };
        }
    }
    x.map(|v| f16_to_f32(f32_to_f16(v)))
}

/// One (query, head): scores against keys `0..n_keys`, softmax, weighted sum of V — with
/// the arithmetic of llama.cpp's CPU flash attention (`ggml_compute_forward_flash_attn_ext_f16`,
/// the path llama-server takes for decoding and for prompts shorter than its 64-row tile), so
/// that greedy continuations reproduce llama.cpp's on this small, tie-prone model. A
/// straightforward f32 softmax differs from it by up to ≈ 0.3 in the logits — as much as
/// llama.cpp differs from itself with `-fa off`. Its distinctive roundings:
/// - the query is rounded to f16 and each score is an f32 sum of exact f16·f16 products in a
///   fixed tree (64 elements per step, four 16-lane accumulators, then halving), leftovers of
///   a head width not a multiple of 64 added in f64;
/// - an online softmax over the keys in position order with libm's `expf`, and the weighted
///   sum of V kept **in f16**: after every key, `acc = f16(fma(v, p, acc))`, rescaled (again
///   to f16) whenever a new maximum appears; the sum of weights in f32.
///
/// Every step depends only on the query, its position and the cached keys and values, so the
/// result is batch-invariant. Scores are still computed sixteen keys at a time (keys as
/// lanes, the element tree unrolled across them), and the f16 roundings are one vector
/// instruction each way.
#[inline(always)]
fn score_keys<const D: usize, const L: u8>(q: &[f32; D], n_keys: usize, task: &Task<'_>, scores: &mut [f32]) {
    let layout = task.layout;
    let bt = layout.block_tokens;
    let be = layout.block_elems();
    let g = task.kv_head;
    let n_blocks = n_keys.div_ceil(bt);
    let table = &task.seq.block_table[..n_blocks];
    let scale = 1.0 / (D as f32).sqrt();

    let mut qh = [0f32; D];
    for c16 in (0..D).step_by(LANES) {
        let r = round_f16_16::<L>(q[c16..c16 + LANES].try_into().unwrap());
        qh[c16..c16 + LANES].copy_from_slice(&r);
    }
    let full = D / 64 * 64;

    for (b, &block) in table.iter().enumerate() {
        let kt = &task.k_cache[block as usize * be + g * D * bt..][..D * bt];
        let valid = (n_keys - b * bt).min(bt);
        for l in 0..valid.div_ceil(LANES) {
            let keys = &kt[l * LANES..];
            let k_row = |c: usize| widen16::<L>(keys[c * bt..c * bt + LANES].try_into().unwrap());
            // Element c's running sum over the 64-wide steps (products are exact in f32).
            let elem = |c: usize| -> [f32; LANES] {
                let mut acc = [0f32; LANES];
                for step in (0..full).step_by(64) {
                    let k = k_row(step + c);
                    for lane in 0..LANES {
                        acc[lane] += qh[step + c] * k[lane];
                    }
                }
                acc
            };
            let mut x0 = [[0f32; LANES]; 16];
            if full > 0 {
                for (i, x) in x0.iter_mut().enumerate() {
                    let (a, b2, c2, d2) = (elem(i), elem(16 + i), elem(32 + i), elem(48 + i));
                    for lane in 0..LANES {
                        x[lane] = (a[lane] + c2[lane]) + (b2[lane] + d2[lane]);
                    }
                }
            }
            // 16 element lanes summed as `_mm512_reduce_add_ps` does: halves of 8, 4, then pairs.
            let mut t = [[0f32; LANES]; 8];
            for i in 0..8 {
                for lane in 0..LANES {
                    t[i][lane] = x0[8 + i][lane] + x0[i][lane];
                }
            }
            let s = &mut scores[b * bt + l * LANES..][..LANES];
            for lane in 0..LANES {
                let u = [t[4][lane] + t[0][lane], t[5][lane] + t[1][lane], t[6][lane] + t[2][lane], t[7][lane] + t[3][lane]];
                let mut sum = (u[0] + u[2]) + (u[1] + u[3]);
                if full < D {
                    let mut wide = sum as f64;
                    for c in full..D {
                        wide += (qh[c] * f16_to_f32(keys[c * bt + lane])) as f64;
                    }
                    sum = wide as f32;
                }
                s[lane] = sum * scale;
            }
        }
    }
}

/// The second half of [`score_keys`]' doc: llama.cpp's online softmax and f16 value sum.
#[inline(always)]
fn softmax_values<const D: usize, const L: u8>(n_keys: usize, task: &Task<'_>, scores: &[f32], o: &mut [f32; D]) {
    let layout = task.layout;
    let (bt, be, g) = (layout.block_tokens, layout.block_elems(), task.kv_head);
    let table = &task.seq.block_table[..n_keys.div_ceil(bt)];
    let mut m = f32::NEG_INFINITY;
    let mut total = 0f32;
    let mut acc = [0f32; D];
    let mut j = 0;
    for (b, &block) in table.iter().enumerate() {
        let vb = &task.v_cache[block as usize * be + g * bt * D..][..bt * D];
        let valid = (n_keys - b * bt).min(bt);
        for slot in 0..valid {
            let s = scores[j];
            j += 1;
            let (ms, vs) = if s > m {
                let ms = (m - s).exp();
                m = s;
                for c16 in (0..D).step_by(LANES) {
                    let mut x: [f32; LANES] = acc[c16..c16 + LANES].try_into().unwrap();
                    for v in &mut x {
                        *v *= ms;
                    }
                    acc[c16..c16 + LANES].copy_from_slice(&round_f16_16::<L>(x));
                }
                (ms, 1.0)
            } else {
                (1.0, (s - m).exp())
            };
            let v = &vb[slot * D..][..D];
            for c16 in (0..D).step_by(LANES) {
                let vv = widen16::<L>(v[c16..c16 + LANES].try_into().unwrap());
                let mut x = [0f32; LANES];
                for l in 0..LANES {
                    x[l] = vv[l].mul_add(vs, acc[c16 + l]);
                }
                acc[c16..c16 + LANES].copy_from_slice(&round_f16_16::<L>(x));
            }
            total = total.mul_add(ms, vs);
        }
    }
    let inv = if total == 0.0 { 0.0 } else { 1.0 / total };
    for c in 0..D {
        o[c] = acc[c] * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, levels, Rng};

    /// The levels with their own code here (AMX runs the AVX-512 ops), those the CPU has.
    fn isas() -> Vec<Isa> {
        levels("llama_ops").into_iter().filter(|&i| i <= Isa::Avx512).collect()
    }

    fn seed(salt: u64) -> u64 {
        salt ^ (std::process::id() as u64).wrapping_mul(0x9E37_79B9)
    }

    #[test]
    fn rms_norm_matches_f64() {
        let mut rng = Rng::new(seed(3));
        for isa in isas() {
            for &(rows, dim) in &[(1, 1), (3, 576), (5, 17), (90, 576)] {
                let x = rng.vec(rows * dim);
                let w = rng.vec(dim);
                let mut out = vec![f32::NAN; rows * dim];
                rms_norm(isa, &x, dim, &w, 1e-5, &mut out);
                let mut want = vec![0f64; rows * dim];
                for r in 0..rows {
                    let row = &x[r * dim..(r + 1) * dim];
                    let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
                    for i in 0..dim {
                        want[r * dim + i] = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                    }
                }
                assert_close(&out, &want, 2e-6, &format!("rms_norm {isa:?} {rows}x{dim}"));
            }
        }
    }

    #[test]
    fn rope_matches_f64() {
        let mut rng = Rng::new(seed(5));
        let (heads, d, rope_dims, base) = (3, 64, 64, 100_000f32);
        for rd in [rope_dims, 32] {
            let positions = [0usize, 1, 7, 300, 8191];
            let x0 = rng.vec(positions.len() * heads * d);
            let mut cs = vec![f32::NAN; positions.len() * rd];
            let params = RopeParams { dims: rd, base, freq_scale: 1.0, freq_factors: Vec::new() };
            for (i, &p) in positions.iter().enumerate() {
                rope_cos_sin(p, &params, &mut cs[i * rd..(i + 1) * rd]);
            }
            let mut x = x0.clone();
            rope_pairs(&mut x, heads, d, rd, &cs);
            // The angles are llama.cpp's f32 recurrence θᵢ₊₁ = θᵢ·base^(−2/dims): θᵢ carries up
            // to ≈ (i + 2) roundings of 2⁻²⁴ relative, i.e. ≈ pos·(i + 2)·2⁻²⁴ radians.
            let mut want = vec![0f64; x0.len()];
            let mut tol = vec![1e-6f64; x0.len()];
            for (r, &p) in positions.iter().enumerate() {
                for h in 0..heads {
                    let at = r * heads * d + h * d;
                    for i in 0..d {
                        want[at + i] = x0[at + i] as f64;
                    }
                    for i in 0..rd / 2 {
                        let theta = p as f64 / (base as f64).powf(2.0 * i as f64 / rd as f64);
                        let (a, b) = (x0[at + 2 * i] as f64, x0[at + 2 * i + 1] as f64);
                        want[at + 2 * i] = a * theta.cos() - b * theta.sin();
                        want[at + 2 * i + 1] = a * theta.sin() + b * theta.cos();
                        let angle_err = p as f64 * (i + 2) as f64 * 2f64.powi(-24) + 1e-7;
                        tol[at + 2 * i] += (a.abs() + b.abs()) * angle_err;
                        tol[at + 2 * i + 1] += (a.abs() + b.abs()) * angle_err;
                    }
                }
            }
            for (i, ((&g, &w), &t)) in x.iter().zip(&want).zip(&tol).enumerate() {
                assert!((g as f64 - w).abs() <= t, "rope rope_dims={rd}: index {i}: got {g}, want {w} (tolerance {t:e})");
            }
        }

        // Linear position scaling and per-frequency divisors (Llama 3's `rope_freqs`).
        let factors: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 0.5).collect();
        let params = RopeParams { dims: 32, base: 500_000.0, freq_scale: 0.25, freq_factors: factors.clone() };
        let mut cs = vec![f32::NAN; 32];
        rope_cos_sin(1234, &params, &mut cs);
        let want: Vec<f64> = (0..16)
            .flat_map(|i| {
                let theta = 1234.0 * 0.25 * 500_000f64.powf(-2.0 * i as f64 / 32.0) / factors[i] as f64;
                [theta.cos(), theta.sin()]
            })
            .collect();
        // θ₀ = 1234 is exact; later angles carry the recurrence's roundings (see above).
        for (i, (&g, &w)) in cs.iter().zip(&want).enumerate() {
            let tol = 1e-7 + 1234.0 * 0.25 * ((i / 2) + 2) as f64 * 2f64.powi(-24);
            assert!((g as f64 - w).abs() <= tol, "rope scaled: index {i}: got {g}, want {w}");
        }
    }

    #[test]
    fn ggml_expf_is_within_two_ulp_and_saturates() {
        let mut rng = Rng::new(seed(29));
        for _ in 0..100_000 {
            let x = rng.f32() * 87.0;
            let (got, want) = (ggml_expf(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= want * 2.5e-7, "expf({x}): {got} vs {want}");
        }
        assert_eq!(ggml_expf(0.0), 1.0);
        assert_eq!(ggml_expf(-200.0), 0.0);
        assert_eq!(ggml_expf(200.0), f32::INFINITY);
    }

    #[test]
    fn silu_mul_matches_f64() {
        let mut rng = Rng::new(seed(9));
        for isa in isas() {
            for n in [1, 33, 1536 * 3, 70_001] {
                let g0: Vec<f32> = rng.vec(n).iter().map(|v| v * 12.0).collect();
                let u = rng.vec(n);
                let mut g = g0.clone();
                silu_mul(isa, &mut g, &u);
                let want: Vec<f64> = g0.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64).collect();
                assert_close(&g, &want, 1e-6, &format!("silu_mul {isa:?} n={n}"));
            }
        }
    }

    /// A cache with `seqs` sequences of the given lengths, each on shuffled blocks.
    struct Fixture {
        k: Vec<u16>,
        v: Vec<u16>,
        tables: Vec<Vec<u32>>,
        /// Per sequence, per position: the K and V rows written.
        kv: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    }

    fn fixture(rng: &mut Rng, layout: PagedKvLayout, lens: &[usize]) -> Fixture {
        let bt = layout.block_tokens;
        let total_blocks: usize = lens.iter().map(|l| l.div_ceil(bt)).sum::<usize>() + 3;
        // Poisoned with NaN: any read of an unwritten slot in a valid lane would show.
        const NAN16: u16 = 0x7e00;
        let mut k = vec![NAN16; total_blocks * layout.block_elems()];
        let mut v = vec![NAN16; total_blocks * layout.block_elems()];
        // A scrambled block order (multiplicative step coprime with the count).
        let mut step = 7usize;
        while gcd(step, total_blocks) != 1 {
            step += 1;
        }
        let mut next = (0..total_blocks).map(|i| (i * step + 1) % total_blocks);
        let width = layout.kv_heads * layout.head_dim;
        let mut tables = Vec::new();
        let mut kvs = Vec::new();
        for &len in lens {
            let table: Vec<u32> = (0..len.div_ceil(bt)).map(|_| next.next().unwrap() as u32).collect();
            let mut rows = Vec::new();
            for p in 0..len {
                let (kr, vr) = (rng.vec(width), rng.vec(width));
                layout.write_token(&mut k, &mut v, table[p / bt] as usize, p % bt, &kr, &vr);
                // The reference sees what the cache holds (rounded to half precision).
                let (mut ks, mut vs) = (vec![0f32; width], vec![0f32; width]);
                layout.read_token(&k, &v, table[p / bt] as usize, p % bt, &mut ks, &mut vs);
                for (stored, orig) in ks.iter().chain(&vs).zip(kr.iter().chain(&vr)) {
                    assert!((stored - orig).abs() <= orig.abs() / 2048.0 + 1e-7, "f16 rounding of {orig}: {stored}");
                }
                rows.push((ks, vs));
            }
            tables.push(table);
            kvs.push(rows);
        }
        Fixture { k, v, tables, kv: kvs }
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    #[test]
    fn the_simd_paths_give_the_portable_bits() {
        let mut rng = Rng::new(seed(31));
        // RMSNorm: any number of rows together gives each row's bits alone.
        let dim = 576;
        let x = rng.vec(21 * dim);
        let w = rng.vec(dim);
        for isa in isas() {
            let mut together = vec![0f32; x.len()];
            rms_norm(isa, &x, dim, &w, 1e-5, &mut together);
            for r in 0..21 {
                let mut alone = vec![0f32; dim];
                rms_norm(Isa::Portable, &x[r * dim..(r + 1) * dim], dim, &w, 1e-5, &mut alone);
                assert!(alone.iter().zip(&together[r * dim..]).all(|(a, b)| a.to_bits() == b.to_bits()), "rms_norm {isa:?} row {r}");
            }
        }
        // SiLU·up, saturation and subnormal results included.
        let mut g0: Vec<f32> = rng.vec(4099).iter().map(|v| v * 40.0).collect();
        g0.extend([150.0, -150.0, 200.0, -200.0, 87.0, -87.0, 103.0, -103.0, 0.0, -0.0, 1e-30, -1e-30, f32::INFINITY, f32::NEG_INFINITY, 1e38, -1e38]);
        let u: Vec<f32> = g0.iter().enumerate().map(|(i, _)| if i % 7 == 0 { 1e-38 } else { 1.5 }).collect();
        let mut portable = g0.clone();
        silu_mul(Isa::Portable, &mut portable, &u);
        for isa in isas() {
            let mut g = g0.clone();
            silu_mul(isa, &mut g, &u);
            for (i, (a, b)) in g.iter().zip(&portable).enumerate() {
                assert!(a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(), "silu_mul {isa:?} at {i} (gate {}): {a} vs {b}", g0[i]);
            }
        }
        // f16 rounding of the KV write.
        let mut vals = rng.vec(1000);
        vals.extend([65504.0, 65520.0, 1e9, -1e9, 6e-8, 3e-8, 2.9e-8, 1e-12, 0.0, -0.0, f32::INFINITY, f32::NAN]);
        for isa in isas() {
            let mut out = vec![0u16; vals.len()];
            dispatch_level!(isa, f32_to_f16_slice(&vals, &mut out));
            for (i, (&h, &v)) in out.iter().zip(&vals).enumerate() {
                assert_eq!(h, f32_to_f16(v), "f16 {isa:?} at {i} ({v})");
            }
        }
    }

    #[test]
    fn kv_layout_round_trips() {
        let mut rng = Rng::new(seed(13));
        let layout = PagedKvLayout::new(16, 3, 64);
        let f = fixture(&mut rng, layout, &[37, 5]);
        let width = 3 * 64;
        let (mut k, mut v) = (vec![0f32; width], vec![0f32; width]);
        for (s, rows) in f.kv.iter().enumerate() {
            for (p, (kr, vr)) in rows.iter().enumerate() {
                layout.read_token(&f.k, &f.v, f.tables[s][p / 16] as usize, p % 16, &mut k, &mut v);
                assert_eq!((&k, &v), (kr, vr), "seq {s} pos {p}");
            }
        }
    }

    #[test]
    fn paged_attention_matches_f64_and_is_batch_invariant() {
        let mut rng = Rng::new(seed(17));
        // Group sizes 3, 1, 4, 2, 4 (Llama 3.2's 32/8) and 5 (split 2 + 3 into tasks).
        for &(d, heads, kv_heads, bt) in
            &[(64, 9, 3, 16), (32, 4, 4, 32), (128, 4, 1, 16), (80, 2, 1, 16), (64, 32, 8, 16), (96, 10, 2, 32)]
        {
            let layout = PagedKvLayout::new(bt, kv_heads, d);
            // Sequence lengths around block and lane boundaries, and one long one.
            let lens = [1usize, 15, 16, 17, 33, 130];
            let f = fixture(&mut rng, layout, &lens);
            let width = heads * d;
            // Every position of every sequence is a query (a full prefill), at a scale that
            // gives peaked softmaxes.
            let total: usize = lens.iter().sum();
            let q: Vec<f32> = rng.vec(total * width).iter().map(|v| v * 3.0).collect();
            // The exact kernel rounds the query to f16 first (as llama.cpp does): its
            // reference starts from the same rounded query and is exact from there; the fast
            // kernel's from the query itself.
            let q16: Vec<f32> = q.iter().map(|&v| f16_to_f32(f32_to_f16(v))).collect();
            let mut seqs = Vec::new();
            let mut row = 0;
            for (s, &len) in lens.iter().enumerate() {
                seqs.push(PagedSeq { rows: row..row + len, start_pos: 0, block_table: &f.tables[s] });
                row += len;
            }
            let group = heads / kv_heads;
            let reference = |q: &[f32]| {
                let mut want = vec![0f64; total * width];
                for (s, seq) in seqs.iter().enumerate() {
                    for i in 0..lens[s] {
                        let r = seq.rows.start + i;
                        for h in 0..heads {
                            let g = h / group;
                            let qh = &q[r * width + h * d..][..d];
                            let sc: Vec<f64> = (0..=i)
                                .map(|j| (0..d).map(|c| qh[c] as f64 * f.kv[s][j].0[g * d + c] as f64).sum::<f64>() / (d as f64).sqrt())
                                .collect();
                            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                            for c in 0..d {
                                want[r * width + h * d + c] =
                                    sc.iter().enumerate().map(|(j, x)| (x - m).exp() / z * f.kv[s][j].1[g * d + c] as f64).sum();
                            }
                        }
                    }
                }
                want
            };
            let (want16, want32) = (reference(&q16), reference(&q));
            for arith in [AttentionArith::LlamaCpp, AttentionArith::Fast] {
            let want = if arith == AttentionArith::LlamaCpp { &want16 } else { &want32 };
            let mut portable = vec![f32::NAN; total * width];
            paged_attention(Isa::Portable, arith, &q, &seqs, heads, &layout, &f.k, &f.v, &mut portable);
            for (s, seq) in seqs.iter().enumerate() {
                for i in 0..lens[s] {
                    let r = seq.rows.start + i;
                    let tol = match arith {
                        // The value sum is kept in f16 (llama.cpp's flash attention): each of
                        // a query's `n` keys adds one f16 rounding (≤ 2⁻¹¹ relative) to a sum
                        // bounded by the weights' total times max |v| (≤ 1 here), so
                        // |error| ≤ ≈ (n + 1)·2⁻¹¹.
                        AttentionArith::LlamaCpp => (i + 2) as f64 * 2f64.powi(-11),
                        // f32 throughout: `fast_exp` (≤ 2e-7 relative) of `s − max`, whose
                        // rounding is ≤ 2⁻²⁴·|s| (|s| ≲ 30 here) ⇒ ≲ 2e-6 per weight, plus
                        // f32 sums over n keys.
                        AttentionArith::Fast => 4e-6 + (i + 2) as f64 * 2f64.powi(-23),
                    };
                    for c in r * width..(r + 1) * width {
                        let err = (portable[c] as f64 - want[c]).abs();
                        assert!(err <= tol, "attention {arith:?} d={d} heads={heads}/{kv_heads} bt={bt}: seq {s} query {i}: got {}, want {} (err {err:e}, tolerance {tol:e})", portable[c], want[c]);
                    }
                }
            }
            for isa in isas() {
                let mut out = vec![f32::NAN; total * width];
                paged_attention(isa, arith, &q, &seqs, heads, &layout, &f.k, &f.v, &mut out);
                // Every level gives the portable code's bits.
                assert!(
                    out.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "attention {arith:?} {isa:?} d={d} heads={heads}/{kv_heads} bt={bt} differs from the portable path"
                );

                // Batch invariance: each query alone (a decode step at its position, in a
                // one-row call) and in chunks of 7 must give the very same bits.
                for (s, seq) in seqs.iter().enumerate() {
                    for chunk in [1usize, 7] {
                        for start in (0..lens[s]).step_by(chunk) {
                            let n = chunk.min(lens[s] - start);
                            let r0 = seq.rows.start + start;
                            let qs = &q[r0 * width..(r0 + n) * width];
                            let mut o = vec![f32::NAN; n * width];
                            let one = [PagedSeq { rows: 0..n, start_pos: start, block_table: &f.tables[s] }];
                            paged_attention(isa, arith, qs, &one, heads, &layout, &f.k, &f.v, &mut o);
                            let whole = &out[r0 * width..(r0 + n) * width];
                            assert!(
                                o.iter().zip(whole).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{arith:?} {isa:?} d={d}: seq {s} rows {start}..{} differ when run in chunks of {chunk}",
                                start + n
                            );
                        }
                    }
                }
            }
            }
        }
    }
}

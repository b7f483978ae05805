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
//! Rust neither re-associates nor contracts float arithmetic, so equal source-level operation
//! sequences give equal bits; fused multiply-adds are a compile-time choice per ISA level (the
//! level is fixed per process), so they cannot vary between calls either.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::math::fast_exp;
use super::Isa;
use crate::quant::f16::{f16_to_f32, f32_to_f16};

/// Elements below which a row-wise op runs on the calling thread (waking the pool costs more).
const PAR_MIN_ELEMS: usize = 32 * 1024;

/// Score lanes: keys are scored sixteen at a time (one 512-bit register, two 256-bit ones).
const LANES: usize = 16;

/// Head widths the attention kernel is compiled for (the accumulators live in registers,
/// so the width is a compile-time constant).
pub const SUPPORTED_HEAD_DIMS: [usize; 6] = [32, 64, 80, 96, 128, 256];

/// What an instantiation `$body::<…, LEVEL>` may assume. Every x86 level uses fused
/// multiply-adds; the portable one multiplies and adds separately (`mul_add` would be a libm
/// call there).
const PORTABLE: u8 = 0;
/// AVX2 + FMA + F16C.
const AVX2: u8 = 1;
/// AVX-512 F/BW/VL + FMA.
const AVX512: u8 = 2;

/// The instantiation level for `isa`.
fn level(isa: Isa) -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        // Every level above AVX2 includes AVX-512 F/BW/VL. F16C comes with every AVX2 CPU
        // made, but `Isa::Avx2` does not promise it, so check.
        if isa >= Isa::Avx512 {
            return AVX512;
        }
        if isa == Isa::Avx2 && is_x86_feature_detected!("f16c") {
            return AVX2;
        }
    }
    let _ = isa;
    PORTABLE
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
                // SAFETY: `level` returns these only when the CPU has the features.
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

/// `a·b + c`: one rounding on the x86 levels, two on the portable one.
#[inline(always)]
fn madd<const L: u8>(a: f32, b: f32, c: f32) -> f32 {
    if L > PORTABLE {
        a.mul_add(b, c)
    } else {
        a * b + c
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
    if x.len() <= PAR_MIN_ELEMS {
        run(x, out);
    } else {
        let chunk = (PAR_MIN_ELEMS / dim).max(1) * dim;
        x.par_chunks(chunk).zip(out.par_chunks_mut(chunk)).for_each(|(x, out)| run(x, out));
    }
}

#[inline(always)]
fn rms_norm_rows<const L: u8>(x: &[f32], dim: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    for (row, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mut lanes = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                lanes[l] = madd::<L>(c[l], c[l], lanes[l]);
            }
        }
        let mut sum = sum_lanes(&lanes);
        for &v in tail {
            sum = madd::<L>(v, v, sum);
        }
        let scale = 1.0 / (sum / dim as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// The sixteen lanes summed as a fixed tree.
#[inline(always)]
fn sum_lanes(l: &[f32; LANES]) -> f32 {
    let mut v = *l;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
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
/// `pos`. Computed in f64 from the position alone, so a token's rotation cannot depend on
/// the rows around it.
pub fn rope_cos_sin(pos: usize, rope: &RopeParams, out: &mut [f32]) {
    let dims = rope.dims;
    assert!(dims.is_multiple_of(2) && out.len() == dims, "rope_cos_sin: {dims} dims into {}", out.len());
    assert!(rope.freq_factors.is_empty() || rope.freq_factors.len() == dims / 2, "rope_cos_sin: {} frequency factors", rope.freq_factors.len());
    let base = rope.base as f64;
    let pos = pos as f64 * rope.freq_scale as f64;
    for (i, cs) in out.chunks_exact_mut(2).enumerate() {
        let mut theta = pos * base.powf(-2.0 * i as f64 / dims as f64);
        if let Some(&f) = rope.freq_factors.get(i) {
            theta /= f as f64;
        }
        cs[0] = theta.cos() as f32;
        cs[1] = theta.sin() as f32;
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
    for (row, cs) in x.chunks_exact_mut(width).zip(cos_sin.chunks_exact(rope_dims.max(1))) {
        for head in row.chunks_exact_mut(head_dim) {
            for (pair, cs) in head[..rope_dims].chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                let (a, b, c, s) = (pair[0], pair[1], cs[0], cs[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
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
    if gate.len() <= PAR_MIN_ELEMS {
        run(gate, up);
    } else {
        gate.par_chunks_mut(PAR_MIN_ELEMS).zip(up.par_chunks(PAR_MIN_ELEMS)).for_each(|(g, u)| run(g, u));
    }
}

#[inline(always)]
fn silu_mul_slice<const L: u8>(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + fast_exp(-*g)) * u;
    }
}

// ---------------------------------------------------------------------------------------------
// Paged KV cache layout and causal attention over it

/// How a layer's K and V caches are laid out: IEEE half floats (as llama.cpp's default cache:
/// half the bytes to stream per attention step, widened exactly by one instruction), in
/// `num_blocks` blocks of `block_tokens` token slots; within a block, per KV head,
/// - K transposed, `[head_dim][block_tokens]`, so that scoring a query against sixteen keys is
///   sixteen independent lanes (no horizontal sums);
/// - V as rows, `[block_tokens][head_dim]`, so that the weighted sum is unit-stride.
///
/// A block of one layer's K cache is `kv_heads · head_dim · block_tokens` halves, the KV head
/// outermost; V alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    /// A multiple of 16 (the score lanes).
    pub block_tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PagedKvLayout {
    pub fn new(block_tokens: usize, kv_heads: usize, head_dim: usize) -> Self {
        assert!(
            block_tokens > 0 && block_tokens.is_multiple_of(LANES),
            "block_tokens {block_tokens} must be a positive multiple of {LANES}"
        );
        assert!(kv_heads > 0 && head_dim > 0, "kv_heads and head_dim must be positive");
        PagedKvLayout { block_tokens, kv_heads, head_dim }
    }

    /// Values (halves) of one block in one layer's K (or V) cache.
    pub fn block_elems(&self) -> usize {
        self.block_tokens * self.kv_heads * self.head_dim
    }

    /// Stores one token's `k` and `v` (`kv_heads · head_dim` each, head after head) into slot
    /// `slot` of block `block`, rounded to half precision (to nearest even).
    pub fn write_token(&self, k_cache: &mut [u16], v_cache: &mut [u16], block: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (bt, d) = (self.block_tokens, self.head_dim);
        let width = self.kv_heads * d;
        assert!(slot < bt && k.len() == width && v.len() == width, "write_token: slot {slot}, row widths {} {}", k.len(), v.len());
        let base = block * self.block_elems();
        let k_block = &mut k_cache[base..base + self.block_elems()];
        let v_block = &mut v_cache[base..base + self.block_elems()];
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

/// Causal multi-head attention with grouped KV heads over a paged cache:
/// `out[row, head] = softmax(q[row, head] · Kᵀ / √head_dim) · V` over the keys of the row's
/// sequence at positions `0..=pos`, where head `h` reads KV head `h / (heads / kv_heads)`.
/// `q` and `out` are `[rows, heads · head_dim]`. Panics if `head_dim` is not one of
/// [`SUPPORTED_HEAD_DIMS`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
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
    let scale = 1.0 / (D as f32).sqrt();
    for i in task.tile.clone() {
        let row = task.seq.rows.start + i;
        let n_keys = task.seq.start_pos + i + 1;
        let at = row * task.width + task.head * D;
        let mut q = [0f32; D];
        for (qc, &v) in q.iter_mut().zip(&task.q[at..at + D]) {
            *qc = v * scale;
        }
        let mut o = [0f32; D];
        attend_one::<D, L>(&q, n_keys, task, scores, &mut o);
        // SAFETY: (row, head) belongs to this task alone; `at + D <= out.len()` because `out`
        // has the length of `q`, which was just sliced at the same place.
        unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), task.out.add(at), D) };
    }
}

/// `acc += q · k`, lane-wise.
#[inline(always)]
fn fma_lanes<const L: u8>(acc: &mut [f32; LANES], q: f32, k: &[u16; LANES]) {
    let k = widen16::<L>(k);
    for lane in 0..LANES {
        acc[lane] = madd::<L>(q, k[lane], acc[lane]);
    }
}

/// One (query, head): scores against keys `0..n_keys`, softmax, weighted sum of V.
/// Every loop bound and lane assignment derives from `n_keys` and the key positions alone.
#[inline(always)]
fn attend_one<const D: usize, const L: u8>(q: &[f32; D], n_keys: usize, task: &Task<'_>, scores: &mut [f32], o: &mut [f32; D]) {
    let layout = task.layout;
    let bt = layout.block_tokens;
    let be = layout.block_elems();
    let g = task.kv_head;
    let n_blocks = n_keys.div_ceil(bt);
    let table = &task.seq.block_table[..n_blocks];

    // Scores, sixteen keys per pass: eight partial sums over the head dimension (d mod 8)
    // so that the multiply-add chains overlap, combined as a fixed tree.
    for (b, &block) in table.iter().enumerate() {
        let kt = &task.k_cache[block as usize * be + g * D * bt..][..D * bt];
        let valid = (n_keys - b * bt).min(bt);
        for l in 0..valid.div_ceil(LANES) {
            let keys = &kt[l * LANES..];
            let k_row = |c: usize| -> &[u16; LANES] { keys[c * bt..c * bt + LANES].try_into().unwrap() };
            let mut acc = [[0f32; LANES]; 8];
            for c8 in (0..D).step_by(8) {
                // Written out so that each accumulator is its own register.
                let [a0, a1, a2, a3, a4, a5, a6, a7] = &mut acc;
                fma_lanes::<L>(a0, q[c8], k_row(c8));
                fma_lanes::<L>(a1, q[c8 + 1], k_row(c8 + 1));
                fma_lanes::<L>(a2, q[c8 + 2], k_row(c8 + 2));
                fma_lanes::<L>(a3, q[c8 + 3], k_row(c8 + 3));
                fma_lanes::<L>(a4, q[c8 + 4], k_row(c8 + 4));
                fma_lanes::<L>(a5, q[c8 + 5], k_row(c8 + 5));
                fma_lanes::<L>(a6, q[c8 + 6], k_row(c8 + 6));
                fma_lanes::<L>(a7, q[c8 + 7], k_row(c8 + 7));
            }
            let s = &mut scores[b * bt + l * LANES..][..LANES];
            for lane in 0..LANES {
                s[lane] = ((acc[0][lane] + acc[1][lane]) + (acc[2][lane] + acc[3][lane]))
                    + ((acc[4][lane] + acc[5][lane]) + (acc[6][lane] + acc[7][lane]));
            }
        }
    }

    // Softmax numerators in place; the sum in sixteen lanes by key position mod 16.
    let scores = &mut scores[..n_keys];
    let mut max_lanes = [f32::NEG_INFINITY; LANES];
    let chunks = scores.chunks_exact(LANES);
    let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..LANES {
            max_lanes[l] = max_lanes[l].max(c[l]);
        }
    }
    for m in max_lanes {
        max = max.max(m);
    }
    let mut sum_l = [0f32; LANES];
    let mut chunks = scores.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = fast_exp(c[l] - max);
            sum_l[l] += c[l];
        }
    }
    let mut sum = sum_lanes(&sum_l);
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - max);
        sum += *v;
    }

    // Weighted sum of V: even and odd keys in two accumulators (two independent chains).
    let mut o_even = [0f32; D];
    let mut o_odd = [0f32; D];
    let mut j = 0;
    for (b, &block) in table.iter().enumerate() {
        let vb = &task.v_cache[block as usize * be + g * bt * D..][..bt * D];
        let valid = (n_keys - b * bt).min(bt);
        let mut slot = 0;
        while slot + 2 <= valid {
            let (p0, p1) = (scores[j], scores[j + 1]);
            let v0 = &vb[slot * D..][..D];
            let v1 = &vb[(slot + 1) * D..][..D];
            for c16 in (0..D).step_by(LANES) {
                let a = widen16::<L>(v0[c16..c16 + LANES].try_into().unwrap());
                let b = widen16::<L>(v1[c16..c16 + LANES].try_into().unwrap());
                for l in 0..LANES {
                    o_even[c16 + l] = madd::<L>(p0, a[l], o_even[c16 + l]);
                    o_odd[c16 + l] = madd::<L>(p1, b[l], o_odd[c16 + l]);
                }
            }
            slot += 2;
            j += 2;
        }
        if slot < valid {
            let p0 = scores[j];
            let v0 = &vb[slot * D..][..D];
            for c16 in (0..D).step_by(LANES) {
                let a = widen16::<L>(v0[c16..c16 + LANES].try_into().unwrap());
                for l in 0..LANES {
                    o_even[c16 + l] = madd::<L>(p0, a[l], o_even[c16 + l]);
                }
            }
            j += 1;
        }
    }
    let inv = 1.0 / sum;
    for c in 0..D {
        o[c] = (o_even[c] + o_odd[c]) * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, Rng};

    fn isas() -> Vec<Isa> {
        let best = Isa::detect_best();
        [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect()
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
            let mut want = vec![0f64; x0.len()];
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
                    }
                }
            }
            assert_close(&x, &want, 1e-6, &format!("rope rope_dims={rd}"));
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
        assert_close(&cs, &want, 1e-7, "rope scaled");
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
        for &(d, heads, kv_heads, bt) in &[(64, 9, 3, 16), (32, 4, 4, 32), (128, 4, 1, 16), (80, 2, 1, 16)] {
            let layout = PagedKvLayout::new(bt, kv_heads, d);
            // Sequence lengths around block and lane boundaries, and one long one.
            let lens = [1usize, 15, 16, 17, 33, 130];
            let f = fixture(&mut rng, layout, &lens);
            let width = heads * d;
            // Every position of every sequence is a query (a full prefill), at a scale that
            // gives peaked softmaxes.
            let total: usize = lens.iter().sum();
            let q: Vec<f32> = rng.vec(total * width).iter().map(|v| v * 3.0).collect();
            let mut seqs = Vec::new();
            let mut row = 0;
            for (s, &len) in lens.iter().enumerate() {
                seqs.push(PagedSeq { rows: row..row + len, start_pos: 0, block_table: &f.tables[s] });
                row += len;
            }
            let group = heads / kv_heads;
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
            for isa in isas() {
                let mut out = vec![f32::NAN; total * width];
                paged_attention(isa, &q, &seqs, heads, &layout, &f.k, &f.v, &mut out);
                assert_close(&out, &want, 2e-5, &format!("attention {isa:?} d={d} heads={heads}/{kv_heads} bt={bt}"));

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
                            paged_attention(isa, qs, &one, heads, &layout, &f.k, &f.v, &mut o);
                            let whole = &out[r0 * width..(r0 + n) * width];
                            assert!(
                                o.iter().zip(whole).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{isa:?} d={d}: seq {s} rows {start}..{} differ when run in chunks of {chunk}",
                                start + n
                            );
                        }
                    }
                }
            }
        }
    }
}

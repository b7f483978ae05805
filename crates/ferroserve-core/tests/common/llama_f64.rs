//! An f64 reference forward pass of a llama-family GGUF: the authority both of the engine's
//! numerics modes are measured against (tests/numerics_quality.rs).
//!
//! The weights are the model's own packed blocks, dequantised here to f64 (the stored value
//! `q·d + m` computed in f64 from the f16 scales, so nothing is rounded to f32); every
//! activation, accumulation, norm, rotary angle, softmax and the KV "cache" stay in f64, and
//! no activation is ever quantised. The graph is the textbook one — RMSNorm, RoPE on adjacent
//! pairs (GGUF's llama Q/K layout), grouped-query causal attention, SwiGLU, tied or separate
//! output — written as plain loops so it can be checked by reading. It is the authority, not
//! fast: a whole sequence goes through at once (teacher forcing), each matmul parallel over
//! output rows.

#![allow(dead_code)]

use ferroserve_core::models::llama::LlamaModel;
use ferroserve_core::weights::gguf::GgufFile;
use ferroserve_kernels::quant::f16::f16_to_f32;
use ferroserve_kernels::quant::{self, QuantType};
use rayon::prelude::*;

/// A weight matrix `[rows, cols]`, row-major, in f64.
struct MatrixF64 {
    rows: usize,
    cols: usize,
    w: Vec<f64>,
}

struct LayerF64 {
    attn_norm: Vec<f64>,
    wq: MatrixF64,
    wk: MatrixF64,
    wv: MatrixF64,
    wo: MatrixF64,
    ffn_norm: Vec<f64>,
    w_gate: MatrixF64,
    w_up: MatrixF64,
    w_down: MatrixF64,
}

pub struct LlamaF64 {
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_dims: usize,
    rope_base: f64,
    rope_freq_scale: f64,
    rope_freq_factors: Vec<f64>,
    eps: f64,
    vocab: usize,
    layers: Vec<LayerF64>,
    token_embd: MatrixF64,
    output_norm: Vec<f64>,
    /// `None`: tied to `token_embd`.
    output: Option<MatrixF64>,
}

/// One block-format row dequantised straight to f64. Q4_0/Q4_1/Q8_0 (the formats the
/// bundled model uses) are decoded here from their layout; F32/F16/BF16 and Q8_0's `q·d`
/// are exact in f32 anyway. Other formats go through the crate's f32 dequantiser, which is
/// within one f32 rounding of the stored value — said loudly, since that is no longer exact.
fn dequantize_row_f64(t: QuantType, bytes: &[u8], out: &mut [f64]) {
    let f16 = |b: &[u8], at: usize| f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]])) as f64;
    let nibble = |qs: &[u8], i: usize| if i < 16 { qs[i] & 0x0f } else { qs[i - 16] >> 4 } as f64;
    match t {
        QuantType::Q4_1 => {
            for (blk, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16(blk, 0), f16(blk, 2));
                for (i, v) in y.iter_mut().enumerate() {
                    *v = nibble(&blk[4..], i) * d + m;
                }
            }
        }
        QuantType::Q4_0 => {
            for (blk, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = f16(blk, 0);
                for (i, v) in y.iter_mut().enumerate() {
                    *v = (nibble(&blk[2..], i) - 8.0) * d;
                }
            }
        }
        QuantType::Q8_0 => {
            for (blk, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16(blk, 0);
                for (v, &q) in y.iter_mut().zip(&blk[2..]) {
                    *v = q as i8 as f64 * d;
                }
            }
        }
        _ => {
            if !matches!(t, QuantType::F32 | QuantType::F16 | QuantType::BF16) {
                eprintln!("llama_f64: {} weights dequantised through f32 (no f64 decoder here yet)", t.name());
            }
            let mut tmp = vec![0f32; out.len()];
            quant::dequantize_row(t, bytes, &mut tmp);
            for (o, v) in out.iter_mut().zip(tmp) {
                *o = v as f64;
            }
        }
    }
}

/// A weight matrix as the GGUF stores it (packed blocks, `[rows, cols]`).
struct MatrixView<'a> {
    bytes: &'a [u8],
    wtype: QuantType,
    rows: usize,
    cols: usize,
}

impl<'a> MatrixView<'a> {
    fn of(gguf: &'a GgufFile, name: &str) -> Self {
        let t = gguf.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let wtype = t.dtype;
        MatrixView { bytes: t.bytes, wtype, rows: t.shape[0], cols: t.shape[1] }
    }
}

/// A norm vector, as the model converts it (to f32).
fn norm(gguf: &GgufFile, name: &str) -> Vec<f32> {
    let t = gguf.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let wtype = t.dtype;
    let mut out = vec![0f32; t.n_elements()];
    quant::dequantize_row(wtype, t.bytes, &mut out);
    out
}

fn matrix(view: &MatrixView<'_>) -> MatrixF64 {
    let (rows, cols) = (view.rows, view.cols);
    let row_bytes = view.wtype.row_bytes(cols);
    let mut w = vec![0f64; rows * cols];
    w.par_chunks_mut(cols).enumerate().for_each(|(r, out)| {
        dequantize_row_f64(view.wtype, &view.bytes[r * row_bytes..(r + 1) * row_bytes], out);
    });
    MatrixF64 { rows, cols, w }
}

fn vector(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Eight independent partial sums so the compiler can use vector registers; every term is
    // still an f64 product and sum.
    let mut acc = [0f64; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// `y[n, w.rows] = x[n, w.cols] · wᵀ`.
fn matmul(w: &MatrixF64, x: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(x.len(), n * w.cols);
    // Output-row-major first (each weight row read once, parallel over groups of four weight
    // rows), then transposed into `[n, rows]`.
    let mut t = vec![0f64; w.rows * n];
    t.par_chunks_mut(4 * n).zip(w.w.par_chunks(4 * w.cols)).for_each(|(out, wrows)| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { dots_avx2(wrows, x, w.cols, out) };
        }
        dots(wrows, x, w.cols, out)
    });
    let mut y = vec![0f64; n * w.rows];
    for r in 0..w.rows {
        for i in 0..n {
            y[i * w.rows + r] = t[r * n + i];
        }
    }
    y
}

/// `out[r · n + i] = wrows[r] · x[i]` for the (up to four) rows of `wrows`.
#[inline(always)]
fn dots(wrows: &[f64], x: &[f64], cols: usize, out: &mut [f64]) {
    let n = x.len() / cols;
    for (i, xrow) in x.chunks_exact(cols).enumerate() {
        for (r, wrow) in wrows.chunks_exact(cols).enumerate() {
            out[r * n + i] = dot(wrow, xrow);
        }
    }
}

/// The same loops compiled for AVX2 (4 f64 lanes instead of SSE2's 2; no FMA, so the same
/// products and sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(wrows: &[f64], x: &[f64], cols: usize, out: &mut [f64]) {
    dots(wrows, x, cols, out)
}

fn rms_norm(x: &[f64], dim: usize, weight: &[f64], eps: f64) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for (o, row) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * g;
        }
    }
    out
}

/// `log softmax` of one row.
pub fn log_softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_z = logits.iter().map(|&v| (v - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&v| v - log_z).collect()
}

impl LlamaF64 {
    /// The same weights `model` serves, dequantised to f64 (≈ 8 bytes per parameter).
    pub fn from_model(model: &LlamaModel) -> Self {
        let hp = &model.hparams;
        let rope = model.rope();
        let gguf = model.gguf();
        let layers = (0..hp.block_count)
            .map(|i| {
                let m = |t: &str| matrix(&MatrixView::of(gguf, &format!("blk.{i}.{t}.weight")));
                LayerF64 {
                    attn_norm: vector(&norm(gguf, &format!("blk.{i}.attn_norm.weight"))),
                    wq: m("attn_q"),
                    wk: m("attn_k"),
                    wv: m("attn_v"),
                    wo: m("attn_output"),
                    ffn_norm: vector(&norm(gguf, &format!("blk.{i}.ffn_norm.weight"))),
                    w_gate: m("ffn_gate"),
                    w_up: m("ffn_up"),
                    w_down: m("ffn_down"),
                }
            })
            .collect();
        let embd = MatrixView::of(gguf, "token_embd.weight");
        let out = gguf.tensor_info("output.weight").map(|_| MatrixView::of(gguf, "output.weight"));
        LlamaF64 {
            dim: hp.embedding_length,
            heads: hp.head_count,
            kv_heads: hp.head_count_kv,
            head_dim: hp.head_dim,
            rope_dims: rope.dims,
            rope_base: rope.base as f64,
            rope_freq_scale: rope.freq_scale as f64,
            rope_freq_factors: vector(&rope.freq_factors),
            eps: hp.rms_norm_eps as f64,
            vocab: hp.vocab_size,
            layers,
            token_embd: matrix(&embd),
            output_norm: vector(&norm(gguf, "output_norm.weight")),
            output: out.as_ref().map(matrix),
        }
    }

    /// Rotates the first `rope_dims` values of every head of row `x` (position `pos`) as
    /// adjacent pairs by `θᵢ = pos · freq_scale · base^(−2i/rope_dims) / factorᵢ`.
    fn rope(&self, x: &mut [f64], pos: usize) {
        for head in x.chunks_exact_mut(self.head_dim) {
            for (i, pair) in head[..self.rope_dims].chunks_exact_mut(2).enumerate() {
                let factor = self.rope_freq_factors.get(i).copied().unwrap_or(1.0);
                let freq = self.rope_base.powf(-2.0 * i as f64 / self.rope_dims as f64);
                let theta = pos as f64 * self.rope_freq_scale * freq / factor;
                let (c, s) = (theta.cos(), theta.sin());
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }

    /// Teacher-forced over `tokens`: row `i` is the log-distribution of the token after
    /// `tokens[..=i]` (`[tokens.len(), vocab]`).
    pub fn log_probs(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let (n, dim, hd) = (tokens.len(), self.dim, self.head_dim);
        let (q_width, kv_width) = (self.heads * hd, self.kv_heads * hd);
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();

        let mut x = Vec::with_capacity(n * dim);
        for &t in tokens {
            let t = t as usize;
            x.extend_from_slice(&self.token_embd.w[t * dim..(t + 1) * dim]);
        }
        for layer in &self.layers {
            let h = rms_norm(&x, dim, &layer.attn_norm, self.eps);
            let mut q = matmul(&layer.wq, &h, n);
            let mut k = matmul(&layer.wk, &h, n);
            let v = matmul(&layer.wv, &h, n);
            for pos in 0..n {
                self.rope(&mut q[pos * q_width..(pos + 1) * q_width], pos);
                self.rope(&mut k[pos * kv_width..(pos + 1) * kv_width], pos);
            }
            // Causal attention: query `i` over keys `0..=i`, head `hq` reading KV head
            // `hq / group`.
            let mut attn = vec![0f64; n * q_width];
            attn.par_chunks_mut(q_width).enumerate().for_each(|(i, out)| {
                for hq in 0..self.heads {
                    let kvh = hq / group;
                    let qv = &q[i * q_width + hq * hd..][..hd];
                    let scores: Vec<f64> = (0..=i).map(|j| dot(qv, &k[j * kv_width + kvh * hd..][..hd]) * scale).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let o = &mut out[hq * hd..(hq + 1) * hd];
                    for (j, w) in weights.iter().enumerate() {
                        for (o, &vv) in o.iter_mut().zip(&v[j * kv_width + kvh * hd..][..hd]) {
                            *o += w / total * vv;
                        }
                    }
                }
            });
            let proj = matmul(&layer.wo, &attn, n);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            let h = rms_norm(&x, dim, &layer.ffn_norm, self.eps);
            let gate = matmul(&layer.w_gate, &h, n);
            let up = matmul(&layer.w_up, &h, n);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
            let proj = matmul(&layer.w_down, &act, n);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        let h = rms_norm(&x, dim, &self.output_norm, self.eps);
        let logits = matmul(self.output.as_ref().unwrap_or(&self.token_embd), &h, n);
        logits.chunks_exact(self.vocab).map(log_softmax).collect()
    }
}

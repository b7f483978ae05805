//! Llama-family decoders (SmolLM2, TinyLlama, Llama 2/3, Mistral-style grouped-query
//! attention) from a GGUF file, computing on the quantised weights in place.
//!
//! One [`LlamaModel::forward`] call is one engine step: the new tokens of every scheduled
//! sequence (prefill chunks and single decode tokens alike) go through the layers as one
//! `[total_tokens, dim]` activation matrix, so each weight matrix is streamed from memory
//! once per step however many sequences share it. K and V of the new tokens are written into
//! the paged cache ([`crate::kv`]) before attention, and each token attends over its own
//! sequence's cache blocks.
//!
//! Weights stay in the GGUF's packed blocks (memory-mapped; the matmuls read them directly,
//! `ferroserve_kernels::quant`); only the norm vectors are copied out. The embedding table is
//! dequantised one row per token; with tied embeddings (no `output.weight`) the logits
//! multiply by the same packed table.
//!
//! Batch invariance: every kernel computes a token's row from that row alone (activation
//! quantisation, matmuls, norms, RoPE) or, in attention, from the cached keys of its own
//! sequence in position order. A sequence's logits are therefore bitwise the same alone or
//! in any batch, at any position in it, and however its prompt is chunked
//! (tests/llama_reference.rs checks this on the real model).

use std::path::Path;

use ferroserve_kernels::cpu::llama_ops::{self, AttentionArith, PagedSeq, RopeParams, SUPPORTED_HEAD_DIMS};
use ferroserve_kernels::cpu::Isa;
use ferroserve_kernels::quant::{self, panel_matmul, panel_matmuls, quant_matmul_prepared, quant_matmul_with_isa, Panels, Q8Activations, QuantLevel, QuantType};

use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::sched::SeqChunk;
use crate::tokenize::chat_template::{ChatTemplate, ChatTemplateError};
use crate::tokenize::gguf_vocab::GgufTokenizer;
use crate::weights::gguf::{GgufFile, LlamaHparams};

/// Token slots per KV block for caches made by [`LlamaModel::new_kv_cache`].
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// The arithmetic of the quantised matmuls, chosen per model at load.
///
/// Both are batch invariant and deterministic; they differ in the f32 sum order of a dot
/// product over the 8-bit-quantised activations, which on a tie-prone model changes greedy
/// continuations (bench/NOTES.md: 14/14 fixture prompts identical to llama.cpp with `Exact`,
/// 4/14 with `Fast`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Numerics {
    /// llama.cpp's CPU order, bit for bit (its Q4_1×Q8_1 eight-lane sums): the same greedy
    /// output as llama.cpp.
    #[default]
    Exact,
    /// Block-format weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K, Q6_K; not Q5_K) repacked
    /// at load into 16-row panels, one chain per
    /// output over whole-block integer dots (`quant::panels`, AVX-512 VNNI and AVX2): ≈ 2–6×
    /// faster matmuls; attention's softmax in f32 with a vectorised exp (`AttentionArith::Fast`).
    Fast,
}

impl Numerics {
    pub fn parse(name: &str) -> Option<Numerics> {
        match name {
            "exact" => Some(Numerics::Exact),
            "fast" => Some(Numerics::Fast),
            _ => None,
        }
    }
}

/// A weight matrix `[rows, cols]` in its packed GGUF form, pointing into the memory map;
/// with `Numerics::Fast`, also repacked for the panel kernels.
struct Matrix {
    ptr: *const u8,
    len: usize,
    wtype: QuantType,
    rows: usize,
    cols: usize,
    panels: Option<Panels>,
}

// SAFETY: the bytes are an immutable memory map owned by the `LlamaModel` holding the
// `Matrix` (field `gguf`), which outlives every access (`Matrix::bytes` borrows the model).
unsafe impl Send for Matrix {}
unsafe impl Sync for Matrix {}

impl Matrix {
    fn bytes(&self) -> &[u8] {
        // SAFETY: see the Send/Sync note: `ptr..ptr + len` is a slice of the live, read-only
        // map (moving a `GgufFile` does not move its mapping).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn row_bytes(&self) -> usize {
        self.wtype.row_bytes(self.cols)
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

pub struct LlamaModel {
    pub hparams: LlamaHparams,
    pub tokenizer: GgufTokenizer,
    /// `None` when the GGUF has no `tokenizer.chat_template`.
    pub chat_template: Option<ChatTemplate>,
    layers: Vec<Layer>,
    token_embd: Matrix,
    output_norm: Vec<f32>,
    /// `output.weight`, or `token_embd` again when the embeddings are tied.
    output: Matrix,
    rope: RopeParams,
    isa: Isa,
    quant_isa: QuantLevel,
    numerics: Numerics,
    /// Owns the memory map every `Matrix` points into; also reads the embedding rows.
    gguf: GgufFile,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("hparams", &self.hparams)
            .field("weights", &self.layers.first().map(|l| l.wq.wtype.name()))
            .field("output", &self.output.wtype.name())
            .field("isa", &self.isa)
            .field("quant_isa", &self.quant_isa)
            .field("numerics", &self.numerics)
            .finish()
    }
}

impl LlamaModel {
    /// Opens a GGUF file of a llama-family model with [`Numerics::Exact`]. Every tensor's
    /// presence, shape and type is checked here, so a forward pass cannot fail on a model
    /// that loaded.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, Numerics::Exact)
    }

    /// [`LlamaModel::load`] with a choice of matmul arithmetic.
    pub fn load_with(path: &Path, numerics: Numerics) -> Result<Self> {
        let err = |reason: String| Error::model_load(path, reason);
        let gguf = GgufFile::open(path).map_err(|e| err(e.to_string()))?;
        let hparams = gguf.llama_hparams().map_err(|e| err(e.to_string()))?;
        let tokenizer = GgufTokenizer::from_gguf(&gguf).map_err(|e| err(format!("tokenizer: {e}")))?;
        let chat_template = match ChatTemplate::from_gguf(&gguf, None) {
            Ok(t) => Some(t),
            Err(ChatTemplateError::Missing) => None,
            Err(e) => return Err(err(format!("chat template: {e}"))),
        };

        let hp = &hparams;
        let (dim, ffn, vocab) = (hp.embedding_length, hp.feed_forward_length, hp.vocab_size);
        let (q_width, kv_width) = (hp.head_count * hp.head_dim, hp.head_count_kv * hp.head_dim);
        if !SUPPORTED_HEAD_DIMS.contains(&hp.head_dim) {
            return Err(err(format!("attention head width {} is not supported (supported: {SUPPORTED_HEAD_DIMS:?})", hp.head_dim)));
        }
        if tokenizer.vocab_size() != vocab {
            return Err(err(format!("the tokenizer has {} tokens but the model {vocab}", tokenizer.vocab_size())));
        }
        let rope = rope_params(&gguf, hp).map_err(err)?;

        let fast = numerics == Numerics::Fast;
        // The panel kernels are written for AVX-512 VNNI and AVX2; elsewhere they would run the
        // scalar reference, slower than the exact order.
        if fast && QuantLevel::selected() < QuantLevel::Avx2 {
            return Err(err(format!(
                "fast numerics need AVX2 or AVX-512 (this CPU runs the {} level); use exact numerics",
                QuantLevel::selected().as_str()
            )));
        }
        let matrix = |name: &str, rows: usize, cols: usize| load_matrix(&gguf, name, rows, cols, fast).map_err(err);
        let vector = |name: &str, len: usize| load_vector(&gguf, name, len).map_err(err);
        // Grown as each block's tensors check out: block_count is a number from the file, and
        // a corrupt one must be a missing-tensor error, not a terabyte allocation (an abort).
        let mut layers = Vec::new();
        for i in 0..hp.block_count {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            for bias in ["attn_q", "attn_k", "attn_v", "attn_output"] {
                if gguf.tensor_info(&format!("blk.{i}.{bias}.bias")).is_some() {
                    return Err(err(format!("tensor blk.{i}.{bias}.bias: attention biases are not supported")));
                }
            }
            layers.push(Layer {
                attn_norm: vector(&name("attn_norm"), dim)?,
                wq: matrix(&name("attn_q"), q_width, dim)?,
                wk: matrix(&name("attn_k"), kv_width, dim)?,
                wv: matrix(&name("attn_v"), kv_width, dim)?,
                wo: matrix(&name("attn_output"), dim, q_width)?,
                ffn_norm: vector(&name("ffn_norm"), dim)?,
                w_gate: matrix(&name("ffn_gate"), ffn, dim)?,
                w_up: matrix(&name("ffn_up"), ffn, dim)?,
                w_down: matrix(&name("ffn_down"), dim, ffn)?,
            });
        }
        // Read one row per token, never multiplied: no panels.
        let token_embd = load_matrix(&gguf, "token_embd.weight", vocab, dim, false).map_err(err)?;
        let output = if gguf.tensor_info("output.weight").is_some() {
            matrix("output.weight", vocab, dim)?
        } else {
            matrix("token_embd.weight", vocab, dim)?
        };
        let output_norm = vector("output_norm.weight", dim)?;

        Ok(LlamaModel {
            hparams,
            tokenizer,
            chat_template,
            layers,
            token_embd,
            output_norm,
            output,
            rope,
            isa: Isa::selected(),
            quant_isa: QuantLevel::selected(),
            numerics,
            gguf,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.hparams.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.hparams.context_length
    }

    /// A KV cache of [`DEFAULT_BLOCK_TOKENS`]-token blocks filling `budget_bytes`.
    pub fn new_kv_cache(&self, budget_bytes: usize) -> KvCache {
        let hp = &self.hparams;
        KvCache::for_budget(budget_bytes, DEFAULT_BLOCK_TOKENS, hp.block_count, hp.head_count_kv, hp.head_dim)
    }

    /// Cache bytes per token (K and V, all layers), for sizing budgets.
    pub fn kv_bytes_per_token(&self) -> usize {
        let hp = &self.hparams;
        KvCache::block_bytes(1, hp.block_count, hp.head_count_kv, hp.head_dim)
    }

    /// One step over a batch of sequences: all chunks' tokens go through the layers as one
    /// `[total_tokens, dim]` activation matrix, K/V are written into each sequence's blocks,
    /// and each token attends causally over its sequence's cached prefix and new tokens.
    /// Returns logits `[chunks with want_logits, vocab]`, in chunk order.
    ///
    /// Panics on a malformed batch (a token id outside the vocabulary, a block table too
    /// short for its positions or naming blocks outside `kv`, `want_logits` on an empty chunk,
    /// a cache made for another model): the scheduler must not build one.
    pub fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut KvCache) -> Vec<f32> {
        self.check_batch(batch, kv);
        // Run the step on a pool worker: the kernels' parallel loops then fork from inside
        // the pool (cheap work stealing) instead of each one injecting its job from outside
        // and putting this thread to sleep until it finishes — ~240 such hand-offs a step.
        rayon::scope(|_| self.forward_in_pool(batch, kv))
    }

    fn check_batch(&self, batch: &[SeqChunk<'_>], kv: &KvCache) {
        let hp = &self.hparams;
        let layout = kv.layout();
        assert!(kv.has_storage(), "the KV cache keeps its blocks on a device; this model computes on the CPU");
        assert!(
            kv.num_layers() == hp.block_count && layout.kv_heads == hp.head_count_kv && layout.head_dim == hp.head_dim,
            "KV cache ({} layers, {} KV heads of {}) was not made for this model",
            kv.num_layers(),
            layout.kv_heads,
            layout.head_dim
        );
        self.check_chunks(batch, layout.block_tokens, kv.num_blocks());
    }

    /// The batch checks that do not depend on where the cache lives (token ids, block
    /// tables, logits from empty chunks); panics as [`LlamaModel::forward`] says.
    pub(crate) fn check_chunks(&self, batch: &[SeqChunk<'_>], block_tokens: usize, num_blocks: usize) {
        let vocab = self.hparams.vocab_size;
        for (i, c) in batch.iter().enumerate() {
            assert!(!(c.want_logits && c.tokens.is_empty()), "chunk {i}: logits wanted from an empty chunk");
            if let Some(&t) = c.tokens.iter().find(|&&t| t as usize >= vocab) {
                panic!("chunk {i}: token id {t} is outside the vocabulary ({vocab})");
            }
            let positions = c.start_pos + c.tokens.len();
            assert!(
                c.block_table.len() * block_tokens >= positions,
                "chunk {i}: {} blocks cannot hold {positions} positions",
                c.block_table.len()
            );
            if let Some(&b) = c.block_table[..positions.div_ceil(block_tokens)].iter().find(|&&b| b as usize >= num_blocks) {
                panic!("chunk {i}: block {b} is outside the KV cache ({num_blocks} blocks)");
            }
        }
    }

    fn forward_in_pool(&self, batch: &[SeqChunk<'_>], kv: &mut KvCache) -> Vec<f32> {
        let hp = &self.hparams;
        let (dim, ffn, heads, kv_heads, head_dim) =
            (hp.embedding_length, hp.feed_forward_length, hp.head_count, hp.head_count_kv, hp.head_dim);
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let eps = hp.rms_norm_eps;
        let layout = kv.layout();
        let bt = layout.block_tokens;

        // Rows: chunk after chunk; each row's position and rotary table.
        let mut seqs = Vec::with_capacity(batch.len());
        let mut positions = Vec::new();
        for c in batch {
            let first = positions.len();
            positions.extend((0..c.tokens.len()).map(|i| c.start_pos + i));
            seqs.push(PagedSeq { rows: first..positions.len(), start_pos: c.start_pos, block_table: c.block_table });
        }
        let rows = positions.len();
        let logit_rows: Vec<usize> = batch.iter().zip(&seqs).filter(|(c, _)| c.want_logits).map(|(_, s)| s.rows.end - 1).collect();
        if rows == 0 {
            return Vec::new();
        }
        let rope_dims = self.rope.dims;
        let mut cos_sin = vec![0f32; rows * rope_dims];
        if rope_dims > 0 {
            for (cs, &p) in cos_sin.chunks_exact_mut(rope_dims).zip(&positions) {
                llama_ops::rope_cos_sin(p, &self.rope, cs);
            }
        }

        let mut x = vec![0f32; rows * dim];
        self.embed(batch.iter().flat_map(|c| c.tokens), &mut x);

        let mut h = vec![0f32; rows * dim];
        let mut q = vec![0f32; rows * q_width];
        let mut k = vec![0f32; rows * kv_width];
        let mut v = vec![0f32; rows * kv_width];
        let mut attn = vec![0f32; rows * q_width];
        let mut proj = vec![0f32; rows * dim];
        let mut gate = vec![0f32; rows * ffn];
        let mut up = vec![0f32; rows * ffn];
        let mut acts = Q8Activations::new();

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            llama_ops::rms_norm(self.isa, &x, dim, &layer.attn_norm, eps, &mut h);
            let input = self.prepare(&mut acts, &h, rows);
            self.matmuls(&mut [(&layer.wq, &mut q), (&layer.wk, &mut k), (&layer.wv, &mut v)], &input);
            llama_ops::rope_pairs(&mut q, heads, head_dim, rope_dims, &cos_sin);
            llama_ops::rope_pairs(&mut k, kv_heads, head_dim, rope_dims, &cos_sin);
            {
                let (k_cache, v_cache) = kv.layer_mut(li);
                for s in &seqs {
                    for (i, row) in s.rows.clone().enumerate() {
                        let p = s.start_pos + i;
                        layout.write_token(
                            k_cache,
                            v_cache,
                            s.block_table[p / bt] as usize,
                            p % bt,
                            &k[row * kv_width..(row + 1) * kv_width],
                            &v[row * kv_width..(row + 1) * kv_width],
                        );
                    }
                }
            }
            let (k_cache, v_cache) = kv.layer(li);
            llama_ops::paged_attention(self.isa, self.attention_arith(), &q, &seqs, heads, &layout, k_cache, v_cache, &mut attn);
            let input = self.prepare(&mut acts, &attn, rows);
            self.matmul(&layer.wo, &input, &mut proj);
            add_in_place(&mut x, &proj);

            // Feed-forward block.
            llama_ops::rms_norm(self.isa, &x, dim, &layer.ffn_norm, eps, &mut h);
            let input = self.prepare(&mut acts, &h, rows);
            self.matmuls(&mut [(&layer.w_gate, &mut gate), (&layer.w_up, &mut up)], &input);
            llama_ops::silu_mul(self.isa, &mut gate, &up);
            let input = self.prepare(&mut acts, &gate, rows);
            self.matmul(&layer.w_down, &input, &mut proj);
            add_in_place(&mut x, &proj);
        }

        // Logits of the wanted rows only.
        let n = logit_rows.len();
        if n == 0 {
            return Vec::new();
        }
        let mut last = Vec::with_capacity(n * dim);
        for &r in &logit_rows {
            last.extend_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        let mut normed = vec![0f32; n * dim];
        llama_ops::rms_norm(self.isa, &last, dim, &self.output_norm, eps, &mut normed);
        let mut logits = vec![0f32; n * hp.vocab_size];
        let input = self.prepare(&mut acts, &normed, n);
        self.matmul(&self.output, &input, &mut logits);
        logits
    }

    /// The embedding rows of `tokens`, one after another in `x`. Each row is read from the
    /// file (`GgufFile::read_copy`), not through the map: gathering through the map would
    /// bring the table's pages back into RSS a few at a time until all of it was resident,
    /// while the matmuls read only the panels (fast numerics; with tied embeddings the table
    /// itself was packed and released at load).
    fn embed<'t>(&self, tokens: impl Iterator<Item = &'t u32>, x: &mut [f32]) {
        let dim = self.hparams.embedding_length;
        let row_bytes = self.token_embd.row_bytes();
        let embd = self.token_embd.bytes();
        let mut row = vec![0u8; row_bytes];
        for (out, &t) in x.chunks_exact_mut(dim).zip(tokens) {
            let t = t as usize;
            self.gguf.read_copy(&embd[t * row_bytes..(t + 1) * row_bytes], &mut row);
            quant::dequantize_row(self.token_embd.wtype, &row, out);
        }
    }

    fn attention_arith(&self) -> AttentionArith {
        match self.numerics {
            Numerics::Exact => AttentionArith::LlamaCpp,
            Numerics::Fast => AttentionArith::Fast,
        }
    }

    /// Quantises `x` once for the block-format matmuls that read it.
    fn prepare<'a>(&self, acts: &'a mut Q8Activations, x: &'a [f32], rows: usize) -> MatmulInput<'a> {
        let k = x.len() / rows.max(1);
        // Only block-format weights read the quantised copy, and those have rows of whole
        // 32-blocks (checked at load).
        if k.is_multiple_of(32) {
            acts.quantize_with_isa(self.quant_isa, x, rows, k);
        }
        MatmulInput { x, rows, acts }
    }

    /// [`LlamaModel::matmul`] for matrices that share an input: with panels, one parallel
    /// region for all of them (`panel_matmuls`), the same bits.
    fn matmuls(&self, outputs: &mut [(&Matrix, &mut [f32])], input: &MatmulInput<'_>) {
        if outputs.iter().all(|(w, _)| w.panels.is_some()) {
            let mut panels: Vec<(&Panels, &mut [f32])> =
                outputs.iter_mut().map(|(w, y)| (w.panels.as_ref().unwrap(), &mut **y)).collect();
            panel_matmuls(self.quant_isa, &mut panels, input.acts);
        } else {
            for (w, y) in outputs.iter_mut() {
                self.matmul(w, input, y);
            }
        }
    }

    /// `y[rows, w.rows] = input · wᵀ`.
    fn matmul(&self, w: &Matrix, input: &MatmulInput<'_>, y: &mut [f32]) {
        debug_assert_eq!(input.x.len(), input.rows * w.cols);
        if let Some(panels) = &w.panels {
            panel_matmul(self.quant_isa, panels, input.acts, y);
        } else if w.wtype.is_block_quantised() {
            quant_matmul_prepared(self.quant_isa, w.wtype, w.bytes(), w.rows, input.acts, y);
        } else {
            quant_matmul_with_isa(self.quant_isa, w.wtype, w.bytes(), w.rows, w.cols, input.x, input.rows, y);
        }
    }
}

/// A weight matrix as the GGUF stores it (packed blocks, `[rows, cols]`), for devices that
/// upload the weights themselves (`llama_opencl`).
pub struct MatrixView<'a> {
    pub name: &'static str,
    pub bytes: &'a [u8],
    pub wtype: QuantType,
    pub rows: usize,
    pub cols: usize,
}

/// One decoder layer's weights, in their stored form.
pub struct LayerView<'a> {
    pub attn_norm: &'a [f32],
    pub ffn_norm: &'a [f32],
    /// Q, K, V, attention output, gate, up, down, in the order a forward pass uses them.
    pub wq: MatrixView<'a>,
    pub wk: MatrixView<'a>,
    pub wv: MatrixView<'a>,
    pub wo: MatrixView<'a>,
    pub w_gate: MatrixView<'a>,
    pub w_up: MatrixView<'a>,
    pub w_down: MatrixView<'a>,
}

impl Matrix {
    fn view(&self, name: &'static str) -> MatrixView<'_> {
        MatrixView { name, bytes: self.bytes(), wtype: self.wtype, rows: self.rows, cols: self.cols }
    }
}

impl LlamaModel {
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    pub fn rope(&self) -> &RopeParams {
        &self.rope
    }

    /// Weight bytes one decode step streams through the matmuls: every layer matrix and the
    /// output projection once, as the kernels read them (the repacked panels with fast
    /// numerics, else the GGUF blocks), and the same in the GGUF's own encoding. The floors of
    /// bench/NOTES.md divide these by the measured bandwidth.
    pub fn weight_bytes_per_step(&self) -> (usize, usize) {
        let matrices = self
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain([&self.output]);
        matrices.fold((0, 0), |(read, file), m| (read + m.panels.as_ref().map_or(m.len, Panels::size_bytes), file + m.len))
    }

    pub fn layer_views(&self) -> Vec<LayerView<'_>> {
        self.layers
            .iter()
            .map(|l| LayerView {
                attn_norm: &l.attn_norm,
                ffn_norm: &l.ffn_norm,
                wq: l.wq.view("attn_q"),
                wk: l.wk.view("attn_k"),
                wv: l.wv.view("attn_v"),
                wo: l.wo.view("attn_output"),
                w_gate: l.w_gate.view("ffn_gate"),
                w_up: l.w_up.view("ffn_up"),
                w_down: l.w_down.view("ffn_down"),
            })
            .collect()
    }

    /// The token embedding table (read one row per token).
    pub fn token_embd_view(&self) -> MatrixView<'_> {
        self.token_embd.view("token_embd")
    }

    /// The vocabulary projection (`token_embd` again when the embeddings are tied).
    pub fn output_view(&self) -> MatrixView<'_> {
        self.output.view("output")
    }

    pub fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }
}

/// A matmul's input, in f32 and quantised to 8 bits (block formats take the latter).
struct MatmulInput<'a> {
    x: &'a [f32],
    rows: usize,
    acts: &'a Q8Activations,
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `fast`: also repack the weights into panels when the format has a panel layout (the other
/// formats keep the exact kernels).
fn load_matrix(gguf: &GgufFile, name: &str, rows: usize, cols: usize, fast: bool) -> std::result::Result<Matrix, String> {
    let t = gguf.tensor(name).map_err(|e| e.to_string())?;
    if t.shape != [rows, cols] {
        return Err(format!("tensor {name} has shape {:?}, expected [{rows}, {cols}]", t.shape));
    }
    let wtype = QuantType::from_ggml_type(t.dtype.id())
        .ok_or_else(|| format!("tensor {name} is {}, which no matmul kernel here reads", t.dtype))?;
    // Block formats multiply 8-bit activation blocks of 32.
    if wtype.is_block_quantised() && !cols.is_multiple_of(32) {
        return Err(format!("tensor {name}: rows of {cols} are not a multiple of 32"));
    }
    let panels = (fast && Panels::supports(wtype)).then(|| Panels::pack(wtype, t.bytes, rows, cols));
    if panels.is_some() {
        // The kernels read the panels only; the file's form is kept for views (OpenCL upload)
        // and tied embeddings' row gathers (`LlamaModel::embed` reads those from the file).
        gguf.release_resident(t.bytes);
    }
    Ok(Matrix { ptr: t.bytes.as_ptr(), len: t.bytes.len(), wtype, rows, cols, panels })
}

fn load_vector(gguf: &GgufFile, name: &str, len: usize) -> std::result::Result<Vec<f32>, String> {
    let t = gguf.tensor(name).map_err(|e| e.to_string())?;
    if t.n_elements() != len || t.shape.len() != 1 {
        return Err(format!("tensor {name} has shape {:?}, expected [{len}]", t.shape));
    }
    let wtype = QuantType::from_ggml_type(t.dtype.id()).ok_or_else(|| format!("tensor {name} has unsupported type {}", t.dtype))?;
    let mut out = vec![0f32; len];
    quant::dequantize_row(wtype, t.bytes, &mut out);
    Ok(out)
}

/// RoPE settings from the `{arch}.rope.*` keys and the optional `rope_freqs.weight` tensor.
fn rope_params(gguf: &GgufFile, hp: &LlamaHparams) -> std::result::Result<RopeParams, String> {
    let arch = &hp.architecture;
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let scaling = gguf.get_str_opt(&key("type")).map_err(|e| e.to_string())?.unwrap_or("none");
    let factor = gguf.get_f32_opt(&key("factor")).map_err(|e| e.to_string())?;
    // Older files give linear scaling as `rope.scale_linear`.
    let scale_linear = gguf.get_f32_opt(&format!("{arch}.rope.scale_linear")).map_err(|e| e.to_string())?;
    let freq_scale = match (scaling, factor, scale_linear) {
        ("none", _, None) => 1.0,
        ("linear", Some(f), _) | ("none", _, Some(f)) if f.is_finite() && f > 0.0 => 1.0 / f,
        (kind, _, _) => return Err(format!("RoPE scaling '{kind}' (factor {factor:?}) is not supported")),
    };
    let freq_factors = match gguf.tensor_info("rope_freqs.weight") {
        None => Vec::new(),
        Some(_) => load_vector(gguf, "rope_freqs.weight", hp.rope_dimension_count / 2)?,
    };
    Ok(RopeParams { dims: hp.rope_dimension_count, base: hp.rope_freq_base, freq_scale, freq_factors })
}

//! Llama-family decoders (SmolLM2, TinyLlama, Llama 2/3, Mistral-style grouped-query
//! attention) from a GGUF file, computing on the quantised weights in place.
//!
//! Written once against the `Backend` trait: `LlamaModel<CpuBackend>` (the default type) and
//! `LlamaModel<OpenClBackend>` run the same forward pass, op for op, in the order below
//! (`LlamaModel::forward_pass`); a backend only enqueues (or, on the CPU, computes) each op.
//!
//! One [`LlamaModel::forward`] call is one engine step: the new tokens of every scheduled
//! sequence (prefill chunks and single decode tokens alike) go through the layers as one
//! `[total_tokens, dim]` activation matrix, so each weight matrix is streamed from memory
//! once per step however many sequences share it. K and V of the new tokens are written into
//! the paged cache ([`crate::kv`]) before attention, and each token attends over its own
//! sequence's cache blocks.
//!
//! Weights stay in the GGUF's packed blocks (on the CPU memory-mapped, the matmuls reading
//! them in place, `ferroserve_kernels::quant`; an OpenCL device gets a copy at load); only the
//! norm vectors are converted. The embedding table is
//! dequantised one row per token; with tied embeddings (no `output.weight`) the logits
//! multiply by the same packed table.
//!
//! Batch invariance: every kernel computes a token's row from that row alone (activation
//! quantisation, matmuls, norms, RoPE) or, in attention, from the cached keys of its own
//! sequence in position order. A sequence's logits are therefore bitwise the same alone or
//! in any batch, at any position in it, and however its prompt is chunked
//! (tests/llama_reference.rs checks this on the real model).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex};

use ferroserve_kernels::backend::{AttentionArith, DecodeStep, MatrixUse, PagedSeq, RopeParams, StoredMatrix, WeightFile};
use ferroserve_kernels::cpu::llama_ops::SUPPORTED_HEAD_DIMS;
use ferroserve_kernels::quant::{self, QuantLevel, QuantType};
use ferroserve_kernels::{Backend, BackendError, CpuBackend};

use crate::error::{Error, Result};
use crate::kv::{KvCache, KvCacheConfig};
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

// SAFETY: a tensor's bytes are a slice of the file's read-only memory map, which the
// `GgufFile` owns and never changes or unmaps while it lives (moving it does not move the
// mapping).
unsafe impl WeightFile for GgufFile {
    fn read_copy(&self, bytes: &[u8], out: &mut [u8]) {
        GgufFile::read_copy(self, bytes, out)
    }
    fn release_resident(&self, bytes: &[u8]) {
        GgufFile::release_resident(self, bytes)
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Buffer<f32>,
    wq: B::Matrix,
    wk: B::Matrix,
    wv: B::Matrix,
    wo: B::Matrix,
    ffn_norm: B::Buffer<f32>,
    w_gate: B::Matrix,
    w_up: B::Matrix,
    w_down: B::Matrix,
}

/// A paged KV cache of a [`LlamaModel<B>`]: the block bookkeeping ([`KvCache`]: pool, prefix
/// cache, block tables; it derefs to it) on the host, the K and V blocks in the backend's
/// storage.
pub struct LlamaKv<B: Backend = CpuBackend> {
    blocks: KvCache,
    storage: B::KvStorage,
}

impl<B: Backend> LlamaKv<B> {
    /// The backend's K and V blocks.
    pub fn storage(&self) -> &B::KvStorage {
        &self.storage
    }
}

impl<B: Backend> AsRef<KvCache> for LlamaKv<B> {
    fn as_ref(&self) -> &KvCache {
        &self.blocks
    }
}

impl<B: Backend> AsMut<KvCache> for LlamaKv<B> {
    fn as_mut(&mut self) -> &mut KvCache {
        &mut self.blocks
    }
}

impl<B: Backend> Deref for LlamaKv<B> {
    type Target = KvCache;
    fn deref(&self) -> &KvCache {
        &self.blocks
    }
}

impl<B: Backend> DerefMut for LlamaKv<B> {
    fn deref_mut(&mut self) -> &mut KvCache {
        &mut self.blocks
    }
}

/// Rows of scratch kept between steps: the engine's steps are at most `max_batch_tokens`
/// (512 by default) rows; a longer pass (a test's whole prompts at once) frees its buffers
/// after it instead of holding them for the model's life (≈ 120 KB a row on a 1B model).
const KEEP_SCRATCH_ROWS: usize = 1024;

/// Per-step buffers, grown (to powers of two) for the largest step seen. Ops touch only a
/// step's leading rows.
struct Scratch<B: Backend> {
    // The activations, rows × width.
    x: B::Buffer<f32>,
    h: B::Buffer<f32>,
    q: B::Buffer<f32>,
    k: B::Buffer<f32>,
    v: B::Buffer<f32>,
    attn: B::Buffer<f32>,
    proj: B::Buffer<f32>,
    gate: B::Buffer<f32>,
    up: B::Buffer<f32>,
    acts: B::Acts,
    cos_sin: B::Buffer<f32>,
    // The rows that want logits.
    last: B::Buffer<f32>,
    normed: B::Buffer<f32>,
    logits: B::Buffer<f32>,
    // The step's indices (`DecodeStep`).
    tokens: B::Buffer<u32>,
    positions: B::Buffer<u32>,
    slots: B::Buffer<u32>,
    row_seq: B::Buffer<u32>,
    block_tables: B::Buffer<u32>,
    wanted: B::Buffer<u32>,
    size: StepSize,
}

/// What one step needs room for.
#[derive(Clone, Copy)]
struct StepSize {
    rows: usize,
    seqs: usize,
    table_len: usize,
    logit_rows: usize,
}

impl StepSize {
    fn fits_in(&self, other: &StepSize) -> bool {
        self.rows <= other.rows && self.seqs <= other.seqs && self.table_len <= other.table_len && self.logit_rows <= other.logit_rows
    }

    /// Room for both, each count rounded up to a power of two.
    fn grown(&self, old: &StepSize) -> StepSize {
        StepSize {
            rows: self.rows.max(old.rows).next_power_of_two(),
            seqs: self.seqs.max(old.seqs).next_power_of_two(),
            table_len: self.table_len.max(old.table_len).next_power_of_two(),
            logit_rows: self.logit_rows.max(old.logit_rows).max(1).next_power_of_two(),
        }
    }
}

impl<B: Backend> Scratch<B> {
    fn new(b: &B, hp: &LlamaHparams, rope_dims: usize, s: StepSize) -> std::result::Result<Self, BackendError> {
        let (dim, ffn, vocab) = (hp.embedding_length, hp.feed_forward_length, hp.vocab_size);
        let (q_width, kv_width) = (hp.head_count * hp.head_dim, hp.head_count_kv * hp.head_dim);
        let (rows, n) = (s.rows, s.logit_rows);
        Ok(Self {
            size: s,
            tokens: b.alloc(rows)?,
            positions: b.alloc(rows)?,
            slots: b.alloc(rows)?,
            row_seq: b.alloc(rows)?,
            block_tables: b.alloc(s.seqs * s.table_len)?,
            wanted: b.alloc(n)?,
            cos_sin: b.alloc(rows * rope_dims)?,
            x: b.alloc(rows * dim)?,
            h: b.alloc(rows * dim)?,
            q: b.alloc(rows * q_width)?,
            k: b.alloc(rows * kv_width)?,
            v: b.alloc(rows * kv_width)?,
            attn: b.alloc(rows * q_width)?,
            proj: b.alloc(rows * dim)?,
            gate: b.alloc(rows * ffn)?,
            up: b.alloc(rows * ffn)?,
            acts: b.alloc_acts(rows, dim.max(q_width).max(ffn))?,
            last: b.alloc(n * dim)?,
            normed: b.alloc(n * dim)?,
            logits: b.alloc(n * vocab)?,
        })
    }
}

/// A llama-family decoder on backend `B` (the CPU unless said otherwise).
pub struct LlamaModel<B: Backend = CpuBackend> {
    pub hparams: LlamaHparams,
    pub tokenizer: GgufTokenizer,
    /// `None` when the GGUF has no `tokenizer.chat_template`.
    pub chat_template: Option<ChatTemplate>,
    backend: B,
    layers: Vec<Layer<B>>,
    /// Read one row per token, never multiplied.
    token_embd: B::Matrix,
    output_norm: B::Buffer<f32>,
    /// `output.weight`, or `token_embd` again (prepared for multiplying) when tied.
    output: B::Matrix,
    rope: RopeParams,
    rope_table: B::Rope,
    numerics: Numerics,
    /// The file the weights come from (the CPU's matrices point into its map).
    gguf: Arc<GgufFile>,
    /// Locked for a whole step; the engine runs one step at a time.
    scratch: Mutex<Option<Scratch<B>>>,
    /// The load check against the CPU (a device's model only).
    check: Option<ProbeReport>,
}

impl<B: Backend> std::fmt::Debug for LlamaModel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let wtype = |name: &str| self.gguf.tensor_info(name).map(|t| t.dtype.to_string());
        f.debug_struct("LlamaModel")
            .field("hparams", &self.hparams)
            .field("backend", &self.backend.name())
            .field("weights", &wtype("blk.0.attn_q.weight"))
            .field("output", &wtype("output.weight").or_else(|| wtype("token_embd.weight")))
            .field("quant_isa", &QuantLevel::selected())
            .field("numerics", &self.numerics)
            .finish()
    }
}

fn backend_err(e: BackendError) -> Error {
    Error::Device(e.0)
}

impl LlamaModel<CpuBackend> {
    /// Opens a GGUF file of a llama-family model on the CPU with [`Numerics::Exact`]. Every
    /// tensor's presence, shape and type is checked here, so a forward pass cannot fail on a
    /// model that loaded.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, Numerics::Exact)
    }

    /// [`LlamaModel::load`] with a choice of matmul arithmetic.
    pub fn load_with(path: &Path, numerics: Numerics) -> Result<Self> {
        // The panel kernels are written for AVX-512 VNNI and AVX2; elsewhere they would run the
        // scalar reference, slower than the exact order.
        if numerics == Numerics::Fast && QuantLevel::selected() < QuantLevel::Avx2 {
            return Err(Error::model_load(
                path,
                format!(
                    "fast numerics need AVX2 or AVX-512 (this CPU runs the {} level); use exact numerics",
                    QuantLevel::selected().as_str()
                ),
            ));
        }
        Self::load_on(path, CpuBackend::default(), numerics)
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
        matrices.map(|m| m.weight_bytes()).fold((0, 0), |(read, file), (r, f)| (read + r, file + f))
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Opens a GGUF file of a llama-family model onto `backend` (already opened: a device
    /// that does not exist fails before the weights are read), checking every tensor's
    /// presence, shape and type and preparing it for the backend's kernels.
    pub fn load_on(path: &Path, mut backend: B, numerics: Numerics) -> Result<Self> {
        let err = |reason: String| Error::model_load(path, reason);
        let gguf = Arc::new(GgufFile::open(path).map_err(|e| err(e.to_string()))?);
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
        backend.prepare_decoder(hp.head_dim).map_err(backend_err)?;

        let usage = match numerics {
            Numerics::Exact => MatrixUse::Matmul,
            Numerics::Fast => MatrixUse::FastMatmul,
        };
        let file: Arc<dyn WeightFile> = gguf.clone();
        let b = &backend;
        let matrix = |name: &str, rows: usize, cols: usize, usage: MatrixUse| -> Result<B::Matrix> {
            let (bytes, wtype) = stored_matrix(&gguf, name, rows, cols).map_err(err)?;
            // SAFETY: `bytes` is a slice of `gguf`'s map, and `file` is that same file.
            let stored = unsafe { StoredMatrix::new(&file, bytes, name, wtype, rows, cols) };
            b.pack_matrix(stored, usage).map_err(backend_err)
        };
        let vector = |name: &str, len: usize| -> Result<B::Buffer<f32>> { b.upload(load_vector(&gguf, name, len).map_err(err)?).map_err(backend_err) };
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
                wq: matrix(&name("attn_q"), q_width, dim, usage)?,
                wk: matrix(&name("attn_k"), kv_width, dim, usage)?,
                wv: matrix(&name("attn_v"), kv_width, dim, usage)?,
                wo: matrix(&name("attn_output"), dim, q_width, usage)?,
                ffn_norm: vector(&name("ffn_norm"), dim)?,
                w_gate: matrix(&name("ffn_gate"), ffn, dim, usage)?,
                w_up: matrix(&name("ffn_up"), ffn, dim, usage)?,
                w_down: matrix(&name("ffn_down"), dim, ffn, usage)?,
            });
        }
        let token_embd = matrix("token_embd.weight", vocab, dim, MatrixUse::Rows)?;
        let output_name = if gguf.tensor_info("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
        let output = matrix(output_name, vocab, dim, usage)?;
        let output_norm = vector("output_norm.weight", dim)?;
        let rope_table = backend.prepare_rope(&rope, hp.context_length).map_err(backend_err)?;

        Ok(LlamaModel {
            hparams,
            tokenizer,
            chat_template,
            backend,
            layers,
            token_embd,
            output_norm,
            output,
            rope,
            rope_table,
            numerics,
            gguf,
            scratch: Mutex::new(None),
            check: None,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.hparams.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.hparams.context_length
    }

    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    pub fn rope(&self) -> &RopeParams {
        &self.rope
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The GGUF file the weights were read from (tensors by name, in their stored form).
    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    /// Where the model computes, e.g. `cpu(avx2)` or `opencl:0(...)`.
    pub fn device_name(&self) -> String {
        self.backend.name()
    }

    /// A KV cache of [`DEFAULT_BLOCK_TOKENS`]-token blocks filling `budget_bytes` of the
    /// backend's memory.
    pub fn new_kv_cache(&self, budget_bytes: usize) -> Result<LlamaKv<B>> {
        let hp = &self.hparams;
        self.new_kv_cache_with(KvCacheConfig::for_budget(budget_bytes, DEFAULT_BLOCK_TOKENS, hp.block_count, hp.head_count_kv, hp.head_dim))
    }

    /// A KV cache of exactly `cfg`'s blocks.
    pub fn new_kv_cache_with(&self, cfg: KvCacheConfig) -> Result<LlamaKv<B>> {
        let hp = &self.hparams;
        let blocks = KvCache::new(cfg, hp.block_count, hp.head_count_kv, hp.head_dim);
        let storage = self.backend.alloc_kv(blocks.layout(), hp.block_count, cfg.num_blocks).map_err(backend_err)?;
        Ok(LlamaKv { blocks, storage })
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
    /// a cache made for another model): the scheduler must not build one. Panics too if the
    /// backend fails (a device lost mid-step; the CPU does not fail).
    pub fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut LlamaKv<B>) -> Vec<f32> {
        self.try_forward(batch, kv).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`LlamaModel::forward`] with a backend failure as an error (the batch checks still
    /// panic).
    pub fn try_forward(&self, batch: &[SeqChunk<'_>], kv: &mut LlamaKv<B>) -> Result<Vec<f32>> {
        self.check_batch(batch, kv);
        // The whole step in one `run_pass`: on the CPU one job on a pool worker, so the
        // kernels' parallel loops fork from inside the pool (cheap work stealing) instead of
        // each one injecting its job from outside and putting this thread to sleep until it
        // finishes — ~240 such hand-offs a step.
        self.backend.run_pass(|| self.forward_pass(batch, kv)).map_err(backend_err)
    }

    fn check_batch(&self, batch: &[SeqChunk<'_>], kv: &LlamaKv<B>) {
        let hp = &self.hparams;
        let layout = kv.blocks.layout();
        assert!(
            kv.blocks.num_layers() == hp.block_count && layout.kv_heads == hp.head_count_kv && layout.head_dim == hp.head_dim,
            "KV cache ({} layers, {} KV heads of {}) was not made for this model",
            kv.blocks.num_layers(),
            layout.kv_heads,
            layout.head_dim
        );
        let (block_tokens, num_blocks) = (layout.block_tokens, kv.blocks.num_blocks());
        let vocab = hp.vocab_size;
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

    fn attention_arith(&self) -> AttentionArith {
        match self.numerics {
            Numerics::Exact => AttentionArith::LlamaCpp,
            Numerics::Fast => AttentionArith::Fast,
        }
    }

    /// The forward pass: the step's index buffers are built on the host and written, then
    /// every op is enqueued in order and only the logits are read back.
    fn forward_pass(&self, batch: &[SeqChunk<'_>], kv: &mut LlamaKv<B>) -> std::result::Result<Vec<f32>, BackendError> {
        let (b, hp) = (&self.backend, &self.hparams);
        let (dim, ffn, heads, kv_heads, head_dim) = (hp.embedding_length, hp.feed_forward_length, hp.head_count, hp.head_count_kv, hp.head_dim);
        let q_width = heads * head_dim;
        let eps = hp.rms_norm_eps;
        let bt = kv.blocks.block_tokens();

        // Rows: chunk after chunk.
        let rows: usize = batch.iter().map(|c| c.tokens.len()).sum();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let table_len = batch.iter().map(|c| (c.start_pos + c.tokens.len()).div_ceil(bt)).max().unwrap_or(0).max(1);
        let mut seqs = Vec::with_capacity(batch.len());
        let mut tokens = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let mut slots = Vec::with_capacity(rows);
        let mut row_seq = Vec::with_capacity(rows);
        let mut wanted = Vec::new();
        let mut tables = vec![0u32; batch.len() * table_len];
        for (s, c) in batch.iter().enumerate() {
            let first = tokens.len();
            let used = (c.start_pos + c.tokens.len()).div_ceil(bt);
            tables[s * table_len..s * table_len + used].copy_from_slice(&c.block_table[..used]);
            for (i, &t) in c.tokens.iter().enumerate() {
                let p = c.start_pos + i;
                tokens.push(t);
                positions.push(p as u32);
                slots.push(c.block_table[p / bt] * bt as u32 + (p % bt) as u32);
                row_seq.push(s as u32);
            }
            seqs.push(PagedSeq { rows: first..tokens.len(), start_pos: c.start_pos, block_table: c.block_table });
            if c.want_logits {
                wanted.push(tokens.len() as u32 - 1);
            }
        }
        let n = wanted.len();

        let size = StepSize { rows, seqs: batch.len(), table_len, logit_rows: n };
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if !guard.as_ref().is_some_and(|sc| size.fits_in(&sc.size)) {
            let old = guard.as_ref().map_or(StepSize { rows: 0, seqs: 0, table_len: 0, logit_rows: 0 }, |sc| sc.size);
            *guard = None; // free the old buffers before allocating larger ones
            *guard = Some(Scratch::new(b, hp, self.rope.dims, size.grown(&old))?);
        }
        let sc = guard.as_mut().expect("scratch allocated above");
        // On a device, blocking writes: they also wait for the previous step's commands.
        b.write(&mut sc.tokens, &tokens)?;
        b.write(&mut sc.positions, &positions)?;
        b.write(&mut sc.slots, &slots)?;
        b.write(&mut sc.row_seq, &row_seq)?;
        b.write(&mut sc.block_tables, &tables)?;
        b.write(&mut sc.wanted, &wanted)?;
        let Scratch { tokens, positions, slots, row_seq, block_tables, wanted, cos_sin, x, h, q, k, v, attn, proj, gate, up, acts, last, normed, logits, .. } = sc;
        let step = DecodeStep::<B> { seqs: &seqs, rows, tokens, positions, slots, row_seq, block_tables, table_len };
        let arith = self.attention_arith();

        // From here to the read: enqueue only.
        b.embed_rows(&self.token_embd, &step, x, dim)?;
        b.rope_rows(&self.rope_table, &step, cos_sin)?;
        for (li, l) in self.layers.iter().enumerate() {
            // Attention block.
            b.rms_norm(x, &l.attn_norm, h, rows, dim, eps)?;
            b.quantize_activations(h, rows, dim, acts)?;
            b.matmuls(&mut [(&l.wq, &mut *q), (&l.wk, &mut *k), (&l.wv, &mut *v)], h, acts, rows)?;
            b.rope(q, &self.rope_table, cos_sin, &step, heads, head_dim)?;
            b.rope(k, &self.rope_table, cos_sin, &step, kv_heads, head_dim)?;
            b.kv_write(&mut kv.storage, li, k, v, &step)?;
            b.paged_attention(q, &kv.storage, li, &step, heads, arith, attn)?;
            b.quantize_activations(attn, rows, q_width, acts)?;
            b.matmul(&l.wo, attn, acts, proj, rows)?;
            b.add(x, proj, rows * dim)?;

            // Feed-forward block.
            b.rms_norm(x, &l.ffn_norm, h, rows, dim, eps)?;
            b.quantize_activations(h, rows, dim, acts)?;
            b.matmuls(&mut [(&l.w_gate, &mut *gate), (&l.w_up, &mut *up)], h, acts, rows)?;
            b.silu_mul(gate, up, rows * ffn)?;
            b.quantize_activations(gate, rows, ffn, acts)?;
            b.matmul(&l.w_down, gate, acts, proj, rows)?;
            b.add(x, proj, rows * dim)?;
        }

        // Logits of the wanted rows only.
        let out = if n == 0 {
            b.finish()?; // the KV writes must land before the next step reads them
            Vec::new()
        } else {
            b.gather_rows(x, wanted, n, dim, last)?;
            b.rms_norm(last, &self.output_norm, normed, n, dim, eps)?;
            b.quantize_activations(normed, n, dim, acts)?;
            b.matmul(&self.output, normed, acts, logits, n)?;
            let mut out = vec![0f32; n * hp.vocab_size];
            b.read(logits, &mut out)?;
            out
        };
        if guard.as_ref().is_some_and(|sc| sc.size.rows > KEEP_SCRATCH_ROWS) {
            *guard = None;
        }
        Ok(out)
    }
}

/// How far a device's logits may be from the reference backend's at the load check,
/// relative to the largest reference logit. A device with exact rounding matches bit for
/// bit; one that flushes denormals or rounds division loosely drifts by far less than this,
/// while a kernel that miscompiles is off by whole logits.
pub const PROBE_TOLERANCE: f32 = 2e-2;

/// The result of a load check: how one backend's logits compare with another's.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReport {
    pub bitwise: bool,
    pub max_abs_diff: f32,
}

impl ProbeReport {
    /// The check in words, for the start-up log.
    pub fn summary(&self) -> String {
        if self.bitwise {
            "logits equal the CPU's bit for bit".into()
        } else {
            format!("logits within {} of the CPU's, not bitwise (greedy ties may differ)", self.max_abs_diff)
        }
    }
}

/// Runs the same small batch on two models of the same file (two backends): two prompts of
/// different lengths prefilled together (the second in two chunks), then a decode step,
/// comparing every logit of `model` with `reference`'s. Fails when they differ by more than
/// [`PROBE_TOLERANCE`] (or a logit is NaN).
pub fn compare_backends<A: Backend, C: Backend>(reference: &LlamaModel<A>, model: &LlamaModel<C>) -> Result<ProbeReport> {
    let tok = &reference.tokenizer;
    let a = tok.encode("The OpenCL device must reproduce the CPU's logits for this sentence.", true).map_err(|e| Error::Internal(e.to_string()))?;
    let b = tok.encode("Hello there!", true).map_err(|e| Error::Internal(e.to_string()))?;
    let cfg = KvCacheConfig { block_tokens: DEFAULT_BLOCK_TOKENS, num_blocks: 2 * (a.len() + b.len() + 2).div_ceil(DEFAULT_BLOCK_TOKENS) + 2 };
    let mut ref_kv = reference.new_kv_cache_with(cfg)?;
    let mut kv = model.new_kv_cache_with(cfg)?;
    let per_seq = cfg.num_blocks / 2;
    let table_a: Vec<u32> = (0..per_seq as u32).collect();
    let table_b: Vec<u32> = (per_seq as u32..2 * per_seq as u32).collect();
    let split = b.len() / 2;
    let steps: Vec<Vec<SeqChunk<'_>>> = vec![
        vec![
            SeqChunk { tokens: &a, start_pos: 0, block_table: &table_a, want_logits: true },
            SeqChunk { tokens: &b[..split], start_pos: 0, block_table: &table_b, want_logits: false },
        ],
        vec![SeqChunk { tokens: &b[split..], start_pos: split, block_table: &table_b, want_logits: true }],
        vec![
            SeqChunk { tokens: &[42], start_pos: a.len(), block_table: &table_a, want_logits: true },
            SeqChunk { tokens: &[7], start_pos: b.len(), block_table: &table_b, want_logits: true },
        ],
    ];
    let mut report = ProbeReport { bitwise: true, max_abs_diff: 0.0 };
    for (i, step) in steps.iter().enumerate() {
        let want = reference.try_forward(step, &mut ref_kv)?;
        let got = model.try_forward(step, &mut kv)?;
        let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
        let mut worst = 0f32;
        for (x, y) in want.iter().zip(&got) {
            report.bitwise &= x.to_bits() == y.to_bits();
            let diff = (x - y).abs();
            // NaN compares false: a NaN logit on either side is a failure.
            worst = if diff <= worst { worst } else if diff.is_nan() { f32::INFINITY } else { diff };
        }
        report.max_abs_diff = report.max_abs_diff.max(worst);
        if got.len() != want.len() || worst > PROBE_TOLERANCE * scale {
            return Err(Error::Device(format!(
                "{}: step {i} of the load check gives logits up to {worst} away from {}'s (tolerance {}); refusing this device",
                model.device_name(),
                reference.device_name(),
                PROBE_TOLERANCE * scale
            )));
        }
    }
    Ok(report)
}

impl<B: Backend> LlamaModel<B> {
    /// What the load check against the CPU found (`None` for a model that was not checked).
    pub fn load_check(&self) -> Option<ProbeReport> {
        self.check
    }

    /// Records the load check's outcome (`llama_opencl`).
    pub(crate) fn set_check(&mut self, report: ProbeReport) {
        self.check = Some(report);
    }
}

/// A weight matrix's stored bytes and format, checked against the shape the model expects.
fn stored_matrix<'a>(gguf: &'a GgufFile, name: &str, rows: usize, cols: usize) -> std::result::Result<(&'a [u8], QuantType), String> {
    let t = gguf.tensor(name).map_err(|e| e.to_string())?;
    if t.shape != [rows, cols] {
        return Err(format!("tensor {name} has shape {:?}, expected [{rows}, {cols}]", t.shape));
    }
    let wtype = t.dtype;
    // Block formats multiply 8-bit activation blocks of 32.
    if wtype.is_block_quantised() && !cols.is_multiple_of(32) {
        return Err(format!("tensor {name}: rows of {cols} are not a multiple of 32"));
    }
    Ok((t.bytes, wtype))
}

fn load_vector(gguf: &GgufFile, name: &str, len: usize) -> std::result::Result<Vec<f32>, String> {
    let t = gguf.tensor(name).map_err(|e| e.to_string())?;
    if t.n_elements() != len || t.shape.len() != 1 {
        return Err(format!("tensor {name} has shape {:?}, expected [{len}]", t.shape));
    }
    let wtype = t.dtype;
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

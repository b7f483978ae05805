//! The `Backend` trait: device-resident buffers and ops that only enqueue (or, on the CPU,
//! compute) into buffers the caller owns, in the spirit of candle's `BackendStorage` and
//! ggml-backend. A model is written once against it (`ferroserve-core`'s `BertModel<B>` and
//! `LlamaModel<B>`) and runs on every backend: [`CpuBackend`] (the native kernels, buffers are `Vec`s) and
//! [`OpenClBackend`] (buffers live on the device; a pass uploads its inputs, enqueues every
//! op back to back on the one in-order queue and reads back only the result).
//!
//! Why buffers and not host slices (the older [`crate::Device`] trait): a host-slice op on
//! OpenCL would copy its inputs to the device and its outputs back, ≈ 40 round trips per
//! encoder pass. Here nothing crosses to the host between [`Backend::write`] and
//! [`Backend::read`].
//!
//! The ops are the BERT encoder's and the llama decoder's in one trait (not a second trait
//! over the same buffers): a backend is one type, opened once, with one set of buffer types,
//! whichever model runs on it, and a third backend implements one trait. The decoder's weights are a model file's packed blocks ([`StoredMatrix`], prepared
//! into [`Backend::Matrix`]), its activations are quantised once per group of matmuls
//! ([`Backend::Acts`]), and its paged KV cache's K and V blocks are [`Backend::KvStorage`]
//! (the block bookkeeping stays with the engine, `ferroserve-core`'s `kv`).

mod cpu;
mod opencl;

pub use cpu::{CpuBackend, CpuKv, CpuLinear, CpuMatrix};
pub use opencl::{ClLinear, ClMatrix, OpenClBackend, OpenClKv};

use std::sync::Arc;

pub use crate::cpu::llama_ops::{AttentionArith, PagedSeq, RopeParams};
use crate::kv_layout::PagedKvLayout;
use crate::opencl::OpenClError;
use crate::quant::QuantType;
use crate::Activation;

/// What a backend buffer may hold: plain values copied bit for bit between host and device.
pub trait Element: Copy + Default + Send + Sync + 'static {}
impl Element for f32 {}
impl Element for u32 {}
impl Element for u8 {}
impl Element for u16 {}

/// A backend op's failure (an OpenCL launch or allocation, a layer format the backend lacks).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl From<OpenClError> for BackendError {
    fn from(e: OpenClError) -> Self {
        BackendError(e.to_string())
    }
}

pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// How token vectors become one sentence vector (sentence-transformers' Pooling module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

/// A batch of variable-length sequences packed back to back (no padding), as a pass's
/// index buffers: row `r` is token `tokens[r]` at position `positions[r]` of sequence
/// `row_seq[r]`; sequence `s` is rows `seq_offsets[s]..seq_offsets[s + 1]`. Buffers may be
/// longer than the pass (scratch grown for the largest pass); `rows` and `seqs` count.
pub struct Packing<'a, B: Backend> {
    pub tokens: &'a B::Buffer<u32>,
    pub positions: &'a B::Buffer<u32>,
    pub row_seq: &'a B::Buffer<u32>,
    pub seq_offsets: &'a B::Buffer<u32>,
    pub rows: usize,
    pub seqs: usize,
}

/// A model file whose tensors [`StoredMatrix`] borrows (a GGUF file's memory map).
///
/// # Safety
/// A slice of the file's tensor bytes must stay valid and unchanged for as long as the file
/// value lives, wherever it (or the `Arc` holding it) moves: a backend keeps pointers into it
/// next to an `Arc` of the file (a memory map qualifies; a `Vec` that may reallocate does not).
pub unsafe trait WeightFile: Send + Sync {
    /// Copies `bytes` (a slice of this file's tensors) into `out` without making its pages
    /// resident in this process (row gathers from a table whose bulk is never read).
    fn read_copy(&self, bytes: &[u8], out: &mut [u8]);
    /// Drops this process's resident pages of `bytes` once a backend has copied or repacked
    /// them and reads only its own form.
    fn release_resident(&self, bytes: &[u8]);
}

/// A `[rows, cols]` weight matrix as a model file stores it (packed blocks of `wtype`),
/// before a backend prepares it.
pub struct StoredMatrix<'a> {
    pub name: &'a str,
    pub wtype: QuantType,
    pub rows: usize,
    pub cols: usize,
    file: &'a Arc<dyn WeightFile>,
    bytes: &'a [u8],
}

impl<'a> StoredMatrix<'a> {
    /// # Safety
    /// `bytes` must be a slice of `file`'s tensors (see [`WeightFile`]).
    pub unsafe fn new(file: &'a Arc<dyn WeightFile>, bytes: &'a [u8], name: &'a str, wtype: QuantType, rows: usize, cols: usize) -> Self {
        Self { name, wtype, rows, cols, file, bytes }
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn file(&self) -> &'a Arc<dyn WeightFile> {
        self.file
    }
}

/// What a decoder weight matrix is prepared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixUse {
    /// Rows gathered one per token ([`Backend::embed_rows`]), never multiplied.
    Rows,
    /// Multiplied in the file's block order (llama.cpp's sums: `Numerics::Exact`).
    Matmul,
    /// Multiplied, repacked where the backend has a faster layout with its own sum order
    /// (the CPU's panels: `Numerics::Fast`); formats without one stay as `Matmul`.
    FastMatmul,
}

/// One decoder step's rows as index buffers, built on the host and written before the ops:
/// row `r` is token `tokens[r]` at position `positions[r]` of sequence `row_seq[r]`, its K
/// and V go to cache slot `slots[r]` (block · block_tokens + offset), and sequence `s`'s
/// block table is `block_tables[s · table_len..][..table_len]`. `seqs` is the same step on
/// the host (each sequence's rows, first position and block table), for backends that
/// compute there. Buffers may be longer than the step.
pub struct DecodeStep<'a, B: Backend> {
    pub seqs: &'a [PagedSeq<'a>],
    pub rows: usize,
    pub tokens: &'a B::Buffer<u32>,
    pub positions: &'a B::Buffer<u32>,
    pub slots: &'a B::Buffer<u32>,
    pub row_seq: &'a B::Buffer<u32>,
    pub block_tables: &'a B::Buffer<u32>,
    pub table_len: usize,
}

/// A compute backend. Every op reads and writes buffers of this backend only; shapes are
/// given in rows and widths, and only the leading `rows × width` elements of a (possibly
/// larger) buffer are touched. Implementations must be deterministic and batch invariant: a
/// row's result never depends on which other rows share the call.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A device-resident array (`Vec<T>` on the CPU, a `DeviceBuffer<T>` on OpenCL).
    type Buffer<T: Element>: Send + Sync;
    /// A linear layer's weight and bias, prepared once in the layout the backend's matmul reads.
    type Linear: Send + Sync;
    /// A decoder weight matrix from a model file, prepared for its [`MatrixUse`].
    type Matrix: Send + Sync;
    /// Activations quantised to 8 bits per 32-block, written once and read by every matmul
    /// of a group (a layer's Q, K and V; its gate and up).
    type Acts: Send + Sync;
    /// The rotary angles: what [`Backend::rope`] reads besides the step's positions.
    type Rope: Send + Sync;
    /// Every layer's K and V blocks of a paged KV cache, laid out as [`PagedKvLayout`] says.
    type KvStorage: Send + Sync;

    /// Human-readable name, e.g. `cpu(avx2)` or `opencl:0(...)`.
    fn name(&self) -> String;

    /// A buffer of `len` elements (contents unspecified until written).
    fn alloc<T: Element>(&self, len: usize) -> BackendResult<Self::Buffer<T>>;
    /// A buffer holding `data` (the CPU keeps the vector itself).
    fn upload<T: Element>(&self, data: Vec<T>) -> BackendResult<Self::Buffer<T>>;
    /// Copies `data` into the start of `buf` (a pass's inputs; may wait for the device).
    fn write<T: Element>(&self, buf: &mut Self::Buffer<T>, data: &[T]) -> BackendResult<()>;
    /// Copies the first `out.len()` elements of `buf` to the host, after every op before.
    fn read<T: Element>(&self, buf: &Self::Buffer<T>, out: &mut [T]) -> BackendResult<()>;

    /// Runs a whole pass. The CPU runs it as one job on a rayon worker, so that the pass's
    /// parallel sections fork on the worker's own deque instead of being injected from the
    /// calling thread and waited for on a latch each time (bench/NOTES.md).
    fn run_pass<R: Send>(&self, pass: impl FnOnce() -> R + Send) -> R {
        pass()
    }

    /// Builds what the encoder ops need for heads of `head_dim` (OpenCL compiles its
    /// attention kernel for the head width). Called once, before any op.
    fn prepare_encoder(&mut self, head_dim: usize) -> BackendResult<()>;

    /// Prepares `weight` (`[out_features, in_features]` row-major, PyTorch's layout) and
    /// `bias` (`[out_features]`) in `format`: `QuantType::F32` for the f32 kernels, or a
    /// block format (weights quantised at load, activations to 8 bits per block on the fly).
    fn pack_linear(&self, weight: &[f32], bias: &[f32], out_features: usize, in_features: usize, format: QuantType) -> BackendResult<Self::Linear>;

    /// `x[r] = word[tokens[r]] + pos[positions[r]] + type0` for the packing's rows.
    #[allow(clippy::too_many_arguments)]
    fn embedding_lookup(
        &self,
        word: &Self::Buffer<f32>,
        pos: &Self::Buffer<f32>,
        type0: &Self::Buffer<f32>,
        seqs: &Packing<'_, Self>,
        x: &mut Self::Buffer<f32>,
        dim: usize,
    ) -> BackendResult<()>;

    /// Row-wise `x = LayerNorm(x + residual) * gamma + beta`, in place (`None`: no residual).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        x: &mut Self::Buffer<f32>,
        residual: Option<&Self::Buffer<f32>>,
        gamma: &Self::Buffer<f32>,
        beta: &Self::Buffer<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> BackendResult<()>;

    /// `y[rows, out] = act(x[rows, in] · Wᵀ + bias)`.
    fn linear(&self, x: &Self::Buffer<f32>, w: &Self::Linear, act: Activation, y: &mut Self::Buffer<f32>, rows: usize) -> BackendResult<()>;

    /// Bidirectional multi-head attention within each packed sequence. `qkv` rows are
    /// `[Q | K | V]` (each `heads × head_dim`, each head contiguous); `out` rows `heads × head_dim`.
    fn encoder_attention(
        &self,
        qkv: &Self::Buffer<f32>,
        seqs: &Packing<'_, Self>,
        heads: usize,
        head_dim: usize,
        out: &mut Self::Buffer<f32>,
    ) -> BackendResult<()>;

    /// One `dim`-vector per sequence from its rows of `hidden`, L2-normalised if `normalize`.
    fn pool(
        &self,
        hidden: &Self::Buffer<f32>,
        seqs: &Packing<'_, Self>,
        mode: Pooling,
        normalize: bool,
        out: &mut Self::Buffer<f32>,
        dim: usize,
    ) -> BackendResult<()>;

    // --- The llama decoder's ops ---

    /// Builds what the decoder ops need for heads of `head_dim` (OpenCL compiles its
    /// attention kernels for the head width). Called once, before any decoder op.
    fn prepare_decoder(&mut self, head_dim: usize) -> BackendResult<()>;

    /// Prepares a model file's weight matrix for `usage` (an error names the matrix when the
    /// backend has no kernel for its format).
    fn pack_matrix(&self, m: StoredMatrix<'_>, usage: MatrixUse) -> BackendResult<Self::Matrix>;

    /// The rotary tables for positions `0..context`.
    fn prepare_rope(&self, params: &RopeParams, context: usize) -> BackendResult<Self::Rope>;

    /// Room for `rows × k` quantised activations (a backend may grow it as needed).
    fn alloc_acts(&self, rows: usize, k: usize) -> BackendResult<Self::Acts>;

    /// K and V storage of `num_blocks` blocks for each of `layers` layers.
    fn alloc_kv(&self, layout: PagedKvLayout, layers: usize, num_blocks: usize) -> BackendResult<Self::KvStorage>;

    /// `x[r] = table row tokens[r]`, dequantised to f32 (`dim` values).
    fn embed_rows(&self, table: &Self::Matrix, step: &DecodeStep<'_, Self>, x: &mut Self::Buffer<f32>, dim: usize) -> BackendResult<()>;

    /// Row-wise `out = RMSNorm(x) · weight` in llama.cpp's arithmetic (`out` is not `x`).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(&self, x: &Self::Buffer<f32>, weight: &Self::Buffer<f32>, out: &mut Self::Buffer<f32>, rows: usize, dim: usize, eps: f32) -> BackendResult<()>;

    /// Quantises `x[rows, k]` into `acts` for the matmuls that follow.
    fn quantize_activations(&self, x: &Self::Buffer<f32>, rows: usize, k: usize, acts: &mut Self::Acts) -> BackendResult<()>;

    /// `y[rows, w.rows] = x · wᵀ` for every `(w, y)`, all reading the same input: `x` in f32
    /// and as quantised by the last [`Backend::quantize_activations`] (block formats read
    /// the latter). A backend may run them as one parallel region; the bits are each
    /// matmul's own.
    fn matmuls(&self, outputs: &mut [(&Self::Matrix, &mut Self::Buffer<f32>)], x: &Self::Buffer<f32>, acts: &Self::Acts, rows: usize) -> BackendResult<()>;

    /// [`Backend::matmuls`] of one matrix.
    fn matmul(&self, w: &Self::Matrix, x: &Self::Buffer<f32>, acts: &Self::Acts, y: &mut Self::Buffer<f32>, rows: usize) -> BackendResult<()> {
        self.matmuls(&mut [(w, y)], x, acts, rows)
    }

    /// The step's rotary factors into `cos_sin` (`rows × rope.dims`), once per step, for
    /// [`Backend::rope`]; a backend that reads a whole-context table by position leaves
    /// it untouched. Fails on a position outside the table.
    fn rope_rows(&self, rope: &Self::Rope, step: &DecodeStep<'_, Self>, cos_sin: &mut Self::Buffer<f32>) -> BackendResult<()>;

    /// Rotates the first `rope.dims` values of every head of `x` (rows of `heads · head_dim`)
    /// as adjacent pairs, by each row's position.
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, x: &mut Self::Buffer<f32>, rope: &Self::Rope, cos_sin: &Self::Buffer<f32>, step: &DecodeStep<'_, Self>, heads: usize, head_dim: usize) -> BackendResult<()>;

    /// Stores the step's K and V rows (`kv_heads · head_dim` each) into layer `layer`'s
    /// blocks at their slots, as f16.
    fn kv_write(&self, kv: &mut Self::KvStorage, layer: usize, k: &Self::Buffer<f32>, v: &Self::Buffer<f32>, step: &DecodeStep<'_, Self>) -> BackendResult<()>;

    /// Causal grouped-query attention of every row over its sequence's cached keys
    /// `0..=position` in layer `layer`: `q` and `out` rows are `heads · head_dim`.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        q: &Self::Buffer<f32>,
        kv: &Self::KvStorage,
        layer: usize,
        step: &DecodeStep<'_, Self>,
        heads: usize,
        arith: AttentionArith,
        out: &mut Self::Buffer<f32>,
    ) -> BackendResult<()>;

    /// `x += y` over the first `count` values.
    fn add(&self, x: &mut Self::Buffer<f32>, y: &Self::Buffer<f32>, count: usize) -> BackendResult<()>;

    /// `gate = silu(gate) · up` over the first `count` values.
    fn silu_mul(&self, gate: &mut Self::Buffer<f32>, up: &Self::Buffer<f32>, count: usize) -> BackendResult<()>;

    /// `out[i] = x[rows[i]]` for `count` rows of `dim` (the rows that want logits).
    fn gather_rows(&self, x: &Self::Buffer<f32>, rows: &Self::Buffer<u32>, count: usize, dim: usize, out: &mut Self::Buffer<f32>) -> BackendResult<()>;

    /// Waits for every op enqueued so far (a step that reads nothing back must still have
    /// written its K and V before the caller moves on).
    fn finish(&self) -> BackendResult<()> {
        Ok(())
    }
}

/// L2-normalises in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32;
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

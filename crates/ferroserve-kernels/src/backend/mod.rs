//! The `Backend` trait: device-resident buffers and ops that only enqueue (or, on the CPU,
//! compute) into buffers the caller owns, in the spirit of candle's `BackendStorage` and
//! ggml-backend. A model is written once against it (`ferroserve-core`'s `BertModel<B>`)
//! and runs on every backend: [`CpuBackend`] (the native kernels, buffers are `Vec`s) and
//! [`OpenClBackend`] (buffers live on the device; a pass uploads its inputs, enqueues every
//! op back to back on the one in-order queue and reads back only the result).
//!
//! Why buffers and not host slices (the older [`crate::Device`] trait): a host-slice op on
//! OpenCL would copy its inputs to the device and its outputs back, ≈ 40 round trips per
//! encoder pass. Here nothing crosses to the host between [`Backend::write`] and
//! [`Backend::read`].
//!
//! So far the ops are the BERT encoder's; the llama decoder's (rms_norm, quantised matmuls,
//! rope, KV writes, paged attention, ...) join the same trait, with its KV storage as one
//! more associated type.

mod cpu;
mod opencl;

pub use cpu::{CpuBackend, CpuLinear};
pub use opencl::{ClLinear, OpenClBackend};

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

/// A compute backend. Every op reads and writes buffers of this backend only; shapes are
/// given in rows and widths, and only the leading `rows × width` elements of a (possibly
/// larger) buffer are touched. Implementations must be deterministic and batch invariant: a
/// row's result never depends on which other rows share the call.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A device-resident array (`Vec<T>` on the CPU, a `DeviceBuffer<T>` on OpenCL).
    type Buffer<T: Element>: Send + Sync;
    /// A linear layer's weight and bias, prepared once in the layout the backend's matmul reads.
    type Linear: Send + Sync;

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
    /// Whether [`Backend::pool`] implements `mode`.
    fn supports_pooling(&self, mode: Pooling) -> bool;

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
}

/// L2-normalises in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32;
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

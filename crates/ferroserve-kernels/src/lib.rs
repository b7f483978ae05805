//! Compute backends and the kernels behind them.
//!
//! Models (in `ferroserve-core`) are written once against the [`Backend`] trait
//! ([`backend`]): device-resident buffers and ops that only enqueue into buffers the caller
//! owns. [`CpuBackend`] runs the native CPU kernels ([`cpu`], [`quant`]) over `Vec`s;
//! [`OpenClBackend`] runs the OpenCL kernels ([`opencl`]) over device buffers, so a pass
//! crosses to the host only for its inputs and its result. Both models are written this way
//! (`BertModel<B>`, `LlamaModel<B>`): a third backend is one more implementation of the
//! trait, not a third copy of a model.
//!
//! [`Device`] is the CPU kernels' host-slice interface (plain row-major `f32` slices,
//! weights packed once at load by [`Device::pack_linear`]): what [`CpuBackend`] calls, and
//! what the kernel tests and benches drive directly. It is not a model-facing abstraction:
//! a host-slice op on another device would copy activations to it and back between ops.

pub mod backend;
pub mod cpu;
pub mod isa;
pub mod kv_layout;
pub mod opencl;
pub mod quant;
#[doc(hidden)]
pub mod testing;

pub use backend::{Backend, BackendError, BackendResult, CpuBackend, OpenClBackend, WeightFile};
pub use cpu::CpuDevice;
pub use isa::{Isa, IsaError, QuantLevel};

/// A linear layer's weight, prepared once for a device's matmul kernel.
///
/// The logical weight is `[out_features, in_features]` row-major (PyTorch's layout);
/// the stored layout is the device's business.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub weights: PackedWeights,
    pub bias: Option<Vec<f32>>,
}

/// A linear layer's weight in the layout of the kernel that will read it.
#[derive(Debug, Clone)]
pub enum PackedWeights {
    /// f32 column panels (`cpu::gemm`).
    F32(Vec<f32>),
    /// The same panels as bf16 pairs along k, one pair per u32 (`vdpbf16ps` and AMX tiles,
    /// for the avx512bf16 and amx levels).
    Bf16(Vec<u32>),
}

impl PackedWeights {
    /// Bytes of packed weight data.
    pub fn bytes(&self) -> usize {
        match self {
            PackedWeights::F32(p) => std::mem::size_of_val(p.as_slice()),
            PackedWeights::Bf16(p) => std::mem::size_of_val(p.as_slice()),
        }
    }
}

/// An element-wise function fused into a linear layer's output (applied while the
/// output tile is still in L1, saving a pass over the activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact (erf-based) GELU.
    Gelu,
}

/// Describes a batch of variable-length sequences packed back to back (no padding):
/// sequence `i` occupies rows `offsets[i]..offsets[i + 1]`.
#[derive(Debug, Clone)]
pub struct SeqLayout<'a> {
    pub offsets: &'a [usize],
}

impl SeqLayout<'_> {
    pub fn num_seqs(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn total_rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }
}

/// The CPU kernels over host slices (see the crate docs). Implementations must be deterministic: the result for one
/// row never depends on which other rows share the call.
pub trait Device: Send + Sync {
    /// Human-readable name, e.g. `cpu(avx512)`.
    fn name(&self) -> String;

    /// Prepare a `[out_features, in_features]` row-major weight (and optional bias).
    fn pack_linear(&self, weight: &[f32], out_features: usize, in_features: usize, bias: Option<&[f32]>) -> PackedLinear;

    /// `out[rows, out_features] = act(x[rows, in_features] · Wᵀ + bias)`.
    fn linear(&self, x: &[f32], rows: usize, w: &PackedLinear, act: Activation, out: &mut [f32]);

    /// Row-wise `x = LayerNorm(x + residual) * gamma + beta` (pass `None` for no residual).
    fn add_layer_norm(&self, x: &mut [f32], residual: Option<&[f32]>, dim: usize, gamma: &[f32], beta: &[f32], eps: f32);

    /// Exact (erf-based) GELU in place.
    fn gelu(&self, x: &mut [f32]);

    /// Row-wise softmax in place over rows of `cols`.
    fn softmax(&self, x: &mut [f32], cols: usize);

    /// Bidirectional (encoder) multi-head attention over packed variable-length sequences.
    /// `qkv` is `[rows, 3 * heads * head_dim]` (Q, K, V blocks side by side, each head
    /// contiguous within its block); `out` is `[rows, heads * head_dim]`.
    fn encoder_attention(&self, qkv: &[f32], layout: &SeqLayout<'_>, heads: usize, head_dim: usize, out: &mut [f32]);
}

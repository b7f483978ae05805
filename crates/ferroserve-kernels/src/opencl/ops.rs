//! Typed launches of the BERT encoder's kernels (see kernels/README.md for each kernel's
//! contract). Each call only enqueues: a caller chains them on the device's one in-order
//! queue and reads back once at the end.

use std::path::{Path, PathBuf};

use super::{Arg, BuiltKernel, DeviceBuffer, KernelSource, OpenClDevice, Result};

/// The encoder's kernels, built once per model (attention is compiled for its head width).
pub struct BertKernels {
    embedding: BuiltKernel,
    layer_norm: BuiltKernel,
    matmul: BuiltKernel,
    attention: BuiltKernel,
    mean_pool: BuiltKernel,
    norm_group: usize,
    pool_group: usize,
}

/// The work-group size for the per-row reduction kernels: a power of two (their tree sums
/// need one), at most 256 (a row of 384 floats gives each work-item one or two elements).
fn reduction_group(k: &BuiltKernel) -> usize {
    let cap = k.max_work_group_size.clamp(1, 256);
    1 << (usize::BITS - 1 - cap.leading_zeros())
}

impl BertKernels {
    pub const NAMES: [&'static str; 5] = ["embedding_lookup_f32", "layer_norm_f32", "matmul_f32_f32", "attention_encoder_f32", "mean_pool_f32"];

    pub fn build(dev: &OpenClDevice, head_dim: usize, from: &KernelSource) -> Result<Self> {
        let none: &[(&str, String)] = &[];
        let embedding = dev.kernel("embedding_lookup_f32", none, from)?;
        let layer_norm = dev.kernel("layer_norm_f32", none, from)?;
        let matmul = dev.kernel("matmul_f32_f32", none, from)?;
        let attention = dev.kernel("attention_encoder_f32", &[("HEAD_DIM", head_dim.to_string())], from)?;
        let mean_pool = dev.kernel("mean_pool_f32", none, from)?;
        let (norm_group, pool_group) = (reduction_group(&layer_norm), reduction_group(&mean_pool));
        Ok(Self { embedding, layer_norm, matmul, attention, mean_pool, norm_group, pool_group })
    }

    /// Writes every kernel's program binary to `dir` (loadable with
    /// `KernelSource::Binaries(dir)` on the same kind of device).
    pub fn save_binaries(&self, dev: &OpenClDevice, dir: &Path) -> Result<Vec<PathBuf>> {
        [&self.embedding, &self.layer_norm, &self.matmul, &self.attention, &self.mean_pool].iter().map(|k| dev.save_binary(k, dir)).collect()
    }

    /// `x[r] = word[tokens[r]] + pos[positions[r]] + type0`.
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_lookup(
        &self,
        dev: &OpenClDevice,
        word: &DeviceBuffer<f32>,
        pos: &DeviceBuffer<f32>,
        type0: &DeviceBuffer<f32>,
        tokens: &DeviceBuffer<u32>,
        positions: &DeviceBuffer<u32>,
        x: &DeviceBuffer<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        let args = [Arg::buf(word), Arg::buf(pos), Arg::buf(type0), Arg::buf(tokens), Arg::buf(positions), Arg::buf(x), Arg::U32(dim as u32)];
        dev.launch(&self.embedding, &args, &[dim, rows], None)
    }

    /// Row-wise `x = LayerNorm(x + residual) * gamma + beta`, in place.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        dev: &OpenClDevice,
        x: &DeviceBuffer<f32>,
        residual: Option<&DeviceBuffer<f32>>,
        gamma: &DeviceBuffer<f32>,
        beta: &DeviceBuffer<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let l = self.norm_group;
        let args = [Arg::buf(x), Arg::opt_buf(residual), Arg::buf(gamma), Arg::buf(beta), Arg::U32(dim as u32), Arg::F32(eps), Arg::Local(l * 4)];
        dev.launch(&self.layer_norm, &args, &[l * rows], Some(&[l]))
    }

    /// `y[m, n] = act(x[m, k] · wᵀ + bias)`, `w` row-major `[n, k]`; `gelu` fuses exact GELU.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        dev: &OpenClDevice,
        x: &DeviceBuffer<f32>,
        w: &DeviceBuffer<f32>,
        bias: Option<&DeviceBuffer<f32>>,
        y: &DeviceBuffer<f32>,
        m: usize,
        n: usize,
        k: usize,
        gelu: bool,
    ) -> Result<()> {
        let args = [Arg::buf(x), Arg::buf(w), Arg::opt_buf(bias), Arg::buf(y), Arg::U32(n as u32), Arg::U32(k as u32), Arg::U32(gelu as u32)];
        dev.launch(&self.matmul, &args, &[n, m], None)
    }

    /// Bidirectional attention within each packed sequence; `qkv` rows are `[Q | K | V]`.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_attention(
        &self,
        dev: &OpenClDevice,
        qkv: &DeviceBuffer<f32>,
        seq_offsets: &DeviceBuffer<u32>,
        row_seq: &DeviceBuffer<u32>,
        out: &DeviceBuffer<f32>,
        rows: usize,
        heads: usize,
    ) -> Result<()> {
        let args = [Arg::buf(qkv), Arg::buf(seq_offsets), Arg::buf(row_seq), Arg::buf(out), Arg::U32(heads as u32)];
        dev.launch(&self.attention, &args, &[heads, rows], None)
    }

    /// Per sequence: the mean of its rows, L2-normalised if `normalize`.
    #[allow(clippy::too_many_arguments)]
    pub fn mean_pool(
        &self,
        dev: &OpenClDevice,
        hidden: &DeviceBuffer<f32>,
        seq_offsets: &DeviceBuffer<u32>,
        out: &DeviceBuffer<f32>,
        num_seqs: usize,
        dim: usize,
        normalize: bool,
    ) -> Result<()> {
        let l = self.pool_group;
        let args = [Arg::buf(hidden), Arg::buf(seq_offsets), Arg::buf(out), Arg::U32(dim as u32), Arg::U32(normalize as u32), Arg::Local(l * 4)];
        dev.launch(&self.mean_pool, &args, &[l * num_seqs], Some(&[l]))
    }
}

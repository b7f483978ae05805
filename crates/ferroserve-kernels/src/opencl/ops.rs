//! The models' kernels, built once per model, and typed launches of the llama decoder's (see
//! kernels/README.md for each kernel's contract). Each launch only enqueues: a caller chains
//! them on the device's one in-order queue and reads back once at the end. Both models'
//! launches are [`crate::OpenClBackend`]'s ops (the `Backend` trait).

use std::path::{Path, PathBuf};

use super::{Arg, BuiltKernel, DeviceBuffer, KernelSource, OpenClDevice, Result};
use crate::quant::QuantLevel;

/// The encoder's kernels, built once per model (attention is compiled for its head width).
pub struct BertKernels {
    pub(crate) embedding: BuiltKernel,
    pub(crate) layer_norm: BuiltKernel,
    pub(crate) matmul_tiled: BuiltKernel,
    pub(crate) attention: BuiltKernel,
    pub(crate) pool: BuiltKernel,
    /// Work-group sizes of the per-row reduction kernels (layer norm, pooling).
    pub(crate) norm_group: usize,
    pub(crate) pool_group: usize,
}

/// The work-group size for the per-row reduction kernels: a power of two (their tree sums
/// need one), at most 256 (a row of 384 floats gives each work-item one or two elements).
fn reduction_group(k: &BuiltKernel) -> usize {
    let cap = k.max_work_group_size.clamp(1, 256);
    1 << (usize::BITS - 1 - cap.leading_zeros())
}

/// `matmul_f32_f32_tiled`'s shape: a work-group computes `LINEAR_TILE_M × LINEAR_TILE_N`
/// outputs in k-chunks of `LINEAR_TILE_K`, each work-item `LINEAR_WORK_M × LINEAR_WORK_N` of
/// them. The kernel's defaults (the fastest shape tried on PoCL, 32 KB of local memory;
/// kernels/README.md), passed explicitly so that the build and the launch cannot disagree
/// (a binary compiled offline with other tiles fails to launch: the kernel requires its
/// work-group size).
pub(crate) const LINEAR_TILE_M: usize = 64;
pub(crate) const LINEAR_TILE_N: usize = 64;
const LINEAR_TILE_K: usize = 64;
const LINEAR_WORK_M: usize = 8;
const LINEAR_WORK_N: usize = 16;
/// Its work-group: `(LINEAR_TILE_N / LINEAR_WORK_N, LINEAR_TILE_M / LINEAR_WORK_M)`.
pub(crate) const LINEAR_GROUP: [usize; 2] = [LINEAR_TILE_N / LINEAR_WORK_N, LINEAR_TILE_M / LINEAR_WORK_M];

impl BertKernels {
    pub const NAMES: [&'static str; 5] = ["embedding_lookup_f32", "layer_norm_f32", "matmul_f32_f32_tiled", "attention_encoder_f32", "pool_f32"];

    pub fn build(dev: &OpenClDevice, head_dim: usize, from: &KernelSource) -> Result<Self> {
        let none: &[(&str, String)] = &[];
        let embedding = dev.kernel("embedding_lookup_f32", none, from)?;
        let layer_norm = dev.kernel("layer_norm_f32", none, from)?;
        // Every linear layer goes through the tiled kernel, whatever the row count: the
        // encoder's batches have at least two rows ([CLS], [SEP]), where it already matches
        // the untiled kernel on PoCL (and is ~25× faster on a batch of sentences).
        let tiles = [
            ("TILE_M", LINEAR_TILE_M.to_string()),
            ("TILE_N", LINEAR_TILE_N.to_string()),
            ("TILE_K", LINEAR_TILE_K.to_string()),
            ("WORK_M", LINEAR_WORK_M.to_string()),
            ("WORK_N", LINEAR_WORK_N.to_string()),
        ];
        let matmul_tiled = dev.kernel("matmul_f32_f32_tiled", &tiles, from)?;
        let group = LINEAR_GROUP[0] * LINEAR_GROUP[1];
        if matmul_tiled.max_work_group_size < group {
            return Err(super::OpenClError::Unsupported(format!(
                "matmul_f32_f32_tiled needs work-groups of {group}; this device allows {}",
                matmul_tiled.max_work_group_size
            )));
        }
        let attention = dev.kernel("attention_encoder_f32", &[("HEAD_DIM", head_dim.to_string())], from)?;
        let pool = dev.kernel("pool_f32", none, from)?;
        let (norm_group, pool_group) = (reduction_group(&layer_norm), reduction_group(&pool));
        Ok(Self { embedding, layer_norm, matmul_tiled, attention, pool, norm_group, pool_group })
    }

    /// Writes every kernel's program binary to `dir` (loadable with
    /// `KernelSource::Binaries(dir)` on the same kind of device).
    pub fn save_binaries(&self, dev: &OpenClDevice, dir: &Path) -> Result<Vec<PathBuf>> {
        [&self.embedding, &self.layer_norm, &self.matmul_tiled, &self.attention, &self.pool].iter().map(|k| dev.save_binary(k, dir)).collect()
    }
}

/// Weight formats the llama matmul kernels read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantWeights {
    Q4_1,
    Q8_0,
}

/// The llama decoder's kernels (kernels/README.md, "A forward pass on one command queue"),
/// built once per model; the paged attention kernels are compiled for its head width.
pub struct LlamaKernels {
    embedding: BuiltKernel,
    rms_norm: BuiltKernel,
    quantize: BuiltKernel,
    matmul_q4_1: BuiltKernel,
    matmul_q8_0: BuiltKernel,
    rope: BuiltKernel,
    kv_write: BuiltKernel,
    attention_prefill: BuiltKernel,
    attention_decode: BuiltKernel,
    add: BuiltKernel,
    silu_mul: BuiltKernel,
    gather_rows: BuiltKernel,
    norm_group: usize,
    head_dim: usize,
}

/// Activation rows per work-item of `matmul_q4_1_q8_1` (`-DROWS`): each weight block is
/// unpacked once for this many rows. 8 was the fastest on PoCL for 16 and 656 rows and no
/// slower for one (bench/NOTES.md).
const Q4_1_ROWS: usize = 8;
/// The same for `matmul_q8_0_q8_0` (the logits), where 4 measured best on PoCL.
const Q8_0_ROWS: usize = 4;

/// `matmul_q8_0_q8_0`'s `-DQ8_0_ORDER`: the operation order of the CPU's Q8_0 kernel at
/// `isa` (0 portable, 1 AVX2, 2 AVX-512; see the kernel's header). The CPU's Q8_0 bits
/// depend on its ISA level, unlike Q4_1's, so the logits (the tied Q8_0 output matrix) are
/// the CPU device's only if the kernel follows the level the CPU runs.
pub fn q8_0_order(isa: QuantLevel) -> u32 {
    match isa {
        QuantLevel::Portable => 0,
        QuantLevel::Avx2 => 1,
        QuantLevel::Avx512 => 2,
    }
}

/// The paged attention kernels' `-DLIBM_EXPF_FMA`: whether this process's `expf` (what the
/// CPU's softmax calls) is glibc's FMA build, which contracts its double arithmetic into
/// fmas. glibc's x86-64 ifunc picks that build on CPUs with FMA and AVX2 (ifunc-fma.h),
/// else its SSE2 build, whose roundings `common.h` reproduces with 0.
pub fn libm_expf_fma() -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        u32::from(is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        1 // glibc's aarch64 expf is compiled with fma contraction everywhere
    }
}

impl LlamaKernels {
    pub const NAMES: [&'static str; 12] = [
        "embedding_lookup_q8_0",
        "rms_norm_f32",
        "quantize_q8_f32",
        "matmul_q4_1_q8_1",
        "matmul_q8_0_q8_0",
        "rope_f32",
        "kv_write_f16_f32",
        "attention_paged_f16_prefill",
        "attention_paged_f16_decode",
        "add_f32",
        "silu_mul_f32",
        "gather_rows_f32",
    ];

    /// Builds the decoder's kernels. `matmul_q8_0_q8_0` is compiled for the operation order
    /// of the CPU's Q8_0 kernel at [`QuantLevel::selected`] (the level the CPU backend, and so
    /// the OpenCL model's load check, runs; [`q8_0_order`]), so that the logits are the CPU's on
    /// every host and every `FERROSERVE_ISA`. Program binaries ([`KernelSource::Binaries`])
    /// keep the order of the process that built them (their `-D` options are fixed): binaries
    /// from a host at another level give logits off in the last bits, which the load check
    /// reports as not bitwise (and refuses beyond its tolerance); rebuild them on the
    /// serving host's level.
    pub fn build(dev: &OpenClDevice, head_dim: usize, from: &KernelSource) -> Result<Self> {
        let none: &[(&str, String)] = &[];
        let head = [("HEAD_DIM", head_dim.to_string()), ("LIBM_EXPF_FMA", libm_expf_fma().to_string())];
        let q8_0 = [("ROWS", Q8_0_ROWS.to_string()), ("Q8_0_ORDER", q8_0_order(QuantLevel::selected()).to_string())];
        let rms_norm = dev.kernel("rms_norm_f32", none, from)?;
        // One work-item computes the row's scale serially; the group then scales the row.
        let norm_group = rms_norm.max_work_group_size.clamp(1, 64);
        let attention_decode = dev.kernel("attention_paged_f16_decode", &head, from)?;
        if attention_decode.max_work_group_size < head_dim {
            return Err(super::OpenClError::Unsupported(format!(
                "attention_paged_f16_decode needs work-groups of {head_dim} (the head width); this device allows {}",
                attention_decode.max_work_group_size
            )));
        }
        Ok(Self {
            embedding: dev.kernel("embedding_lookup_q8_0", none, from)?,
            rms_norm,
            quantize: dev.kernel("quantize_q8_f32", none, from)?,
            matmul_q4_1: dev.kernel("matmul_q4_1_q8_1", &[("ROWS", Q4_1_ROWS.to_string())], from)?,
            matmul_q8_0: dev.kernel("matmul_q8_0_q8_0", &q8_0, from)?,
            rope: dev.kernel("rope_f32", none, from)?,
            kv_write: dev.kernel("kv_write_f16_f32", none, from)?,
            attention_prefill: dev.kernel("attention_paged_f16_prefill", &head, from)?,
            attention_decode,
            add: dev.kernel("add_f32", none, from)?,
            silu_mul: dev.kernel("silu_mul_f32", none, from)?,
            gather_rows: dev.kernel("gather_rows_f32", none, from)?,
            norm_group,
            head_dim,
        })
    }

    fn all(&self) -> [&BuiltKernel; 12] {
        [
            &self.embedding,
            &self.rms_norm,
            &self.quantize,
            &self.matmul_q4_1,
            &self.matmul_q8_0,
            &self.rope,
            &self.kv_write,
            &self.attention_prefill,
            &self.attention_decode,
            &self.add,
            &self.silu_mul,
            &self.gather_rows,
        ]
    }

    /// Writes every kernel's program binary to `dir` (the attention binaries are then fixed
    /// to this model's head width).
    pub fn save_binaries(&self, dev: &OpenClDevice, dir: &Path) -> Result<Vec<PathBuf>> {
        self.all().iter().map(|k| dev.save_binary(k, dir)).collect()
    }

    /// `x[r] = dequantised Q8_0 row tokens[r]`.
    pub fn embedding_lookup(&self, dev: &OpenClDevice, table: &DeviceBuffer<u8>, tokens: &DeviceBuffer<u32>, x: &DeviceBuffer<f32>, rows: usize, dim: usize) -> Result<()> {
        let args = [Arg::buf(table), Arg::buf(tokens), Arg::buf(x), Arg::U32(dim as u32)];
        dev.launch(&self.embedding, &args, &[dim, rows], None)
    }

    /// `out = RMSNorm(x) * weight` per row (`out` must not alias `x`).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(&self, dev: &OpenClDevice, x: &DeviceBuffer<f32>, weight: &DeviceBuffer<f32>, out: &DeviceBuffer<f32>, rows: usize, dim: usize, eps: f32) -> Result<()> {
        let l = self.norm_group;
        let args = [Arg::buf(x), Arg::buf(weight), Arg::buf(out), Arg::U32(dim as u32), Arg::F32(eps)];
        dev.launch(&self.rms_norm, &args, &[l * rows], Some(&[l]))
    }

    /// Quantises `rows × k` activations into 8-bit blocks (`acts`), once for every matmul
    /// that reads them.
    pub fn quantize(&self, dev: &OpenClDevice, x: &DeviceBuffer<f32>, acts: &Q8Buffers, rows: usize, k: usize) -> Result<()> {
        let args = [Arg::buf(x), Arg::buf(&acts.qs), Arg::buf(&acts.scales), Arg::buf(&acts.sums), Arg::U32(k as u32)];
        dev.launch(&self.quantize, &args, &[k / 32, rows], None)
    }

    /// `y[m, n] = acts · wᵀ` for a packed `[n, k]` weight matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(&self, dev: &OpenClDevice, w: &DeviceBuffer<u8>, format: QuantWeights, acts: &Q8Buffers, y: &DeviceBuffer<f32>, m: usize, n: usize, k: usize) -> Result<()> {
        let (n32, k32) = (n as u32, k as u32);
        match format {
            QuantWeights::Q4_1 => {
                let args = [Arg::buf(w), Arg::buf(&acts.qs), Arg::buf(&acts.scales), Arg::buf(&acts.sums), Arg::buf(y), Arg::U32(n32), Arg::U32(k32), Arg::U32(m as u32)];
                dev.launch(&self.matmul_q4_1, &args, &[n, m.div_ceil(Q4_1_ROWS)], None)
            }
            QuantWeights::Q8_0 => {
                let args = [Arg::buf(w), Arg::buf(&acts.qs), Arg::buf(&acts.scales), Arg::buf(y), Arg::U32(n32), Arg::U32(k32), Arg::U32(m as u32)];
                dev.launch(&self.matmul_q8_0, &args, &[n, m.div_ceil(Q8_0_ROWS)], None)
            }
        }
    }

    /// Rotates the first `rope_dims` values of every head of `x` in place.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(&self, dev: &OpenClDevice, x: &DeviceBuffer<f32>, positions: &DeviceBuffer<u32>, cos_sin: &DeviceBuffer<f32>, rows: usize, heads: usize, rope_dims: usize) -> Result<()> {
        let args = [Arg::buf(x), Arg::buf(positions), Arg::buf(cos_sin), Arg::U32(heads as u32), Arg::U32(self.head_dim as u32), Arg::U32(rope_dims as u32)];
        dev.launch(&self.rope, &args, &[rope_dims / 2, heads, rows], None)
    }

    /// Stores the step's K and V rows into one layer's paged f16 caches at `slot_mapping`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        dev: &OpenClDevice,
        k: &DeviceBuffer<f32>,
        v: &DeviceBuffer<f32>,
        slot_mapping: &DeviceBuffer<u32>,
        k_cache: &DeviceBuffer<u16>,
        v_cache: &DeviceBuffer<u16>,
        rows: usize,
        kv_heads: usize,
        block_tokens: usize,
    ) -> Result<()> {
        let args = [
            Arg::buf(k),
            Arg::buf(v),
            Arg::buf(slot_mapping),
            Arg::buf(k_cache),
            Arg::buf(v_cache),
            Arg::U32(kv_heads as u32),
            Arg::U32(self.head_dim as u32),
            Arg::U32(block_tokens as u32),
        ];
        dev.launch(&self.kv_write, &args, &[kv_heads * self.head_dim, rows], None)
    }

    /// Causal attention of every row over its sequence's cached keys `0..=row_pos`. `decode`
    /// picks the kernel that parallelises within a (row, head), for steps of few rows; both
    /// give the same bits.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(&self, dev: &OpenClDevice, decode: bool, t: &AttentionTables, q: &DeviceBuffer<f32>, k_cache: &DeviceBuffer<u16>, v_cache: &DeviceBuffer<u16>, out: &DeviceBuffer<f32>) -> Result<()> {
        let args = [
            Arg::buf(q),
            Arg::buf(k_cache),
            Arg::buf(v_cache),
            Arg::buf(t.block_tables),
            Arg::buf(t.row_seq),
            Arg::buf(t.row_pos),
            Arg::buf(out),
            Arg::U32(t.heads as u32),
            Arg::U32(t.kv_heads as u32),
            Arg::U32(t.block_tokens as u32),
            Arg::U32(t.max_blocks as u32),
        ];
        if decode {
            let d = self.head_dim;
            dev.launch(&self.attention_decode, &args, &[t.heads * d, t.rows], Some(&[d, 1]))
        } else {
            dev.launch(&self.attention_prefill, &args, &[t.heads, t.rows], None)
        }
    }

    /// `x += y` over `count` values.
    pub fn add(&self, dev: &OpenClDevice, x: &DeviceBuffer<f32>, y: &DeviceBuffer<f32>, count: usize) -> Result<()> {
        dev.launch(&self.add, &[Arg::buf(x), Arg::buf(y), Arg::U32(count as u32)], &[count], None)
    }

    /// `gate = silu(gate) * up` over `count` values.
    pub fn silu_mul(&self, dev: &OpenClDevice, gate: &DeviceBuffer<f32>, up: &DeviceBuffer<f32>, count: usize) -> Result<()> {
        dev.launch(&self.silu_mul, &[Arg::buf(gate), Arg::buf(up), Arg::U32(count as u32)], &[count], None)
    }

    /// `out[i] = x[rows[i]]` for `count` rows of `dim`.
    pub fn gather_rows(&self, dev: &OpenClDevice, x: &DeviceBuffer<f32>, rows: &DeviceBuffer<u32>, out: &DeviceBuffer<f32>, count: usize, dim: usize) -> Result<()> {
        dev.launch(&self.gather_rows, &[Arg::buf(x), Arg::buf(rows), Arg::buf(out), Arg::U32(dim as u32)], &[dim, count], None)
    }
}

/// 8-bit activation blocks on the device (`quantize_q8_f32`'s outputs): `qs` `[rows·k]`,
/// `scales` `[rows·k/32][d, d·Σq]`, `sums` `[rows·k/32]`.
pub struct Q8Buffers {
    pub qs: DeviceBuffer<i8>,
    pub scales: DeviceBuffer<f32>,
    pub sums: DeviceBuffer<f32>,
}

impl Q8Buffers {
    /// Room for `rows × k` activations.
    pub fn new(dev: &OpenClDevice, rows: usize, k: usize) -> Result<Self> {
        let blocks = rows * k / 32;
        Ok(Self { qs: dev.alloc(rows * k)?, scales: dev.alloc(2 * blocks)?, sums: dev.alloc(blocks)? })
    }
}

/// A step's attention indices on the device (kernels/README.md "Conventions").
pub struct AttentionTables<'a> {
    /// `[num_seqs][max_blocks]` block ids.
    pub block_tables: &'a DeviceBuffer<u32>,
    /// Per row: its sequence, and its absolute position.
    pub row_seq: &'a DeviceBuffer<u32>,
    pub row_pos: &'a DeviceBuffer<u32>,
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub block_tokens: usize,
    pub max_blocks: usize,
}

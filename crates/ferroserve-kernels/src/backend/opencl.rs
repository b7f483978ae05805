//! [`Backend`] over an OpenCL device: buffers live on the device and every op is one launch
//! of a kernel of [`BertKernels`] (the encoder) or [`LlamaKernels`] (the decoder) on the
//! device's one in-order queue (see kernels/README.md for each kernel's contract), so a pass
//! waits for the device only when it reads its result back.
//!
//! The decoder kernels reproduce the CPU backend's exact numerics (llama.cpp's order) bit for
//! bit on a device with correctly rounded division and sqrt and with denormals
//! (kernels/README.md); they have no fast order (`AttentionArith::Fast`, repacked matmuls).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{AttentionArith, Backend, BackendError, BackendResult, DecodeStep, Element, MatrixUse, Packing, Pooling, RopeParams, StoredMatrix};
use crate::cpu::llama_ops;
use crate::kv_layout::PagedKvLayout;
use crate::opencl::ops::{AttentionTables, BertKernels, LlamaKernels, Q8Buffers, QuantWeights, LINEAR_GROUP, LINEAR_TILE_M, LINEAR_TILE_N};
use crate::opencl::{Arg, DeviceBuffer, KernelSource, OpenClDevice};
use crate::quant::QuantType;
use crate::Activation;

/// One OpenCL device, with the kernels built so far.
pub struct OpenClBackend {
    dev: OpenClDevice,
    source: KernelSource,
    /// Locked per launch: a launch sets the kernel's arguments, then enqueues it, and an
    /// OpenCL kernel object's arguments are not safe to set from two threads at once.
    bert: Option<Mutex<BertKernels>>,
    llama: Option<Mutex<LlamaKernels>>,
}

/// A linear layer on the device: the f32 weight as the checkpoint stores it (`[out, in]`
/// row-major, what `matmul_f32_f32_tiled` reads) and its bias.
pub struct ClLinear {
    weight: DeviceBuffer<f32>,
    bias: DeviceBuffer<f32>,
    out_features: usize,
    in_features: usize,
}

impl OpenClBackend {
    /// Opens OpenCL device `index` (as `ferroserve devices` numbers them); kernels are built
    /// later from `source` (the embedded sources, or precompiled program binaries).
    pub fn open(index: usize, source: &KernelSource) -> BackendResult<Self> {
        Ok(Self { dev: OpenClDevice::open(index)?, source: source.clone(), bert: None, llama: None })
    }

    pub fn device(&self) -> &OpenClDevice {
        &self.dev
    }

    /// Writes the encoder kernels' program binaries for this device to `dir` (for
    /// `KernelSource::Binaries`).
    pub fn save_encoder_binaries(&self, dir: &Path) -> BackendResult<Vec<PathBuf>> {
        Ok(self.kernels()?.save_binaries(&self.dev, dir)?)
    }

    /// Writes the decoder kernels' program binaries for this device to `dir` (the attention
    /// binaries are then fixed to the model's head width).
    pub fn save_decoder_binaries(&self, dir: &Path) -> BackendResult<Vec<PathBuf>> {
        Ok(self.decoder()?.save_binaries(&self.dev, dir)?)
    }

    fn decoder(&self) -> BackendResult<MutexGuard<'_, LlamaKernels>> {
        let kernels = self.llama.as_ref().ok_or_else(|| BackendError("the decoder kernels are not built (prepare_decoder first)".into()))?;
        Ok(kernels.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn kernels(&self) -> BackendResult<MutexGuard<'_, BertKernels>> {
        let kernels = self.bert.as_ref().ok_or_else(|| BackendError("the encoder kernels are not built (prepare_encoder first)".into()))?;
        Ok(kernels.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A decoder weight matrix on the device, in the file's packed blocks (the kernels read
/// Q4_1 and Q8_0 in place).
pub struct ClMatrix {
    buf: DeviceBuffer<u8>,
    format: QuantWeights,
    rows: usize,
    cols: usize,
}

/// A paged KV cache's K and V blocks in device memory (f16, per layer).
pub struct OpenClKv {
    layout: PagedKvLayout,
    k: Vec<DeviceBuffer<u16>>,
    v: Vec<DeviceBuffer<u16>>,
}

/// `[context][rope dims]` = `[cos, sin]` pairs per position, from the CPU's `rope_cos_sin`
/// (libm), uploaded once.
pub struct ClRope {
    table: DeviceBuffer<f32>,
    dims: usize,
    context: usize,
}

impl Backend for OpenClBackend {
    type Buffer<T: Element> = DeviceBuffer<T>;
    type Linear = ClLinear;
    type Matrix = ClMatrix;
    type Acts = Q8Buffers;
    type Rope = ClRope;
    type KvStorage = OpenClKv;

    fn name(&self) -> String {
        self.dev.name()
    }

    fn alloc<T: Element>(&self, len: usize) -> BackendResult<DeviceBuffer<T>> {
        Ok(self.dev.alloc(len)?)
    }

    fn upload<T: Element>(&self, data: Vec<T>) -> BackendResult<DeviceBuffer<T>> {
        Ok(self.dev.upload(&data)?)
    }

    fn write<T: Element>(&self, buf: &mut DeviceBuffer<T>, data: &[T]) -> BackendResult<()> {
        Ok(self.dev.write(buf, data)?)
    }

    fn read<T: Element>(&self, buf: &DeviceBuffer<T>, out: &mut [T]) -> BackendResult<()> {
        Ok(self.dev.read(buf, out)?)
    }

    fn prepare_encoder(&mut self, head_dim: usize) -> BackendResult<()> {
        self.bert = Some(Mutex::new(BertKernels::build(&self.dev, head_dim, &self.source)?));
        Ok(())
    }

    fn pack_linear(&self, weight: &[f32], bias: &[f32], out_features: usize, in_features: usize, format: QuantType) -> BackendResult<ClLinear> {
        if format != QuantType::F32 {
            return Err(BackendError(format!("{} linear layers are not implemented on OpenCL (the encoder kernels compute f32)", format.name())));
        }
        Ok(ClLinear { weight: self.dev.upload(weight)?, bias: self.dev.upload(bias)?, out_features, in_features })
    }

    fn embedding_lookup(
        &self,
        word: &DeviceBuffer<f32>,
        pos: &DeviceBuffer<f32>,
        type0: &DeviceBuffer<f32>,
        seqs: &Packing<'_, Self>,
        x: &mut DeviceBuffer<f32>,
        dim: usize,
    ) -> BackendResult<()> {
        let args = [Arg::buf(word), Arg::buf(pos), Arg::buf(type0), Arg::buf(seqs.tokens), Arg::buf(seqs.positions), Arg::buf(x), Arg::U32(dim as u32)];
        Ok(self.dev.launch(&self.kernels()?.embedding, &args, &[dim, seqs.rows], None)?)
    }

    fn layer_norm(
        &self,
        x: &mut DeviceBuffer<f32>,
        residual: Option<&DeviceBuffer<f32>>,
        gamma: &DeviceBuffer<f32>,
        beta: &DeviceBuffer<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> BackendResult<()> {
        let k = self.kernels()?;
        let l = k.norm_group;
        let args = [Arg::buf(x), Arg::opt_buf(residual), Arg::buf(gamma), Arg::buf(beta), Arg::U32(dim as u32), Arg::F32(eps), Arg::Local(l * 4)];
        Ok(self.dev.launch(&k.layer_norm, &args, &[l * rows], Some(&[l]))?)
    }

    fn linear(&self, x: &DeviceBuffer<f32>, w: &ClLinear, act: Activation, y: &mut DeviceBuffer<f32>, rows: usize) -> BackendResult<()> {
        let (m, n, k) = (rows, w.out_features, w.in_features);
        let gelu = act == Activation::Gelu;
        let args = [Arg::buf(x), Arg::buf(&w.weight), Arg::buf(&w.bias), Arg::buf(y), Arg::U32(n as u32), Arg::U32(k as u32), Arg::U32(gelu as u32), Arg::U32(m as u32)];
        // One work-group per LINEAR_TILE_M × LINEAR_TILE_N block of y (partial blocks at the
        // edges are masked in the kernel).
        let global = [n.div_ceil(LINEAR_TILE_N) * LINEAR_GROUP[0], m.div_ceil(LINEAR_TILE_M) * LINEAR_GROUP[1]];
        Ok(self.dev.launch(&self.kernels()?.matmul_tiled, &args, &global, Some(&LINEAR_GROUP))?)
    }

    fn encoder_attention(&self, qkv: &DeviceBuffer<f32>, seqs: &Packing<'_, Self>, heads: usize, _head_dim: usize, out: &mut DeviceBuffer<f32>) -> BackendResult<()> {
        // The head width was compiled into the kernel (prepare_encoder).
        let args = [Arg::buf(qkv), Arg::buf(seqs.seq_offsets), Arg::buf(seqs.row_seq), Arg::buf(out), Arg::U32(heads as u32)];
        Ok(self.dev.launch(&self.kernels()?.attention, &args, &[heads, seqs.rows], None)?)
    }

    fn pool(&self, hidden: &DeviceBuffer<f32>, seqs: &Packing<'_, Self>, mode: Pooling, normalize: bool, out: &mut DeviceBuffer<f32>, dim: usize) -> BackendResult<()> {
        // The mode numbers pool_f32.cl reads.
        let mode = match mode {
            Pooling::Mean => 0u32,
            Pooling::Cls => 1,
            Pooling::Max => 2,
            Pooling::MeanSqrtLen => 3,
        };
        let k = self.kernels()?;
        let l = k.pool_group;
        let args = [
            Arg::buf(hidden),
            Arg::buf(seqs.seq_offsets),
            Arg::buf(out),
            Arg::U32(dim as u32),
            Arg::U32(mode),
            Arg::U32(normalize as u32),
            Arg::Local(l * 4),
        ];
        Ok(self.dev.launch(&k.pool, &args, &[l * seqs.seqs], Some(&[l]))?)
    }

    fn prepare_decoder(&mut self, head_dim: usize) -> BackendResult<()> {
        self.llama = Some(Mutex::new(LlamaKernels::build(&self.dev, head_dim, &self.source)?));
        Ok(())
    }

    fn pack_matrix(&self, m: StoredMatrix<'_>, usage: MatrixUse) -> BackendResult<ClMatrix> {
        let format = match (usage, m.wtype) {
            (MatrixUse::FastMatmul, _) => return Err(BackendError(format!("{}: OpenCL devices compute llama.cpp's exact order only", m.name))),
            (MatrixUse::Rows, QuantType::Q8_0) => QuantWeights::Q8_0,
            (MatrixUse::Rows, other) => {
                return Err(BackendError(format!("{} is {}: the OpenCL embedding lookup reads Q8_0 tables", m.name, other.name())));
            }
            (MatrixUse::Matmul, QuantType::Q4_1) => QuantWeights::Q4_1,
            (MatrixUse::Matmul, QuantType::Q8_0) => QuantWeights::Q8_0,
            (MatrixUse::Matmul, other) => {
                return Err(BackendError(format!("tensor {} is {}: the OpenCL matmul kernels read Q4_1 and Q8_0 weights", m.name, other.name())));
            }
        };
        Ok(ClMatrix { buf: self.dev.upload(m.bytes())?, format, rows: m.rows, cols: m.cols })
    }

    fn prepare_rope(&self, params: &RopeParams, context: usize) -> BackendResult<ClRope> {
        let context = context.max(1);
        let mut table = vec![0f32; context * params.dims];
        if params.dims > 0 {
            for (p, cs) in table.chunks_exact_mut(params.dims).enumerate() {
                llama_ops::rope_cos_sin(p, params, cs);
            }
        }
        Ok(ClRope { table: self.dev.upload(&table)?, dims: params.dims, context })
    }

    fn alloc_acts(&self, rows: usize, k: usize) -> BackendResult<Q8Buffers> {
        Ok(Q8Buffers::new(&self.dev, rows, k)?)
    }

    fn alloc_kv(&self, layout: PagedKvLayout, layers: usize, num_blocks: usize) -> BackendResult<OpenClKv> {
        let elems = num_blocks.checked_mul(layout.block_elems()).ok_or_else(|| BackendError("KV cache size overflows".into()))?;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.dev.alloc(elems)?);
            v.push(self.dev.alloc(elems)?);
        }
        Ok(OpenClKv { layout, k, v })
    }

    fn embed_rows(&self, table: &ClMatrix, step: &DecodeStep<'_, Self>, x: &mut DeviceBuffer<f32>, dim: usize) -> BackendResult<()> {
        Ok(self.decoder()?.embedding_lookup(&self.dev, &table.buf, step.tokens, x, step.rows, dim)?)
    }

    fn rms_norm(&self, x: &DeviceBuffer<f32>, weight: &DeviceBuffer<f32>, out: &mut DeviceBuffer<f32>, rows: usize, dim: usize, eps: f32) -> BackendResult<()> {
        Ok(self.decoder()?.rms_norm(&self.dev, x, weight, out, rows, dim, eps)?)
    }

    fn quantize_activations(&self, x: &DeviceBuffer<f32>, rows: usize, k: usize, acts: &mut Q8Buffers) -> BackendResult<()> {
        Ok(self.decoder()?.quantize(&self.dev, x, acts, rows, k)?)
    }

    fn matmuls(&self, outputs: &mut [(&ClMatrix, &mut DeviceBuffer<f32>)], _x: &DeviceBuffer<f32>, acts: &Q8Buffers, rows: usize) -> BackendResult<()> {
        let k = self.decoder()?;
        for (w, y) in outputs.iter_mut() {
            k.matmul(&self.dev, &w.buf, w.format, acts, y, rows, w.rows, w.cols)?;
        }
        Ok(())
    }

    fn rope_rows(&self, rope: &ClRope, step: &DecodeStep<'_, Self>, _cos_sin: &mut DeviceBuffer<f32>) -> BackendResult<()> {
        // The kernel reads the whole-context table by position: check the positions here.
        match step.seqs.iter().map(|s| s.start_pos + s.rows.len()).max() {
            Some(end) if end > rope.context => Err(BackendError(format!("position {end} is past the context ({})", rope.context))),
            _ => Ok(()),
        }
    }

    fn rope(&self, x: &mut DeviceBuffer<f32>, rope: &ClRope, _cos_sin: &DeviceBuffer<f32>, step: &DecodeStep<'_, Self>, heads: usize, _head_dim: usize) -> BackendResult<()> {
        if rope.dims == 0 {
            return Ok(());
        }
        // The head width was compiled into the kernels (prepare_decoder).
        Ok(self.decoder()?.rope(&self.dev, x, step.positions, &rope.table, step.rows, heads, rope.dims)?)
    }

    fn kv_write(&self, kv: &mut OpenClKv, layer: usize, k: &DeviceBuffer<f32>, v: &DeviceBuffer<f32>, step: &DecodeStep<'_, Self>) -> BackendResult<()> {
        let l = kv.layout;
        Ok(self.decoder()?.kv_write(&self.dev, k, v, step.slots, &kv.k[layer], &kv.v[layer], step.rows, l.kv_heads, l.block_tokens)?)
    }

    fn paged_attention(
        &self,
        q: &DeviceBuffer<f32>,
        kv: &OpenClKv,
        layer: usize,
        step: &DecodeStep<'_, Self>,
        heads: usize,
        arith: AttentionArith,
        out: &mut DeviceBuffer<f32>,
    ) -> BackendResult<()> {
        if arith != AttentionArith::LlamaCpp {
            return Err(BackendError("OpenCL attention computes llama.cpp's exact order only".into()));
        }
        let tables = AttentionTables {
            block_tables: step.block_tables,
            row_seq: step.row_seq,
            row_pos: step.positions,
            rows: step.rows,
            heads,
            kv_heads: kv.layout.kv_heads,
            block_tokens: kv.layout.block_tokens,
            max_blocks: step.table_len,
        };
        // Decode steps (one token per sequence) have few (row, head) pairs: on a GPU the decode
        // kernel gives each pair a work-group. Not on a CPU device, where the group's work-items
        // each repeat the softmax of every key (≈ 7× slower on PoCL than one work-item per pair:
        // bench/NOTES.md); both kernels give the same bits.
        let decode = !self.dev.info.is_cpu && step.seqs.iter().all(|s| s.rows.len() <= 1);
        Ok(self.decoder()?.attention(&self.dev, decode, &tables, q, &kv.k[layer], &kv.v[layer], out)?)
    }

    fn add(&self, x: &mut DeviceBuffer<f32>, y: &DeviceBuffer<f32>, count: usize) -> BackendResult<()> {
        Ok(self.decoder()?.add(&self.dev, x, y, count)?)
    }

    fn silu_mul(&self, gate: &mut DeviceBuffer<f32>, up: &DeviceBuffer<f32>, count: usize) -> BackendResult<()> {
        Ok(self.decoder()?.silu_mul(&self.dev, gate, up, count)?)
    }

    fn gather_rows(&self, x: &DeviceBuffer<f32>, rows: &DeviceBuffer<u32>, count: usize, dim: usize, out: &mut DeviceBuffer<f32>) -> BackendResult<()> {
        Ok(self.decoder()?.gather_rows(&self.dev, x, rows, out, count, dim)?)
    }

    fn finish(&self) -> BackendResult<()> {
        Ok(self.dev.finish()?)
    }
}

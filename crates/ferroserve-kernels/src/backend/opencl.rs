//! [`Backend`] over an OpenCL device: buffers live on the device and every op is one launch
//! of a kernel of [`BertKernels`] on the device's one in-order queue (see kernels/README.md
//! for each kernel's contract), so a pass waits for the device only when it reads its result
//! back.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{Backend, BackendError, BackendResult, Element, Packing, Pooling};
use crate::opencl::ops::{BertKernels, LINEAR_GROUP, LINEAR_TILE_M, LINEAR_TILE_N};
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
        Ok(Self { dev: OpenClDevice::open(index)?, source: source.clone(), bert: None })
    }

    pub fn device(&self) -> &OpenClDevice {
        &self.dev
    }

    /// Writes the encoder kernels' program binaries for this device to `dir` (for
    /// `KernelSource::Binaries`).
    pub fn save_encoder_binaries(&self, dir: &Path) -> BackendResult<Vec<PathBuf>> {
        Ok(self.kernels()?.save_binaries(&self.dev, dir)?)
    }

    fn kernels(&self) -> BackendResult<MutexGuard<'_, BertKernels>> {
        let kernels = self.bert.as_ref().ok_or_else(|| BackendError("the encoder kernels are not built (prepare_encoder first)".into()))?;
        Ok(kernels.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Backend for OpenClBackend {
    type Buffer<T: Element> = DeviceBuffer<T>;
    type Linear = ClLinear;

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

    fn supports_pooling(&self, mode: Pooling) -> bool {
        // mean_pool_f32 is the only pooling kernel so far (all-MiniLM and most
        // sentence-transformers models pool by mean).
        mode == Pooling::Mean
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
        if mode != Pooling::Mean {
            return Err(BackendError(format!("{mode:?} pooling is not implemented on OpenCL (only mean pooling)")));
        }
        let k = self.kernels()?;
        let l = k.pool_group;
        let args = [Arg::buf(hidden), Arg::buf(seqs.seq_offsets), Arg::buf(out), Arg::U32(dim as u32), Arg::U32(normalize as u32), Arg::Local(l * 4)];
        Ok(self.dev.launch(&k.mean_pool, &args, &[l * seqs.seqs], Some(&[l]))?)
    }
}

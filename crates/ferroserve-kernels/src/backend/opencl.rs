//! [`Backend`] over an OpenCL device: buffers live on the device and every op is one kernel
//! launch on its one in-order queue ([`BertKernels`]), so a pass waits for the device only
//! when it reads its result back.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{Backend, BackendError, BackendResult, Element, Packing, Pooling};
use crate::opencl::ops::BertKernels;
use crate::opencl::{DeviceBuffer, KernelSource, OpenClDevice};
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
        Ok(self.kernels()?.embedding_lookup(&self.dev, word, pos, type0, seqs.tokens, seqs.positions, x, seqs.rows, dim)?)
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
        Ok(self.kernels()?.layer_norm(&self.dev, x, residual, gamma, beta, rows, dim, eps)?)
    }

    fn linear(&self, x: &DeviceBuffer<f32>, w: &ClLinear, act: Activation, y: &mut DeviceBuffer<f32>, rows: usize) -> BackendResult<()> {
        let gelu = act == Activation::Gelu;
        Ok(self.kernels()?.linear(&self.dev, x, &w.weight, Some(&w.bias), y, rows, w.out_features, w.in_features, gelu)?)
    }

    fn encoder_attention(&self, qkv: &DeviceBuffer<f32>, seqs: &Packing<'_, Self>, heads: usize, _head_dim: usize, out: &mut DeviceBuffer<f32>) -> BackendResult<()> {
        // The head width was compiled into the kernel (prepare_encoder).
        Ok(self.kernels()?.encoder_attention(&self.dev, qkv, seqs.seq_offsets, seqs.row_seq, out, seqs.rows, heads)?)
    }

    fn pool(&self, hidden: &DeviceBuffer<f32>, seqs: &Packing<'_, Self>, mode: Pooling, normalize: bool, out: &mut DeviceBuffer<f32>, dim: usize) -> BackendResult<()> {
        if mode != Pooling::Mean {
            return Err(BackendError(format!("{mode:?} pooling is not implemented on OpenCL (only mean pooling)")));
        }
        Ok(self.kernels()?.mean_pool(&self.dev, hidden, seqs.seq_offsets, out, seqs.seqs, dim, normalize)?)
    }
}

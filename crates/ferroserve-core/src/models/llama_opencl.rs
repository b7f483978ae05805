//! The llama decoder on an OpenCL device: `LlamaModel<OpenClBackend>`, the same forward pass
//! as the CPU's over the device's kernels (`ferroserve_kernels::OpenClBackend`), with the
//! weights, KV blocks and activations resident on the device and one in-order queue, no host
//! round trip inside a step: a step uploads only its index buffers (tokens, positions, KV
//! slots, block tables, the rows that want logits) and reads back only the logits.
//!
//! What is OpenCL's own is here: loading with the load check (the device must reproduce the
//! CPU's logits before the model is served: [`compare_backends`] of the CPU model against
//! the device's), and the kernels' program binaries. The kernels reproduce the CPU's exact
//! numerics (`Numerics::Exact`, llama.cpp's order) bit for bit on a device with correctly
//! rounded division and sqrt and with denormals (kernels/README.md), so greedy decoding
//! gives the CPU's tokens.

use std::path::{Path, PathBuf};

use ferroserve_kernels::opencl::ops::LlamaKernels;
use ferroserve_kernels::opencl::{KernelSource, OpenClDevice, OpenClError};
use ferroserve_kernels::OpenClBackend;

use crate::error::{Error, Result};
use crate::models::llama::{compare_backends, LlamaModel, Numerics, ProbeReport};

/// The decoder on an OpenCL device.
pub type OpenClLlama = LlamaModel<OpenClBackend>;

/// Why a model with fast numerics cannot go to an OpenCL device.
pub const EXACT_ONLY: &str = "numerics: OpenCL devices compute llama.cpp's exact order only; use exact numerics or the CPU";

fn cl_err(e: OpenClError) -> Error {
    Error::Device(e.to_string())
}

impl LlamaModel<OpenClBackend> {
    /// Opens OpenCL device `device_index`, builds the decoder's kernels (from the embedded
    /// sources or `kernels`' binaries), uploads the GGUF's weights, and checks the device
    /// against the CPU: a two-sequence prefill and a decode step must give the CPU model's
    /// logits (within `PROBE_TOLERANCE`; bitwise on a device with IEEE division and
    /// denormals), or the load fails. The CPU model is dropped after the check.
    pub fn load_opencl(path: &Path, device_index: usize, kernels: &KernelSource) -> Result<Self> {
        let backend = OpenClBackend::open(device_index, kernels).map_err(|e| Error::Device(e.0))?;
        let mut model = Self::load_on(path, backend, Numerics::Exact)?;
        let cpu = LlamaModel::load(path)?;
        model.set_check(compare_backends(&cpu, &model)?);
        Ok(model)
    }

    /// How the device's logits compared with the CPU's at load.
    pub fn check(&self) -> ProbeReport {
        self.load_check().expect("load_opencl checks every OpenCL model")
    }

    /// The load check in words, for the start-up log.
    pub fn check_summary(&self) -> String {
        self.check().summary()
    }

    /// Writes the program binaries of the kernels this model was built with to `dir`.
    pub fn save_kernel_binaries(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        self.backend().save_decoder_binaries(dir).map_err(|e| Error::Device(e.0))
    }
}

/// Builds the decoder's kernels for the GGUF model at `gguf` (its head width, from the
/// metadata; no weights are read) on OpenCL device `device_index`, and writes their program
/// binaries to `out` for `KernelSource::Binaries` (what `ferroserve kernels` does).
pub fn write_kernel_binaries(gguf: &Path, device_index: usize, out: &Path) -> Result<Vec<PathBuf>> {
    let file = crate::weights::gguf::GgufFile::open(gguf).map_err(|e| Error::model_load(gguf, e.to_string()))?;
    let hp = file.llama_hparams().map_err(|e| Error::model_load(gguf, e.to_string()))?;
    let dev = OpenClDevice::open(device_index).map_err(cl_err)?;
    let kernels = LlamaKernels::build(&dev, hp.head_dim, &KernelSource::Embedded).map_err(cl_err)?;
    kernels.save_binaries(&dev, out).map_err(cl_err)
}

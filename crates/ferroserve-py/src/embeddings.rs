//! `EmbeddingEngine`: submit / fd / drain over `ferroserve_core::EmbeddingEngine`.

use std::os::raw::{c_int, c_void};
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use ferroserve_core::{DeviceChoice, EmbedInput, EmbedNumerics, EmbedOutput, EmbeddingEngine, EmbeddingEngineConfig, InteractiveLoad, Priority};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{detach, kind_name};
use crate::events::{Embedded, EngineFailed};

#[pyclass(name = "EmbeddingEngine", module = "ferroserve._core", frozen)]
pub struct PyEmbeddingEngine {
    inner: EmbeddingEngine,
}

#[pymethods]
impl PyEmbeddingEngine {
    /// Loads a sentence-transformers folder onto `device` (`cpu`, `opencl` or `opencl:N`;
    /// OpenCL kernels from the embedded sources, or the program binaries in
    /// `kernel_binaries`) and starts its batcher thread. A device that cannot be used raises
    /// `DeviceError`; falling back to the CPU is the caller's decision. Batch-priority inputs
    /// run in passes of at most `batch_pass_tokens` (`batch_pass_tokens_busy` while
    /// interactive traffic is recent), and wait while interactive requests are in flight on
    /// any engine of this process. `numerics`: `f32` (the default) or `int8` (the linear
    /// layers in 8-bit integers, CPU only: with an OpenCL device it raises `DeviceError`); any
    /// other name raises `InvalidRequest`. (The defaults are `ferroserve_core::EmbeddingEngineConfig`'s, written out so
    /// the signature shows them.)
    #[new]
    #[pyo3(signature = (path, max_batch_tokens = 16384, max_wait_us = 1000, device = "cpu", kernel_binaries = None, batch_pass_tokens = 2048, batch_pass_tokens_busy = 16, numerics = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        max_batch_tokens: usize,
        max_wait_us: u64,
        device: &str,
        kernel_binaries: Option<PathBuf>,
        batch_pass_tokens: usize,
        batch_pass_tokens_busy: usize,
        numerics: &str,
    ) -> PyResult<Self> {
        let device = DeviceChoice::parse(device, kernel_binaries.as_deref()).map_err(crate::errors::to_py)?;
        let numerics = EmbedNumerics::parse(numerics)
            .ok_or_else(|| ferroserve_core::Error::invalid_request(format!("embedding numerics must be f32 or int8, got {numerics:?}")))
            .map_err(crate::errors::to_py)?;
        let cfg = EmbeddingEngineConfig {
            max_batch_tokens,
            batch_pass_tokens,
            batch_pass_tokens_busy,
            max_wait: Duration::from_micros(max_wait_us),
            device,
            interactive: InteractiveLoad::server(),
            numerics,
            ..EmbeddingEngineConfig::default()
        };
        let inner = detach(py, move || EmbeddingEngine::load(&path, cfg))?;
        Ok(Self { inner })
    }

    /// Queues a request: exactly one of `texts` / `token_lists`. Returns the prompt token
    /// count; the vectors arrive through `drain()` under `request_id`. `priority`:
    /// "interactive" or "batch" (embedded after every waiting interactive input); else
    /// `InvalidRequest`.
    #[pyo3(signature = (request_id, texts = None, token_lists = None, dimensions = None, *, priority = "interactive"))]
    fn submit(
        &self,
        py: Python<'_>,
        request_id: u64,
        texts: Option<Vec<String>>,
        token_lists: Option<Vec<Vec<u32>>>,
        dimensions: Option<usize>,
        priority: &str,
    ) -> PyResult<usize> {
        let priority = Priority::parse(priority).map_err(crate::errors::to_py)?;
        let inputs: Vec<EmbedInput> = match (texts, token_lists) {
            (Some(t), None) => t.into_iter().map(EmbedInput::Text).collect(),
            (None, Some(l)) => l.into_iter().map(EmbedInput::Tokens).collect(),
            _ => return Err(pyo3::exceptions::PyTypeError::new_err("pass exactly one of texts / token_lists")),
        };
        detach(py, || self.inner.submit(request_id, inputs, dimensions, priority))
    }

    /// The prompt tokens `submit` would count for these inputs (same validation errors),
    /// without queueing them.
    #[pyo3(signature = (texts = None, token_lists = None))]
    fn count_tokens(&self, py: Python<'_>, texts: Option<Vec<String>>, token_lists: Option<Vec<Vec<u32>>>) -> PyResult<usize> {
        let inputs: Vec<EmbedInput> = match (texts, token_lists) {
            (Some(t), None) => t.into_iter().map(EmbedInput::Text).collect(),
            (None, Some(l)) => l.into_iter().map(EmbedInput::Tokens).collect(),
            _ => return Err(pyo3::exceptions::PyTypeError::new_err("pass exactly one of texts / token_lists")),
        };
        detach(py, || self.inner.count_tokens(inputs))
    }

    /// The batcher's counters, per priority ("interactive" / "batch"): `waiting_inputs_<p>`
    /// (queued, not embedded yet), `passes_<p>` and `embedded_inputs_<p>` (so far).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        for p in Priority::ALL {
            d.set_item(format!("waiting_inputs_{}", p.as_str()), s.waiting_inputs(p))?;
            d.set_item(format!("passes_{}", p.as_str()), s.passes(p))?;
            d.set_item(format!("embedded_inputs_{}", p.as_str()), s.embedded_inputs(p))?;
        }
        Ok(d)
    }

    /// The wake-up fd: readable when `drain()` has events. Read it before draining.
    fn fd(&self) -> i32 {
        self.inner.notifier().fd()
    }

    /// Every finished request since the last call: `Embedded` or `EngineFailed` (see
    /// `events.rs`).
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.inner
            .notifier()
            .drain()
            .into_iter()
            .map(|ev| match ev.result {
                Ok(out) => {
                    let prompt_tokens = out.prompt_tokens;
                    let vectors = Py::new(py, PyVectors::from(out))?;
                    Ok(Bound::new(py, Embedded { request_id: ev.request_id, vectors, prompt_tokens })?.into_any())
                }
                Err(e) => Ok(Bound::new(
                    py,
                    EngineFailed { request_id: ev.request_id, kind: kind_name(e.kind()), message: e.to_string(), param: e.param() },
                )?
                .into_any()),
            })
            .collect()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_len()
    }

    #[getter]
    fn device(&self) -> String {
        self.inner.device_name().to_owned()
    }
}

/// One request's vectors: `rows` x `dim` float32, row-major, owned by the engine's buffer and
/// read through the buffer protocol, so `numpy.asarray(vectors)` is a read-only (rows, dim)
/// float32 array over that buffer without copying it.
#[pyclass(name = "Vectors", module = "ferroserve._core", frozen)]
pub struct PyVectors {
    data: Vec<f32>,
    shape: [ffi::Py_ssize_t; 2],
    strides: [ffi::Py_ssize_t; 2],
}

impl From<EmbedOutput> for PyVectors {
    fn from(out: EmbedOutput) -> Self {
        let dim = out.dim.max(1);
        let rows = out.vectors.len() / dim;
        let item = std::mem::size_of::<f32>() as ffi::Py_ssize_t;
        Self { data: out.vectors, shape: [rows as ffi::Py_ssize_t, dim as ffi::Py_ssize_t], strides: [dim as ffi::Py_ssize_t * item, item] }
    }
}

#[pymethods]
impl PyVectors {
    /// Fills `view` for a read-only, C-contiguous 2-D float32 buffer (PEP 3118). The buffer
    /// lives as long as this object, which the view holds a reference to.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("embedding vectors are read-only"));
        }
        let this = slf.get();
        // SAFETY: `view` is a valid Py_buffer the caller owns (checked non-null above); every
        // pointer stored in it points into `this`, which `obj` keeps alive until release.
        unsafe {
            (*view).buf = this.data.as_ptr() as *mut c_void;
            (*view).len = (this.data.len() * std::mem::size_of::<f32>()) as ffi::Py_ssize_t;
            (*view).readonly = 1;
            (*view).itemsize = std::mem::size_of::<f32>() as ffi::Py_ssize_t;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT { c"f".as_ptr() as *mut _ } else { ptr::null_mut() };
            // Without PyBUF_ND the consumer asked for plain bytes: one dimension, no shape.
            let nd = flags & ffi::PyBUF_ND == ffi::PyBUF_ND;
            (*view).ndim = if nd { 2 } else { 1 };
            (*view).shape = if nd { this.shape.as_ptr() as *mut _ } else { ptr::null_mut() };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES { this.strides.as_ptr() as *mut _ } else { ptr::null_mut() };
            (*view).suboffsets = ptr::null_mut();
            (*view).internal = ptr::null_mut();
            (*view).obj = slf.into_any().into_ptr();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.shape[0] as usize
    }
}

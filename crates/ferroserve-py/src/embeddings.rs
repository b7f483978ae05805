//! `EmbeddingEngine`: submit / fd / drain over `ferroserve_core::EmbeddingEngine`.

use std::path::PathBuf;
use std::time::Duration;

use ferroserve_core::embed::{EmbedInput, Encoding};
use ferroserve_core::sched::{InteractiveLoad, Priority};
use ferroserve_core::{DeviceChoice, EmbeddingEngine, EmbeddingEngineConfig};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::errors::{detach, kind_name};

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
    /// any engine of this process. (The defaults are `ferroserve_core::embed`'s, written out so
    /// the signature shows them.)
    #[new]
    #[pyo3(signature = (path, max_batch_tokens = 16384, max_wait_us = 1000, device = "cpu", kernel_binaries = None, batch_pass_tokens = 2048, batch_pass_tokens_busy = 16))]
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
    ) -> PyResult<Self> {
        let device = DeviceChoice::parse(device, kernel_binaries.as_deref()).map_err(crate::errors::to_py)?;
        let cfg = EmbeddingEngineConfig {
            max_batch_tokens,
            batch_pass_tokens,
            batch_pass_tokens_busy,
            max_wait: Duration::from_micros(max_wait_us),
            device,
            interactive: InteractiveLoad::server(),
            ..EmbeddingEngineConfig::default()
        };
        let inner = detach(py, move || EmbeddingEngine::load(&path, cfg))?;
        Ok(Self { inner })
    }

    /// Queues a request: exactly one of `texts` / `token_lists`. Returns the prompt token
    /// count; the result arrives through `drain()` under `request_id`. `priority`:
    /// "interactive" or "batch" (embedded after every waiting interactive input); else
    /// `InvalidRequest`. `f32`: the result is the rows as little-endian float32 bytes, not
    /// the JSON `data` array.
    #[pyo3(signature = (request_id, texts = None, token_lists = None, dimensions = None, base64 = false, *, priority = "interactive", f32 = false))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        request_id: u64,
        texts: Option<Vec<String>>,
        token_lists: Option<Vec<Vec<u32>>>,
        dimensions: Option<usize>,
        base64: bool,
        priority: &str,
        f32: bool,
    ) -> PyResult<usize> {
        let priority = Priority::parse(priority).map_err(crate::errors::to_py)?;
        let inputs: Vec<EmbedInput> = match (texts, token_lists) {
            (Some(t), None) => t.into_iter().map(EmbedInput::Text).collect(),
            (None, Some(l)) => l.into_iter().map(EmbedInput::Tokens).collect(),
            _ => return Err(pyo3::exceptions::PyTypeError::new_err("pass exactly one of texts / token_lists")),
        };
        let encoding = match (f32, base64) {
            (true, _) => Encoding::F32,
            (false, true) => Encoding::Base64,
            (false, false) => Encoding::Float,
        };
        detach(py, || self.inner.submit(request_id, inputs, dimensions, encoding, priority))
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

    /// Every finished request since the last call, as
    /// `(request_id, True, data_json: bytes, prompt_tokens)` or
    /// `(request_id, False, error_kind: str, message: str, param: str | None)`.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.inner
            .notifier()
            .drain()
            .into_iter()
            .map(|ev| match ev.result {
                Ok(out) => (ev.request_id, true, PyBytes::new(py, &out.data_json), out.prompt_tokens).into_pyobject(py),
                Err(e) => (ev.request_id, false, kind_name(e.kind()), e.to_string(), e.param()).into_pyobject(py),
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

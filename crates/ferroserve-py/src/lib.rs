//! `ferroserve._core`: the only crate that knows Python. Thin wrappers over
//! `ferroserve-core`; every call that may take time owns its inputs and releases the GIL
//! through [`errors::detach`].

mod chat;
mod embeddings;
mod errors;
mod events;
mod interactive;

use pyo3::prelude::*;

/// The CPU instruction-set level the kernels dispatch to (after `FERROSERVE_ISA`). Raises
/// ValueError, saying what this CPU supports, when `FERROSERVE_ISA` names a level it lacks
/// or no level at all (servers call this before loading anything).
#[pyfunction]
fn cpu_isa() -> PyResult<&'static str> {
    ferroserve_core::Isa::configured()
        .map(|isa| isa.as_str())
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
}

/// Every CPU kernel level this CPU can run, lowest first (`FERROSERVE_ISA` may name any).
#[pyfunction]
fn cpu_isa_levels() -> Vec<&'static str> {
    ferroserve_core::Isa::available().into_iter().map(|i| i.as_str()).collect()
}

/// The OpenCL devices this process can use, as `--device opencl:N` numbers them: a list of
/// dicts (index, platform, name, version, global_mem_bytes, compute_units, ieee_fp32).
/// Raises `DeviceError` with the reason when there is no ICD loader or no platform.
/// Builds the OpenCL kernels a model needs (`kind` "chat": a GGUF file; "embedding": a
/// sentence-transformers folder) on OpenCL device `device` and writes their program binaries
/// into `out_dir` (for `--kernel-binaries`). Returns the files written. Raises `DeviceError`
/// without a usable device, `ModelLoadError` for an unreadable model.
#[pyfunction]
fn write_kernel_binaries(py: Python<'_>, kind: &str, path: std::path::PathBuf, device: usize, out_dir: std::path::PathBuf) -> PyResult<Vec<String>> {
    let kind = kind.to_owned();
    py.allow_threads(move || match kind.as_str() {
        "chat" => ferroserve_core::write_chat_kernel_binaries(&path, device, &out_dir),
        "embedding" => ferroserve_core::write_embedding_kernel_binaries(&path, device, &out_dir),
        other => Err(ferroserve_core::Error::invalid_request(format!("kind must be chat or embedding, got {other:?}"))),
    })
    .map(|files| files.iter().map(|f| f.to_string_lossy().into_owned()).collect())
    .map_err(errors::to_py)
}

#[pyfunction]
fn opencl_devices(py: Python<'_>) -> PyResult<Vec<Bound<'_, pyo3::types::PyDict>>> {
    let devices = py.allow_threads(ferroserve_core::opencl_devices).map_err(|e| errors::to_py(ferroserve_core::Error::Device(e.to_string())))?;
    devices
        .into_iter()
        .map(|d| {
            let dict = pyo3::types::PyDict::new(py);
            dict.set_item("index", d.index)?;
            dict.set_item("platform", d.platform)?;
            dict.set_item("name", d.name)?;
            dict.set_item("version", d.version)?;
            dict.set_item("global_mem_bytes", d.global_mem_bytes)?;
            dict.set_item("compute_units", d.compute_units)?;
            dict.set_item("ieee_fp32", d.ieee_fp32)?;
            Ok(dict)
        })
        .collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa_levels, m)?)?;
    m.add_function(wrap_pyfunction!(opencl_devices, m)?)?;
    m.add_function(wrap_pyfunction!(write_kernel_binaries, m)?)?;
    m.add_class::<embeddings::PyEmbeddingEngine>()?;
    m.add_class::<embeddings::PyVectors>()?;
    m.add_class::<chat::PyChatEngine>()?;
    m.add_class::<interactive::PyInteractiveRequest>()?;
    errors::register(m)?;
    events::register(m)?;
    Ok(())
}

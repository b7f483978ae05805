//! `ferroserve._core`: the only crate that knows Python. Thin wrappers over
//! `ferroserve-core`; every call that may take time owns its inputs and releases the GIL
//! through [`errors::detach`].

mod chat;
mod embeddings;
mod errors;

use pyo3::prelude::*;

/// The CPU instruction-set level the kernels dispatch to (after `FERROSERVE_ISA`).
#[pyfunction]
fn cpu_isa() -> &'static str {
    ferroserve_kernels::Isa::selected().as_str()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_class::<embeddings::PyEmbeddingEngine>()?;
    m.add_class::<chat::PyChatEngine>()?;
    errors::register(m)?;
    Ok(())
}

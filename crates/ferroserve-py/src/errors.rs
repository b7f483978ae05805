//! The one mapping from engine errors to Python exceptions, and the GIL-release helper.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ferroserve_core::{Error, ErrorKind};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(_core, FerroserveError, PyException, "Base class of ferroserve engine errors.");
create_exception!(_core, InvalidRequest, FerroserveError, "The request is invalid (HTTP 400).");
create_exception!(_core, ContextLengthExceeded, FerroserveError, "Prompt and output exceed the context (HTTP 400).");
create_exception!(_core, Overloaded, FerroserveError, "The engine is saturated (HTTP 503).");
create_exception!(_core, EngineDead, FerroserveError, "The engine thread stopped (HTTP 503).");
create_exception!(_core, ModelLoadError, FerroserveError, "A model could not be loaded.");
create_exception!(_core, DeviceError, FerroserveError, "The compute device is unavailable or failed.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FerroserveError", py.get_type::<FerroserveError>())?;
    m.add("InvalidRequest", py.get_type::<InvalidRequest>())?;
    m.add("ContextLengthExceeded", py.get_type::<ContextLengthExceeded>())?;
    m.add("Overloaded", py.get_type::<Overloaded>())?;
    m.add("EngineDead", py.get_type::<EngineDead>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    // A class default, so `exc.param` reads `None` on errors raised elsewhere too.
    py.get_type::<FerroserveError>().setattr("param", py.None())?;
    Ok(())
}

/// Stable names for error kinds, used in drained error events.
pub fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "InvalidRequest",
        ErrorKind::ContextLengthExceeded => "ContextLengthExceeded",
        ErrorKind::Overloaded => "Overloaded",
        ErrorKind::EngineDead => "EngineDead",
        ErrorKind::ModelLoad => "ModelLoadError",
        ErrorKind::Device => "DeviceError",
        ErrorKind::Internal => "FerroserveError",
    }
}

/// The exception for `err`, with `param` (the OpenAI request parameter at fault, or `None`)
/// set on the instance.
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    let param = err.param();
    let py_err = match err.kind() {
        ErrorKind::InvalidRequest => InvalidRequest::new_err(msg),
        ErrorKind::ContextLengthExceeded => ContextLengthExceeded::new_err(msg),
        ErrorKind::Overloaded => Overloaded::new_err(msg),
        ErrorKind::EngineDead => EngineDead::new_err(msg),
        ErrorKind::ModelLoad => ModelLoadError::new_err(msg),
        ErrorKind::Device => DeviceError::new_err(msg),
        ErrorKind::Internal => FerroserveError::new_err(msg),
    };
    // Callers hold the GIL already (`detach` re-acquires it first), so this is cheap.
    Python::with_gil(|py| {
        // Cannot fail on a fresh exception instance; if it did, the class default `None` shows.
        let _ = py_err.value(py).setattr("param", param);
    });
    py_err
}

/// Runs `f` with the GIL released, turning engine errors and panics into exceptions.
/// Callers copy their arguments into owned Rust values first.
pub fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.allow_threads(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|_| FerroserveError::new_err("internal panic in the engine"))?
        .map_err(to_py)
}

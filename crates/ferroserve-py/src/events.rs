//! The engines' events as Python sees them: one small frozen class per kind, with named
//! fields (read-only attributes), instead of positional tuples with one-letter codes.

use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::embeddings::PyVectors;

/// A chat request entered the engine: its prompt's length and how much of it the prefix
/// cache supplied.
#[pyclass(name = "ChatAdmitted", module = "ferroserve._core", frozen, get_all)]
pub struct ChatAdmitted {
    pub request_id: u64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

/// New text of one choice (`index`), the token ids it came from, and their logprobs (`None`
/// unless asked for: a list of `(token_id, bytes, logprob, [(token_id, bytes, logprob)])`).
#[pyclass(name = "ChatDelta", module = "ferroserve._core", frozen, get_all)]
pub struct ChatDelta {
    pub request_id: u64,
    pub index: u32,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Option<Py<PyList>>,
}

/// One choice ended (`finish_reason`: `stop`, `length`, ...), with the request's usage.
#[pyclass(name = "ChatFinished", module = "ferroserve._core", frozen, get_all)]
pub struct ChatFinished {
    pub request_id: u64,
    pub index: u32,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// A request failed in an engine: the error kind's name (as `FerroserveError` subclasses
/// are named), its message and the request parameter it concerns, if any. Chat and
/// embeddings share it.
#[pyclass(name = "EngineFailed", module = "ferroserve._core", frozen, get_all)]
pub struct EngineFailed {
    pub request_id: u64,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

/// An embedding request's vectors and the prompt tokens it was charged.
#[pyclass(name = "Embedded", module = "ferroserve._core", frozen, get_all)]
pub struct Embedded {
    pub request_id: u64,
    pub vectors: Py<PyVectors>,
    pub prompt_tokens: usize,
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ChatAdmitted>()?;
    m.add_class::<ChatDelta>()?;
    m.add_class::<ChatFinished>()?;
    m.add_class::<EngineFailed>()?;
    m.add_class::<Embedded>()?;
    Ok(())
}

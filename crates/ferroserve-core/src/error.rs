//! The engine's one error type. `kind()` is what the bindings map to Python exception
//! classes (and those to HTTP statuses); messages are for humans only.

/// Coarse error categories, stable across messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is invalid (→ HTTP 400).
    InvalidRequest,
    /// Prompt plus requested output exceeds the model's context (→ 400 context_length_exceeded).
    ContextLengthExceeded,
    /// The engine is saturated (→ 503 / 429).
    Overloaded,
    /// The engine thread died (→ 503).
    EngineDead,
    /// A model could not be loaded (startup error).
    ModelLoad,
    /// The compute device is unavailable or failed (no OpenCL runtime, a kernel that does
    /// not build, a failed launch): at startup the caller may fall back to the CPU.
    Device,
    /// Anything else (→ 500).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    ContextLengthExceeded(String),
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    #[error("the engine thread has stopped")]
    EngineDead,
    #[error("cannot load model from {path}: {reason}")]
    ModelLoad { path: String, reason: String },
    #[error("device error: {0}")]
    Device(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidRequest(_) => ErrorKind::InvalidRequest,
            Error::ContextLengthExceeded(_) => ErrorKind::ContextLengthExceeded,
            Error::Overloaded(_) => ErrorKind::Overloaded,
            Error::EngineDead => ErrorKind::EngineDead,
            Error::ModelLoad { .. } => ErrorKind::ModelLoad,
            Error::Device(_) => ErrorKind::Device,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn model_load(path: impl AsRef<std::path::Path>, reason: impl std::fmt::Display) -> Self {
        Error::ModelLoad { path: path.as_ref().display().to_string(), reason: reason.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

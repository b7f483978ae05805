//! The engine's one error type. `kind()` is what the bindings map to Python exception
//! classes (and those to HTTP statuses); `param()` names the request parameter a client
//! error concerns (OpenAI's `param`), so no caller has to parse messages, which are for
//! humans only.

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
    /// `param`: the OpenAI request parameter at fault (`"temperature"`, `"input"`), `None`
    /// when the error is about no single parameter (engine configuration, a duplicate id).
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<&'static str> },
    /// `param` is `None` from the engine: whether the prompt arrived as `messages` or
    /// `prompt` is known only to the API layer.
    #[error("{message}")]
    ContextLengthExceeded { message: String, param: Option<&'static str> },
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
            Error::InvalidRequest { .. } => ErrorKind::InvalidRequest,
            Error::ContextLengthExceeded { .. } => ErrorKind::ContextLengthExceeded,
            Error::Overloaded(_) => ErrorKind::Overloaded,
            Error::EngineDead => ErrorKind::EngineDead,
            Error::ModelLoad { .. } => ErrorKind::ModelLoad,
            Error::Device(_) => ErrorKind::Device,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The request parameter this error concerns, by its OpenAI name.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { param, .. } | Error::ContextLengthExceeded { param, .. } => *param,
            _ => None,
        }
    }

    /// An invalid request blamed on parameter `param` (its OpenAI name).
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest { message: message.into(), param: Some(param) }
    }

    /// An invalid request that concerns no single parameter.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Error::InvalidRequest { message: message.into(), param: None }
    }

    pub fn context_length_exceeded(message: impl Into<String>) -> Self {
        Error::ContextLengthExceeded { message: message.into(), param: None }
    }

    pub fn model_load(path: impl AsRef<std::path::Path>, reason: impl std::fmt::Display) -> Self {
        Error::ModelLoad { path: path.as_ref().display().to_string(), reason: reason.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_travels_with_the_error_and_stays_out_of_the_message() {
        let e = Error::invalid("temperature", "temperature must be between 0 and 2, got 3");
        assert_eq!((e.kind(), e.param()), (ErrorKind::InvalidRequest, Some("temperature")));
        assert_eq!(e.to_string(), "temperature must be between 0 and 2, got 3");
        let e = Error::invalid_request("request_id 7 is already in flight");
        assert_eq!((e.kind(), e.param()), (ErrorKind::InvalidRequest, None));
        let e = Error::context_length_exceeded("too long");
        assert_eq!((e.kind(), e.param()), (ErrorKind::ContextLengthExceeded, None));
        assert_eq!(e.to_string(), "too long");
        assert_eq!(Error::Internal("x".into()).param(), None);
    }
}

//! ferroserve's engine: tokenization, model weights, models, batching and scheduling.
//! Pure Rust: no Python here (the `ferroserve-py` crate wraps this one).

pub mod embed;
pub mod engine;
pub mod error;
pub mod kv;
pub mod models;
pub mod notify;
pub mod sample;
pub mod sched;
pub mod tokenize;
pub mod weights;

pub use embed::{DeviceChoice, EmbedInput, EmbedOutput, EmbeddingEngine, EmbeddingEngineConfig};
pub use error::{Error, ErrorKind, Result};

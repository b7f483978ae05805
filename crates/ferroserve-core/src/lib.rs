//! ferroserve's engine: tokenization, model weights, models, batching and scheduling.
//! Pure Rust: no Python here (the `ferroserve-py` crate wraps this one).
//!
//! The public API is re-exported below; the bindings use only these names, so the modules
//! can be rearranged without touching them.

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
pub use models::bert::EmbedNumerics;
pub use engine::{ChatEngine, ChatEvent, Delivery, EngineConfig, EngineStats, FinishReason, SubmitInfo, TokenLogprob, TopLogprob, Usage};
pub use error::{Error, ErrorKind, Result};
pub use models::bert::write_kernel_binaries as write_embedding_kernel_binaries;
pub use models::llama::Numerics;
pub use models::llama_opencl::write_kernel_binaries as write_chat_kernel_binaries;
pub use sample::SamplingParams;
pub use sched::{InteractiveLoad, InteractiveRequest, Priority};
pub use tokenize::chat_template::{ChatMessage, ContentPart, MessageContent, ToolCall, ToolSpec};

/// The CPU kernel levels (`FERROSERVE_ISA`) and the OpenCL devices this process can use.
pub use ferroserve_kernels::opencl::{list_devices as opencl_devices, DeviceInfo as OpenClDeviceInfo};
pub use ferroserve_kernels::Isa;

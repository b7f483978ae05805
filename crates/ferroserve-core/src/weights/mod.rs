//! Weight files: safetensors (memory-mapped) and GGUF.

pub mod gguf;
pub mod safetensors;

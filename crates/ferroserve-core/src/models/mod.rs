//! Models, each written once against the `Backend` trait: `bert` (`BertModel<CpuBackend>`,
//! `BertModel<OpenClBackend>`) and `llama` (`LlamaModel<CpuBackend>`,
//! `LlamaModel<OpenClBackend>`); `llama_opencl` holds what is OpenCL's own about the
//! decoder (the load check against the CPU, the kernels' program binaries).

pub mod bert;
pub mod llama;
pub mod llama_opencl;

//! Models. `bert` is written once against the `Backend` trait (`BertModel<CpuBackend>`,
//! `BertModel<OpenClBackend>`); `llama` is still a CPU model with `llama_opencl` as its
//! device-resident OpenCL runner beside it, until it moves onto the same trait.

pub mod bert;
pub mod llama;
pub mod llama_opencl;

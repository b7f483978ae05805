//! Models, written against the `Device` trait only; `bert_opencl` and `llama_opencl`
//! are the device-resident runners for OpenCL (see their headers for why they are not a
//! `Device`).

pub mod bert;
pub mod bert_opencl;
pub mod llama;
pub mod llama_opencl;

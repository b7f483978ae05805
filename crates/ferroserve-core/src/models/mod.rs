//! Models, written against the `Device` trait only; `bert_opencl` is the encoder's
//! device-resident runner for OpenCL (see its header for why it is not a `Device`).

pub mod bert;
pub mod bert_opencl;
pub mod llama;

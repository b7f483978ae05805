//! Models, written against the `Device` trait only.

pub mod bert;
pub mod llama;

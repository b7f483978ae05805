//! GGUF weight formats, stored exactly as GGML writes them, and matmul kernels that read
//! those packed blocks directly.
//!
//! Every format is a sequence of little-endian blocks; a weight matrix `[n, k]` is `n` rows,
//! each `row_bytes(k)` long (GGUF stores tensors row-major with the row made of blocks).
//! Each family lives in its own file with its layout, a reference `dequantize_row`, a
//! round-to-nearest `quantize_row` (for tests and small tools, not a model quantiser), and
//! its dot-product kernels; [`matmul`] holds the ISA dispatch and threading.
//!
//! Why hand-written: no Rust library multiplies GGUF packed blocks in place with our
//! batch-invariance guarantee (ggml does it in C, candle and mistral.rs wrap ggml-style
//! kernels whose reduction order depends on the thread split). See [`matmul`].

pub mod activations;
pub mod f16;
pub(crate) mod half;
pub mod iq4_nl;
pub mod matmul;
pub mod panels;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub(crate) mod toolkit;

pub use crate::isa::QuantLevel;
pub use matmul::{quant_matmul, quant_matmul_prepared, quant_matmul_with_isa};
pub use panels::{panel_matmul, panel_matmuls, Panels};
pub use activations::Q8Activations;
pub use toolkit::FormatInfo;

use toolkit::Kernels;

/// A GGUF tensor type this crate can read (the subset our target models use).
#[allow(non_camel_case_types)] // GGML's own names, so they grep across projects
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
    Q5_0,
    Q5_1,
    Q5_K,
    IQ4_NL,
}

impl QuantType {
    pub const ALL: [QuantType; 12] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4_K,
        QuantType::Q6_K,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q5_K,
        QuantType::IQ4_NL,
    ];

    /// The format's row of the table: everything below reads it.
    pub fn info(self) -> &'static FormatInfo {
        match self {
            QuantType::F32 => &f16::F32_FORMAT,
            QuantType::F16 => &f16::F16_FORMAT,
            QuantType::BF16 => &f16::BF16_FORMAT,
            QuantType::Q8_0 => &q8_0::FORMAT,
            QuantType::Q4_0 => &q4_0::FORMAT,
            QuantType::Q4_1 => &q4_1::FORMAT,
            QuantType::Q4_K => &q4_k::FORMAT,
            QuantType::Q6_K => &q6_k::FORMAT,
            QuantType::Q5_0 => &q5_0::FORMAT,
            QuantType::Q5_1 => &q5_1::FORMAT,
            QuantType::Q5_K => &q5_k::FORMAT,
            QuantType::IQ4_NL => &iq4_nl::FORMAT,
        }
    }

    /// The format GGUF's `ggml_type` number `id` names, if this crate reads it.
    pub fn from_ggml_type(id: u32) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_type() == id)
    }

    pub fn ggml_type(self) -> u32 {
        self.info().ggml_type
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Weights per block; a row length must be a multiple of it.
    pub fn block_elems(self) -> usize {
        self.info().block_elems
    }

    pub fn block_bytes(self) -> usize {
        self.info().block_bytes
    }

    /// Bytes of a row of `n_elems` weights. Panics unless `n_elems` is a whole number of blocks.
    pub fn row_bytes(self, n_elems: usize) -> usize {
        assert!(
            n_elems.is_multiple_of(self.block_elems()),
            "{}: row of {n_elems} weights is not a multiple of the {}-weight block",
            self.name(),
            self.block_elems()
        );
        n_elems / self.block_elems() * self.block_bytes()
    }

    /// True for the block formats whose matmul quantises the activations to 8 bits.
    pub fn is_block_quantised(self) -> bool {
        matches!(self.info().kernels, Kernels::Blocks(_))
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reference dequantisation of one row: `bytes` holds `out.len()` weights of type `t`.
pub fn dequantize_row(t: QuantType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        t.row_bytes(out.len()),
        "{}: byte length for {} weights",
        t.name(),
        out.len()
    );
    (t.info().dequantize_row)(bytes, out);
}

/// Round-to-nearest quantisation of one row into `out` (`t.row_bytes(x.len())` bytes).
/// Simple per-block scales as a test reference; it does not search for better scales as
/// llama.cpp's quantiser does, so use that one to make production model files.
pub fn quantize_row(t: QuantType, x: &[f32], out: &mut [u8]) {
    assert_eq!(
        out.len(),
        t.row_bytes(x.len()),
        "{}: byte length for {} weights",
        t.name(),
        x.len()
    );
    (t.info().quantize_row)(x, out);
}

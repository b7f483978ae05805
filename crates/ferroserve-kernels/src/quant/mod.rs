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

pub mod f16;
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

pub use crate::isa::QuantLevel;
pub use matmul::{quant_matmul, quant_matmul_prepared, quant_matmul_with_isa};
pub use panels::{panel_matmul, panel_matmuls, Panels};
pub use q8_0::Q8Activations;

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

    /// The `ggml_type` number GGUF files store in their tensor infos.
    pub fn from_ggml_type(id: u32) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_type() == id)
    }

    pub fn ggml_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
            QuantType::IQ4_NL => 20,
            QuantType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q6_K => "Q6_K",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q5_K => "Q5_K",
            QuantType::IQ4_NL => "IQ4_NL",
        }
    }

    /// Weights per block; a row length must be a multiple of it.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q8_0 => q8_0::BLOCK_ELEMS,
            QuantType::Q4_0 => q4_0::BLOCK_ELEMS,
            QuantType::Q4_1 => q4_1::BLOCK_ELEMS,
            QuantType::Q4_K => q4_k::BLOCK_ELEMS,
            QuantType::Q6_K => q6_k::BLOCK_ELEMS,
            QuantType::Q5_0 => q5_0::BLOCK_ELEMS,
            QuantType::Q5_1 => q5_1::BLOCK_ELEMS,
            QuantType::Q5_K => q5_k::BLOCK_ELEMS,
            QuantType::IQ4_NL => iq4_nl::BLOCK_ELEMS,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q8_0 => q8_0::BLOCK_BYTES,
            QuantType::Q4_0 => q4_0::BLOCK_BYTES,
            QuantType::Q4_1 => q4_1::BLOCK_BYTES,
            QuantType::Q4_K => q4_k::BLOCK_BYTES,
            QuantType::Q6_K => q6_k::BLOCK_BYTES,
            QuantType::Q5_0 => q5_0::BLOCK_BYTES,
            QuantType::Q5_1 => q5_1::BLOCK_BYTES,
            QuantType::Q5_K => q5_k::BLOCK_BYTES,
            QuantType::IQ4_NL => iq4_nl::BLOCK_BYTES,
        }
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
        !matches!(self, QuantType::F32 | QuantType::F16 | QuantType::BF16)
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
    match t {
        QuantType::F32 => f16::dequantize_row_f32(bytes, out),
        QuantType::F16 => f16::dequantize_row_f16(bytes, out),
        QuantType::BF16 => f16::dequantize_row_bf16(bytes, out),
        QuantType::Q8_0 => q8_0::dequantize_row(bytes, out),
        QuantType::Q4_0 => q4_0::dequantize_row(bytes, out),
        QuantType::Q4_1 => q4_1::dequantize_row(bytes, out),
        QuantType::Q4_K => q4_k::dequantize_row(bytes, out),
        QuantType::Q6_K => q6_k::dequantize_row(bytes, out),
        QuantType::Q5_0 => q5_0::dequantize_row(bytes, out),
        QuantType::Q5_1 => q5_1::dequantize_row(bytes, out),
        QuantType::Q5_K => q5_k::dequantize_row(bytes, out),
        QuantType::IQ4_NL => iq4_nl::dequantize_row(bytes, out),
    }
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
    match t {
        QuantType::F32 => f16::quantize_row_f32(x, out),
        QuantType::F16 => f16::quantize_row_f16(x, out),
        QuantType::BF16 => f16::quantize_row_bf16(x, out),
        QuantType::Q8_0 => q8_0::quantize_row(x, out),
        QuantType::Q4_0 => q4_0::quantize_row(x, out),
        QuantType::Q4_1 => q4_1::quantize_row(x, out),
        QuantType::Q4_K => q4_k::quantize_row(x, out),
        QuantType::Q6_K => q6_k::quantize_row(x, out),
        QuantType::Q5_0 => q5_0::quantize_row(x, out),
        QuantType::Q5_1 => q5_1::quantize_row(x, out),
        QuantType::Q5_K => q5_k::quantize_row(x, out),
        QuantType::IQ4_NL => iq4_nl::quantize_row(x, out),
    }
}

/// Reads the little-endian f16 at `bytes[at..at + 2]` as f32.
#[inline]
pub(crate) fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

#[inline]
pub(crate) fn write_f16(bytes: &mut [u8], at: usize, v: f32) {
    bytes[at..at + 2].copy_from_slice(&f16::f32_to_f16(v).to_le_bytes());
}

/// Round half to even, exactly, for |v| < 2²²: adding 1.5·2²³ pushes the fraction out of
/// the mantissa under the default rounding mode. Unlike `f32::round` it vectorises without
/// SSE4.1, and the quantisers run on the baseline target.
#[inline]
pub(crate) fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

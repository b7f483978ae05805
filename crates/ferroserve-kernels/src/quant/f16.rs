//! Float weight formats: F32, F16 (IEEE half) and BF16 (the top half of an f32), plus the
//! matmul for them, which keeps the activations in f32 (no 8-bit quantisation: these
//! weights are used where precision matters, so the kernel does not lose it either).
//!
//! Why hand-written: the f32 GEMM in `cpu::gemm` wants its own packed layout, and no Rust
//! crate multiplies f16/bf16 rows in place with a reduction order fixed per output element.

pub use super::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::toolkit::{FloatFormat, FormatInfo, Kernels, OutMatrix};
use std::ops::Range;

pub fn dequantize_row_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub fn dequantize_row_f16(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

pub fn dequantize_row_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

pub fn quantize_row_f32(x: &[f32], out: &mut [u8]) {
    for (v, b) in x.iter().zip(out.chunks_exact_mut(4)) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

pub fn quantize_row_f16(x: &[f32], out: &mut [u8]) {
    for (v, b) in x.iter().zip(out.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_f16(*v).to_le_bytes());
    }
}

pub fn quantize_row_bf16(x: &[f32], out: &mut [u8]) {
    for (v, b) in x.iter().zip(out.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
    }
}

/// The float formats' rows of the format table ([`super::QuantType::info`]): one weight per
/// "block", read by one kernel shape whose loads `FloatFormat` picks.
pub static F32_FORMAT: FormatInfo =
    float_format("F32", 0, 4, FloatFormat::F32, dequantize_row_f32, quantize_row_f32);
pub static F16_FORMAT: FormatInfo =
    float_format("F16", 1, 2, FloatFormat::F16, dequantize_row_f16, quantize_row_f16);
pub static BF16_FORMAT: FormatInfo =
    float_format("BF16", 30, 2, FloatFormat::BF16, dequantize_row_bf16, quantize_row_bf16);

const fn float_format(
    name: &'static str,
    ggml_type: u32,
    bytes: usize,
    format: FloatFormat,
    dequantize_row: fn(&[u8], &mut [f32]),
    quantize_row: fn(&[f32], &mut [u8]),
) -> FormatInfo {
    FormatInfo {
        name,
        ggml_type,
        block_elems: 1,
        block_bytes: bytes,
        dequantize_row,
        quantize_row,
        kernels: Kernels::Float(format),
    }
}

/// Activations for the float kernels: `rows` rows of `k` f32, row-major.
pub(crate) struct F32Rows<'a> {
    pub data: &'a [f32],
    pub k: usize,
}

impl<'a> F32Rows<'a> {
    #[inline]
    pub fn rows(&self) -> usize {
        self.data.len() / self.k
    }
    #[inline]
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.k..(i + 1) * self.k]
    }
}

#[inline]
fn load_portable(fmt: FloatFormat, w_row: &[u8], i: usize) -> f32 {
    match fmt {
        FloatFormat::F32 => {
            let b = &w_row[4 * i..4 * i + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        FloatFormat::F16 => f16_to_f32(u16::from_le_bytes([w_row[2 * i], w_row[2 * i + 1]])),
        FloatFormat::BF16 => bf16_to_f32(u16::from_le_bytes([w_row[2 * i], w_row[2 * i + 1]])),
    }
}

/// Portable kernel: four running sums over `i mod 4`, added in a fixed order, so one output
/// element's rounding depends only on `k`.
fn dot_portable<const R: usize>(fmt: FloatFormat, w_row: &[u8], xs: &[&[f32]; R]) -> [f32; R] {
    let k = xs[0].len();
    let mut acc = [[0f32; 4]; R];
    for i in 0..k {
        let w = load_portable(fmt, w_row, i);
        for r in 0..R {
            acc[r][i % 4] += w * xs[r][i];
        }
    }
    acc.map(|a| (a[0] + a[1]) + (a[2] + a[3]))
}

pub(crate) fn matmul_cols_portable(
    fmt: FloatFormat,
    w: &[u8],
    row_bytes: usize,
    x: &F32Rows<'_>,
    cols: Range<usize>,
    out: &OutMatrix,
) {
    super::toolkit::drive_columns!(4, dot_portable, [fmt], w, row_bytes, x, cols, out);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! One AVX2+FMA+F16C kernel serves both x86 levels: with f32 activations the loop is
    //! bound by loads and FMAs, which 256-bit registers already saturate on this path's
    //! few (non-hot) tensors.
    use super::{F32Rows, FloatFormat, OutMatrix};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Eight weights from element `i` widened to f32.
    ///
    /// # Safety
    /// Elements `i..i + 8` of the row at `w` must exist; the CPU must have the features.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(fmt: FloatFormat, w: *const u8, i: usize) -> __m256 {
        match fmt {
            FloatFormat::F32 => _mm256_loadu_ps(w.add(4 * i) as *const f32),
            FloatFormat::F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i) as *const __m128i)),
            FloatFormat::BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(2 * i) as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Two 8-lane sums (elements `i mod 16` < 8 and ≥ 8), then a scalar tail, in an order that
    /// depends only on `k`.
    ///
    /// # Safety
    /// Needs AVX2, FMA and F16C; the shapes are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const R: usize>(fmt: FloatFormat, w_row: &[u8], xs: &[&[f32]; R]) -> [f32; R] {
        let k = xs[0].len();
        let bytes_per = if fmt == FloatFormat::F32 { 4 } else { 2 };
        assert!(w_row.len() == k * bytes_per && xs.iter().all(|x| x.len() == k));
        let w = w_row.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut i = 0;
        // SAFETY (loads below): i + 16 ≤ k, and every row was checked to hold k elements.
        while i + 16 <= k {
            let w0 = load8(fmt, w, i);
            let w1 = load8(fmt, w, i + 8);
            for r in 0..R {
                let x = xs[r].as_ptr().add(i);
                acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[r][1]);
            }
            i += 16;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            for (t, x) in xs[r].iter().enumerate().skip(i) {
                s += super::load_portable(fmt, w_row, t) * x;
            }
            out[r] = s;
        }
        out
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; the caller owns columns `cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn matmul_cols(
        fmt: FloatFormat,
        w: &[u8],
        row_bytes: usize,
        x: &F32Rows<'_>,
        cols: Range<usize>,
        out: &OutMatrix,
    ) {
        crate::quant::toolkit::drive_columns!(4, dot, [fmt], w, row_bytes, x, cols, out);
    }
}

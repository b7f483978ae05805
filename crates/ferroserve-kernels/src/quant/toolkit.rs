//! The kernel toolkit every format file builds on, and nothing else in `quant/` reaches
//! into: the format table's row type, the output matrix the column kernels write, the loops
//! that drive a kernel over columns and activation rows, and the SIMD helpers the formats
//! share. It depends only on the activations it multiplies ([`super::activations`]).

use std::ops::Range;

use super::activations::{assert_rows_match, ActRow, Q8Activations};
use super::half::{read_f16, write_f16};

/// What the crate knows of one weight format: the row of the table
/// [`QuantType::info`](super::QuantType::info) reads. Each format's file exports its row as `FORMAT` (the float ones three, in `f16.rs`), so a
/// new format is one file, one enum variant and one arm of `QuantType::info`.
pub struct FormatInfo {
    /// GGML's name, as tools and model cards spell it.
    pub name: &'static str,
    /// The `ggml_type` number GGUF files store in their tensor infos.
    pub ggml_type: u32,
    /// Weights per block; a row length must be a multiple of it.
    pub block_elems: usize,
    pub block_bytes: usize,
    /// Reference dequantisation of whole blocks (`bytes` and `out` already checked).
    pub dequantize_row: fn(&[u8], &mut [f32]),
    /// Round-to-nearest quantisation of whole blocks (lengths already checked).
    pub quantize_row: fn(&[f32], &mut [u8]),
    pub(crate) kernels: Kernels,
}

/// How [`super::matmul`] multiplies a format.
pub(crate) enum Kernels {
    /// Float weights against the f32 activations as they are.
    Float(FloatFormat),
    /// Block weights against activations quantised to 8 bits ([`Q8Activations`]).
    Blocks(BlockKernels),
}

/// One block format's column kernel per ISA level. A level whose kernel would only repeat
/// the one below (the reduction order is fixed by the format) names that one again.
pub(crate) struct BlockKernels {
    pub portable: QuantisedKernel,
    #[cfg(target_arch = "x86_64")]
    pub avx2: QuantisedKernel,
    #[cfg(target_arch = "x86_64")]
    pub avx512: QuantisedKernel,
}

/// Which float format a float-weight kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatFormat {
    F32,
    F16,
    BF16,
}

/// Eight lanes summed as llama.cpp's `hsum_float_8`: upper half onto lower, then
/// `(l₀ + l₂) + (l₁ + l₃)`.
#[inline]
pub(crate) fn hsum8(l: &[f32; 8]) -> f32 {
    let h = [l[4] + l[0], l[5] + l[1], l[6] + l[2], l[7] + l[3]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// `lanes[g] = fma(dd, Σ₄ w·a, lanes[g])` over the eight groups of four weights of one
/// 32-weight block: llama.cpp's AVX2 per-lane order, written out for the portable kernels
/// that reproduce it (the group sums are exact in i32).
#[inline]
pub(crate) fn fma_lanes(lanes: &mut [f32; 8], dd: f32, w: &[i32], aq: &[i8]) {
    for (g, lane) in lanes.iter_mut().enumerate() {
        let isum: i32 = (4 * g..4 * g + 4).map(|i| w[i] * aq[i] as i32).sum();
        *lane = dd.mul_add(isum as f32, *lane);
    }
}

/// The portable tile dot of the formats whose block decodes to `E` signed integer weights
/// and one f32 scale `d` (Q8_0, Q4_0; Q6_K with its integer sub-scales folded in): per
/// 32-weight sub-block an exact i32 dot, then `acc += d·d_x·Σ` in block order.
/// `decode(block, &mut weights) -> d`.
#[inline]
pub(crate) fn signed_dot_portable<const R: usize, const E: usize>(
    w_row: &[u8],
    acts: &[ActRow<'_>; R],
    block_bytes: usize,
    decode: impl Fn(&[u8], &mut [i32; E]) -> f32,
) -> [f32; R] {
    let nb = w_row.len() / block_bytes;
    assert_rows_match(acts, nb * E / 32);
    let mut acc = [0f32; R];
    let mut w = [0i32; E];
    for (s, blk) in w_row.chunks_exact(block_bytes).enumerate() {
        let d = decode(blk, &mut w);
        for (r, a) in acts.iter().enumerate() {
            for (j, wj) in w.chunks_exact(32).enumerate() {
                let b = E / 32 * s + j;
                let aq = &a.qs[b * 32..(b + 1) * 32];
                let isum: i32 = wj.iter().zip(aq).map(|(&wi, &x)| wi * x as i32).sum();
                acc[r] += d * a.scales[b][0] * isum as f32;
            }
        }
    }
    acc
}

/// The portable tile dot of the `d·q + m` formats of 32 (Q4_1, Q5_1), the reference order
/// every level reproduces bit for bit: llama.cpp's `ggml_vec_dot_q4_1_q8_1` on x86. Per
/// block, eight lanes `fma(d·d_x, Σ₄ q·a, lane)` ([`fma_lanes`]) in block order, summed as
/// [`hsum8`]; plus the `m` terms `fma(m, s, Σ)` in block order, with `s` the f16-rounded
/// activation sum (`q81_sum`). `codes(block) -> q`; `[d, m]` are the block's first 4 bytes.
pub(crate) fn affine_dot_portable<const R: usize>(
    w_row: &[u8],
    acts: &[ActRow<'_>; R],
    block_bytes: usize,
    codes: impl Fn(&[u8]) -> [i32; 32],
) -> [f32; R] {
    let nb = w_row.len() / block_bytes;
    assert_rows_match(acts, nb);
    let mut lanes = [[0f32; 8]; R];
    let mut mins = [0f32; R];
    for (b, blk) in w_row.chunks_exact(block_bytes).enumerate() {
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        let q = codes(blk);
        for (r, a) in acts.iter().enumerate() {
            let aq = &a.qs[b * 32..(b + 1) * 32];
            fma_lanes(&mut lanes[r], d * a.scales[b][0], &q, aq);
            mins[r] = m.mul_add(a.q81_sums[b], mins[r]);
        }
    }
    core::array::from_fn(|r| hsum8(&lanes[r]) + mins[r])
}

/// `src` and `dst` in chunks of `src_len` and `dst_len` side by side: a row's blocks and
/// their values, as every `dequantize_row` and `quantize_row` walks them.
pub(crate) fn zip_blocks<'a, T, U>(
    src: &'a [T],
    src_len: usize,
    dst: &'a mut [U],
    dst_len: usize,
) -> impl Iterator<Item = (&'a [T], &'a mut [U])> {
    src.chunks_exact(src_len).zip(dst.chunks_exact_mut(dst_len))
}

/// Reference dequantisation of the 32-weight formats whose blocks lead with an f16 `d`:
/// weight `i` of a block is `code(blk, i)·d`.
pub(crate) fn dequantize_scaled(bytes: &[u8], out: &mut [f32], block_bytes: usize, code: impl Fn(&[u8], usize) -> i32) {
    for (blk, y) in zip_blocks(bytes, block_bytes, out, 32) {
        let d = read_f16(blk, 0);
        for (i, v) in y.iter_mut().enumerate() {
            *v = code(blk, i) as f32 * d;
        }
    }
}

/// The same for the `d·q + m` formats (an f16 `d` and an f16 `m` first): weight `i` is
/// `code(blk, i)·d + m`.
pub(crate) fn dequantize_affine(bytes: &[u8], out: &mut [f32], block_bytes: usize, code: impl Fn(&[u8], usize) -> u8) {
    for (blk, y) in zip_blocks(bytes, block_bytes, out, 32) {
        let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
        for (i, v) in y.iter_mut().enumerate() {
            *v = code(blk, i) as f32 * d + m;
        }
    }
}

/// The 4-bit code of weight `i` (0..32) in a 32-weight block's 16 nibble bytes: low nibbles
/// are weights 0..16, high nibbles 16..32 (GGML's order).
#[inline]
pub(crate) fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    }
}

/// The symmetric quantisers' scale, ggml's choice: the weight of largest magnitude (the
/// first if several, sign kept) maps to `most_negative`, the one code with no positive twin.
/// Writes `d` as the block's leading f16 and returns `1/d` of the stored (rounded) `d`.
pub(crate) fn write_signed_scale(x: &[f32], blk: &mut [u8], most_negative: f32) -> f32 {
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    write_f16(blk, 0, max / most_negative);
    let d = read_f16(blk, 0);
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The `d·q + m` quantisers' block header: the block's [min, max] range in `steps` steps,
/// `d` and `m` written as its two leading f16. Returns the stored `m` and `1/d`.
pub(crate) fn write_affine_scale(x: &[f32], blk: &mut [u8], steps: f32) -> (f32, f32) {
    let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    write_f16(blk, 0, (max - min) / steps);
    write_f16(blk, 2, min);
    let (d, m) = (read_f16(blk, 0), read_f16(blk, 2));
    (m, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// A block format's column kernel: columns `cols` of `out` from the packed weights (rows of
/// `row_bytes`) and the quantised activations.
pub(crate) type QuantisedKernel = unsafe fn(&[u8], usize, &Q8Activations, Range<usize>, &OutMatrix);

/// The output `[m, n]`, written column range by column range from several threads.
pub(crate) struct OutMatrix {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: threads only write through `set`, each to the columns it was given, which are
// disjoint (`for_column_chunks`); the borrow of `y` outlives every task.
unsafe impl Send for OutMatrix {}
unsafe impl Sync for OutMatrix {}

impl OutMatrix {
    pub(crate) fn new(y: &mut [f32], m: usize, n: usize) -> Self {
        assert_eq!(y.len(), m * n);
        OutMatrix {
            ptr: y.as_mut_ptr(),
            m,
            n,
        }
    }

    /// # Safety
    /// The caller must own column `j`: no other thread writes it during the call.
    #[inline]
    pub(crate) unsafe fn set(&self, r: usize, j: usize, v: f32) {
        assert!(r < self.m && j < self.n);
        *self.ptr.add(r * self.n + j) = v;
    }
}

/// The loop every kernel shares: for each weight row (output column) in `cols`, the
/// activation rows in tiles of `$tile`, then one by one. `$dot(args.., w_row, &[row; R])`
/// returns the `R` dot products; its per-row arithmetic must not depend on `R`.
macro_rules! drive_columns {
    ($tile:expr, $dot:path, [$($arg:expr),*], $w:expr, $row_bytes:expr, $acts:expr, $cols:expr, $out:expr) => {{
        let (w, row_bytes, acts, out) = ($w, $row_bytes, $acts, $out);
        let m = acts.rows();
        for j in $cols {
            let w_row = &w[j * row_bytes..(j + 1) * row_bytes];
            let mut r = 0;
            while r + $tile <= m {
                let tile: [_; $tile] = ::core::array::from_fn(|t| acts.row(r + t));
                let y = $dot($($arg,)* w_row, &tile);
                for (t, v) in y.into_iter().enumerate() {
                    // SAFETY: the caller gave this call columns `cols` alone.
                    unsafe { out.set(r + t, j, v) };
                }
                r += $tile;
            }
            while r < m {
                let y = $dot($($arg,)* w_row, &[acts.row(r)]);
                // SAFETY: as above.
                unsafe { out.set(r, j, y[0]) };
                r += 1;
            }
        }
    }};
}
pub(crate) use drive_columns;

/// A block format's table row and its portable column kernel, from the items its file
/// defines: `BLOCK_ELEMS`, `BLOCK_BYTES`, `dequantize_row`, `quantize_row`, the tile dot
/// `dot_portable::<R>` and the module `avx2` (see [`avx2_matmul_cols`]); `avx512` names
/// the AVX-512 level's kernel, the format's own or the AVX2 one where that already gives
/// the format's one reduction order.
macro_rules! block_format {
    ($name:literal, ggml_type: $id:literal, avx512: $avx512:path) => {
        /// This format's row of the format table (`QuantType::info`).
        pub static FORMAT: $crate::quant::toolkit::FormatInfo = $crate::quant::toolkit::FormatInfo {
            name: $name,
            ggml_type: $id,
            block_elems: BLOCK_ELEMS,
            block_bytes: BLOCK_BYTES,
            dequantize_row,
            quantize_row,
            kernels: $crate::quant::toolkit::Kernels::Blocks($crate::quant::toolkit::BlockKernels {
                portable: matmul_cols_portable,
                #[cfg(target_arch = "x86_64")]
                avx2: avx2::matmul_cols,
                #[cfg(target_arch = "x86_64")]
                avx512: $avx512,
            }),
        };

        fn matmul_cols_portable(
            w: &[u8],
            row_bytes: usize,
            acts: &$crate::quant::activations::Q8Activations,
            cols: ::std::ops::Range<usize>,
            out: &$crate::quant::toolkit::OutMatrix,
        ) {
            $crate::quant::toolkit::drive_columns!(4, dot_portable, [], w, row_bytes, acts, cols, out);
        }
    };
}
pub(crate) use block_format;

/// Inside a format's `avx2` module: its column kernel over the tile dot `dot::<R>` there.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_matmul_cols {
    () => {
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C; the caller owns columns `cols`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) unsafe fn matmul_cols(
            w: &[u8],
            row_bytes: usize,
            acts: &$crate::quant::activations::Q8Activations,
            cols: ::std::ops::Range<usize>,
            out: &$crate::quant::toolkit::OutMatrix,
        ) {
            use $crate::quant::toolkit::x86::TILE;
            $crate::quant::toolkit::drive_columns!(TILE, dot, [], w, row_bytes, acts, cols, out);
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2_matmul_cols;

/// Inside a format's `avx2` module, for the formats of 32 signed weights behind an f16 `d`
/// at the block's start (Q8_0, Q4_0): the tile dot and column kernel, given in scope
/// `weights(blk) -> __m256i`, the block's 32 weights as signed bytes. Even and odd blocks
/// go to separate accumulators to halve the FMA latency chain; the weights' signs move onto
/// the activations so the unsigned×signed product sees |w| (≤ 128, no saturation).
#[cfg(target_arch = "x86_64")]
macro_rules! signed_blocks_avx2 {
    () => {
        /// One block into `acc` for each row.
        ///
        /// # Safety
        /// Reads the block at `blk` and activation block `b` of every row; needs AVX2/FMA/F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn block<const R: usize>(
            blk: *const u8,
            b: usize,
            acts: &[$crate::quant::activations::ActRow<'_>; R],
            acc: &mut [__m256; R],
        ) {
            let d = load_f16(blk);
            let w = weights(blk);
            let w_abs = _mm256_sign_epi8(w, w);
            for r in 0..R {
                let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * super::BLOCK_ELEMS).cast());
                let dot = dot_u8i8_avx2(w_abs, _mm256_sign_epi8(a, w));
                let scale = _mm_mul_ps(d, load_act_scales(acts[r].scales.as_ptr().add(b)));
                acc[r] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dot),
                    _mm256_broadcastss_ps(scale),
                    acc[r],
                );
            }
        }

        /// # Safety
        /// Needs AVX2, FMA and F16C; the shapes are checked here.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn dot<const R: usize>(
            w_row: &[u8],
            acts: &[$crate::quant::activations::ActRow<'_>; R],
        ) -> [f32; R] {
            let nb = w_row.len() / super::BLOCK_BYTES;
            $crate::quant::activations::assert_rows_match(acts, nb);
            let w = w_row.as_ptr();
            let mut even = [_mm256_setzero_ps(); R];
            let mut odd = [_mm256_setzero_ps(); R];
            let mut b = 0;
            // SAFETY (pointer reads in `block`): b < nb, and the rows were checked above.
            while b + 2 <= nb {
                block(w.add(b * super::BLOCK_BYTES), b, acts, &mut even);
                block(w.add((b + 1) * super::BLOCK_BYTES), b + 1, acts, &mut odd);
                b += 2;
            }
            if b < nb {
                block(w.add(b * super::BLOCK_BYTES), b, acts, &mut even);
            }
            core::array::from_fn(|r| hsum(_mm256_add_ps(even[r], odd[r])))
        }

        $crate::quant::toolkit::avx2_matmul_cols!();
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use signed_blocks_avx2;

/// Inside a format's `avx2` module, for the `d·q + m` formats of 32 (Q4_1, Q5_1): the tile
/// dot and column kernel in llama.cpp's order ([`affine_dot_portable`]'s), given in scope
/// `codes(blk) -> __m256i`, the block's 32 unsigned codes, with `[d, m]` the block's first
/// four bytes. Eight lanes in one register per row: `vpmaddubsw` + `vpmaddwd` sum groups of
/// four codes exactly (codes ≤ 31, |a| ≤ 127: pairs stay below 2¹⁵); `hsum` is `hsum8`.
#[cfg(target_arch = "x86_64")]
macro_rules! affine_blocks_avx2 {
    () => {
        /// # Safety
        /// Needs AVX2, FMA and F16C; the shapes are checked here.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        pub(super) unsafe fn dot<const R: usize>(
            w_row: &[u8],
            acts: &[$crate::quant::activations::ActRow<'_>; R],
        ) -> [f32; R] {
            let nb = w_row.len() / super::BLOCK_BYTES;
            $crate::quant::activations::assert_rows_match(acts, nb);
            let w = w_row.as_ptr();
            let mut lanes = [_mm256_setzero_ps(); R];
            let mut mins = [0f32; R];
            for b in 0..nb {
                // SAFETY: b < nb blocks of the row; the activation rows hold nb blocks (checked).
                let blk = w.add(b * super::BLOCK_BYTES);
                let dm = load_f16x2(blk);
                let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
                let q = codes(blk);
                for r in 0..R {
                    let a = _mm256_loadu_si256(acts[r].qs.as_ptr().add(b * super::BLOCK_ELEMS).cast());
                    let dd = _mm256_set1_ps(d * acts[r].scales.get_unchecked(b)[0]);
                    lanes[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot_u8i8_avx2(q, a)), lanes[r]);
                    mins[r] = m.mul_add(*acts[r].q81_sums.get_unchecked(b), mins[r]);
                }
            }
            core::array::from_fn(|r| hsum(lanes[r]) + mins[r])
        }

        $crate::quant::toolkit::avx2_matmul_cols!();
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use affine_blocks_avx2;

/// Small SIMD helpers shared by the families' kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Rows per tile: each weight block is unpacked once and used for this many rows.
    pub const TILE: usize = 4;

    /// Σ u·s over groups of four bytes into eight i32 lanes (u unsigned, s signed).
    /// `vpmaddubsw` saturates pairs at i16; every caller keeps |u·s| pairs below 2¹⁵.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn dot_u8i8_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// Sum of the eight lanes, in a fixed order.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The f16 at `p` (unaligned) in lane 0, zeros above.
    ///
    /// # Safety
    /// Reads 2 bytes at `p`; the CPU must have this function's features (as for every
    /// `unsafe fn` in the kernels: the dispatch checks them once).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn load_f16(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32))
    }

    /// Two consecutive f16 at `p` in lanes 0 and 1.
    ///
    /// # Safety
    /// Reads 4 bytes at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn load_f16x2(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()))
    }

    /// An activation block's `[d, d·Σq]` in lanes 0 and 1.
    ///
    /// # Safety
    /// `p` must point to a live `[f32; 2]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn load_act_scales(p: *const [f32; 2]) -> __m128 {
        _mm_castpd_ps(_mm_load_sd(p.cast::<f64>()))
    }

    /// Sixteen packed nibbles as 32 bytes: low nibbles first, then high (GGML's order).
    ///
    /// # Safety
    /// Reads 16 bytes at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(p.cast());
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// The 32 bits of the little-endian `u32` at `p` as 32 bytes, byte `i` 0xff where bit
    /// `i` is set, else 0 (llama.cpp's `bytes_from_bits_32`, for the 5th bits of Q5_0/Q5_1).
    ///
    /// # Safety
    /// Reads 4 bytes at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
        let bits = p.cast::<i32>().read_unaligned();
        let spread = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread);
        // Byte i of each 8 keeps all bits but bit i: all ones exactly when bit i was set.
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
    }

    /// AVX-512 kernels for the 32-weight block formats (and Q4_K's 32-weight sub-blocks).
    ///
    /// Every format is put in one shape, unsigned codes `u` and an affine map per block,
    /// `w = d·u + m` (Q4_1 as stored; Q4_0 with m = −8d; Q8_0 with u = q + 128 and
    /// m = −128d; Q4_K with d·sc[j] and −dmin·m[j]), so that one `vpdpbusd` (unsigned
    /// weights × signed activations, exact in i32) does the integer work and the offset
    /// becomes `m·(d_x·Σa)`, a term each activation block carries precomputed.
    ///
    /// Work goes in groups of four blocks: two 512-bit registers of codes (two blocks each)
    /// and one vector of their eight `[d, m]`, so one f16 conversion and one multiply by the
    /// activations' `[d_x, d_x·Σa]` serve four blocks. 4-bit codes keep the high nibble in
    /// place (16·q, still a byte) and those lanes take the scale divided by 16 (exact),
    /// which saves a shift on the ports that limit this loop.
    ///
    /// A call computes a tile of `C` weight rows × `R` activation rows; every (row, column)
    /// goes through the same operations whatever `C`, `R` and the tail, which is what makes
    /// a row's result independent of its batch.
    // Index loops over the tile's register arrays read closer to the arithmetic than zips.
    #[allow(clippy::needless_range_loop)]
    pub mod avx512 {
        use super::hsum;
        use crate::quant::activations::ActRow;
        use std::arch::x86_64::*;

        /// One weight row's four blocks (activation blocks `b..b + 4`).
        #[derive(Clone, Copy)]
        pub struct Group {
            /// Codes of blocks (0, 1) and (2, 3), laid out as the format's spread table says.
            pub u: [__m512i; 2],
            /// `[d₀, m₀, d₁, m₁, d₂, m₂, d₃, m₃]`.
            pub w: __m256,
        }

        impl Group {
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            #[inline]
            pub fn zero() -> Group {
                Group {
                    u: [_mm512_setzero_si512(); 2],
                    w: _mm256_setzero_ps(),
                }
            }
        }

        /// For each 32-bit lane of a code register, which lane of `[p | p/16]` scales it
        /// (`p` being the eight products `[d·d_x, m·d_x·Σa]` of a group, indices ≥ 16 the /16
        /// copy for 4-bit high nibbles): one table per code register of the group.
        pub type Spread = [[i32; 16]; 2];

        /// Per (column, row): two sets of f32 dot lanes (even and odd code registers, to
        /// halve the FMA latency chain) and the 8-lane running sum of `p`, whose odd lanes
        /// are the offsets `m·d_x·Σa`.
        pub struct Acc<const C: usize, const R: usize> {
            dots: [[[__m512; 2]; R]; C],
            offsets: [[__m256; R]; C],
        }

        impl<const C: usize, const R: usize> Acc<C, R> {
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            #[inline]
            pub fn zero() -> Self {
                Acc {
                    dots: [[[_mm512_setzero_ps(); 2]; R]; C],
                    offsets: [[_mm256_setzero_ps(); R]; C],
                }
            }
        }

        /// Bytes `0..len` of a 64-byte load.
        #[inline]
        pub fn byte_mask(len: usize) -> __mmask64 {
            if len >= 64 {
                !0
            } else {
                (1u64 << len) - 1
            }
        }

        /// Accumulates one group for every (column, row) of the tile: activation blocks
        /// `b..b + n`, where `n` = 4 unless `TAIL` (then the activation loads are masked to
        /// the `n` real blocks and the caller's groups hold zero codes and scales beyond).
        ///
        /// # Safety
        /// Activation blocks `b..b + n` must exist in every row.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        #[inline]
        pub unsafe fn group_step<const C: usize, const R: usize, const TAIL: bool>(
            groups: &[Group; C],
            spread: &Spread,
            b: usize,
            n: usize,
            acts: &[ActRow<'_>; R],
            acc: &mut Acc<C, R>,
        ) {
            let spread0 = _mm512_loadu_si512(spread[0].as_ptr().cast());
            let spread1 = _mm512_loadu_si512(spread[1].as_ptr().cast());
            let sixteenth = _mm256_set1_ps(1.0 / 16.0);
            for r in 0..R {
                let q = acts[r].qs.as_ptr().add(b * 32);
                let s = acts[r].scales.as_ptr().add(b).cast::<f32>();
                let (a0, a1, sx) = if TAIL {
                    let bytes = 32 * n;
                    (
                        _mm512_maskz_loadu_epi8(byte_mask(bytes), q),
                        _mm512_maskz_loadu_epi8(byte_mask(bytes.saturating_sub(64)), q.add(64)),
                        _mm256_maskz_loadu_ps(((1u32 << (2 * n)) - 1) as u8, s),
                    )
                } else {
                    (
                        _mm512_loadu_si512(q.cast()),
                        _mm512_loadu_si512(q.add(64).cast()),
                        _mm256_loadu_ps(s),
                    )
                };
                for c in 0..C {
                    let g = &groups[c];
                    let p = _mm256_mul_ps(g.w, sx);
                    let (p16, pq16) = (
                        _mm512_castps256_ps512(p),
                        _mm512_castps256_ps512(_mm256_mul_ps(p, sixteenth)),
                    );
                    let dot0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), g.u[0], a0);
                    let acc_cr = &mut acc.dots[c][r];
                    acc_cr[0] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot0),
                        _mm512_permutex2var_ps(p16, spread0, pq16),
                        acc_cr[0],
                    );
                    // A tail of one or two blocks leaves the second register empty; which
                    // work is skipped depends only on k, so every tile skips the same.
                    if !TAIL || n > 2 {
                        let dot1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), g.u[1], a1);
                        acc_cr[1] = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(dot1),
                            _mm512_permutex2var_ps(p16, spread1, pq16),
                            acc_cr[1],
                        );
                    }
                    acc.offsets[c][r] = _mm256_add_ps(acc.offsets[c][r], p);
                }
            }
        }

        /// The tile's results, each reduced in the same fixed order.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        #[inline]
        pub fn finish<const C: usize, const R: usize>(acc: &Acc<C, R>) -> [[f32; R]; C] {
            let mut out = [[0f32; R]; C];
            for c in 0..C {
                for r in 0..R {
                    let v = _mm512_add_ps(acc.dots[c][r][0], acc.dots[c][r][1]);
                    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
                    let dots = hsum(_mm256_add_ps(_mm512_castps512_ps256(v), high));
                    let o = acc.offsets[c][r];
                    let o = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
                    let offsets =
                        _mm_cvtss_f32(_mm_movehdup_ps(o)) + _mm_cvtss_f32(_mm_shuffle_ps(o, o, 3));
                    out[c][r] = dots + offsets;
                }
            }
            out
        }

        /// A 32-weight format's `dot` and `matmul_cols`, given in scope its `SPREAD` table and
        /// `load_group::<TAIL>(block_ptr, n_blocks, readable_bytes) -> Group` (the weights
        /// from `block_ptr` on are `readable_bytes` long, so a loader may read past the group
        /// within them instead of masking).
        macro_rules! group_kernel {
            ($block_bytes:expr) => {
                /// `C` consecutive weight rows from the start of `w` against `R` activation rows.
                ///
                /// # Safety
                /// Needs the AVX-512 level; all shapes are checked here.
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
                #[inline]
                unsafe fn dot<const C: usize, const R: usize>(
                    w: &[u8],
                    row_bytes: usize,
                    acts: &[ActRow<'_>; R],
                ) -> [[f32; R]; C] {
                    use crate::quant::toolkit::x86::avx512::{finish, group_step, Acc, Group};
                    let nb = row_bytes / $block_bytes;
                    assert!(w.len() >= C * row_bytes);
                    assert_rows_match(acts, nb);
                    let mut acc = Acc::<C, R>::zero();
                    let mut groups = [Group::zero(); C];
                    let mut b = 0;
                    // SAFETY (loads): blocks b..b + 4 (b..nb in the tail) of each of the C rows
                    // lie inside `w`, and the activation rows were checked to hold nb blocks.
                    while b + 4 <= nb {
                        for (c, g) in groups.iter_mut().enumerate() {
                            let at = c * row_bytes + b * $block_bytes;
                            // Streaming several weight rows (decode): fetch ≈ 1 KiB ahead, as
                            // the hardware prefetcher alone leaves the loop waiting on memory
                            // (a prefetch past the end is dropped, never faults).
                            if C > 1 {
                                _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(at + 1024).cast());
                                _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(at + 1088).cast());
                            }
                            *g = load_group::<false>(w.as_ptr().add(at), 4, w.len() - at);
                        }
                        group_step::<C, R, false>(&groups, &SPREAD, b, 4, acts, &mut acc);
                        b += 4;
                    }
                    if b < nb {
                        for (c, g) in groups.iter_mut().enumerate() {
                            let at = c * row_bytes + b * $block_bytes;
                            *g = load_group::<true>(w.as_ptr().add(at), nb - b, w.len() - at);
                        }
                        group_step::<C, R, true>(&groups, &SPREAD, b, nb - b, acts, &mut acc);
                    }
                    finish(&acc)
                }

                /// # Safety
                /// The CPU must support the AVX-512 level; the caller owns columns `cols`.
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
                pub(crate) unsafe fn matmul_cols(
                    w: &[u8],
                    row_bytes: usize,
                    acts: &Q8Activations,
                    cols: Range<usize>,
                    out: &OutMatrix,
                ) {
                    crate::quant::toolkit::drive_tiles!(dot, w, row_bytes, acts, cols, out);
                }
            };
        }
        pub(crate) use group_kernel;

        /// `vpermw` indices turning a block pair's nibble runs (starting at 16-bit words
        /// `first0` and `first1` of the pair) into `[q₀, q₀, q₁, q₁]`, 16 bytes each: the
        /// nibble mask below then leaves `[lo₀, 16·hi₀, lo₁, 16·hi₁]` (GGML's order: low
        /// nibbles are weights 0..16, high nibbles 16..32).
        pub const fn nibble_words(first0: u16, first1: u16) -> [u16; 32] {
            let mut idx = [0u16; 32];
            let mut i = 0;
            while i < 32 {
                idx[i] = if i < 16 { first0 } else { first1 } + (i % 8) as u16;
                i += 1;
            }
            idx
        }

        /// Spread for `[lo₀, 16·hi₀, lo₁, 16·hi₁]` code registers (Q4_0, Q4_1).
        pub const NIBBLE_PAIR_SPREAD: Spread = {
            let mut t = [[0i32; 16]; 2];
            let mut reg = 0;
            while reg < 2 {
                let mut lane = 0;
                while lane < 16 {
                    let block = 2 * reg + lane / 8; // block in the group
                    let high = (lane / 4) % 2 == 1;
                    t[reg][lane] = (2 * block + if high { 16 } else { 0 }) as i32;
                    lane += 1;
                }
                reg += 1;
            }
            t
        };

        /// `[lo₀, 16·hi₀, lo₁, 16·hi₁]` codes from a block pair loaded at `raw`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        #[inline]
        pub fn unpack_nibble_pair(raw: __m512i, words: &[u16; 32]) -> __m512i {
            // SAFETY: `words` is exactly the 64 bytes loaded.
            let idx = unsafe { _mm512_loadu_si512(words.as_ptr().cast()) };
            let keep = _mm512_set_epi64(
                0xf0f0_f0f0_f0f0_f0f0u64 as i64,
                0xf0f0_f0f0_f0f0_f0f0u64 as i64,
                0x0f0f_0f0f_0f0f_0f0f,
                0x0f0f_0f0f_0f0f_0f0f,
                0xf0f0_f0f0_f0f0_f0f0u64 as i64,
                0xf0f0_f0f0_f0f0_f0f0u64 as i64,
                0x0f0f_0f0f_0f0f_0f0f,
                0x0f0f_0f0f_0f0f_0f0f,
            );
            _mm512_and_si512(_mm512_permutexvar_epi16(idx, raw), keep)
        }
    }
}

/// The loop of the tile kernels (AVX-512): per group of up to four output columns, the
/// activation rows in tiles of four (one column at a time), then the remaining rows with
/// the four columns at once (decode, `m = 1`, is all remainder). `$dot::<C, R>(w_from,
/// row_bytes, &[row; R])` computes `C` consecutive weight rows from the start of `w_from`.
macro_rules! drive_tiles {
    ($dot:ident, $w:expr, $row_bytes:expr, $acts:expr, $cols:expr, $out:expr) => {{
        let (w, row_bytes, acts, out) = ($w, $row_bytes, $acts, $out);
        let cols: ::std::ops::Range<usize> = $cols;
        let m = acts.rows();
        let tiled_rows = m - m % 4;
        let mut j = cols.start;
        while j < cols.end {
            let group = (cols.end - j).min(4);
            let w_from = &w[j * row_bytes..];
            for c in 0..group {
                let mut r = 0;
                while r < tiled_rows {
                    let tile: [_; 4] = ::core::array::from_fn(|t| acts.row(r + t));
                    let y = $dot::<1, 4>(&w_from[c * row_bytes..], row_bytes, &tile);
                    for (t, v) in y[0].into_iter().enumerate() {
                        // SAFETY: the caller gave this call columns `cols` alone.
                        unsafe { out.set(r + t, j + c, v) };
                    }
                    r += 4;
                }
            }
            for r in tiled_rows..m {
                let row = [acts.row(r)];
                if group == 4 {
                    let y = $dot::<4, 1>(w_from, row_bytes, &row);
                    for (c, v) in y.into_iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { out.set(r, j + c, v[0]) };
                    }
                } else {
                    for c in 0..group {
                        let y = $dot::<1, 1>(&w_from[c * row_bytes..], row_bytes, &row);
                        // SAFETY: as above.
                        unsafe { out.set(r, j + c, y[0][0]) };
                    }
                }
            }
            j += group;
        }
    }};
}
pub(crate) use drive_tiles;

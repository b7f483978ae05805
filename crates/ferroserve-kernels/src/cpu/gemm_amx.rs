//! Linear layers on Intel AMX (AMX-BF16 tiles): `tdpbf16ps` multiplies a 16×32 bf16 tile
//! of A by a 32×16 bf16 tile of B into a 16×16 f32 tile — 8,192 multiply-adds per
//! instruction, an order of magnitude beyond AVX-512 FMA.
//!
//! Hand-written because no Rust library drives AMX, and because our layout and fixed
//! k order keep one row's result independent of the batch (batch invariance). Rust has
//! no stable AMX intrinsics, so the tile instructions are inline assembly.
//!
//! Layouts (k padded to a multiple of 32 with zeros):
//! - weights: NR=32-column panels of bf16 *pairs along k* in one u32, `[panel][k/2][32]`;
//!   a B tile (16 k-pairs × 16 columns) is 16 rows of 64 bytes at a 128-byte stride;
//! - activations: rows of bf16 pairs `[row (padded to 32)][k/2]`; an A tile is 16 rows of
//!   64 bytes at a `k` × 2-byte stride.
//!
//! Each task computes a 32×32 block of C with four accumulator tiles (tmm0–3), two A
//! tiles (tmm4–5) and two B tiles (tmm6–7), then adds bias and activation on the way out.

use rayon::prelude::*;

use super::gemm::{bias_and_activation, bias_tile, SendPtr, NR};
use super::{dispatch_isa, Isa};
use crate::{Activation, PackedLinear};

/// Rows per A tile / C tile; two of them per micro-kernel step.
const TILE_ROWS: usize = 16;
const BLOCK_ROWS: usize = 2 * TILE_ROWS;
/// k values per tile step (16 pairs).
const TILE_K: usize = 32;

/// f32 → bf16 bits, round to nearest even. Branch-free so the packing loops vectorise;
/// activations are finite (a NaN would already be a bug upstream).
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of `v` rounded to bf16 (for tests and references).
#[cfg(test)]
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits((to_bf16(v) as u32) << 16)
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

pub(super) fn padded_k(k: usize) -> usize {
    k.div_ceil(TILE_K) * TILE_K
}

/// Packs a row-major `[n, k]` weight into 32-column panels of bf16 pairs.
pub fn pack_b(weight: &[f32], n: usize, k: usize) -> Vec<u32> {
    let k2 = padded_k(k) / 2;
    let panels = n.div_ceil(NR);
    let mut packed = vec![0u32; panels * k2 * NR];
    for p in 0..panels {
        let panel = &mut packed[p * k2 * NR..(p + 1) * k2 * NR];
        for j in 0..NR.min(n - p * NR) {
            let row = &weight[(p * NR + j) * k..(p * NR + j + 1) * k];
            for q in 0..k.div_ceil(2) {
                let hi = if 2 * q + 1 < k { row[2 * q + 1] } else { 0.0 };
                panel[q * NR + j] = pair(row[2 * q], hi);
            }
        }
    }
    packed
}

/// Rows of `x` as bf16 pairs, `[rows padded to BLOCK_ROWS][k2]` (zero padding).
fn pack_a(x: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let k2 = padded_k(k) / 2;
    let rows_pad = rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS;
    let mut packed = vec![0u32; rows_pad * k2];
    let pack_row = |(r, dst): (usize, &mut [u32])| {
        if r < rows {
            let src = &x[r * k..(r + 1) * k];
            dispatch_isa!(Isa::Avx512, || {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = pair(s[0], s[1]);
                }
                if k % 2 == 1 {
                    dst[k / 2] = pair(src[k - 1], 0.0);
                }
            });
        }
    };
    if rows * k >= 64 * 1024 {
        packed.par_chunks_mut(k2).enumerate().for_each(pack_row);
    } else {
        packed.chunks_mut(k2).enumerate().for_each(pack_row);
    }
    packed
}

/// `out[rows, n] = act(x[rows, k] · Wᵀ + bias)` with AMX tiles, `data` being `w`'s bf16 panels.
pub fn linear(x: &[f32], rows: usize, w: &PackedLinear, data: &[u32], act: Activation, out: &mut [f32]) {
    let (n, k) = (w.out_features, w.in_features);
    let k2 = padded_k(k) / 2;
    assert!(x.len() >= rows * k && out.len() >= rows * n);
    assert_eq!(data.len(), n.div_ceil(NR) * k2 * NR, "weights packed for another ISA");
    if rows == 0 || n == 0 {
        return;
    }
    let a = pack_a(x, rows, k);
    let panels = n.div_ceil(NR);
    let row_blocks = rows.div_ceil(BLOCK_ROWS);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let bias = w.bias.as_deref();
    // Tasks: a panel × a run of row blocks, so each task amortises its tile-config load
    // and reuses its B panel from L1/L2.
    let blocks_per_task = row_blocks.clamp(1, 4);
    let row_groups = row_blocks.div_ceil(blocks_per_task);
    let task = |t: usize| {
        let (g, p) = (t / panels, t % panels);
        let c0 = p * NR;
        let ncols = NR.min(n - c0);
        let panel = &data[p * k2 * NR..(p + 1) * k2 * NR];
        let out_ptr = out_ptr;
        let mut tile = [0.0f32; BLOCK_ROWS * NR];
        let bias_tile = bias_tile(bias, c0, ncols);
        let mut configured_rows = 0;
        for rb in g * blocks_per_task..((g + 1) * blocks_per_task).min(row_blocks) {
            let r0 = rb * BLOCK_ROWS;
            // A block with at most 16 live rows (a short request) needs one A tile and two
            // tile products per k-step instead of two and four. The A and C tiles are
            // configured with only the live rows: tile loads and products cost in
            // proportion to their rows, so a 19-token sentence does not pay for 32.
            let live_rows = BLOCK_ROWS.min(rows - r0);
            if live_rows != configured_rows {
                // SAFETY: the caller's level has AMX (`Isa::has_amx`), which this CPU supports.
                unsafe { x86::configure(live_rows) };
                configured_rows = live_rows;
            }
            // SAFETY: `a` holds BLOCK_ROWS-padded rows of k2 pairs; `panel` k2 × NR pairs.
            unsafe { x86::block_32x32(a.as_ptr().add(r0 * k2), k2, panel.as_ptr(), tile.as_mut_ptr(), live_rows > TILE_ROWS) };
            let valid_rows = BLOCK_ROWS.min(rows - r0);
            let live = &mut tile[..valid_rows * NR];
            bias_and_activation(live, &bias_tile, act);
            for i in 0..valid_rows {
                // SAFETY: this task alone writes rows of block rb × columns c0..c0+ncols.
                unsafe { std::ptr::copy_nonoverlapping(live.as_ptr().add(i * NR), out_ptr.0.add((r0 + i) * n + c0), ncols) };
            }
        }
        // SAFETY: releases this thread's tile state (cheaper context switches).
        unsafe { x86::release() };
    };
    let tasks = row_groups * panels;
    if tasks == 1 || rows * n * k < 32 * 1024 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    use super::{NR, TILE_K, TILE_ROWS};

    /// Palette 1, tiles 0–7 × 64 bytes per row.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Configures the tiles for a block of `live_rows` (1..=32) rows of A: the first A tile
    /// (tmm4) and its accumulators (tmm0–1) get `min(live_rows, 16)` rows, the second
    /// (tmm5, tmm2–3) the rest (at least 1); B tiles (tmm6–7) are always 16 k-pair rows.
    /// Each row of C depends only on its own row of A, so results do not change with this.
    ///
    /// # Safety
    /// AMX must be available and permitted (`Isa::Amx.is_supported()`).
    pub unsafe fn configure(live_rows: usize) {
        debug_assert!((1..=2 * TILE_ROWS).contains(&live_rows));
        let first = live_rows.min(TILE_ROWS) as u8;
        let second = live_rows.saturating_sub(TILE_ROWS).max(1) as u8;
        let config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [first, first, second, second, first, second, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    }

    /// # Safety
    /// Only after `configure` on this thread.
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// C[32×32] (row-major into `c`, 128-byte rows) = A[32 rows × 2·k2] · B-panel.
    ///
    /// # Safety
    /// `a`: 32 rows of `k2` u32 pairs; `b`: `k2` rows of NR u32 pairs; `c`: 32×32 f32;
    /// tiles configured on this thread; `k2` a multiple of 16.
    pub unsafe fn block_32x32(a: *const u32, k2: usize, b: *const u32, c: *mut f32, both_halves: bool) {
        if !both_halves {
            return block_16x32(a, k2, b, c);
        }
        let a_stride = k2 * 4;
        let b_stride = NR * 4;
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let mut q = 0;
        while q < k2 {
            let a0 = a.add(q);
            let a1 = a.add(16 * k2 + q);
            let b0 = b.add(q * NR);
            let b1 = b.add(q * NR + 16);
            // The weights stream from L3/DRAM for small batches, and tile loads are not
            // covered well by the hardware prefetchers: fetch the next k-step's B rows.
            if q + 16 < k2 {
                let next = b.add((q + 16) * NR) as *const i8;
                for line in 0..32 {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(64 * line));
                }
            }
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                sa = in(reg) a_stride, sb = in(reg) b_stride,
                options(nostack, readonly)
            );
            q += TILE_K / 2;
        }
        let cs = NR * 4;
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c.add(16 * NR), c3 = in(reg) c.add(16 * NR + 16),
            cs = in(reg) cs,
            options(nostack)
        );
    }

    /// C[16×32] = A[16 rows × 2·k2] · B-panel; rows 16..32 of `c` are left untouched.
    ///
    /// # Safety
    /// As `block_32x32`.
    unsafe fn block_16x32(a: *const u32, k2: usize, b: *const u32, c: *mut f32) {
        let a_stride = k2 * 4;
        let b_stride = NR * 4;
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        let mut q = 0;
        while q < k2 {
            let a0 = a.add(q);
            let b0 = b.add(q * NR);
            let b1 = b.add(q * NR + 16);
            if q + 16 < k2 {
                let next = b.add((q + 16) * NR) as *const i8;
                for line in 0..32 {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(64 * line));
                }
            }
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                sa = in(reg) a_stride, sb = in(reg) b_stride,
                options(nostack, readonly)
            );
            q += TILE_K / 2;
        }
        let cs = NR * 4;
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            c0 = in(reg) c, c1 = in(reg) c.add(16),
            cs = in(reg) cs,
            options(nostack)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuDevice, Device, Isa as CpuIsa};

    /// Short batches (≤ 16 rows) take the one-A-tile path: rows must equal those of the
    /// same inputs computed inside a larger batch (batch invariance across both paths and
    /// across tile configurations).
    #[test]
    fn short_and_long_blocks_agree() {
        let Some(dev) = CpuDevice::with_isa(CpuIsa::Amx) else {
            eprintln!("skipping: this CPU lacks {} (the f32 paths are covered in gemm.rs)", CpuIsa::Amx.requires());
            return;
        };
        let (n, k) = (70, 96);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let x: Vec<f32> = (0..40 * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        let packed = dev.pack_linear(&w, n, k, None);
        let mut all = vec![f32::NAN; 40 * n];
        dev.linear(&x, 40, &packed, Activation::None, &mut all);
        // Tiles are configured with the live rows of each block: 19 and 33 rows give
        // blocks of 19, and 32 + 1, where the 40-row batch has 32 + 8.
        for rows in [1usize, 5, 16, 19, 33] {
            let mut some = vec![f32::NAN; rows * n];
            dev.linear(&x[..rows * k], rows, &packed, Activation::None, &mut some);
            assert_eq!(some, all[..rows * n], "rows={rows}");
        }
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0); // tie → even
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    }
}

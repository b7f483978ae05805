//! "Fast" numerics for Q4_1 and Q8_0 weights (AVX-512 VNNI and AVX2 kernels, a scalar
//! reference): rows repacked at load into panels of sixteen,
//! and one f32 chain per output, `acc = fma(d·d_x, Σq·a, acc)` per block with the block's
//! whole integer dot product.
//!
//! Why a second order next to llama.cpp's (`q4_1.rs`, `q8_0.rs`): llama.cpp keeps eight f32
//! lanes per output and so needs a convert, a multiply and an fma per eight lanes per block
//! per row — on this CPU ≈ 2.4 cycles per (weight row, block, activation row), which caps a
//! 16-stream step. Summing the block's integer dot first needs those three once per sixteen
//! weight rows instead (≈ 3× less work per block here). The price is the sum order: on a
//! tie-prone model (SmolLM2-135M) greedy output then differs from llama.cpp's often (see
//! bench/NOTES.md), so this is the `fast` numerics mode, chosen per model at load, and the
//! exact order stays the default.
//!
//! Still batch invariant, like every kernel here: an output element is always the same
//! sequence of f32 operations over its own row's blocks (integer sums are exact in any order),
//! whatever `m`, the row's position, the tile or the thread split; and every ISA level gives
//! the portable code's bits (tested).
//!
//! Panel layout (per panel of rows `16p..16p + 16`, zero rows padding the last one; per block):
//! - Q4_1: 256 code bytes, four 64-byte vectors; vector `t` holds, for row `c`, that row's
//!   block bytes `qs[4t..4t + 4]` at bytes `4c..4c + 4`. Their low nibbles are the block's
//!   elements `4t..4t + 4` and their high nibbles elements `16 + 4t..`, so one mask and one
//!   shift give two groups of four codes for sixteen rows, ready for `vpdpbusd` against four
//!   broadcast activation bytes. Then 32 f32: the sixteen rows' `d`, then their `m`.
//! - Q8_0: 512 code bytes, eight vectors; vector `g` holds row `c`'s codes `4g..4g + 4`
//!   offset by 128 (`q ^ 0x80`, unsigned for `vpdpbusd`; the kernel subtracts `128·Σa`).
//!   Then 16 f32: the rows' `d`.

use std::ops::Range;

use rayon::prelude::*;

use super::matmul::QuantIsa;
use super::q8_0::{ActRow, Q8Activations};
use super::{read_f16, QuantType};

/// Weight rows per panel (one 512-bit register of f32 or i32 lanes).
pub const PANEL_ROWS: usize = 16;
const BLOCK_ELEMS: usize = 32;

/// A weight matrix `[n, k]` repacked for [`panel_matmul`].
#[derive(Debug, Clone)]
pub struct Panels {
    wtype: QuantType,
    n: usize,
    k: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl Panels {
    /// Whether weights of `wtype` can be repacked (the fast numerics cover these).
    pub fn supports(wtype: QuantType) -> bool {
        matches!(wtype, QuantType::Q4_1 | QuantType::Q8_0)
    }

    fn code_bytes_per_block(wtype: QuantType) -> usize {
        match wtype {
            QuantType::Q4_1 => PANEL_ROWS * 16,
            _ => PANEL_ROWS * 32,
        }
    }

    fn scales_per_block(wtype: QuantType) -> usize {
        match wtype {
            QuantType::Q4_1 => 2 * PANEL_ROWS,
            _ => PANEL_ROWS,
        }
    }

    /// Repacks `n` rows of `k` weights stored as GGUF writes `wtype`. Panics if `wtype` is
    /// not supported or the length does not fit the shape.
    pub fn pack(wtype: QuantType, w: &[u8], n: usize, k: usize) -> Panels {
        assert!(Panels::supports(wtype), "{} weights have no panel layout", wtype.name());
        assert!(k.is_multiple_of(BLOCK_ELEMS), "row length {k} is not a multiple of {BLOCK_ELEMS}");
        let row_bytes = wtype.row_bytes(k);
        assert_eq!(w.len(), n * row_bytes, "{}: weight bytes for [{n}, {k}]", wtype.name());
        let (nb, panels) = (k / BLOCK_ELEMS, n.div_ceil(PANEL_ROWS));
        let (cb, sb) = (Panels::code_bytes_per_block(wtype), Panels::scales_per_block(wtype));
        // Padding rows: Q4_1 codes 0 with d = m = 0; Q8_0 codes 0 (stored as 0x80) with d = 0.
        let pad = if wtype == QuantType::Q8_0 { 0x80 } else { 0 };
        let mut codes = vec![pad; panels * nb * cb];
        let mut scales = vec![0f32; panels * nb * sb];
        let block_bytes = row_bytes / nb;
        for j in 0..n {
            let (p, c) = (j / PANEL_ROWS, j % PANEL_ROWS);
            for b in 0..nb {
                let blk = &w[j * row_bytes + b * block_bytes..][..block_bytes];
                let dst = &mut codes[(p * nb + b) * cb..][..cb];
                let s = &mut scales[(p * nb + b) * sb..][..sb];
                s[c] = read_f16(blk, 0);
                match wtype {
                    QuantType::Q4_1 => {
                        s[PANEL_ROWS + c] = read_f16(blk, 2);
                        for t in 0..4 {
                            dst[t * 64 + 4 * c..][..4].copy_from_slice(&blk[4 + 4 * t..][..4]);
                        }
                    }
                    _ => {
                        for g in 0..8 {
                            for i in 0..4 {
                                dst[g * 64 + 4 * c + i] = blk[2 + 4 * g + i] ^ 0x80;
                            }
                        }
                    }
                }
            }
        }
        Panels { wtype, n, k, codes, scales }
    }

    pub fn wtype(&self) -> QuantType {
        self.wtype
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held (the repacked copy lives beside the memory-mapped original).
    pub fn size_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    fn panel(&self, p: usize) -> (&[u8], &[f32]) {
        let nb = self.k / BLOCK_ELEMS;
        let (cb, sb) = (Panels::code_bytes_per_block(self.wtype), Panels::scales_per_block(self.wtype));
        (&self.codes[p * nb * cb..(p + 1) * nb * cb], &self.scales[p * nb * sb..(p + 1) * nb * sb])
    }
}

/// `y[m, n] = acts · Wᵀ` in the fast order (module docs), `acts` quantised from the
/// `[m, k]` input. Row `i` of `y` depends only on row `i` of the input, bit for bit.
pub fn panel_matmul(isa: QuantIsa, w: &Panels, acts: &Q8Activations, y: &mut [f32]) {
    assert!(isa.is_supported(), "ISA level {} is not supported by this CPU", isa.as_str());
    let (m, n) = (acts.rows(), w.n);
    assert_eq!(acts.k(), w.k, "activation width");
    assert_eq!(y.len(), m * n, "output length for [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    // 128·Σa per (row, block), for the Q8_0 codes' offset (the AVX2 kernel uses signed codes).
    let offsets: Vec<i32> = if w.wtype == QuantType::Q8_0 && isa != QuantIsa::Avx2 {
        (0..m).flat_map(|r| acts.row(r).qs.chunks_exact(BLOCK_ELEMS).map(|q| 128 * q.iter().map(|&v| v as i32).sum::<i32>()).collect::<Vec<_>>()).collect()
    } else {
        Vec::new()
    };
    let out = PanelOut { ptr: y.as_mut_ptr(), m, n };
    let panels = n.div_ceil(PANEL_ROWS);
    // Work in weight bytes × activation rows, as `matmul::for_column_chunks` counts it: a few
    // chunks per thread once a chunk is worth more than waking a worker.
    let work = w.codes.len() * m;
    let threads = rayon::current_num_threads();
    let chunks = (work / (64 * 1024)).clamp(1, 4 * threads).min(panels);
    let chunks = if chunks < threads { chunks } else { chunks - chunks % threads };
    let per = panels.div_ceil(chunks);
    let run = |c: usize| {
        let range = c * per..((c + 1) * per).min(panels);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 level was checked above; this call owns panels `range`.
            QuantIsa::Avx512 => unsafe { avx512::panels(w, acts, &offsets, range, &out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX2 level was checked above; this call owns panels `range`.
            QuantIsa::Avx2 => unsafe { avx2::panels(w, acts, range, &out) },
            _ => portable_panels(w, acts, &offsets, range, &out),
        }
    };
    if chunks == 1 {
        run(0);
    } else {
        (0..panels.div_ceil(per)).into_par_iter().for_each(run);
    }
}

/// The output, written panel range by panel range from several threads.
struct PanelOut {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: each task writes only the columns of the panels it was given (disjoint ranges);
// the borrow of `y` outlives every task.
unsafe impl Send for PanelOut {}
unsafe impl Sync for PanelOut {}

impl PanelOut {
    /// Writes row `r`'s sixteen outputs of panel `p`, dropping the padding rows.
    ///
    /// # Safety
    /// The caller must own panel `p`'s columns.
    unsafe fn set_panel(&self, r: usize, p: usize, v: &[f32; PANEL_ROWS]) {
        assert!(r < self.m);
        let j0 = p * PANEL_ROWS;
        let len = PANEL_ROWS.min(self.n - j0);
        std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(r * self.n + j0), len);
    }
}

/// The reference order, scalar: per output, per block, `dd = d_w·d_x` (f32),
/// `acc = fma(dd, Σq·a, acc)`, and for Q4_1 `mins = fma(m, s, mins)`; the result `acc + mins`.
fn portable_panels(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
    let nb = w.k / BLOCK_ELEMS;
    for p in range {
        let (codes, scales) = w.panel(p);
        for r in 0..acts.rows() {
            let a = acts.row(r);
            let mut acc = [0f32; PANEL_ROWS];
            let mut mins = [0f32; PANEL_ROWS];
            for b in 0..nb {
                let aq = &a.qs[b * BLOCK_ELEMS..][..BLOCK_ELEMS];
                let dx = a.scales[b][0];
                for c in 0..PANEL_ROWS {
                    let sumi = match w.wtype {
                        QuantType::Q4_1 => {
                            let cb = &codes[b * 256..][..256];
                            (0..4)
                                .map(|t| {
                                    let bytes = &cb[t * 64 + 4 * c..][..4];
                                    (0..4)
                                        .map(|i| {
                                            (bytes[i] & 0x0f) as i32 * aq[4 * t + i] as i32
                                                + (bytes[i] >> 4) as i32 * aq[16 + 4 * t + i] as i32
                                        })
                                        .sum::<i32>()
                                })
                                .sum::<i32>()
                        }
                        _ => {
                            let cb = &codes[b * 512..][..512];
                            (0..8).map(|g| (0..4).map(|i| cb[g * 64 + 4 * c + i] as i32 * aq[4 * g + i] as i32).sum::<i32>()).sum::<i32>()
                                - offsets[r * nb + b]
                        }
                    };
                    match w.wtype {
                        QuantType::Q4_1 => {
                            let s = &scales[b * 32..][..32];
                            acc[c] = (s[c] * dx).mul_add(sumi as f32, acc[c]);
                            mins[c] = s[PANEL_ROWS + c].mul_add(a.q81_sums[b], mins[c]);
                        }
                        _ => {
                            let s = &scales[b * 16..][..16];
                            acc[c] = (s[c] * dx).mul_add(sumi as f32, acc[c]);
                        }
                    }
                }
            }
            let y: [f32; PANEL_ROWS] = core::array::from_fn(|c| acc[c] + mins[c]);
            // SAFETY: this call owns panel p (see `panel_matmul`).
            unsafe { out.set_panel(r, p, &y) };
        }
    }
}

/// The order of [`portable_panels`] with sixteen weight rows per register: per block, the
/// panel's codes are loaded (and for Q4_1 unpacked) once for a tile of up to four activation
/// rows, and each activation row takes eight `vpdpbusd` against broadcast groups of four of
/// its bytes (two chains of four, then one add: integer sums, so any order is exact), one
/// convert, one multiply (`d·d_x`) and one fma (plus the `m·s` fma for Q4_1).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Bytes ahead of the current block to prefetch (as the row kernels do).
    const PREFETCH_AHEAD: usize = 2048;

    /// # Safety
    /// Needs the AVX-512 level (F/BW/VL/VNNI); the caller owns panels `range` of `out`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn panels(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
        if w.wtype == QuantType::Q4_1 {
            panels_of::<true>(w, acts, offsets, range, out);
        } else {
            panels_of::<false>(w, acts, offsets, range, out);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn panels_of<const Q4: bool>(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
        let m = acts.rows();
        for p in range {
            let mut r = 0;
            while m - r >= 4 {
                tile::<4, Q4>(w, acts, offsets, p, r, out);
                r += 4;
            }
            if m - r >= 2 {
                tile::<2, Q4>(w, acts, offsets, p, r, out);
                r += 2;
            }
            if m - r == 1 {
                tile::<1, Q4>(w, acts, offsets, p, r, out);
            }
        }
    }

    /// Panel `p` against activation rows `r0..r0 + R`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const Q4: bool>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let rows: [ActRow<'_>; R] = core::array::from_fn(|i| acts.row(r0 + i));
        let (codes, scales) = w.panel(p);
        let (cp, sp) = (codes.as_ptr(), scales.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins = [_mm512_setzero_ps(); R];
        let mask = _mm512_set1_epi8(0x0f);
        for b in 0..nb {
            // The eight code vectors of this block: groups 0..8 of four codes per row.
            let mut v = [_mm512_setzero_si512(); 8];
            let dw;
            let mut mw = _mm512_setzero_ps();
            if Q4 {
                // SAFETY: block b of the panel is 256 code bytes and 32 scales (layout above).
                let cb = cp.add(b * 256);
                _mm_prefetch::<_MM_HINT_T0>(cb.add(PREFETCH_AHEAD).cast());
                for t in 0..4 {
                    let x = _mm512_loadu_si512(cb.add(64 * t).cast());
                    v[t] = _mm512_and_si512(x, mask);
                    v[t + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
                }
                dw = _mm512_loadu_ps(sp.add(b * 32));
                mw = _mm512_loadu_ps(sp.add(b * 32 + 16));
            } else {
                // SAFETY: block b of the panel is 512 code bytes and 16 scales.
                let cb = cp.add(b * 512);
                _mm_prefetch::<_MM_HINT_T0>(cb.add(PREFETCH_AHEAD).cast());
                _mm_prefetch::<_MM_HINT_T0>(cb.add(PREFETCH_AHEAD + 256).cast());
                for (g, vg) in v.iter_mut().enumerate() {
                    *vg = _mm512_loadu_si512(cb.add(64 * g).cast());
                }
                dw = _mm512_loadu_ps(sp.add(b * 16));
            }
            for i in 0..R {
                // SAFETY: the activation row holds nb > b blocks of 32 bytes.
                let a = rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast::<i32>();
                let group = |g: usize| _mm512_set1_epi32(a.add(g).read_unaligned());
                let mut lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], group(0));
                let mut hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[4], group(4));
                for g in 1..4 {
                    lo = _mm512_dpbusd_epi32(lo, v[g], group(g));
                    hi = _mm512_dpbusd_epi32(hi, v[g + 4], group(g + 4));
                }
                let mut sumi = _mm512_add_epi32(lo, hi);
                if !Q4 {
                    sumi = _mm512_sub_epi32(sumi, _mm512_set1_epi32(*offsets.get_unchecked((r0 + i) * nb + b)));
                }
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(rows[i].scales.get_unchecked(b)[0]));
                acc[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi), acc[i]);
                if Q4 {
                    mins[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*rows[i].q81_sums.get_unchecked(b)), mins[i]);
                }
            }
        }
        for i in 0..R {
            let mut y = [0f32; PANEL_ROWS];
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(acc[i], mins[i]));
            // SAFETY: the caller owns panel p.
            out.set_panel(r0 + i, p, &y);
        }
    }
}

/// The same order on AVX2: a panel as two halves of eight rows (one 256-bit register of i32 or
/// f32 lanes each), `vpmaddubsw` + `vpmaddwd` for the integer dot of a group of four codes.
/// `vpmaddubsw` saturates at i16, so Q8_0 does not use the +128 codes (up to 255·127·2) but
/// their signed value with the sign moved onto the activation, |w|·(±a) ≤ 128·127·2 < 2¹⁵;
/// both give the exact integer dot, hence the portable bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// Needs AVX2 + FMA; the caller owns panels `range` of `out`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn panels(w: &Panels, acts: &Q8Activations, range: Range<usize>, out: &PanelOut) {
        let m = acts.rows();
        for p in range {
            let mut r = 0;
            while m - r >= 2 {
                tile::<2>(w, acts, p, r, out);
                r += 2;
            }
            if m - r == 1 {
                tile::<1>(w, acts, p, r, out);
            }
        }
    }

    /// Σ u·s over groups of four bytes into eight i32 lanes (`u` unsigned, pairs < 2¹⁵).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot4(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// Panel `p` against activation rows `r0..r0 + R`, one half of eight weight rows at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const R: usize>(w: &Panels, acts: &Q8Activations, p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let q4 = w.wtype == QuantType::Q4_1;
        let rows: [ActRow<'_>; R] = core::array::from_fn(|i| acts.row(r0 + i));
        let (codes, scales) = w.panel(p);
        let (cp, sp) = (codes.as_ptr(), scales.as_ptr());
        let mask = _mm256_set1_epi8(0x0f);
        let flip = _mm256_set1_epi8(-128);
        let mut y = [[0f32; PANEL_ROWS]; R];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut mins = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // Groups 0..8 of four codes for the half's eight rows, unsigned, and for Q8_0
                // the signs to move onto the activations.
                let mut v = [_mm256_setzero_si256(); 8];
                let mut sign = [_mm256_setzero_si256(); 8];
                let (dw, mw);
                if q4 {
                    // SAFETY: block b of the panel is 256 code bytes and 32 scales.
                    let cb = cp.add(b * 256 + 32 * half);
                    for t in 0..4 {
                        let x = _mm256_loadu_si256(cb.add(64 * t).cast());
                        v[t] = _mm256_and_si256(x, mask);
                        v[t + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
                    }
                    dw = _mm256_loadu_ps(sp.add(b * 32 + 8 * half));
                    mw = _mm256_loadu_ps(sp.add(b * 32 + 16 + 8 * half));
                } else {
                    // SAFETY: block b of the panel is 512 code bytes and 16 scales.
                    let cb = cp.add(b * 512 + 32 * half);
                    for g in 0..8 {
                        let signed = _mm256_xor_si256(_mm256_loadu_si256(cb.add(64 * g).cast()), flip);
                        v[g] = _mm256_abs_epi8(signed);
                        sign[g] = signed;
                    }
                    dw = _mm256_loadu_ps(sp.add(b * 16 + 8 * half));
                    mw = _mm256_setzero_ps();
                }
                for i in 0..R {
                    // SAFETY: the activation row holds nb > b blocks of 32 bytes.
                    let a = rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast::<i32>();
                    let mut sumi = _mm256_setzero_si256();
                    for g in 0..8 {
                        let ag = _mm256_set1_epi32(a.add(g).read_unaligned());
                        let ag = if q4 { ag } else { _mm256_sign_epi8(ag, sign[g]) };
                        sumi = _mm256_add_epi32(sumi, dot4(v[g], ag));
                    }
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(rows[i].scales.get_unchecked(b)[0]));
                    acc[i] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi), acc[i]);
                    if q4 {
                        mins[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*rows[i].q81_sums.get_unchecked(b)), mins[i]);
                    }
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(y[i].as_mut_ptr().add(8 * half), _mm256_add_ps(acc[i], mins[i]));
            }
        }
        for (i, yi) in y.iter().enumerate() {
            // SAFETY: the caller owns panel p.
            out.set_panel(r0 + i, p, yi);
        }
    }
}

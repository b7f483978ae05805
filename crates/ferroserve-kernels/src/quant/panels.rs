//! "Fast" numerics for the block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K and Q6_K
//! (AVX-512 VNNI and AVX2 kernels, a scalar reference): rows repacked at load into panels of
//! sixteen,
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
//! Panel layout (per panel of rows `16p..16p + 16`, zero rows padding the last one; per block).
//! The codes and the per-block scales are two arrays; the scales stay the file's f16 (`d`, `m`,
//! `dmin`: every one is an f16 in the GGUF, none is computed at repack) and the kernels widen
//! them with `vcvtph2ps` (the portable code with [`f16_to_f32`]), which is exact, so the
//! arithmetic is that of f32 scales while a panel reads as many bytes as the file's blocks
//! (f32 scales read 24 bytes per 32 Q4_1 weights against the file's 20: SmolLM2's decode step
//! read 111.5 MB instead of 96.4; bench/NOTES.md, "f16 panel scales and the c=1 kernel").
//! - Q4_1: 256 code bytes, four 64-byte vectors; vector `t` holds, for row `c`, that row's
//!   block bytes `qs[4t..4t + 4]` at bytes `4c..4c + 4`. Their low nibbles are the block's
//!   elements `4t..4t + 4` and their high nibbles elements `16 + 4t..`, so one mask and one
//!   shift give two groups of four codes for sixteen rows, ready for `vpdpbusd` against four
//!   broadcast activation bytes. Then 32 f16: the sixteen rows' `d`, then their `m`.
//! - Q8_0: 512 code bytes, eight vectors; vector `g` holds row `c`'s codes `4g..4g + 4`
//!   offset by 128 (`q ^ 0x80`, unsigned for `vpdpbusd`; the kernel subtracts `128·Σa`).
//!   Then 16 f16: the rows' `d`.
//! - Q4_0, Q5_0, Q5_1, IQ4_NL (the formats llama.cpp's K-quant mixes fall back to for rows that
//!   are not a multiple of 256): the codes' low four bits as Q4_1's 256 bytes; for Q5_0 and Q5_1
//!   then a 64-byte plane of fifth bits, byte `4c + i` holding element `4t + i`'s at bit `t` and
//!   element `16 + 4t + i`'s at bit `4 + t` (one 16-bit shift and one `vpternlogd` put each
//!   group's at bit 4). Then the rows' `d` (and Q5_1's `m`) as f16: 18, 22, 24 and 18 bytes per
//!   32 weights, as in the GGUF. Codes stay unsigned (0..32) for `vpdpbusd`; Q4_0 and
//!   Q5_0 subtract `8·Σa` and `16·Σa` per block, IQ4_NL looks its codes up as `value + 128`
//!   (`vpshufb`) and subtracts `128·Σa` (on AVX2 it takes Q8_0's sign trick). The order is Q8_0's
//!   (Q4_1's for Q5_1). Why not Q5_0 as Q8_0 panels (codes `q − 16` fit i8; no new kernel, but
//!   36 bytes per 32 weights): measured (`panel_bench fallback`, SmolLM2's FFN shape 1536 × 576
//!   streamed from memory, AVX-512 level, loaded 2-core EPYC) the Q8_0 panels took 1.09× the
//!   5-bit panels' time at m = 1 and 1.16–1.19× at m = 16 (AVX2 level: 0.99× and 0.91×); and the
//!   repacked copy is a third smaller. bench/NOTES.md, "Fallback-format panels".
//!
//! The K-quants pack per 256-weight super-block instead, keeping their small integer scales
//! (an f32 per sub-block would cost 4 more bytes per 32 weights, and decode is bound by the
//! weight bytes read):
//! - Q4_K: 256 bytes of sub-block scales, `sc[j]` for the sixteen rows at bytes `16j..16j + 16`
//!   and `m[j]` at `128 + 16j..`, then per sub-block `j` 256 code bytes in Q4_1's layout (its
//!   nibbles re-paired: element `i` and `16 + i` share a byte). Then 32 f16: the rows' `d`,
//!   then their `dmin`. 18.5 bytes per 32 weights (the GGUF block: 18). Each sub-block is Q4_1
//!   shaped, `w = (d·sc)·q − dmin·m`, with both products exact in f32 (an f16 times a 6-bit
//!   integer), so the order is Q4_1's: `acc = fma((d·sc)·d_x, Σq·a, acc)`,
//!   `mins = fma(dmin·m, d_x·Σa, mins)` per sub-block, the result `acc − mins` (`d_x·Σa`
//!   the f32 [`Q8Activations`] keep; Q4_1 reads llama.cpp's f16-rounded one).
//! - Q6_K: 256 bytes of i8 scales, group `g`'s (weights `16g..16g + 16`) at bytes
//!   `16g..16g + 16`, then per sub-block 384 code bytes of `u = q + 32` (0..64): 256 bytes of
//!   low nibbles in Q4_1's layout, then two 64-byte vectors `h` of the top two bits, vector
//!   `h` holding at byte `4c + i`, bits `2t..2t + 2`, element `16h + 4t + i`'s. Then 16 f16:
//!   the rows' `d`. 26.25 bytes per 32 weights, as the GGUF block. Per sub-block the
//!   integer `s₀·Σ₁₆ q·a + s₁·Σ₁₆ q·a` (exact in i32: |s·q·a| ≤ 128·32·127, 32 terms), then
//!   `acc = fma(d·d_x, that, acc)`.
//!
//! Why not repack Q4_K into Q4_1 panels (no new kernel, but an f32 `d·sc` and `dmin·m` per
//! sub-block: 24 bytes per 32 weights): measured side by side (`panel_bench kquant`, the 1B
//! FFN shape n = 8192, k = 2048, weights streamed from memory, AVX-512 level, 2 threads on a
//! loaded 2-core EPYC), Q4_1 panels took 1.01–1.17× the Q4_K panels' time at m = 1 and 1.06×
//! at m = 16, so the integer-scale layout costs nothing in the kernel and keeps the repacked
//! copy 21 % smaller. Against the exact kernels of the same format, same runs: Q4_K 3.1–3.6×
//! (m = 1) and 5.6–6.0× (m = 16), Q6_K 1.3–1.5× and 5.5–6.2×. On the AVX2 level Q6_K panels
//! are slower than the exact AVX2 kernel at m = 1 (0.63×; 1.27× at m = 16): the unpacking and
//! sign handling is paid per eight rows there. Details: bench/NOTES.md, "K-quant panels". At
//! m = 1 the AVX2 level now has a Q6_K tile without the sign trick (unsigned codes, the
//! `32·a` pair sums taken off per group), ≈ 2× the exact kernel's speed on the loaded Zen 1
//! (bench/NOTES.md, "The 1B one-sequence decode on Zen 1").

use std::ops::Range;

use rayon::prelude::*;

use super::f16::f16_to_f32;
use super::activations::{ActRow, Q8Activations};
use super::{iq4_nl, q4_k, q5_0, q6_k, QuantType};
use crate::isa::QuantLevel;

/// Weight rows per panel (one 512-bit register of f32 or i32 lanes).
pub const PANEL_ROWS: usize = 16;
const BLOCK_ELEMS: usize = 32;
/// A K-quant super-block: eight sub-blocks of 32 (one activation block each).
const SUPER_ELEMS: usize = 256;
const SUBS: usize = SUPER_ELEMS / BLOCK_ELEMS;
/// A K-quant unit's leading integer scales: Q4_K's `sc` and `m`, Q6_K's sixteen group scales.
const K_SCALE_BYTES: usize = 16 * PANEL_ROWS;
/// Code bytes of one 32-weight block of a panel: Q4_1 and Q4_K nibbles, Q6_K nibbles + top bits.
const NIBBLE_BYTES: usize = 16 * PANEL_ROWS;
const Q6_BYTES: usize = NIBBLE_BYTES + 8 * PANEL_ROWS;
/// Q5_0 and Q5_1: the nibbles, then one bit plane of the fifth bits (4 bytes a row).
const FIVE_BIT_BYTES: usize = NIBBLE_BYTES + 4 * PANEL_ROWS;

/// The tile kernels, one per layout, chosen by a const generic.
mod kind {
    pub const Q4_1: u8 = 0;
    pub const Q8_0: u8 = 1;
    pub const Q4_K: u8 = 2;
    pub const Q6_K: u8 = 3;
    pub const Q4_0: u8 = 4;
    pub const Q5_0: u8 = 5;
    pub const Q5_1: u8 = 6;
    pub const IQ4_NL: u8 = 7;

    pub const fn five_bit(kind: u8) -> bool {
        matches!(kind, Q5_0 | Q5_1)
    }

    /// `w = d·q + m`: a second chain `mins = fma(m, f16(d_x·Σa), mins)`, as llama.cpp's q8_1 dots.
    pub const fn affine(kind: u8) -> bool {
        matches!(kind, Q4_1 | Q5_1)
    }

    /// Code bytes and f16 scales per 32-weight block of a panel (the block formats).
    pub const fn block_code_bytes(kind: u8) -> usize {
        match kind {
            Q8_0 => 32 * super::PANEL_ROWS,
            Q5_0 | Q5_1 => super::FIVE_BIT_BYTES,
            _ => super::NIBBLE_BYTES,
        }
    }

    pub const fn block_scales(kind: u8) -> usize {
        if affine(kind) {
            2 * super::PANEL_ROWS
        } else {
            super::PANEL_ROWS
        }
    }
}

fn kind_of(wtype: QuantType) -> u8 {
    match wtype {
        QuantType::Q4_1 => kind::Q4_1,
        QuantType::Q8_0 => kind::Q8_0,
        QuantType::Q4_K => kind::Q4_K,
        QuantType::Q6_K => kind::Q6_K,
        QuantType::Q4_0 => kind::Q4_0,
        QuantType::Q5_0 => kind::Q5_0,
        QuantType::Q5_1 => kind::Q5_1,
        QuantType::IQ4_NL => kind::IQ4_NL,
        _ => panic!("{} weights have no panel layout", wtype.name()),
    }
}

/// `VALUES + 128` (1..=241): IQ4_NL's table as unsigned bytes for `vpdpbusd`.
const IQ4_NL_UNSIGNED: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (iq4_nl::VALUES[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// The f16 at byte `at` of a GGUF block, as its bits: the panels keep the file's scales and
/// the kernels widen them (exactly; every f16 is an f32).
fn f16_bits(blk: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([blk[at], blk[at + 1]])
}

/// A weight matrix `[n, k]` repacked for [`panel_matmul`].
#[derive(Debug, Clone)]
pub struct Panels {
    wtype: QuantType,
    n: usize,
    k: usize,
    codes: Vec<u8>,
    /// The per-block f16 scales as the file stores them (bits), widened in the kernels.
    scales: Vec<u16>,
}

impl Panels {
    /// Whether weights of `wtype` can be repacked (the fast numerics cover these).
    pub fn supports(wtype: QuantType) -> bool {
        matches!(
            wtype,
            QuantType::Q4_0
                | QuantType::Q4_1
                | QuantType::Q5_0
                | QuantType::Q5_1
                | QuantType::Q8_0
                | QuantType::IQ4_NL
                | QuantType::Q4_K
                | QuantType::Q6_K
        )
    }

    /// Weights per packing unit: a block, or a K-quant's super-block.
    fn unit_elems(wtype: QuantType) -> usize {
        match wtype {
            QuantType::Q4_K | QuantType::Q6_K => SUPER_ELEMS,
            _ => BLOCK_ELEMS,
        }
    }

    fn code_bytes_per_unit(wtype: QuantType) -> usize {
        match wtype {
            QuantType::Q4_K => K_SCALE_BYTES + SUBS * NIBBLE_BYTES,
            QuantType::Q6_K => K_SCALE_BYTES + SUBS * Q6_BYTES,
            _ => kind::block_code_bytes(kind_of(wtype)),
        }
    }

    fn scales_per_unit(wtype: QuantType) -> usize {
        match wtype {
            QuantType::Q4_K => 2 * PANEL_ROWS,
            QuantType::Q6_K => PANEL_ROWS,
            _ => kind::block_scales(kind_of(wtype)),
        }
    }

    /// Repacks `n` rows of `k` weights stored as GGUF writes `wtype`. Panics if `wtype` is
    /// not supported or the length does not fit the shape.
    pub fn pack(wtype: QuantType, w: &[u8], n: usize, k: usize) -> Panels {
        assert!(Panels::supports(wtype), "{} weights have no panel layout", wtype.name());
        let unit = Panels::unit_elems(wtype);
        assert!(k.is_multiple_of(unit), "row length {k} is not a multiple of {unit}");
        let row_bytes = wtype.row_bytes(k);
        assert_eq!(w.len(), n * row_bytes, "{}: weight bytes for [{n}, {k}]", wtype.name());
        let (nu, panels) = (k / unit, n.div_ceil(PANEL_ROWS));
        let (cb, sb) = (Panels::code_bytes_per_unit(wtype), Panels::scales_per_unit(wtype));
        // Padding rows: codes 0 (Q8_0's stored as 0x80) with every scale 0.
        let pad = if wtype == QuantType::Q8_0 { 0x80 } else { 0 };
        let mut codes = vec![pad; panels * nu * cb];
        let mut scales = vec![0u16; panels * nu * sb];
        let unit_bytes = row_bytes / nu;
        for j in 0..n {
            let (p, c) = (j / PANEL_ROWS, j % PANEL_ROWS);
            for u in 0..nu {
                let blk = &w[j * row_bytes + u * unit_bytes..][..unit_bytes];
                let dst = &mut codes[(p * nu + u) * cb..][..cb];
                let s = &mut scales[(p * nu + u) * sb..][..sb];
                match wtype {
                    QuantType::Q4_K => pack_q4_k(blk, c, dst, s),
                    QuantType::Q6_K => pack_q6_k(blk, c, dst, s),
                    QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::IQ4_NL => {
                        pack_nibble_block(wtype, blk, c, dst, s)
                    }
                    _ => {
                        s[c] = f16_bits(blk, 0);
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
        self.codes.len() + 2 * self.scales.len()
    }

    fn panel(&self, p: usize) -> (&[u8], &[u16]) {
        let nu = self.k / Panels::unit_elems(self.wtype);
        let (cb, sb) = (Panels::code_bytes_per_unit(self.wtype), Panels::scales_per_unit(self.wtype));
        (&self.codes[p * nu * cb..(p + 1) * nu * cb], &self.scales[p * nu * sb..(p + 1) * nu * sb])
    }
}

/// Row `c` of a panel's block of a nibble format (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL): the
/// codes' low four bits in Q4_1's layout, for Q5_0 and Q5_1 then the fifth bits, byte `4c + i`
/// holding element `4t + i`'s at bit `t` and element `16 + 4t + i`'s at bit `4 + t`; the
/// scales `d` (and `m`).
fn pack_nibble_block(wtype: QuantType, blk: &[u8], c: usize, dst: &mut [u8], s: &mut [u16]) {
    s[c] = f16_bits(blk, 0);
    let code = |i: usize| -> u8 {
        let nibble = |qs: &[u8]| if i < 16 { qs[i] & 0x0f } else { qs[i - 16] >> 4 };
        match wtype {
            QuantType::Q4_1 => nibble(&blk[4..]),
            QuantType::Q5_0 => q5_0::code(blk, i),
            QuantType::Q5_1 => q5_0::code(&blk[2..], i),
            _ => nibble(&blk[2..]),
        }
    };
    if kind::affine(kind_of(wtype)) {
        s[PANEL_ROWS + c] = f16_bits(blk, 2);
    }
    for t in 0..4 {
        for i in 0..4 {
            let (low, high) = (code(4 * t + i), code(16 + 4 * t + i));
            dst[64 * t + 4 * c + i] = (low & 0x0f) | ((high & 0x0f) << 4);
            if kind::five_bit(kind_of(wtype)) {
                dst[NIBBLE_BYTES + 4 * c + i] |= (low >> 4) << t | (high >> 4) << (4 + t);
            }
        }
    }
}

/// Row `c` of a panel's Q4_K super-block (`dst`, `s`: the unit's codes and scales).
fn pack_q4_k(blk: &[u8], c: usize, dst: &mut [u8], s: &mut [u16]) {
    s[c] = f16_bits(blk, 0);
    s[PANEL_ROWS + c] = f16_bits(blk, 2);
    for j in 0..SUBS {
        let (sc, m) = q4_k::scale_min(&blk[4..16], j);
        dst[PANEL_ROWS * j + c] = sc;
        dst[PANEL_ROWS * (SUBS + j) + c] = m;
        let code = |i: usize| q4_k::nibble(&blk[16..], BLOCK_ELEMS * j + i);
        let cb = &mut dst[K_SCALE_BYTES + NIBBLE_BYTES * j..][..NIBBLE_BYTES];
        for t in 0..4 {
            for i in 0..4 {
                cb[64 * t + 4 * c + i] = code(4 * t + i) | (code(16 + 4 * t + i) << 4);
            }
        }
    }
}

/// Row `c` of a panel's Q6_K super-block.
fn pack_q6_k(blk: &[u8], c: usize, dst: &mut [u8], s: &mut [u16]) {
    s[c] = f16_bits(blk, q6_k::D);
    for g in 0..16 {
        dst[PANEL_ROWS * g + c] = q6_k::scale(blk, 16 * g) as i8 as u8;
    }
    for j in 0..SUBS {
        let u = |i: usize| (q6_k::code(blk, BLOCK_ELEMS * j + i) + 32) as u8;
        let cb = &mut dst[K_SCALE_BYTES + Q6_BYTES * j..][..Q6_BYTES];
        for i in 0..4 {
            for t in 0..4 {
                cb[64 * t + 4 * c + i] = (u(4 * t + i) & 0x0f) | ((u(16 + 4 * t + i) & 0x0f) << 4);
            }
            for h in 0..2 {
                cb[NIBBLE_BYTES + 64 * h + 4 * c + i] = (0..4).fold(0, |bits, t| bits | ((u(16 * h + 4 * t + i) >> 4) << (2 * t)));
            }
        }
    }
}

/// Per activation row and group of `group` bytes, `−times·Σa`: the correction for weight codes
/// stored with an offset (Q8_0's +128 over 32 bytes, Q6_K's +32 over 16), negated so the
/// SIMD kernels start their integer sums from it. A plain loop: the iterator chain it replaced
/// (`flat_map` + `collect`) was 3.8 % of a 16-stream SmolLM2 Q4_K_M step.
fn group_sums(acts: &Q8Activations, group: usize, times: i32) -> Vec<i32> {
    let mut sums = Vec::with_capacity(acts.rows() * acts.k() / group);
    for r in 0..acts.rows() {
        for q in acts.row(r).qs.chunks_exact(group) {
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            sums.push(-times * sum);
        }
    }
    sums
}

/// Per activation row and group of sixteen bytes, Q6_K's code offset for the AVX2 one-row tile
/// as two i16 in one i32: `32·Σ(a[4q] + a[4q + 1])` over the group's four runs of four bytes in
/// the low half, `32·Σ(a[4q + 2] + a[4q + 3])` in the high half — the lanes of the group's
/// `vpmaddubsw` pair sums of `32·a` (each ≤ 32·8·127 = 32,512, so exact in i16). The tile
/// multiplies the unsigned codes `u = q + 32` and subtracts this once per group, instead of
/// moving each code's sign onto the activations (`vpsignb` + `vpabsb` + the bias per code
/// vector).
fn q6_k_pair_sums(acts: &Q8Activations) -> Vec<i32> {
    let mut sums = Vec::with_capacity(acts.rows() * acts.k() / 16);
    for r in 0..acts.rows() {
        for q in acts.row(r).qs.chunks_exact(16) {
            let (mut even, mut odd) = (0i32, 0i32);
            for run in q.chunks_exact(4) {
                even += run[0] as i32 + run[1] as i32;
                odd += run[2] as i32 + run[3] as i32;
            }
            sums.push(((32 * even) as u16 as u32 | ((32 * odd) as u16 as u32) << 16) as i32);
        }
    }
    sums
}

/// `y[m, n] = acts · Wᵀ` in the fast order (module docs), `acts` quantised from the
/// `[m, k]` input. Row `i` of `y` depends only on row `i` of the input, bit for bit.
pub fn panel_matmul(isa: QuantLevel, w: &Panels, acts: &Q8Activations, y: &mut [f32]) {
    panel_matmuls(isa, &mut [(w, y)], acts);
}

/// [`panel_matmul`] for several weight matrices that read the same activations (a layer's Q, K
/// and V; its gate and up), in one parallel region: their panels are split over the threads
/// together, by weight bytes, instead of one region (and one wait for the slower thread) per
/// matrix — a 16-stream decode step had 361 such regions. Every output is computed exactly as
/// [`panel_matmul`] computes it.
pub fn panel_matmuls(isa: QuantLevel, outputs: &mut [(&Panels, &mut [f32])], acts: &Q8Activations) {
    assert!(isa.is_supported(), "ISA level {} is not supported by this CPU", isa.as_str());
    let m = acts.rows();
    for (w, y) in outputs.iter() {
        assert_eq!(acts.k(), w.k, "activation width");
        assert_eq!(y.len(), m * w.n, "output length for [{m}, {}]", w.n);
    }
    if m == 0 {
        return;
    }
    // The offsets of codes stored unsigned for `vpdpbusd` (negated): 128·Σa per (row, block) for Q8_0
    // (the AVX2 kernel uses signed codes) and IQ4_NL on AVX-512, 32·Σa per (row, 16 bytes)
    // for Q6_K on AVX-512, and Q4_0's 8·Σa and Q5_0's 16·Σa per block on both SIMD levels
    // (their codes 0..32 stay unsigned there; the portable code subtracts 8 or 16 per weight).
    let simd = isa != QuantLevel::Portable;
    let offsets_for = |wtype: QuantType| match wtype {
        QuantType::Q8_0 if isa != QuantLevel::Avx2 => group_sums(acts, BLOCK_ELEMS, 128),
        QuantType::IQ4_NL if isa == QuantLevel::Avx512 => group_sums(acts, BLOCK_ELEMS, 128),
        QuantType::Q6_K if isa == QuantLevel::Avx512 => group_sums(acts, 16, 32),
        QuantType::Q6_K if isa == QuantLevel::Avx2 => q6_k_pair_sums(acts),
        QuantType::Q4_0 if simd => group_sums(acts, BLOCK_ELEMS, 8),
        QuantType::Q5_0 if simd => group_sums(acts, BLOCK_ELEMS, 16),
        _ => Vec::new(),
    };
    let mut offsets: Vec<(QuantType, Vec<i32>)> = Vec::new();
    for (w, _) in outputs.iter() {
        if !offsets.iter().any(|(t, _)| *t == w.wtype) {
            offsets.push((w.wtype, offsets_for(w.wtype)));
        }
    }
    let jobs: Vec<(&Panels, PanelOut, &[i32])> = outputs
        .iter_mut()
        .map(|(w, y)| {
            let offsets = &offsets.iter().find(|(t, _)| *t == w.wtype).unwrap().1;
            (&**w, PanelOut { ptr: y.as_mut_ptr(), m, n: w.n }, offsets.as_slice())
        })
        .collect();
    // Work in weight bytes × activation rows, as `matmul::for_column_chunks` counts it: a few
    // chunks per thread once a chunk is worth more than waking a worker. Chunk `c` takes the
    // bytes `c·total/chunks..(c + 1)·total/chunks` of the matrices' panels laid end to end,
    // rounded to whole panels.
    let panel_bytes: Vec<usize> = jobs.iter().map(|(w, ..)| w.codes.len() / w.n.div_ceil(PANEL_ROWS).max(1)).collect();
    let total: usize = jobs.iter().map(|(w, ..)| w.codes.len()).sum();
    let total_panels: usize = jobs.iter().map(|(w, ..)| w.n.div_ceil(PANEL_ROWS)).sum();
    let threads = rayon::current_num_threads();
    let chunks = (total * m / (64 * 1024)).clamp(1, 4 * threads).min(total_panels.max(1));
    let chunks = if chunks < threads { chunks } else { chunks - chunks % threads };
    // The panel index (in the end-to-end order) at which byte `at` falls, rounded to the nearest
    // panel boundary.
    let boundary = |at: usize| {
        let (mut before, mut panels) = (0, 0);
        for ((w, ..), &pb) in jobs.iter().zip(&panel_bytes) {
            let len = w.codes.len();
            if at < before + len {
                return panels + ((at - before) + pb / 2) / pb.max(1);
            }
            before += len;
            panels += w.n.div_ceil(PANEL_ROWS);
        }
        panels
    };
    let run = |c: usize| {
        let (start, end) = (boundary(c * total / chunks), boundary((c + 1) * total / chunks));
        let mut first = 0;
        for (w, out, offsets) in &jobs {
            let panels = w.n.div_ceil(PANEL_ROWS);
            let range = start.max(first) - first..end.min(first + panels).max(first) - first;
            first += panels;
            if range.is_empty() {
                continue;
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the AVX-512 level was checked above; this call owns panels `range`.
                QuantLevel::Avx512 => unsafe { avx512::panels(w, acts, offsets, range, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the AVX2 level was checked above; this call owns panels `range`.
                QuantLevel::Avx2 => unsafe { avx2::panels(w, acts, offsets, range, out) },
                _ => portable_panels(w, acts, offsets, range, out),
            }
        }
    };
    if chunks == 1 {
        run(0);
    } else {
        (0..chunks).into_par_iter().for_each(run);
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
        if self.n - j0 >= PANEL_ROWS {
            // A whole panel: a fixed-size copy the compiler inlines (the variable-length one
            // below is a memmove call, 1.8 % of a 16-stream step).
            self.ptr.add(r * self.n + j0).cast::<[f32; PANEL_ROWS]>().write_unaligned(*v);
        } else {
            std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(r * self.n + j0), self.n - j0);
        }
    }
}

/// The reference order, scalar: per output, per block, `dd = d_w·d_x` (f32),
/// `acc = fma(dd, Σq·a, acc)`, and for Q4_1 `mins = fma(m, s, mins)`; the result `acc + mins`
/// (the K-quants' orders in the module docs).
fn portable_panels(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
    let nb = w.k / BLOCK_ELEMS;
    for p in range {
        let (codes, scales) = w.panel(p);
        for r in 0..acts.rows() {
            let a = acts.row(r);
            let y = match w.wtype {
                QuantType::Q4_K => portable_q4_k(codes, scales, a),
                QuantType::Q6_K => portable_q6_k(codes, scales, a),
                QuantType::Q8_0 => portable_q8_0(codes, scales, a, &offsets[r * nb..(r + 1) * nb]),
                wtype => portable_nibble_blocks(kind_of(wtype), codes, scales, a),
            };
            // SAFETY: this call owns panel p (see `panel_matmul`).
            unsafe { out.set_panel(r, p, &y) };
        }
    }
}

/// Σ code·a of row `c` in a 32-weight block of nibbles in Q4_1's panel layout (`cb`, 256 bytes).
fn nibble_dot(cb: &[u8], c: usize, aq: &[i8]) -> i32 {
    (0..4)
        .map(|t| {
            let bytes = &cb[t * 64 + 4 * c..][..4];
            (0..4)
                .map(|i| (bytes[i] & 0x0f) as i32 * aq[4 * t + i] as i32 + (bytes[i] >> 4) as i32 * aq[16 + 4 * t + i] as i32)
                .sum::<i32>()
        })
        .sum()
}

/// The nibble formats (`kind::nibbles`): per block `acc = fma(d·d_x, Σw·a, acc)` with `w` the
/// signed weight code (`q − 8`, `q − 16`, IQ4_NL's table value, or Q4_1's and Q5_1's `q`), and
/// for the affine ones `mins = fma(m, s, mins)`; the result `acc + mins`, else `acc`.
fn portable_nibble_blocks(kind: u8, codes: &[u8], scales: &[u16], a: ActRow<'_>) -> [f32; PANEL_ROWS] {
    let mut acc = [0f32; PANEL_ROWS];
    let mut mins = [0f32; PANEL_ROWS];
    let blocks = codes.chunks_exact(kind::block_code_bytes(kind)).zip(scales.chunks_exact(kind::block_scales(kind)));
    for (b, (cb, s)) in blocks.enumerate() {
        let aq = &a.qs[b * BLOCK_ELEMS..][..BLOCK_ELEMS];
        let dx = a.scales[b][0];
        for c in 0..PANEL_ROWS {
            let weight = |e: usize| {
                let (t, i) = (e % 16 / 4, e % 4);
                let byte = cb[64 * t + 4 * c + i];
                let mut q = if e < 16 { byte & 0x0f } else { byte >> 4 };
                if kind::five_bit(kind) {
                    let bit = if e < 16 { t } else { 4 + t };
                    q |= ((cb[NIBBLE_BYTES + 4 * c + i] >> bit) & 1) << 4;
                }
                match kind {
                    kind::Q4_0 => q as i32 - 8,
                    kind::Q5_0 => q as i32 - 16,
                    kind::IQ4_NL => iq4_nl::VALUES[q as usize] as i32,
                    _ => q as i32,
                }
            };
            let sumi: i32 = (0..BLOCK_ELEMS).map(|e| weight(e) * aq[e] as i32).sum();
            acc[c] = (f16_to_f32(s[c]) * dx).mul_add(sumi as f32, acc[c]);
            if kind::affine(kind) {
                mins[c] = f16_to_f32(s[PANEL_ROWS + c]).mul_add(a.q81_sums[b], mins[c]);
            }
        }
    }
    if kind::affine(kind) {
        core::array::from_fn(|c| acc[c] + mins[c])
    } else {
        acc
    }
}

/// `offsets`: the row's −128·Σa per block.
fn portable_q8_0(codes: &[u8], scales: &[u16], a: ActRow<'_>, offsets: &[i32]) -> [f32; PANEL_ROWS] {
    let mut acc = [0f32; PANEL_ROWS];
    for (b, (cb, s)) in codes.chunks_exact(PANEL_ROWS * 32).zip(scales.chunks_exact(PANEL_ROWS)).enumerate() {
        let aq = &a.qs[b * BLOCK_ELEMS..][..BLOCK_ELEMS];
        let dx = a.scales[b][0];
        for c in 0..PANEL_ROWS {
            let sumi =
                (0..8).map(|g| (0..4).map(|i| cb[g * 64 + 4 * c + i] as i32 * aq[4 * g + i] as i32).sum::<i32>()).sum::<i32>() + offsets[b];
            acc[c] = (f16_to_f32(s[c]) * dx).mul_add(sumi as f32, acc[c]);
        }
    }
    acc
}

/// Per sub-block `acc = fma((d·sc)·d_x, Σq·a, acc)`, `mins = fma(dmin·m, d_x·Σa, mins)`;
/// the result `acc − mins`.
fn portable_q4_k(codes: &[u8], scales: &[u16], a: ActRow<'_>) -> [f32; PANEL_ROWS] {
    let mut acc = [0f32; PANEL_ROWS];
    let mut mins = [0f32; PANEL_ROWS];
    let unit_bytes = K_SCALE_BYTES + SUBS * NIBBLE_BYTES;
    for (u, (unit, s)) in codes.chunks_exact(unit_bytes).zip(scales.chunks_exact(2 * PANEL_ROWS)).enumerate() {
        for j in 0..SUBS {
            let b = SUBS * u + j;
            let aq = &a.qs[b * BLOCK_ELEMS..][..BLOCK_ELEMS];
            let [dx, dx_sum] = a.scales[b];
            let cb = &unit[K_SCALE_BYTES + NIBBLE_BYTES * j..][..NIBBLE_BYTES];
            for c in 0..PANEL_ROWS {
                let sumi = nibble_dot(cb, c, aq);
                let dw = f16_to_f32(s[c]) * unit[PANEL_ROWS * j + c] as f32;
                let mw = f16_to_f32(s[PANEL_ROWS + c]) * unit[PANEL_ROWS * (SUBS + j) + c] as f32;
                acc[c] = (dw * dx).mul_add(sumi as f32, acc[c]);
                mins[c] = mw.mul_add(dx_sum, mins[c]);
            }
        }
    }
    core::array::from_fn(|c| acc[c] - mins[c])
}

/// Per sub-block `acc = fma(d·d_x, s₀·Σq·a + s₁·Σq·a, acc)` over its two groups of 16.
fn portable_q6_k(codes: &[u8], scales: &[u16], a: ActRow<'_>) -> [f32; PANEL_ROWS] {
    let mut acc = [0f32; PANEL_ROWS];
    let unit_bytes = K_SCALE_BYTES + SUBS * Q6_BYTES;
    for (u, (unit, s)) in codes.chunks_exact(unit_bytes).zip(scales.chunks_exact(PANEL_ROWS)).enumerate() {
        for j in 0..SUBS {
            let b = SUBS * u + j;
            let aq = &a.qs[b * BLOCK_ELEMS..][..BLOCK_ELEMS];
            let dx = a.scales[b][0];
            let cb = &unit[K_SCALE_BYTES + Q6_BYTES * j..][..Q6_BYTES];
            for c in 0..PANEL_ROWS {
                let code = |e: usize| {
                    let (h, t, i) = (e / 16, e % 16 / 4, e % 4);
                    let low = (cb[64 * t + 4 * c + i] >> (4 * h)) & 0x0f;
                    let high = (cb[NIBBLE_BYTES + 64 * h + 4 * c + i] >> (2 * t)) & 3;
                    (low | (high << 4)) as i32 - 32
                };
                let group = |h: usize| {
                    let dot: i32 = (16 * h..16 * h + 16).map(|e| code(e) * aq[e] as i32).sum();
                    unit[PANEL_ROWS * (2 * j + h) + c] as i8 as i32 * dot
                };
                acc[c] = (f16_to_f32(s[c]) * dx).mul_add((group(0) + group(1)) as f32, acc[c]);
            }
        }
    }
    acc
}

/// The order of [`portable_panels`] with sixteen weight rows per register: per block, the
/// panel's codes are loaded (and unpacked) once for a tile of up to eight activation rows (four
/// for Q4_1 and Q5_1, which keep a second f32 chain per row; Q4_K runs its second chains in a
/// pass of their own per super-block and so takes eight), and each activation row takes
/// eight `vpdpbusd` against broadcast groups of four of its bytes (one chain starting from the
/// code offset's correction when the tile has four or more rows, else two chains of four and an
/// add: integer sums, so any order is exact), one convert, one multiply (`d·d_x`) and one fma
/// (plus the `m·s` fma for Q4_1).
/// The K-quants add per sub-block, once per tile, the widening of their integer scales (Q4_K:
/// `d·sc` and `dmin·m`, two multiplies; Q6_K: the i8 scales, applied per activation row with
/// two `vpmulld` on the two 16-weight dots).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Bytes ahead of the current block to prefetch (as the row kernels do).
    const PREFETCH_AHEAD: usize = 2048;

    /// Sixteen f16 scales widened to f32 (`vcvtph2ps`, exact: the bits of [`f16_to_f32`]).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn widen16(at: *const u16) -> __m512 {
        // SAFETY (caller): `at` points at 16 readable scales.
        _mm512_cvtph_ps(_mm256_loadu_si256(at.cast()))
    }

    /// # Safety
    /// Needs the AVX-512 level (F/BW/VL/VNNI); the caller owns panels `range` of `out`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn panels(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
        match kind_of(w.wtype) {
            kind::Q4_1 => panels_of::<{ kind::Q4_1 }>(w, acts, offsets, range, out),
            kind::Q8_0 => panels_of::<{ kind::Q8_0 }>(w, acts, offsets, range, out),
            kind::Q4_K => panels_of::<{ kind::Q4_K }>(w, acts, offsets, range, out),
            kind::Q6_K => panels_of::<{ kind::Q6_K }>(w, acts, offsets, range, out),
            kind::Q4_0 => panels_of::<{ kind::Q4_0 }>(w, acts, offsets, range, out),
            kind::Q5_0 => panels_of::<{ kind::Q5_0 }>(w, acts, offsets, range, out),
            kind::Q5_1 => panels_of::<{ kind::Q5_1 }>(w, acts, offsets, range, out),
            _ => panels_of::<{ kind::IQ4_NL }>(w, acts, offsets, range, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn panels_of<const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
        let m = acts.rows();
        // Eight activation rows per tile where the registers allow it (eight code vectors and
        // eight accumulators); the affine kinds keep a second chain per row, so four (Q4_K
        // takes eight: its mins chains run in a pass of their own, see `tile_q4_k`).
        let wide = !matches!(KIND, kind::Q4_1 | kind::Q5_1);
        for p in range {
            let mut r = 0;
            while wide && m - r >= 8 {
                tile_of::<8, KIND>(w, acts, offsets, p, r, out);
                r += 8;
            }
            while m - r >= 4 {
                tile_of::<4, KIND>(w, acts, offsets, p, r, out);
                r += 4;
            }
            if m - r >= 2 {
                tile_of::<2, KIND>(w, acts, offsets, p, r, out);
                r += 2;
            }
            if m - r == 1 {
                tile_of::<1, KIND>(w, acts, offsets, p, r, out);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_of<const R: usize, const KIND: u8>(
        w: &Panels,
        acts: &Q8Activations,
        offsets: &[i32],
        p: usize,
        r0: usize,
        out: &PanelOut,
    ) {
        match KIND {
            kind::Q4_K => tile_q4_k::<R>(w, acts, p, r0, out),
            kind::Q6_K => tile_q6_k::<R>(w, acts, offsets, p, r0, out),
            _ => tile::<R, KIND>(w, acts, offsets, p, r0, out),
        }
    }

    /// The integer dots of one 32-byte activation block (`a`) with eight code vectors, groups
    /// `0..4` and `4..8` summed apart (the two 16-weight halves), starting from `lo0` and `hi0`
    /// (a code offset's correction, or zero).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dots(v: &[__m512i; 8], a: *const i32, lo0: __m512i, hi0: __m512i) -> (__m512i, __m512i) {
        // SAFETY (caller): `a` points at 32 readable bytes.
        let group = |g: usize| _mm512_set1_epi32(a.add(g).read_unaligned());
        let mut lo = _mm512_dpbusd_epi32(lo0, v[0], group(0));
        let mut hi = _mm512_dpbusd_epi32(hi0, v[4], group(4));
        for g in 1..4 {
            lo = _mm512_dpbusd_epi32(lo, v[g], group(g));
            hi = _mm512_dpbusd_epi32(hi, v[g + 4], group(g + 4));
        }
        (lo, hi)
    }

    /// The whole block's integer dot in one chain from `init`: with four or more activation
    /// rows in a tile there are as many independent chains, enough to hide `vpdpbusd`'s
    /// latency, and the add joining two halves is saved (integer sums: the same value).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot_chain(v: &[__m512i; 8], a: *const i32, init: __m512i) -> __m512i {
        // SAFETY (caller): `a` points at 32 readable bytes.
        let mut sum = init;
        for (g, vg) in v.iter().enumerate() {
            sum = _mm512_dpbusd_epi32(sum, *vg, _mm512_set1_epi32(a.add(g).read_unaligned()));
        }
        sum
    }

    /// The eight code vectors of a 32-weight block of nibbles in Q4_1's panel layout.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn nibbles(cb: *const u8) -> [__m512i; 8] {
        let mask = _mm512_set1_epi8(0x0f);
        let mut v = [_mm512_setzero_si512(); 8];
        for t in 0..4 {
            // SAFETY (caller): `cb` points at 256 readable bytes.
            let x = _mm512_loadu_si512(cb.add(64 * t).cast());
            v[t] = _mm512_and_si512(x, mask);
            v[t + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
        }
        v
    }

    /// The fifth bits of a Q5_0 / Q5_1 block (`hp`, 64 bytes: the panel's bit plane) or'ed
    /// into bit 4 of the eight nibble vectors.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn add_fifth_bits(v: &mut [__m512i; 8], hp: *const u8) {
        // a | (b & c)
        const OR_AND: i32 = 0xF8;
        let bit4 = _mm512_set1_epi8(0x10);
        // SAFETY (caller): `hp` points at 64 readable bytes.
        let h = _mm512_loadu_si512(hp.cast());
        // Bit t (element 4t + i) and bit 4 + t (element 16 + 4t + i) to bit 4; the 16-bit
        // shifts carry bits across bytes only into positions the mask drops.
        let low = [_mm512_slli_epi16::<4>(h), _mm512_slli_epi16::<3>(h), _mm512_slli_epi16::<2>(h), _mm512_slli_epi16::<1>(h)];
        let high = [h, _mm512_srli_epi16::<1>(h), _mm512_srli_epi16::<2>(h), _mm512_srli_epi16::<3>(h)];
        for t in 0..4 {
            v[t] = _mm512_ternarylogic_epi32::<OR_AND>(v[t], low[t], bit4);
            v[t + 4] = _mm512_ternarylogic_epi32::<OR_AND>(v[t + 4], high[t], bit4);
        }
    }

    /// Panel `p` of a block format (Q8_0 or a nibble format) against activation rows
    /// `r0..r0 + R`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let (code_bytes, scale_count) = (kind::block_code_bytes(KIND), kind::block_scales(KIND));
        let affine = kind::affine(KIND);
        let offset = matches!(KIND, kind::Q8_0 | kind::Q4_0 | kind::Q5_0 | kind::IQ4_NL);
        let rows: [ActRow<'_>; R] = core::array::from_fn(|i| acts.row(r0 + i));
        let (codes, scales) = w.panel(p);
        let (cp, sp) = (codes.as_ptr(), scales.as_ptr());
        let table = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_NL_UNSIGNED.as_ptr().cast()));
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: block b of the panel is `code_bytes` code bytes and `scale_count` scales
            // (layout in the module docs); prefetches may point past the end.
            let cb = cp.add(b * code_bytes);
            for line in 0..code_bytes / 64 {
                _mm_prefetch::<_MM_HINT_T0>(cb.wrapping_add(PREFETCH_AHEAD + 64 * line).cast());
            }
            // The scales are a second stream (32 or 64 bytes a block): as far ahead.
            let ahead = sp.wrapping_add((b + PREFETCH_AHEAD / code_bytes) * scale_count);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            if affine {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
            }
            // The eight code vectors of this block: groups 0..8 of four codes per row.
            let mut v = [_mm512_setzero_si512(); 8];
            if KIND == kind::Q8_0 {
                for (g, vg) in v.iter_mut().enumerate() {
                    *vg = _mm512_loadu_si512(cb.add(64 * g).cast());
                }
            } else {
                v = nibbles(cb);
                if kind::five_bit(KIND) {
                    add_fifth_bits(&mut v, cb.add(NIBBLE_BYTES));
                }
                if KIND == kind::IQ4_NL {
                    v = v.map(|x| _mm512_shuffle_epi8(table, x));
                }
            }
            let dw = widen16(sp.add(b * scale_count));
            let mw = if affine { widen16(sp.add(b * scale_count + PANEL_ROWS)) } else { _mm512_setzero_ps() };
            for i in 0..R {
                // SAFETY: the activation row holds nb > b blocks of 32 bytes.
                let a = rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast();
                // The sum starts from the (negated) offset correction.
                let init = if offset { _mm512_set1_epi32(*offsets.get_unchecked((r0 + i) * nb + b)) } else { _mm512_setzero_si512() };
                let sumi = if R >= 4 {
                    dot_chain(&v, a, init)
                } else {
                    let (lo, hi) = dots(&v, a, init, _mm512_setzero_si512());
                    _mm512_add_epi32(lo, hi)
                };
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(rows[i].scales.get_unchecked(b)[0]));
                acc[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi), acc[i]);
                if affine {
                    mins[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*rows[i].q81_sums.get_unchecked(b)), mins[i]);
                }
            }
        }
        for i in 0..R {
            let mut y = [0f32; PANEL_ROWS];
            _mm512_storeu_ps(y.as_mut_ptr(), if affine { _mm512_add_ps(acc[i], mins[i]) } else { acc[i] });
            // SAFETY: the caller owns panel p.
            out.set_panel(r0 + i, p, &y);
        }
    }

    /// Q4_K panel `p` against activation rows `r0..r0 + R`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_q4_k<const R: usize>(w: &Panels, acts: &Q8Activations, p: usize, r0: usize, out: &PanelOut) {
        let nsb = w.k / SUPER_ELEMS;
        let rows: [ActRow<'_>; R] = core::array::from_fn(|i| acts.row(r0 + i));
        let (codes, scales) = w.panel(p);
        let (cp, sp) = (codes.as_ptr(), scales.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins = [_mm512_setzero_ps(); R];
        // Fewer rows keep the mins fma next to the dot (the same bits either way).
        let split_mins = R >= 8;
        for s in 0..nsb {
            // SAFETY: super-block s of the panel is K_SCALE_BYTES + 8·256 code bytes and 32
            // scales (layout in the module docs); activation rows hold 8·nsb blocks.
            let unit = cp.add(s * (K_SCALE_BYTES + SUBS * NIBBLE_BYTES));
            let (d, dmin) = (widen16(sp.add(32 * s)), widen16(sp.add(32 * s + 16)));
            // The next super-block's scales (a second stream, 64 bytes per 2,304 of codes).
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(32 * (s + 1)).cast());
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(32 * (s + 1) + 16).cast());
            let byte_lanes = |at: usize| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(unit.add(at).cast())));
            // Sub-block j's `mins = fma(dmin·m, d_x·Σa, mins)` for every row of the tile.
            let add_mins = |j: usize, mins: &mut [__m512; R]| {
                let mw = _mm512_mul_ps(dmin, byte_lanes(PANEL_ROWS * (SUBS + j)));
                for i in 0..R {
                    let dx_sum = rows[i].scales.get_unchecked(SUBS * s + j)[1];
                    mins[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dx_sum), mins[i]);
                }
            };
            for j in 0..SUBS {
                let b = SUBS * s + j;
                let cb = unit.add(K_SCALE_BYTES + NIBBLE_BYTES * j);
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(cb.add(PREFETCH_AHEAD + 64 * line).cast());
                }
                let v = nibbles(cb);
                let dw = _mm512_mul_ps(d, byte_lanes(PANEL_ROWS * j));
                for i in 0..R {
                    let a = rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast();
                    let zero = _mm512_setzero_si512();
                    let sumi = if R >= 4 {
                        dot_chain(&v, a, zero)
                    } else {
                        let (lo, hi) = dots(&v, a, zero, zero);
                        _mm512_add_epi32(lo, hi)
                    };
                    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(rows[i].scales.get_unchecked(b)[0]));
                    acc[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi), acc[i]);
                }
                if !split_mins {
                    add_mins(j, &mut mins);
                }
            }
            // With eight rows the mins chains take their own pass over the super-block (the
            // same fmas in the same order per row, so the same bits): the dot loop above then
            // holds one chain per row, and eight rows' chains, the eight code vectors and the
            // scales fit the 32 registers.
            if split_mins {
                for j in 0..SUBS {
                    add_mins(j, &mut mins);
                }
            }
        }
        for i in 0..R {
            let mut y = [0f32; PANEL_ROWS];
            _mm512_storeu_ps(y.as_mut_ptr(), _mm512_sub_ps(acc[i], mins[i]));
            // SAFETY: the caller owns panel p.
            out.set_panel(r0 + i, p, &y);
        }
    }

    /// Q6_K panel `p` against activation rows `r0..r0 + R`: codes unpacked to `q + 32` (0..64,
    /// unsigned for `vpdpbusd`), the offsets' 32·Σa taken off per 16-weight half.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_q6_k<const R: usize>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let (nb, nsb) = (w.k / BLOCK_ELEMS, w.k / SUPER_ELEMS);
        let rows: [ActRow<'_>; R] = core::array::from_fn(|i| acts.row(r0 + i));
        let (codes, scales) = w.panel(p);
        let (cp, sp) = (codes.as_ptr(), scales.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        let (low4, high2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        // (A & C) | B for A = low bits, B = top bits in place, C = the low-nibble mask.
        const SELECT: i32 = 0xEC;
        for s in 0..nsb {
            // SAFETY: super-block s of the panel is K_SCALE_BYTES + 8·384 code bytes and 16
            // scales; activation rows hold 8·nsb blocks and `offsets` 2 halves per block.
            let unit = cp.add(s * (K_SCALE_BYTES + SUBS * Q6_BYTES));
            let d = widen16(sp.add(16 * s));
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(16 * (s + 1)).cast());
            for j in 0..SUBS {
                let b = SUBS * s + j;
                let cb = unit.add(K_SCALE_BYTES + Q6_BYTES * j);
                for line in 0..6 {
                    _mm_prefetch::<_MM_HINT_T0>(cb.add(PREFETCH_AHEAD + 64 * line).cast());
                }
                let h = [_mm512_loadu_si512(cb.add(NIBBLE_BYTES).cast()), _mm512_loadu_si512(cb.add(NIBBLE_BYTES + 64).cast())];
                let mut v = [_mm512_setzero_si512(); 8];
                for t in 0..4 {
                    // Bits 2t..2t + 2 of each byte to bits 4..6 (16-bit shifts: the mask drops
                    // what crosses from the neighbouring byte).
                    let top = |x: __m512i| {
                        let moved = match t {
                            0 => _mm512_slli_epi16::<4>(x),
                            1 => _mm512_slli_epi16::<2>(x),
                            2 => x,
                            _ => _mm512_srli_epi16::<2>(x),
                        };
                        _mm512_and_si512(moved, high2)
                    };
                    let x = _mm512_loadu_si512(cb.add(64 * t).cast());
                    v[t] = _mm512_ternarylogic_epi32::<SELECT>(x, top(h[0]), low4);
                    v[t + 4] = _mm512_ternarylogic_epi32::<SELECT>(_mm512_srli_epi16::<4>(x), top(h[1]), low4);
                }
                let group_scales = |g: usize| _mm512_cvtepi8_epi32(_mm_loadu_si128(unit.add(PANEL_ROWS * g).cast()));
                let (s0, s1) = (group_scales(2 * j), group_scales(2 * j + 1));
                for i in 0..R {
                    // Each half's dot starts from its (negated) offset correction.
                    let off = offsets.as_ptr().add(((r0 + i) * nb + b) * 2);
                    let (lo, hi) =
                        dots(&v, rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast(), _mm512_set1_epi32(*off), _mm512_set1_epi32(*off.add(1)));
                    let sumi = _mm512_add_epi32(_mm512_mullo_epi32(lo, s0), _mm512_mullo_epi32(hi, s1));
                    let dd = _mm512_mul_ps(d, _mm512_set1_ps(rows[i].scales.get_unchecked(b)[0]));
                    acc[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi), acc[i]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let mut y = [0f32; PANEL_ROWS];
            _mm512_storeu_ps(y.as_mut_ptr(), *acc_i);
            // SAFETY: the caller owns panel p.
            out.set_panel(r0 + i, p, &y);
        }
    }
}

/// The same order on AVX2: a panel as two halves of eight rows (one 256-bit register of i32 or
/// f32 lanes each), `vpmaddubsw` + `vpmaddwd` for the integer dot of a group of four codes.
/// `vpmaddubsw` gives i16 pairs and `vpmaddwd` widens them; the widening is the scarcer
/// multiply (Zen 1 runs both on one 128-bit pipe), so where the pairs cannot overflow it is
/// done once per run of groups: |a| ≤ 127, so a pair of codes 0..15 is at most 3,810 and eight
/// groups' pairs sum to ≤ 30,480 in i16 (Q4_0, Q4_1, Q4_K: one `vpmaddwd` per block instead of
/// eight); codes 0..31 (Q5_0, Q5_1) sum four groups (≤ 31,496), Q6_K's |q| ≤ 32 four groups of
/// one scale (≤ 32,512). The integer dot is the same, so are the bits.
///
/// `vpmaddubsw` saturates at i16, so Q8_0 does not use the +128 codes (up to 255·127·2) but
/// their signed value with the sign moved onto the activation, |w|·(±a) ≤ 128·127·2 < 2¹⁵;
/// both give the exact integer dot, hence the portable bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Bytes ahead of the current sub-block the one-row K-quant tiles prefetch (as the AVX-512
    /// tiles do): at m = 1 they stream the weights once, and with the prefetch they ran ≈ 1.2×
    /// faster on a loaded Zen 1 than with the hardware prefetcher alone (bench/NOTES.md, "The
    /// 1B one-sequence decode on Zen 1"). A prefetch past the end is dropped, never faults.
    const PREFETCH_AHEAD: usize = 2048;

    /// # Safety
    /// Needs AVX2 + FMA; the caller owns panels `range` of `out`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn panels(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
        match kind_of(w.wtype) {
            kind::Q4_1 => panels_of::<{ kind::Q4_1 }>(w, acts, offsets, range, out),
            kind::Q8_0 => panels_of::<{ kind::Q8_0 }>(w, acts, offsets, range, out),
            kind::Q4_K => panels_of::<{ kind::Q4_K }>(w, acts, offsets, range, out),
            kind::Q6_K => panels_of::<{ kind::Q6_K }>(w, acts, offsets, range, out),
            kind::Q4_0 => panels_of::<{ kind::Q4_0 }>(w, acts, offsets, range, out),
            kind::Q5_0 => panels_of::<{ kind::Q5_0 }>(w, acts, offsets, range, out),
            kind::Q5_1 => panels_of::<{ kind::Q5_1 }>(w, acts, offsets, range, out),
            _ => panels_of::<{ kind::IQ4_NL }>(w, acts, offsets, range, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panels_of<const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], range: Range<usize>, out: &PanelOut) {
        let m = acts.rows();
        // Tiles of four activation rows, each code vector unpacked once for all of them
        // (`tile_rows`, `tile_q4_k_rows`, `tile_q6_k_rows`, `tile_signed_rows`).
        for p in range {
            let mut r = 0;
            while m - r >= 4 {
                tile_of::<4, KIND>(w, acts, offsets, p, r, out);
                r += 4;
            }
            match m - r {
                3 => tile_of::<3, KIND>(w, acts, offsets, p, r, out),
                2 => tile_of::<2, KIND>(w, acts, offsets, p, r, out),
                1 => tile_of::<1, KIND>(w, acts, offsets, p, r, out),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_of<const R: usize, const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        match KIND {
            // The both-halves tiles only for one activation row: at R = 2 LLVM spilled their
            // `[[__m256i; 2]; 2]` sums and accumulators (42 YMM stack moves per block;
            // bench/NOTES.md, "The AVX2 chat step on Zen 1"). Two to four rows take the
            // half-at-a-time tiles that unpack each code vector once for all rows ("The AVX2
            // tiles at m ≥ 2 on Zen 1").
            kind::Q4_K if R == 1 => tile_q4_k_wide::<R>(w, acts, p, r0, out),
            kind::Q4_K => tile_q4_k_rows::<R>(w, acts, p, r0, out),
            kind::Q6_K if R == 1 => tile_q6_k_wide(w, acts, offsets, p, r0, out),
            kind::Q6_K => tile_q6_k_rows::<R>(w, acts, offsets, p, r0, out),
            kind::Q4_1 | kind::Q4_0 if R == 1 => tile_wide::<R, KIND>(w, acts, offsets, p, r0, out),
            // One row of Q5 codes keeps the tile it had before the four-row tiles (whose m = 1
            // speed was not measured; a quiet c=1 run read SmolLM2 Q4_K_M, mostly Q5_0, 0–6 %
            // slower through them). Same bits either way.
            kind::Q5_1 | kind::Q5_0 if R == 1 => tile::<R, KIND>(w, acts, offsets, p, r0, out),
            kind::Q4_1 | kind::Q4_0 | kind::Q5_1 | kind::Q5_0 => tile_rows::<R, KIND>(w, acts, offsets, p, r0, out),
            kind::Q8_0 | kind::IQ4_NL if R > 1 => tile_signed_rows::<R, KIND>(w, acts, p, r0, out),
            _ => tile::<R, KIND>(w, acts, offsets, p, r0, out),
        }
    }

    /// Σ code·a in i16 for both halves of one 32-weight block of nibbles (Q4_1's layout, `cb`)
    /// against activation rows `a`: the sixteen rows' pairs, `[row][half]`, each half's eight
    /// groups summed in i16 (|sum| ≤ 8·2·15·127 = 30,480, exact in any order).
    ///
    /// Why both halves at once (bench/NOTES.md, "The AVX2 chat step on Zen 1"): each group's
    /// activation broadcast then serves sixteen weight rows instead of eight (the old
    /// half-at-a-time tile broadcast every activation group twice per block, ≈ a fifth of its
    /// instructions), each unpacked nibble vector is used at once instead of eight being held,
    /// and each block's bytes are read once, in order. Used for one activation row (m = 1 and
    /// a batch's odd row): with two, LLVM spills (see `tile_of`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibble_sums<const R: usize>(cb: *const u8, a: [*const i32; R]) -> [[__m256i; 2]; R] {
        let mask = _mm256_set1_epi8(0x0f);
        let mut s16 = [[_mm256_setzero_si256(); 2]; R];
        for t in 0..4 {
            // SAFETY (caller): `cb` is a block's 256 code bytes, each `a[i]` a block's 32 bytes.
            let x = [_mm256_loadu_si256(cb.add(64 * t).cast()), _mm256_loadu_si256(cb.add(64 * t + 32).cast())];
            for i in 0..R {
                let (lo, hi) = (_mm256_set1_epi32(a[i].add(t).read_unaligned()), _mm256_set1_epi32(a[i].add(t + 4).read_unaligned()));
                for h in 0..2 {
                    let pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(x[h], mask), lo),
                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16::<4>(x[h]), mask), hi),
                    );
                    s16[i][h] = _mm256_add_epi16(s16[i][h], pairs);
                }
            }
        }
        s16
    }

    /// Q4_1 and Q4_0 panel `p` against activation rows `r0..r0 + R`, both halves of the panel
    /// per block ([`nibble_sums`]); per output the same f32 operations as [`tile`] (the
    /// `mins` chain of Q4_1 runs as a second pass over the blocks: it does not depend on the
    /// codes, and a chain's own operations and order are what fix its bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_wide<const R: usize, const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let (code_bytes, scale_count) = (kind::block_code_bytes(KIND), kind::block_scales(KIND));
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..nb {
            // SAFETY: block b of the panel is `code_bytes` code bytes and `scale_count` scales;
            // the activation rows hold nb > b blocks of 32 bytes.
            let a = act_blocks(&rows, b);
            let s16 = nibble_sums::<R>(cp.add(b * code_bytes), a);
            for h in 0..2 {
                let dw = widen8(sp.add(b * scale_count + 8 * h));
                for i in 0..R {
                    let mut sumi = _mm256_madd_epi16(s16[i][h], ones);
                    if KIND == kind::Q4_0 {
                        sumi = _mm256_add_epi32(sumi, _mm256_set1_epi32(*offsets.get_unchecked((r0 + i) * nb + b)));
                    }
                    fold(&mut acc[i][h], dw, &rows[i], b, sumi);
                }
            }
        }
        let mut y = [[0f32; PANEL_ROWS]; R];
        for h in 0..2 {
            finish_half::<R, KIND>(&mut y, h, core::array::from_fn(|i| acc[i][h]), sp, nb, &rows);
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Q4_K panel `p` against activation rows `r0..r0 + R`, both halves per sub-block as
    /// [`tile_wide`], the `dmin·m` chain as its second pass; per output the operations of
    /// `portable_q4_k`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_q4_k_wide<const R: usize>(w: &Panels, acts: &Q8Activations, p: usize, r0: usize, out: &PanelOut) {
        let nsb = w.k / SUPER_ELEMS;
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for s in 0..nsb {
            // SAFETY: super-block s of the panel is K_SCALE_BYTES + 8·256 code bytes and 32
            // scales; activation rows hold 8·nsb blocks.
            let unit = cp.add(s * (K_SCALE_BYTES + SUBS * NIBBLE_BYTES));
            // The next super-block's f16 scales (the codes' prefetches, one stream over the
            // units, also cover the integer scales).
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(32 * (s + 1)).cast());
            for j in 0..SUBS {
                let b = SUBS * s + j;
                let a = act_blocks(&rows, b);
                let cb = unit.add(K_SCALE_BYTES + NIBBLE_BYTES * j);
                for line in 0..NIBBLE_BYTES / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(cb.wrapping_add(PREFETCH_AHEAD + 64 * line).cast());
                }
                let s16 = nibble_sums::<R>(cb, a);
                for h in 0..2 {
                    let dw = _mm256_mul_ps(widen8(sp.add(32 * s + 8 * h)), byte_lanes(unit, PANEL_ROWS * j + 8 * h));
                    for i in 0..R {
                        let sumi = _mm256_madd_epi16(s16[i][h], ones);
                        fold(&mut acc[i][h], dw, &rows[i], b, sumi);
                    }
                }
            }
        }
        let mut y = [[0f32; PANEL_ROWS]; R];
        for h in 0..2 {
            finish_q4_k_half::<R>(&mut y, h, core::array::from_fn(|i| acc[i][h]), cp, sp, nsb, &rows);
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Σ code·a in i16 for one half (eight weight rows) of a 32-weight block of nibbles
    /// (Q4_1's layout, `cb` at the half's first byte) against activation rows `a`, each row's
    /// eight groups summed in i16 (|sum| ≤ 8·2·15·127 = 30,480, exact in any order).
    ///
    /// Each code vector is unpacked once and consumed at once by every row: live are the `R`
    /// sums, the mask and one code vector with its two nibble halves, so four rows and the
    /// caller's four accumulators fit the sixteen YMM registers (the both-halves sums of
    /// [`nibble_sums`] at two rows did not: bench/NOTES.md, "The AVX2 tiles at m ≥ 2 on Zen 1").
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half_nibble_sums<const R: usize>(cb: *const u8, a: [*const i32; R]) -> [__m256i; R] {
        let mask = _mm256_set1_epi8(0x0f);
        let mut s16 = [_mm256_setzero_si256(); R];
        for t in 0..4 {
            // SAFETY (caller): `cb` is a half's first code byte, each `a[i]` a block's 32 bytes.
            let x = _mm256_loadu_si256(cb.add(64 * t).cast());
            let (lo, hi) = (_mm256_and_si256(x, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask));
            for i in 0..R {
                let pairs = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a[i].add(t).read_unaligned())),
                    _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a[i].add(t + 4).read_unaligned())),
                );
                s16[i] = _mm256_add_epi16(s16[i], pairs);
            }
        }
        s16
    }

    /// Σ code·a in i32 for one half of a 32-weight block of 5-bit codes (Q5_0, Q5_1: the
    /// nibbles as [`half_nibble_sums`], the fifth bits from the plane after them, as [`tile`]
    /// adds them) against activation rows `a`. Codes 0..31 give pairs up to 2·31·127 = 7,874,
    /// so four groups are summed in i16 (≤ 31,496) before each `vpmaddwd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half_five_bit_sums<const R: usize>(cb: *const u8, a: [*const i32; R]) -> [__m256i; R] {
        let (mask, bit4, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x10), _mm256_set1_epi16(1));
        // SAFETY (caller): `cb` is a half's first code byte, its fifth bits NIBBLE_BYTES on.
        let h = _mm256_loadu_si256(cb.add(NIBBLE_BYTES).cast());
        let mut sumi = [_mm256_setzero_si256(); R];
        for run in 0..2 {
            let mut s16 = [_mm256_setzero_si256(); R];
            for t in 2 * run..2 * run + 2 {
                // Bits t and 4 + t of the plane to bit 4.
                let (low, high) = match t {
                    0 => (_mm256_slli_epi16::<4>(h), h),
                    1 => (_mm256_slli_epi16::<3>(h), _mm256_srli_epi16::<1>(h)),
                    2 => (_mm256_slli_epi16::<2>(h), _mm256_srli_epi16::<2>(h)),
                    _ => (_mm256_slli_epi16::<1>(h), _mm256_srli_epi16::<3>(h)),
                };
                let x = _mm256_loadu_si256(cb.add(64 * t).cast());
                let lo = _mm256_or_si256(_mm256_and_si256(x, mask), _mm256_and_si256(low, bit4));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(x), mask), _mm256_and_si256(high, bit4));
                for i in 0..R {
                    let pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a[i].add(t).read_unaligned())),
                        _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a[i].add(t + 4).read_unaligned())),
                    );
                    s16[i] = _mm256_add_epi16(s16[i], pairs);
                }
            }
            for i in 0..R {
                let wide = _mm256_madd_epi16(s16[i], ones);
                sumi[i] = if run == 0 { wide } else { _mm256_add_epi32(sumi[i], wide) };
            }
        }
        sumi
    }

    /// Q4_1, Q4_0, Q5_1 and Q5_0 panel `p` against activation rows `r0..r0 + R` (R ≤ 4), one
    /// half of the panel at a time ([`half_nibble_sums`], [`half_five_bit_sums`]), the `mins`
    /// chain as a second pass per half; per output the f32 operations of [`tile_wide`] and
    /// [`tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_rows<const R: usize, const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let (code_bytes, scale_count) = (kind::block_code_bytes(KIND), kind::block_scales(KIND));
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let ones = _mm256_set1_epi16(1);
        let mut y = [[0f32; PANEL_ROWS]; R];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY: the panel and the rows hold nb > b blocks.
                let (cb, a) = half_block(cp, code_bytes, half, &rows, b);
                let sums = if kind::five_bit(KIND) { half_five_bit_sums::<R>(cb, a) } else { half_nibble_sums::<R>(cb, a) };
                let dw = widen8(sp.add(b * scale_count + 8 * half));
                for i in 0..R {
                    let mut sumi = if kind::five_bit(KIND) { sums[i] } else { _mm256_madd_epi16(sums[i], ones) };
                    if matches!(KIND, kind::Q4_0 | kind::Q5_0) {
                        sumi = _mm256_add_epi32(sumi, _mm256_set1_epi32(*offsets.get_unchecked((r0 + i) * nb + b)));
                    }
                    fold(&mut acc[i], dw, &rows[i], b, sumi);
                }
            }
            finish_half::<R, KIND>(&mut y, half, acc, sp, nb, &rows);
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Q4_K panel `p` against activation rows `r0..r0 + R` (R ≤ 4), one half of the panel at
    /// a time as [`tile_rows`], the `dmin·m` chain as a second pass per half; per output the
    /// operations of [`tile_q4_k_wide`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_q4_k_rows<const R: usize>(w: &Panels, acts: &Q8Activations, p: usize, r0: usize, out: &PanelOut) {
        let nsb = w.k / SUPER_ELEMS;
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let ones = _mm256_set1_epi16(1);
        let mut y = [[0f32; PANEL_ROWS]; R];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for s in 0..nsb {
                // SAFETY: super-block s of the panel is K_SCALE_BYTES + 8·256 code bytes and 32
                // scales; activation rows hold 8·nsb blocks.
                let unit = cp.add(s * (K_SCALE_BYTES + SUBS * NIBBLE_BYTES));
                for j in 0..SUBS {
                    let b = SUBS * s + j;
                    let a = act_blocks(&rows, b);
                    let s16 = half_nibble_sums::<R>(unit.add(K_SCALE_BYTES + NIBBLE_BYTES * j + 32 * half), a);
                    let dw = _mm256_mul_ps(widen8(sp.add(32 * s + 8 * half)), byte_lanes(unit, PANEL_ROWS * j + 8 * half));
                    for i in 0..R {
                        let sumi = _mm256_madd_epi16(s16[i], ones);
                        fold(&mut acc[i], dw, &rows[i], b, sumi);
                    }
                }
            }
            finish_q4_k_half::<R>(&mut y, half, acc, cp, sp, nsb, &rows);
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Q6_K panel `p` against activation rows `r0..r0 + R` (R ≤ Q6_K_ROWS), one half of the
    /// panel and one scale group at a time, with the unsigned codes of [`tile_q6_k_wide`]: a
    /// group's four `vpmaddubsw` pair sums of `u·a` added in i16 (wrapping), its `32·a` pair
    /// sums (`offsets`) subtracted, one `vpmaddwd` by the group's scales. Each code vector is
    /// unpacked once and consumed by every row at once; per output the integer sums and f32
    /// operations of [`tile_q6_k_wide`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_q6_k_rows<const R: usize>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let nsb = w.k / SUPER_ELEMS;
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let (low4, high2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
        let pair_sums: [*const i32; R] = core::array::from_fn(|i| offsets[(r0 + i) * (w.k / 16)..(r0 + i + 1) * (w.k / 16)].as_ptr());
        let mut y = [[0f32; PANEL_ROWS]; R];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for s in 0..nsb {
                // SAFETY: super-block s of the panel is K_SCALE_BYTES + 8·384 code bytes and 16
                // scales; the activation rows hold 8·nsb blocks and 16·nsb pair sums.
                let unit = cp.add(s * (K_SCALE_BYTES + SUBS * Q6_BYTES));
                // A group's i8 scales for this half's rows as i16 pairs `[s, s]`.
                let group_scales = |g: usize| {
                    let s32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(unit.add(PANEL_ROWS * g + 8 * half).cast()));
                    _mm256_or_si256(_mm256_and_si256(s32, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32::<16>(s32))
                };
                for j in 0..SUBS {
                    let b = SUBS * s + j;
                    let a = act_blocks(&rows, b);
                    let cb = unit.add(K_SCALE_BYTES + Q6_BYTES * j + 32 * half);
                    let mut sumi = [_mm256_setzero_si256(); R];
                    for e in 0..2 {
                        // The same code bytes for both groups, their address hidden from LLVM
                        // for the second (as in `tile_q6_k_wide`): else it keeps the first
                        // group's four loads live for it.
                        let mut cb = cb;
                        if e == 1 {
                            // SAFETY: an empty asm that leaves the register as it was.
                            std::arch::asm!("/* {0} */", inout(reg) cb, options(nomem, nostack, preserves_flags));
                        }
                        let h = _mm256_loadu_si256(cb.add(NIBBLE_BYTES + 64 * e).cast());
                        let mut s16 = [_mm256_setzero_si256(); R];
                        for t in 0..4 {
                            // Bits 2t..2t + 2 of the top-bit bytes to bits 4..6.
                            let top = match t {
                                0 => _mm256_slli_epi16::<4>(h),
                                1 => _mm256_slli_epi16::<2>(h),
                                2 => h,
                                _ => _mm256_srli_epi16::<2>(h),
                            };
                            let x = _mm256_loadu_si256(cb.add(64 * t).cast());
                            let nibble = if e == 0 { x } else { _mm256_srli_epi16::<4>(x) };
                            let u = _mm256_or_si256(_mm256_and_si256(nibble, low4), _mm256_and_si256(top, high2));
                            for i in 0..R {
                                s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(u, _mm256_set1_epi32(a[i].add(4 * e + t).read_unaligned())));
                            }
                        }
                        let scale = group_scales(2 * j + e);
                        for i in 0..R {
                            let bias = _mm256_set1_epi32(pair_sums[i].add(2 * b + e).read());
                            let group = _mm256_madd_epi16(_mm256_sub_epi16(s16[i], bias), scale);
                            sumi[i] = if e == 0 { group } else { _mm256_add_epi32(sumi[i], group) };
                        }
                    }
                    fold_rows(&mut acc, widen8(sp.add(16 * s + 8 * half)), &rows, b, &sumi);
                }
            }
            store_half(&mut y, half, &acc);
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Q8_0 and IQ4_NL panel `p` against activation rows `r0..r0 + R` (R ≤ 4), one half of the
    /// panel at a time, with [`tile`]'s sign trick: each group's code vector is made signed
    /// (Q8_0: `q ^ 0x80`; IQ4_NL: its table value) and its `vpabsb` taken once for every row,
    /// each row moving the signs onto its broadcast activations (`vpsignb`). A pair
    /// |w|·(±a) reaches 128·127·2 = 32,512, so no two groups share an i16 sum: one `vpmaddwd`
    /// per group and row. Live are the `R` i32 sums, the `R` accumulators, the constants and
    /// one group's codes, so four rows fit the sixteen YMM registers, where the two-row
    /// [`tile`] held all eight groups' codes and signs and moved them through the stack
    /// (bench/NOTES.md, "Q8_0 and IQ4_NL tiles at m ≥ 2 on Zen 1"). Per output the integer
    /// sums and f32 operations of [`tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_signed_rows<const R: usize, const KIND: u8>(w: &Panels, acts: &Q8Activations, p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let code_bytes = kind::block_code_bytes(KIND);
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let (ones, mask, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0f), _mm256_set1_epi8(-128));
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(iq4_nl::VALUES.as_ptr().cast()));
        let mut y = [[0f32; PANEL_ROWS]; R];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY: the panel and the rows hold nb > b blocks.
                let (cb, a) = half_block(cp, code_bytes, half, &rows, b);
                let mut sumi = [_mm256_setzero_si256(); R];
                for g in 0..8 {
                    let s = if KIND == kind::Q8_0 {
                        _mm256_xor_si256(_mm256_loadu_si256(cb.add(64 * g).cast()), flip)
                    } else {
                        // Groups g and g + 4 are the low and high nibbles of one vector.
                        let x = _mm256_loadu_si256(cb.add(64 * (g % 4)).cast());
                        let q = if g < 4 { x } else { _mm256_srli_epi16::<4>(x) };
                        _mm256_shuffle_epi8(table, _mm256_and_si256(q, mask))
                    };
                    let v = _mm256_abs_epi8(s);
                    for i in 0..R {
                        let ag = _mm256_sign_epi8(_mm256_set1_epi32(a[i].add(g).read_unaligned()), s);
                        sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(_mm256_maddubs_epi16(v, ag), ones));
                    }
                    fence(&mut sumi);
                }
                fold_rows(&mut acc, widen8(sp.add(b * PANEL_ROWS + 8 * half)), &rows, b, &sumi);
            }
            store_half(&mut y, half, &acc);
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Passes the `R` sums through one empty `asm!`, so that every row finishes a group before
    /// any row starts the next. Without it LLVM runs the rows one after the other (their
    /// sums are independent chains, and it reassociates each row's adds into a tree), and so
    /// keeps all eight groups' code vectors live: 42–43 YMM stack moves per block and half in
    /// [`tile_signed_rows`], none with it.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fence<const R: usize>(s: &mut [__m256i; R]) {
        // SAFETY: empty asm that leaves the registers as they were. (The arms for R < 4 never
        // index past R.)
        unsafe {
            match R {
                1 => std::arch::asm!("/* {0} */", inout(ymm_reg) s[0], options(pure, nomem, nostack, preserves_flags)),
                2 => std::arch::asm!("/* {0} {1} */", inout(ymm_reg) s[0], inout(ymm_reg) s[1], options(pure, nomem, nostack, preserves_flags)),
                3 => std::arch::asm!(
                    "/* {0} {1} {2} */",
                    inout(ymm_reg) s[0],
                    inout(ymm_reg) s[1],
                    inout(ymm_reg) s[2],
                    options(pure, nomem, nostack, preserves_flags)
                ),
                _ => std::arch::asm!(
                    "/* {0} {1} {2} {3} */",
                    inout(ymm_reg) s[0],
                    inout(ymm_reg) s[1],
                    inout(ymm_reg) s[2],
                    inout(ymm_reg) s[3],
                    options(pure, nomem, nostack, preserves_flags)
                ),
            }
        }
    }

    /// A tile's activation rows `r0..r0 + R` and panel `p`'s code and scale pointers.
    #[inline(always)]
    fn tile_inputs<'a, const R: usize>(w: &'a Panels, acts: &'a Q8Activations, p: usize, r0: usize) -> ([ActRow<'a>; R], *const u8, *const u16) {
        let (codes, scales) = w.panel(p);
        (core::array::from_fn(|i| acts.row(r0 + i)), codes.as_ptr(), scales.as_ptr())
    }

    /// Block `b` of each activation row, as groups of four bytes.
    ///
    /// # Safety
    /// The rows hold more than `b` blocks.
    #[inline(always)]
    unsafe fn act_blocks<const R: usize>(rows: &[ActRow<'_>; R], b: usize) -> [*const i32; R] {
        core::array::from_fn(|i| rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast::<i32>())
    }

    /// For the half-at-a-time tiles of the block formats: block `b`'s first code byte of the
    /// panel's half `half` (a half's rows are the 32 bytes at 32·half of each 64-byte vector)
    /// and each activation row's block `b`.
    ///
    /// # Safety
    /// The panel and the rows hold more than `b` blocks.
    #[inline(always)]
    unsafe fn half_block<const R: usize>(cp: *const u8, code_bytes: usize, half: usize, rows: &[ActRow<'_>; R], b: usize) -> (*const u8, [*const i32; R]) {
        (cp.add(b * code_bytes + 32 * half), act_blocks(rows, b))
    }

    /// A block's f32 step, the same in every tile (module docs): `acc = fma(d·d_x, Σq·a, acc)`
    /// for one activation row (`dw`: the eight weight rows' `d`, `sumi` their integer dots).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fold(acc: &mut __m256, dw: __m256, row: &ActRow<'_>, b: usize, sumi: __m256i) {
        // SAFETY (caller): the row holds nb > b blocks.
        let dd = _mm256_mul_ps(dw, _mm256_set1_ps(row.scales.get_unchecked(b)[0]));
        *acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi), *acc);
    }

    /// [`fold`] for each row of a tile.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fold_rows<const R: usize>(acc: &mut [__m256; R], dw: __m256, rows: &[ActRow<'_>; R], b: usize, sumi: &[__m256i; R]) {
        for i in 0..R {
            fold(&mut acc[i], dw, &rows[i], b, sumi[i]);
        }
    }

    /// Each row's eight outputs of one half of the panel into the tile's outputs `y`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn store_half<const R: usize>(y: &mut [[f32; PANEL_ROWS]; R], half: usize, acc: &[__m256; R]) {
        for i in 0..R {
            _mm256_storeu_ps(y[i].as_mut_ptr().add(8 * half), acc[i]);
        }
    }

    /// One half of a block-format tile's outputs: `acc`, plus for Q4_1 and Q5_1 the `mins`
    /// chain, run here as a second pass over the blocks (it does not depend on the codes, and
    /// a chain's own operations and order are what fix its bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn finish_half<const R: usize, const KIND: u8>(y: &mut [[f32; PANEL_ROWS]; R], half: usize, mut acc: [__m256; R], sp: *const u16, nb: usize, rows: &[ActRow<'_>; R]) {
        if kind::affine(KIND) {
            let scale_count = kind::block_scales(KIND);
            let mut mins = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY (caller): the panel holds nb blocks of `scale_count` scales.
                let mw = widen8(sp.add(b * scale_count + PANEL_ROWS + 8 * half));
                for i in 0..R {
                    mins[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*rows[i].q81_sums.get_unchecked(b)), mins[i]);
                }
            }
            for i in 0..R {
                acc[i] = _mm256_add_ps(acc[i], mins[i]);
            }
        }
        store_half(y, half, &acc);
    }

    /// Eight bytes of a Q4_K unit's integer scales (`sc` or `m`) as f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn byte_lanes(unit: *const u8, at: usize) -> __m256 {
        // SAFETY (caller): `at + 8` bytes of the unit's integer scales are readable.
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(unit.add(at).cast())))
    }

    /// One half of a Q4_K tile's outputs: `acc − mins`, the `dmin·m` chain run here as a
    /// second pass over the super-blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn finish_q4_k_half<const R: usize>(y: &mut [[f32; PANEL_ROWS]; R], half: usize, mut acc: [__m256; R], cp: *const u8, sp: *const u16, nsb: usize, rows: &[ActRow<'_>; R]) {
        let mut mins = [_mm256_setzero_ps(); R];
        for s in 0..nsb {
            // SAFETY (caller): the panel holds nsb super-blocks.
            let unit = cp.add(s * (K_SCALE_BYTES + SUBS * NIBBLE_BYTES));
            let dmin = widen8(sp.add(32 * s + 16 + 8 * half));
            for j in 0..SUBS {
                let b = SUBS * s + j;
                let mw = _mm256_mul_ps(dmin, byte_lanes(unit, PANEL_ROWS * (SUBS + j) + 8 * half));
                for i in 0..R {
                    mins[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(rows[i].scales.get_unchecked(b)[1]), mins[i]);
                }
            }
        }
        for i in 0..R {
            acc[i] = _mm256_sub_ps(acc[i], mins[i]);
        }
        store_half(y, half, &acc);
    }

    /// Writes a tile's outputs.
    ///
    /// # Safety
    /// The caller owns panel `p`.
    #[inline]
    unsafe fn write_tile<const R: usize>(out: &PanelOut, p: usize, r0: usize, y: &[[f32; PANEL_ROWS]; R]) {
        for (i, yi) in y.iter().enumerate() {
            out.set_panel(r0 + i, p, yi);
        }
    }

    /// Eight f16 scales widened to f32 (`vcvtph2ps`, exact: the bits of [`f16_to_f32`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen8(at: *const u16) -> __m256 {
        // SAFETY (caller): `at` points at 8 readable scales.
        _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))
    }

    /// Σ u·s over groups of four bytes into eight i32 lanes (`u` unsigned, pairs < 2¹⁵).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot4(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// Panel `p` of a block format against activation rows `r0..r0 + R`, one half of eight
    /// weight rows at a time. Q8_0 and IQ4_NL multiply signed codes (the sign trick above);
    /// the other nibble formats their unsigned codes 0..32 (Q4_0 and Q5_0 then subtract
    /// `offsets`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const R: usize, const KIND: u8>(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r0: usize, out: &PanelOut) {
        let nb = w.k / BLOCK_ELEMS;
        let (code_bytes, scale_count) = (kind::block_code_bytes(KIND), kind::block_scales(KIND));
        let affine = kind::affine(KIND);
        let signed = matches!(KIND, kind::Q8_0 | kind::IQ4_NL);
        let offset = matches!(KIND, kind::Q4_0 | kind::Q5_0);
        let (rows, cp, sp) = tile_inputs::<R>(w, acts, p, r0);
        let (mask, bit4) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x10));
        let flip = _mm256_set1_epi8(-128);
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(iq4_nl::VALUES.as_ptr().cast()));
        let mut y = [[0f32; PANEL_ROWS]; R];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut mins = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // Groups 0..8 of four codes for the half's eight rows, unsigned, and for the
                // signed formats the signs to move onto the activations.
                let mut v = [_mm256_setzero_si256(); 8];
                let mut sign = [_mm256_setzero_si256(); 8];
                // SAFETY: block b of the panel is `code_bytes` code bytes and `scale_count`
                // scales; a half's rows are the 32 bytes at 32·half of each 64-byte vector.
                let cb = cp.add(b * code_bytes + 32 * half);
                if KIND == kind::Q8_0 {
                    for g in 0..8 {
                        let s = _mm256_xor_si256(_mm256_loadu_si256(cb.add(64 * g).cast()), flip);
                        v[g] = _mm256_abs_epi8(s);
                        sign[g] = s;
                    }
                } else {
                    for t in 0..4 {
                        let x = _mm256_loadu_si256(cb.add(64 * t).cast());
                        v[t] = _mm256_and_si256(x, mask);
                        v[t + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
                    }
                    if kind::five_bit(KIND) {
                        // As the AVX-512 `add_fifth_bits`: bits t and 4 + t to bit 4.
                        let h = _mm256_loadu_si256(cb.add(NIBBLE_BYTES).cast());
                        let low = [_mm256_slli_epi16::<4>(h), _mm256_slli_epi16::<3>(h), _mm256_slli_epi16::<2>(h), _mm256_slli_epi16::<1>(h)];
                        let high = [h, _mm256_srli_epi16::<1>(h), _mm256_srli_epi16::<2>(h), _mm256_srli_epi16::<3>(h)];
                        for t in 0..4 {
                            v[t] = _mm256_or_si256(v[t], _mm256_and_si256(low[t], bit4));
                            v[t + 4] = _mm256_or_si256(v[t + 4], _mm256_and_si256(high[t], bit4));
                        }
                    }
                    if KIND == kind::IQ4_NL {
                        for g in 0..8 {
                            let s = _mm256_shuffle_epi8(table, v[g]);
                            v[g] = _mm256_abs_epi8(s);
                            sign[g] = s;
                        }
                    }
                }
                let dw = widen8(sp.add(b * scale_count + 8 * half));
                let mw = if affine { widen8(sp.add(b * scale_count + PANEL_ROWS + 8 * half)) } else { _mm256_setzero_ps() };
                for i in 0..R {
                    // SAFETY: the activation row holds nb > b blocks of 32 bytes.
                    let a = rows[i].qs.as_ptr().add(b * BLOCK_ELEMS).cast::<i32>();
                    let mut sumi = _mm256_setzero_si256();
                    if signed {
                        for g in 0..8 {
                            let ag = _mm256_sign_epi8(_mm256_set1_epi32(a.add(g).read_unaligned()), sign[g]);
                            sumi = _mm256_add_epi32(sumi, dot4(v[g], ag));
                        }
                    } else {
                        // Unsigned codes: the groups' `vpmaddubsw` pairs summed in i16 first
                        // (module docs of `avx2`), one `vpmaddwd` per run of groups.
                        let run = if kind::five_bit(KIND) { 4 } else { 8 };
                        for g0 in (0..8).step_by(run) {
                            let mut s16 = _mm256_setzero_si256();
                            for g in g0..g0 + run {
                                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(v[g], _mm256_set1_epi32(a.add(g).read_unaligned())));
                            }
                            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
                        }
                    }
                    if offset {
                        sumi = _mm256_add_epi32(sumi, _mm256_set1_epi32(*offsets.get_unchecked((r0 + i) * nb + b)));
                    }
                    fold(&mut acc[i], dw, &rows[i], b, sumi);
                    if affine {
                        mins[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*rows[i].q81_sums.get_unchecked(b)), mins[i]);
                    }
                }
            }
            for i in 0..R {
                let yi = if affine { _mm256_add_ps(acc[i], mins[i]) } else { acc[i] };
                _mm256_storeu_ps(y[i].as_mut_ptr().add(8 * half), yi);
            }
        }
        // SAFETY: the caller owns panel p.
        write_tile(out, p, r0, &y);
    }

    /// Q6_K panel `p` against activation row `r`, both halves of the panel per sub-block (as
    /// [`tile_q4_k_wide`]); per output the integer sums and f32 operations of `portable_q6_k`.
    ///
    /// The codes stay unsigned (`u = q + 32`, 0..64) for `vpmaddubsw`; a scale group's four
    /// pair sums are added in i16 and the group's `32·a` pair sums (`offsets`,
    /// [`q6_k_pair_sums`]) subtracted. The true result `Σ(u − 32)·a` per lane is at most
    /// 8·32·127 = 32,512, so the wrapping i16 adds give it exactly although the partial sums
    /// of `u·a` (up to 64,008) wrap. Against the signed tile it replaced this drops a `vpsignb`, a
    /// `vpabsb` and the bias subtraction per code vector and broadcasts each activation group
    /// once per sixteen rows instead of eight (bench/NOTES.md, "The 1B one-sequence decode on
    /// Zen 1").
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_q6_k_wide(w: &Panels, acts: &Q8Activations, offsets: &[i32], p: usize, r: usize, out: &PanelOut) {
        let nsb = w.k / SUPER_ELEMS;
        let row = acts.row(r);
        let (codes, scales) = w.panel(p);
        let (cp, sp) = (codes.as_ptr(), scales.as_ptr());
        let (low4, high2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
        let pair_sums = offsets[r * (w.k / 16)..(r + 1) * (w.k / 16)].as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2];
        for s in 0..nsb {
            // SAFETY: super-block s of the panel is K_SCALE_BYTES + 8·384 code bytes and 16
            // scales; the activation row holds 8·nsb blocks and 16·nsb pair sums.
            let unit = cp.add(s * (K_SCALE_BYTES + SUBS * Q6_BYTES));
            // The next super-block's f16 scales (the codes' prefetches, one stream over the
            // units, also cover the integer scales).
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(16 * (s + 1)).cast());
            // A group's i8 scales for one half's rows as i16 pairs `[s, s]`.
            let group_scales = |g: usize, half: usize| {
                let s32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(unit.add(PANEL_ROWS * g + 8 * half).cast()));
                _mm256_or_si256(_mm256_and_si256(s32, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32::<16>(s32))
            };
            for j in 0..SUBS {
                let b = SUBS * s + j;
                let a = row.qs.as_ptr().add(b * BLOCK_ELEMS).cast::<i32>();
                let cb = unit.add(K_SCALE_BYTES + Q6_BYTES * j);
                for line in 0..Q6_BYTES / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(cb.wrapping_add(PREFETCH_AHEAD + 64 * line).cast());
                }
                let dx = _mm256_set1_ps(row.scales.get_unchecked(b)[0]);
                // One scale group (element half `e`: the low nibbles, then the high ones) at a
                // time, so that only its two top-bit vectors and two i16 sums are live: with
                // both groups at once LLVM spilled an accumulator and the sums.
                let mut sumi = [_mm256_setzero_si256(); 2];
                for e in 0..2 {
                    // The same code bytes for both groups, their address hidden from LLVM for
                    // the second: else it keeps the first group's eight loads live for it and
                    // spills (`std::hint::black_box` did the same through the stack and
                    // stopped the unrolling).
                    let mut cb = cb;
                    if e == 1 {
                        // SAFETY: an empty asm that leaves the register as it was.
                        std::arch::asm!("/* {0} */", inout(reg) cb, options(nomem, nostack, preserves_flags));
                    }
                    // i16 pair sums of u·a per half of the panel, wrapping.
                    let mut s16 = [_mm256_setzero_si256(); 2];
                    for t in 0..4 {
                        let at = a.add(4 * e + t).read_unaligned();
                        let ag = _mm256_set1_epi32(at);
                        for half in 0..2 {
                            // Bits 2t..2t + 2 of the top-bit bytes to bits 4..6.
                            let h = _mm256_loadu_si256(cb.add(NIBBLE_BYTES + 64 * e + 32 * half).cast());
                            let top = match t {
                                0 => _mm256_slli_epi16::<4>(h),
                                1 => _mm256_slli_epi16::<2>(h),
                                2 => h,
                                _ => _mm256_srli_epi16::<2>(h),
                            };
                            let x = _mm256_loadu_si256(cb.add(64 * t + 32 * half).cast());
                            let nibble = if e == 0 { x } else { _mm256_srli_epi16::<4>(x) };
                            let u = _mm256_or_si256(_mm256_and_si256(nibble, low4), _mm256_and_si256(top, high2));
                            s16[half] = _mm256_add_epi16(s16[half], _mm256_maddubs_epi16(u, ag));
                        }
                    }
                    let bias = _mm256_set1_epi32(pair_sums.add(2 * b + e).read());
                    for half in 0..2 {
                        let group = _mm256_madd_epi16(_mm256_sub_epi16(s16[half], bias), group_scales(2 * j + e, half));
                        sumi[half] = if e == 0 { group } else { _mm256_add_epi32(sumi[half], group) };
                    }
                }
                for half in 0..2 {
                    let dd = _mm256_mul_ps(widen8(sp.add(16 * s + 8 * half)), dx);
                    acc[half] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi[half]), acc[half]);
                }
            }
        }
        let mut y = [0f32; PANEL_ROWS];
        _mm256_storeu_ps(y.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(y.as_mut_ptr().add(8), acc[1]);
        // SAFETY: the caller owns panel p.
        out.set_panel(r, p, &y);
    }
}

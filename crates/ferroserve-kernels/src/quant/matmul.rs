//! `Y[m, n] = X[m, k] · Wᵀ` with `W` in a GGUF format: ISA dispatch and threading.
//!
//! Why hand-written: no Rust library computes on GGUF's packed blocks in place (candle and
//! mistral.rs port ggml's kernels but split the reduction differently for one and many rows,
//! and their threading changes the sum order). We need a result per row that is bitwise the
//! same whatever the batch, because the scheduler batches requests freely and users expect
//! a seeded request to give the same tokens alone or in company.
//!
//! How (the strategy of llama.cpp's CPU backend): the activation rows are quantised once per
//! call to 8-bit blocks of 32 with an f16-rounded scale ([`Q8Activations`]); each weight block is
//! then multiplied with integer dot products (AVX-512 VNNI `vpdpbusd`, AVX2
//! `vpmaddubsw`, or scalar) and the block's `d_w·d_x` scale is applied in f32. The weights
//! are read in place, once per call: a kernel takes a tile of weight rows × activation rows
//! (4 weight rows × 1 activation row for decode, 1 × 4 for batches), so each unpacked
//! weight block serves every activation row of the tile from registers and the rest of the
//! batch from L1.
//!
//! Batch invariance, by construction:
//! - threads split the *output columns* (weight rows), never `k`, so one output element is
//!   always reduced by one call over the whole row;
//! - every tile shape applies to each (activation row, weight row) pair exactly the
//!   operations of the 1 × 1 case (same accumulators, same order; Rust never re-associates
//!   or contracts float arithmetic), so the tiling — hence `m` and a row's position in the
//!   batch — cannot change its bits;
//! - the activation quantisation is per row, and bitwise the same on every ISA.
//!
//! Different ISAs round the sums differently (lanes vs scalars); the ISA is chosen once per
//! process, so a deployment is deterministic.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::activations::Q8Activations;
use super::f16::F32Rows;
use super::toolkit::{Kernels, OutMatrix, QuantisedKernel};
use super::QuantType;
use crate::isa::QuantLevel;

/// `y[m, n] = x[m, k] · wᵀ`. `w` holds `n` rows of `k` weights of type `wtype` exactly as
/// GGUF stores them (`n · wtype.row_bytes(k)` bytes); `x` and `y` are row-major f32. Block
/// formats quantise `x` to 8 bits per 32 values ([`Q8Activations`]); float formats use it as
/// is. Runs on the process-wide ISA ([`QuantLevel::selected`]) and the rayon pool.
///
/// Row `i` of `y` depends only on row `i` of `x` and on `w`, bit for bit, whatever `m`, the
/// row's position and the thread count. Panics if a length does not fit the shape or `k` is
/// not a whole number of blocks.
pub fn quant_matmul(
    wtype: QuantType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
    quant_matmul_with_isa(QuantLevel::selected(), wtype, w, n, k, x, m, y);
}

/// [`quant_matmul`] on an explicit ISA level (tests and benchmarks compare levels side by
/// side). Panics if the CPU does not support `isa`.
#[allow(clippy::too_many_arguments)] // the GEMM shape, spelled out as in BLAS
pub fn quant_matmul_with_isa(
    isa: QuantLevel,
    wtype: QuantType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
    assert_eq!(
        w.len(),
        n * wtype.row_bytes(k),
        "{}: weight bytes for [{n}, {k}]",
        wtype.name()
    );
    assert_eq!(x.len(), m * k, "activation length for [{m}, {k}]");
    if !wtype.is_block_quantised() {
        float_matmul(isa, wtype, w, n, k, x, m, y);
        return;
    }
    thread_local! {
        // Reused so that decode steps do not allocate; `try_borrow_mut` below covers a
        // caller that re-enters from a rayon task stolen while this thread waits.
        static SCRATCH: RefCell<Q8Activations> = RefCell::new(Q8Activations::new());
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut acts) => {
            acts.quantize_with_isa(isa, x, m, k);
            quant_matmul_prepared(isa, wtype, w, n, &acts, y);
        }
        Err(_) => {
            let mut acts = Q8Activations::new();
            acts.quantize_with_isa(isa, x, m, k);
            quant_matmul_prepared(isa, wtype, w, n, &acts, y);
        }
    });
}

/// Like [`quant_matmul_with_isa`] with activations already quantised, so that several
/// weights applied to one input (Q, K, V; gate and up) quantise it once. Block formats only.
pub fn quant_matmul_prepared(
    isa: QuantLevel,
    wtype: QuantType,
    w: &[u8],
    n: usize,
    acts: &Q8Activations,
    y: &mut [f32],
) {
    assert!(
        isa.is_supported(),
        "ISA level {} is not supported by this CPU",
        isa.as_str()
    );
    assert!(
        wtype.is_block_quantised(),
        "{} weights take f32 activations: use quant_matmul",
        wtype.name()
    );
    let (m, k) = (acts.rows(), acts.k());
    let row_bytes = wtype.row_bytes(k);
    assert_eq!(
        w.len(),
        n * row_bytes,
        "{}: weight bytes for [{n}, {k}]",
        wtype.name()
    );
    assert_eq!(y.len(), m * n, "output length for [{m}, {n}]");
    let kernel = quantised_kernel(isa, wtype);
    let out = OutMatrix::new(y, m, n);
    for_column_chunks(n, row_bytes, m, |cols| {
        // SAFETY: `quantised_kernel` returned a kernel for `isa`, which the CPU supports
        // (asserted above); the kernel owns columns `cols` of `out` (disjoint chunks).
        unsafe { kernel(w, row_bytes, acts, cols, &out) }
    });
}

/// `wtype`'s kernel for `isa`, from the format table.
fn quantised_kernel(isa: QuantLevel, wtype: QuantType) -> QuantisedKernel {
    let Kernels::Blocks(kernels) = &wtype.info().kernels else {
        unreachable!("float formats take the f32 path")
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        QuantLevel::Avx512 => kernels.avx512,
        #[cfg(target_arch = "x86_64")]
        QuantLevel::Avx2 => kernels.avx2,
        _ => kernels.portable,
    }
}

#[allow(clippy::too_many_arguments)] // the GEMM shape, spelled out as in BLAS
fn float_matmul(
    isa: QuantLevel,
    wtype: QuantType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
    assert!(
        isa.is_supported(),
        "ISA level {} is not supported by this CPU",
        isa.as_str()
    );
    assert_eq!(y.len(), m * n, "output length for [{m}, {n}]");
    if k == 0 {
        y.fill(0.0);
        return;
    }
    let Kernels::Float(fmt) = wtype.info().kernels else {
        unreachable!("block formats take the quantised path")
    };
    let row_bytes = wtype.row_bytes(k);
    let rows = F32Rows { data: x, k };
    let out = OutMatrix::new(y, m, n);
    for_column_chunks(n, row_bytes, m, |cols| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2+FMA+F16C are part of both x86 levels, whose support was asserted;
        // this call owns columns `cols` of `out`.
        QuantLevel::Avx2 | QuantLevel::Avx512 => unsafe {
            super::f16::x86::matmul_cols(fmt, w, row_bytes, &rows, cols, &out)
        },
        _ => super::f16::matmul_cols_portable(fmt, w, row_bytes, &rows, cols, &out),
    });
}

/// Work (weight bytes × activation rows) below which a chunk is not worth a rayon task:
/// about a few microseconds, comparable to waking a worker.
const MIN_CHUNK_WORK: usize = 64 * 1024;

/// Runs `f` over column ranges covering `0..n`, in parallel when the work is large enough.
/// Only the column split varies with the thread count; each element is computed whole.
fn for_column_chunks(n: usize, row_bytes: usize, m: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 || m == 0 {
        return;
    }
    let work = n * row_bytes.max(1) * m;
    let threads = rayon::current_num_threads();
    // Up to four chunks per thread, so that a thread slowed by a neighbour on its core is
    // covered by the others stealing, and a multiple of the threads, so that equal chunks
    // end together.
    let chunks = (work / MIN_CHUNK_WORK).clamp(1, 4 * threads).min(n);
    let chunks = if chunks < threads { chunks } else { chunks - chunks % threads };
    if chunks == 1 {
        f(0..n);
        return;
    }
    // Multiples of 4: the AVX-512 kernels handle decode four weight rows at a time.
    let cols_per_chunk = n.div_ceil(chunks).next_multiple_of(4);
    (0..n.div_ceil(cols_per_chunk))
        .into_par_iter()
        .for_each(|c| {
            let start = c * cols_per_chunk;
            f(start..(start + cols_per_chunk).min(n));
        });
}

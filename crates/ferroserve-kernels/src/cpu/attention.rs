//! Bidirectional multi-head attention over packed variable-length sequences (BERT).
//!
//! One task per (sequence, head): K is copied transposed and V contiguous into a small
//! scratch buffer so both products are unit-stride AXPYs the compiler vectorises, with
//! no horizontal reductions. Sequences are never padded, so no work is spent on padding.

use rayon::prelude::*;

use super::elementwise::softmax_in_place;
use super::{dispatch_isa, Isa};
use crate::SeqLayout;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each task writes only its own sequence's rows × its own head's columns.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

pub fn encoder_attention(isa: Isa, qkv: &[f32], layout: &SeqLayout<'_>, heads: usize, head_dim: usize, out: &mut [f32]) {
    let hidden = heads * head_dim;
    let rows = layout.total_rows();
    assert!(qkv.len() >= rows * 3 * hidden && out.len() >= rows * hidden);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let tasks = layout.num_seqs() * heads;
    let run = |t: usize| {
        let (s, h) = (t / heads, t % heads);
        let (start, end) = (layout.offsets[s], layout.offsets[s + 1]);
        let out_ptr = out_ptr;
        dispatch_isa!(isa, || head_attention(qkv, start, end, h, heads, head_dim, out_ptr.0))
    };
    if tasks <= 1 || rows * hidden < 4096 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

thread_local! {
    /// Per-thread scratch (Kᵀ, V, scores, output row), reused across tasks and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[inline(always)]
fn head_attention(qkv: &[f32], start: usize, end: usize, h: usize, heads: usize, d: usize, out: *mut f32) {
    let len = end - start;
    // Key positions padded to a multiple of 16 so the score loops have no scalar tail;
    // padded scores are excluded from the softmax below.
    let padded = len.div_ceil(16) * 16;
    let hidden = heads * d;
    let stride = 3 * hidden;
    let scale = 1.0 / (d as f32).sqrt();
    // Take the buffer out of the thread-local rather than working inside `with`'s
    // closure: that closure would be compiled without this function's ISA features.
    let mut buf = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    {
        let need = d * padded + len * d + padded + d;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (kt, rest) = buf.split_at_mut(d * padded);
        let (v, rest) = rest.split_at_mut(len * d);
        let (scores, rest) = rest.split_at_mut(padded);
        let acc = &mut rest[..d];
        kt.fill(0.0);
        for j in 0..len {
            let row = &qkv[(start + j) * stride..];
            for c in 0..d {
                kt[c * padded + j] = row[hidden + h * d + c];
            }
            v[j * d..(j + 1) * d].copy_from_slice(&row[2 * hidden + h * d..2 * hidden + (h + 1) * d]);
        }
        for i in 0..len {
            let q = &qkv[(start + i) * stride + h * d..(start + i) * stride + (h + 1) * d];
            scores.fill(0.0);
            for c in 0..d {
                let qc = q[c] * scale;
                for (s, &k) in scores.iter_mut().zip(&kt[c * padded..(c + 1) * padded]) {
                    *s += qc * k;
                }
            }
            softmax_in_place(&mut scores[..len]);
            acc.fill(0.0);
            for (j, &p) in scores[..len].iter().enumerate() {
                for (a, &vv) in acc.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                    *a += p * vv;
                }
            }
            // SAFETY: row start+i, columns h*d..(h+1)*d belong to this task only.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add((start + i) * hidden + h * d), d) };
        }
    }
    SCRATCH.with(|cell| *cell.borrow_mut() = buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, Rng};

    #[test]
    fn attention_matches_f64() {
        let mut rng = Rng::new(99 ^ std::process::id() as u64);
        let (heads, d) = (3, 8);
        let hidden = heads * d;
        let offsets = [0usize, 1, 6, 6 + 33, 6 + 33 + 2];
        let rows = *offsets.last().unwrap();
        let qkv = rng.vec(rows * 3 * hidden);
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            let mut out = vec![f32::NAN; rows * hidden];
            encoder_attention(isa, &qkv, &SeqLayout { offsets: &offsets }, heads, d, &mut out);
            let mut want = vec![0.0f64; rows * hidden];
            for s in 0..offsets.len() - 1 {
                let (a, b) = (offsets[s], offsets[s + 1]);
                for h in 0..heads {
                    for i in a..b {
                        let q = |c: usize| qkv[i * 3 * hidden + h * d + c] as f64;
                        let sc: Vec<f64> = (a..b).map(|j| (0..d).map(|c| q(c) * qkv[j * 3 * hidden + hidden + h * d + c] as f64).sum::<f64>() / (d as f64).sqrt()).collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                        for c in 0..d {
                            want[i * hidden + h * d + c] = (a..b).zip(&sc).map(|(j, x)| (x - m).exp() / z * qkv[j * 3 * hidden + 2 * hidden + h * d + c] as f64).sum();
                        }
                    }
                }
            }
            assert_close(&out, &want, 1e-5, &format!("attention {isa:?}"));
        }
    }
}

//! Bidirectional multi-head attention over packed variable-length sequences (BERT).
//!
//! One task per (sequence, head): K is copied transposed and V contiguous into a small
//! scratch buffer so both products are unit-stride AXPYs the compiler vectorises, with
//! no horizontal reductions; each query row's scores and outputs are accumulated in
//! 16-lane register blocks. Keys are padded only to the next multiple of 16.

use rayon::prelude::*;

use super::math::fast_exp;
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

/// Score and output lanes per register-resident block (one AVX-512 register of f32).
const LANES: usize = 16;

#[inline(always)]
fn head_attention(qkv: &[f32], start: usize, end: usize, h: usize, heads: usize, d: usize, out: *mut f32) {
    let len = end - start;
    // Key positions padded to a multiple of LANES so the score loops have no scalar tail;
    // padded scores are excluded from the softmax below.
    let padded = len.div_ceil(LANES) * LANES;
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
            // Scores for LANES keys at a time, accumulated in a register over the head
            // dimension rather than re-loaded and re-stored from memory for every c.
            let mut max = [f32::NEG_INFINITY; LANES];
            for (b, block) in scores.chunks_exact_mut(LANES).enumerate() {
                let mut s = [0.0f32; LANES];
                for c in 0..d {
                    let qc = q[c] * scale;
                    let k: &[f32; LANES] = kt[c * padded + b * LANES..c * padded + (b + 1) * LANES].try_into().unwrap();
                    for l in 0..LANES {
                        s[l] += qc * k[l];
                    }
                }
                for l in 0..LANES {
                    // Padded keys (score 0) must not win the max.
                    let live = b * LANES + l < len;
                    max[l] = if live && s[l] > max[l] { s[l] } else { max[l] };
                }
                block.copy_from_slice(&s);
            }
            let m = max.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            let mut sum = [0.0f32; LANES];
            for (b, block) in scores.chunks_exact_mut(LANES).enumerate() {
                for l in 0..LANES {
                    let e = if b * LANES + l < len { fast_exp(block[l] - m) } else { 0.0 };
                    block[l] = e;
                    sum[l] += e;
                }
            }
            let inv = 1.0 / sum.iter().sum::<f32>();
            // out = Σ_j p_j · V_j, one register block of the head dimension at a time.
            let mut c0 = 0;
            while c0 + LANES <= d {
                let mut a = [0.0f32; LANES];
                for j in 0..len {
                    let p = scores[j];
                    let vv: &[f32; LANES] = v[j * d + c0..j * d + c0 + LANES].try_into().unwrap();
                    for l in 0..LANES {
                        a[l] += p * vv[l];
                    }
                }
                for l in 0..LANES {
                    acc[c0 + l] = a[l] * inv;
                }
                c0 += LANES;
            }
            for c in c0..d {
                acc[c] = (0..len).map(|j| scores[j] * v[j * d + c]).sum::<f32>() * inv;
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
    use crate::cpu::test_util::{assert_close, levels, Rng};

    #[test]
    fn attention_matches_f64() {
        let mut rng = Rng::new(99 ^ std::process::id() as u64);
        // d = 8: only the scalar tail of the output loop; d = 40: two register blocks + tail.
        for (heads, d) in [(3usize, 8usize), (2, 40)] {
            let hidden = heads * d;
            let offsets = [0usize, 1, 6, 6 + 33, 6 + 33 + 2];
            let rows = *offsets.last().unwrap();
            let qkv = rng.vec(rows * 3 * hidden);
            for isa in levels("attention_matches_f64") {
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
                assert_close(&out, &want, 1e-5, &format!("attention {isa:?} d={d}"));
            }
        }
    }
}

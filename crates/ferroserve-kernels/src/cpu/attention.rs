//! Bidirectional multi-head attention over packed variable-length sequences (BERT).
//!
//! One task per (sequence, head): K is copied transposed and V contiguous into a small
//! scratch buffer so both products are unit-stride AXPYs the compiler vectorises, with
//! no horizontal reductions. Query rows go in groups of `QR`: each register tile holds
//! `QR` rows × two 16-lane blocks (of keys for the scores, of the head dimension for the
//! output), 8 independent accumulator chains, so the FMA units are not waiting on one
//! chain's latency (the one-row form ran a single dependent chain over the head
//! dimension: 29 % of a 256-token pass for 10 % of its arithmetic, bench/NOTES.md).
//! Keys are padded to the next multiple of 32; padded keys are excluded from the softmax.

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
        // Fused multiply-adds where the level has them (`mul_add` without FMA hardware
        // would be a libm call per element).
        if isa == Isa::Portable {
            head_attention::<false>(qkv, start, end, h, heads, head_dim, out_ptr.0)
        } else {
            dispatch_isa!(isa, || head_attention::<true>(qkv, start, end, h, heads, head_dim, out_ptr.0))
        }
    };
    if tasks <= 1 || rows * hidden < 4096 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

thread_local! {
    /// Per-thread scratch (Kᵀ, V, scores, query and output rows), reused across tasks and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Lanes per register-resident block (one AVX-512 register of f32).
const LANES: usize = 16;
/// Key positions are padded to a multiple of this (two blocks per register tile).
const KEY_PAD: usize = 2 * LANES;
/// Query rows per register tile.
const QR: usize = 4;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn head_attention<const FMA: bool>(qkv: &[f32], start: usize, end: usize, h: usize, heads: usize, d: usize, out: *mut f32) {
    let len = end - start;
    if len == 0 {
        return;
    }
    let padded = len.div_ceil(KEY_PAD) * KEY_PAD;
    let hidden = heads * d;
    let stride = 3 * hidden;
    let scale = 1.0 / (d as f32).sqrt();
    // Take the buffer out of the thread-local rather than working inside `with`'s
    // closure: that closure would be compiled without this function's ISA features.
    let mut buf = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    {
        let need = d * padded + len * d + QR * padded + 2 * QR * d;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (kt, rest) = buf.split_at_mut(d * padded);
        let (v, rest) = rest.split_at_mut(len * d);
        let (scores, rest) = rest.split_at_mut(QR * padded);
        let (qs, rest) = rest.split_at_mut(QR * d);
        let acc = &mut rest[..QR * d];
        kt.fill(0.0);
        for j in 0..len {
            let row = &qkv[(start + j) * stride..];
            for c in 0..d {
                kt[c * padded + j] = row[hidden + h * d + c];
            }
            v[j * d..(j + 1) * d].copy_from_slice(&row[2 * hidden + h * d..2 * hidden + (h + 1) * d]);
        }
        let mut i0 = 0;
        while i0 < len {
            let rows = QR.min(len - i0);
            // Scaled query rows; a partial group repeats its last row (computed, not stored).
            for r in 0..QR {
                let i = start + i0 + r.min(rows - 1);
                let q = &qkv[i * stride + h * d..i * stride + (h + 1) * d];
                for (dst, &qc) in qs[r * d..(r + 1) * d].iter_mut().zip(q) {
                    *dst = qc * scale;
                }
            }
            // Scores: QR rows × 2 key blocks per register tile, accumulated over the head
            // dimension.
            for b in (0..padded).step_by(KEY_PAD) {
                let mut s = [[[0.0f32; LANES]; 2]; QR];
                for c in 0..d {
                    let k: &[f32; KEY_PAD] = kt[c * padded + b..c * padded + b + KEY_PAD].try_into().unwrap();
                    for (r, sr) in s.iter_mut().enumerate() {
                        let qc = qs[r * d + c];
                        for l in 0..LANES {
                            sr[0][l] = madd::<FMA>(qc, k[l], sr[0][l]);
                            sr[1][l] = madd::<FMA>(qc, k[LANES + l], sr[1][l]);
                        }
                    }
                }
                for (r, sr) in s.iter().enumerate() {
                    scores[r * padded + b..r * padded + b + LANES].copy_from_slice(&sr[0]);
                    scores[r * padded + b + LANES..r * padded + b + KEY_PAD].copy_from_slice(&sr[1]);
                }
            }
            // Softmax of each row over its live keys; padded keys get probability 0.
            let mut inv = [0.0f32; QR];
            for (r, row) in scores.chunks_exact_mut(padded).enumerate() {
                let mut max = [f32::NEG_INFINITY; LANES];
                for (bi, block) in row.chunks_exact(LANES).enumerate() {
                    for l in 0..LANES {
                        let live = bi * LANES + l < len;
                        max[l] = if live && block[l] > max[l] { block[l] } else { max[l] };
                    }
                }
                let m = max.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                let mut sum = [0.0f32; LANES];
                for (bi, block) in row.chunks_exact_mut(LANES).enumerate() {
                    for l in 0..LANES {
                        let e = if bi * LANES + l < len { fast_exp(block[l] - m) } else { 0.0 };
                        block[l] = e;
                        sum[l] += e;
                    }
                }
                inv[r] = 1.0 / sum.iter().sum::<f32>();
            }
            // out = P · V: QR rows × 2 blocks of the head dimension per register tile, then
            // one block, then the scalar tail.
            let mut c0 = 0;
            while c0 + 2 * LANES <= d {
                let mut a = [[[0.0f32; LANES]; 2]; QR];
                for j in 0..len {
                    let vv: &[f32; 2 * LANES] = v[j * d + c0..j * d + c0 + 2 * LANES].try_into().unwrap();
                    for (r, ar) in a.iter_mut().enumerate() {
                        let p = scores[r * padded + j];
                        for l in 0..LANES {
                            ar[0][l] = madd::<FMA>(p, vv[l], ar[0][l]);
                            ar[1][l] = madd::<FMA>(p, vv[LANES + l], ar[1][l]);
                        }
                    }
                }
                for (r, ar) in a.iter().enumerate() {
                    for l in 0..LANES {
                        acc[r * d + c0 + l] = ar[0][l] * inv[r];
                        acc[r * d + c0 + LANES + l] = ar[1][l] * inv[r];
                    }
                }
                c0 += 2 * LANES;
            }
            while c0 + LANES <= d {
                let mut a = [[0.0f32; LANES]; QR];
                for j in 0..len {
                    let vv: &[f32; LANES] = v[j * d + c0..j * d + c0 + LANES].try_into().unwrap();
                    for (r, ar) in a.iter_mut().enumerate() {
                        let p = scores[r * padded + j];
                        for l in 0..LANES {
                            ar[l] = madd::<FMA>(p, vv[l], ar[l]);
                        }
                    }
                }
                for (r, ar) in a.iter().enumerate() {
                    for l in 0..LANES {
                        acc[r * d + c0 + l] = ar[l] * inv[r];
                    }
                }
                c0 += LANES;
            }
            for c in c0..d {
                for r in 0..QR {
                    acc[r * d + c] = (0..len).fold(0.0f32, |s, j| madd::<FMA>(scores[r * padded + j], v[j * d + c], s)) * inv[r];
                }
            }
            for r in 0..rows {
                // SAFETY: row start+i0+r, columns h*d..(h+1)*d belong to this task only.
                unsafe { std::ptr::copy_nonoverlapping(acc[r * d..].as_ptr(), out.add((start + i0 + r) * hidden + h * d), d) };
            }
            i0 += QR;
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
        // d = 8: only the scalar tail of the output loop; d = 40: a two-block tile + tail;
        // d = 48: a two-block tile + a one-block tile. Sequence lengths cover partial query
        // groups, one and several 32-key tiles, and padded keys.
        for (heads, d) in [(3usize, 8usize), (2, 40), (2, 48)] {
            let hidden = heads * d;
            let offsets = [0usize, 1, 6, 6 + 33, 6 + 33 + 2, 6 + 33 + 2 + 70];
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

//! Row-wise and element-wise kernels: residual + LayerNorm, GELU, softmax.
//! Plain loops written so the compiler vectorises them inside each ISA instantiation.

use rayon::prelude::*;

use super::math::{erf, fast_exp};
use super::{dispatch_isa, Isa};

/// Elements per parallel chunk: below this, threading costs more than it saves.
const PAR_CHUNK_ELEMS: usize = 16 * 1024;

pub fn add_layer_norm(isa: Isa, x: &mut [f32], residual: Option<&[f32]>, dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    assert_eq!(x.len() % dim, 0);
    assert!(gamma.len() == dim && beta.len() == dim);
    if let Some(r) = residual {
        assert_eq!(r.len(), x.len());
    }
    let rows_per_chunk = (PAR_CHUNK_ELEMS / dim).max(1);
    let run = |ci: usize, chunk: &mut [f32]| {
        let res = residual.map(|r| &r[ci * rows_per_chunk * dim..ci * rows_per_chunk * dim + chunk.len()]);
        dispatch_isa!(isa, || layer_norm_rows(chunk, res, dim, gamma, beta, eps))
    };
    if x.len() <= PAR_CHUNK_ELEMS {
        run(0, x);
    } else {
        x.par_chunks_mut(rows_per_chunk * dim).enumerate().for_each(|(ci, c)| run(ci, c));
    }
}

#[inline(always)]
fn layer_norm_rows(x: &mut [f32], residual: Option<&[f32]>, dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    for (r, row) in x.chunks_exact_mut(dim).enumerate() {
        if let Some(res) = residual {
            for (v, &a) in row.iter_mut().zip(&res[r * dim..(r + 1) * dim]) {
                *v += a;
            }
        }
        let mean = lane_sum(row) / dim as f32;
        // 16 lanes over whole chunks (vectorises; `i % 16` indexing did not), then the tail.
        let mut var_acc = [0.0f32; 16];
        let chunks = row.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                let d = c[l] - mean;
                var_acc[l] += d * d;
            }
        }
        let tail_var: f32 = tail.iter().map(|&v| (v - mean) * (v - mean)).sum();
        let var = (var_acc.iter().sum::<f32>() + tail_var) / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Sum with 16 independent lanes (vectorisable, and a fixed order).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

pub fn gelu(isa: Isa, x: &mut [f32]) {
    let run = |c: &mut [f32]| dispatch_isa!(isa, || gelu_slice(c));
    if x.len() <= PAR_CHUNK_ELEMS {
        run(x);
    } else {
        x.par_chunks_mut(PAR_CHUNK_ELEMS).for_each(run);
    }
}

#[inline(always)]
pub(crate) fn gelu_slice(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

pub fn softmax_rows(isa: Isa, x: &mut [f32], cols: usize) {
    assert_eq!(x.len() % cols, 0);
    let run = |c: &mut [f32]| dispatch_isa!(isa, || c.chunks_exact_mut(cols).for_each(softmax_in_place));
    let rows_per_chunk = (PAR_CHUNK_ELEMS / cols).max(1);
    if x.len() <= PAR_CHUNK_ELEMS {
        run(x);
    } else {
        x.par_chunks_mut(rows_per_chunk * cols).for_each(run);
    }
}

#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in row.iter_mut() {
        *v = fast_exp(*v - max);
    }
    let inv = 1.0 / lane_sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, levels, Rng};

    #[test]
    fn layer_norm_matches_f64() {
        let mut rng = Rng::new(7 ^ std::process::id() as u64);
        for isa in levels("layer_norm_matches_f64") {
            for &(rows, dim) in &[(1, 1), (3, 384), (100, 17), (700, 384)] {
                let x0 = rng.vec(rows * dim);
                let res = rng.vec(rows * dim);
                let (g, b) = (rng.vec(dim), rng.vec(dim));
                let mut x = x0.clone();
                add_layer_norm(isa, &mut x, Some(&res), dim, &g, &b, 1e-12);
                let mut want = vec![0.0f64; rows * dim];
                for r in 0..rows {
                    let row: Vec<f64> = (0..dim).map(|i| x0[r * dim + i] as f64 + res[r * dim + i] as f64).collect();
                    let mean = row.iter().sum::<f64>() / dim as f64;
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
                    for i in 0..dim {
                        want[r * dim + i] = (row[i] - mean) / (var + 1e-12).sqrt() * g[i] as f64 + b[i] as f64;
                    }
                }
                // dim = 1 normalises to exactly beta; skip the degenerate relative check there.
                assert_close(&x, &want, if dim == 1 { 1e-2 } else { 1e-4 }, &format!("{isa:?} {rows}x{dim}"));
            }
        }
    }

    #[test]
    fn gelu_and_softmax_match_f64() {
        let mut rng = Rng::new(11 ^ std::process::id() as u64);
        for isa in levels("gelu_and_softmax_match_f64") {
            let x0: Vec<f32> = rng.vec(40_001).iter().map(|v| v * 6.0).collect();
            let mut x = x0.clone();
            gelu(isa, &mut x);
            let want: Vec<f64> = x0.iter().map(|&v| {
                let v = v as f64;
                0.5 * v * (1.0 + libm_erf(v / 2f64.sqrt()))
            }).collect();
            assert_close(&x, &want, 1e-5, &format!("gelu {isa:?}"));

            for cols in [1, 5, 256, 1000] {
                let s0: Vec<f32> = rng.vec(cols * 9).iter().map(|v| v * 20.0).collect();
                let mut s = s0.clone();
                softmax_rows(isa, &mut s, cols);
                let mut want = vec![0.0f64; s0.len()];
                for (r, row) in s0.chunks(cols).enumerate() {
                    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                    let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                    for (i, &v) in row.iter().enumerate() {
                        want[r * cols + i] = (v as f64 - m).exp() / sum;
                    }
                }
                assert_close(&s, &want, 1e-5, &format!("softmax {isa:?} cols={cols}"));
            }
        }
    }

    /// erf in f64 via a continued-fraction-free series / asymptotic split, good to 1e-12.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut sum, mut term, mut n) = (0.0, x, 0.0);
            while term.abs() > 1e-17 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(x) < 2.3e-5 here; its asymptotic series is accurate enough.
            let z = x.abs();
            let erfc = (-z * z).exp() / (z * std::f64::consts::PI.sqrt()) * (1.0 - 1.0 / (2.0 * z * z) + 3.0 / (4.0 * z.powi(4)));
            (1.0 - erfc).copysign(x)
        }
    }
}

//! GFLOP/s of the f32 linear kernel at the BERT shapes (m = tokens in a batch).
//! `cargo run --release --example gemm_bench`

use std::time::Instant;

use ferroserve_kernels::{Activation, CpuDevice, Device};

fn main() {
    let dev = CpuDevice::new();
    println!("device {}", dev.name());
    for &(m, n, k) in &[(608usize, 1152usize, 384usize), (608, 384, 384), (608, 1536, 384), (608, 384, 1536), (20, 1536, 384), (2048, 2048, 2048)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let packed = dev.pack_linear(&w, n, k, None);
        let mut out = vec![0.0f32; m * n];
        let iters = (2e10 / (2.0 * (m * n * k) as f64)).max(3.0) as usize;
        dev.linear(&x, m, &packed, Activation::None, &mut out);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..iters {
                dev.linear(&x, m, &packed, Activation::None, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / iters as f64);
        }
        println!("m={m:5} n={n:5} k={k:5}: {:7.1} GFLOP/s ({:.3} ms)", 2.0 * (m * n * k) as f64 / best / 1e9, best * 1e3);
    }
}

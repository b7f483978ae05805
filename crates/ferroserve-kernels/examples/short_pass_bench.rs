//! The 24 linear layers of one short sentence's BERT forward pass (all-MiniLM-L6-v2 shapes,
//! six layers with their own weights, so the 21 MB of bf16 weights stream from L3 as in the
//! server), m = `M` tokens (default 19, the latency workload's mean), with an idle gap
//! between passes as at concurrency 1. Run under `RAYON_NUM_THREADS=1` to see the kernel
//! alone. `cargo run --release --example short_pass_bench -p ferroserve-kernels`

use std::time::{Duration, Instant};

use ferroserve_kernels::{Activation, CpuDevice, Device};

fn main() {
    let dev = CpuDevice::new();
    let m: usize = std::env::var("M").ok().and_then(|v| v.parse().ok()).unwrap_or(19);
    let shapes = [(1152usize, 384usize), (384, 384), (1536, 384), (384, 1536)];
    let mut linears = Vec::new();
    for layer in 0..6 {
        for &(n, k) in &shapes {
            let w: Vec<f32> = (0..n * k).map(|i| ((i + layer) % 5) as f32 * 0.1).collect();
            linears.push((dev.pack_linear(&w, n, k, None), k));
        }
    }
    let x: Vec<f32> = (0..m * 1536).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut out = vec![0.0f32; m * 1536];
    let mut micros = Vec::new();
    for _ in 0..400 {
        std::thread::sleep(Duration::from_micros(300));
        let t = Instant::now();
        // One job on a worker for the whole pass, as BertModel::embed runs it.
        rayon::scope(|_| {
            for (w, k) in &linears {
                dev.linear(&x[..m * k], m, w, Activation::None, &mut out);
            }
        });
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let bytes: usize = linears.iter().map(|(w, _)| w.weights.bytes()).sum();
    println!(
        "device {}: 24 linears, m = {m}: p10 {:.0} us, p50 {:.0} us ({:.1} MB of weights -> {:.1} GB/s at p50)",
        dev.name(),
        micros[40],
        micros[200],
        bytes as f64 / 1e6,
        bytes as f64 / (micros[200] * 1e-6) / 1e9
    );
}

//! Q4_1 / Q8_0 matmul throughput, llama.cpp's order against the fast panel order, for the
//! decoder's shapes at m = 1, 16 and 512 rows.
//!
//! `cargo run --release -p ferroserve-kernels --example panel_bench`
//!
//! Reports ns per (weight row, 32-block, activation row) — the unit the kernels' floors are
//! stated in (bench/NOTES.md) — median of 15 runs after a warm-up, both orders back to back.

use std::time::Instant;

use ferroserve_kernels::quant::{panel_matmul, quant_matmul_prepared, quantize_row, Panels, Q8Activations, QuantIsa, QuantType};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let isa = QuantIsa::selected();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    println!("# isa {:?}, {} threads; ns per (row, block, activation row): exact | fast | ratio", isa, rayon::current_num_threads());
    for (t, n, k) in [(QuantType::Q4_1, 1536, 576), (QuantType::Q4_1, 576, 1536), (QuantType::Q8_0, 49152, 576)] {
        let wf: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let rb = t.row_bytes(k);
        let mut w = vec![0u8; n * rb];
        for (row, bytes) in wf.chunks_exact(k).zip(w.chunks_exact_mut(rb)) {
            quantize_row(t, row, bytes);
        }
        let panels = Panels::pack(t, &w, n, k);
        for m in [1usize, 16, 512] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut acts = Q8Activations::new();
            acts.quantize_with_isa(isa, &x, m, k);
            let mut y = vec![0f32; m * n];
            let reps = if m * n > 1 << 20 { 5 } else { 15 };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for i in 0..=reps {
                let t0 = Instant::now();
                quant_matmul_prepared(isa, t, &w, n, &acts, &mut y);
                let t1 = Instant::now();
                panel_matmul(isa, &panels, &acts, &mut y);
                let t2 = Instant::now();
                if i > 0 {
                    a.push((t1 - t0).as_secs_f64());
                    b.push((t2 - t1).as_secs_f64());
                }
            }
            let unit = 1e9 / (n * (k / 32) * m) as f64;
            let (ea, eb) = (median(a) * unit, median(b) * unit);
            println!("{} n={n:<6} k={k:<5} m={m:<4} {ea:7.3} | {eb:7.3} | {:5.2}x", t.name(), ea / eb);
        }
    }
}

//! Panel matmul throughput, llama.cpp's order (the exact kernels) against the fast panel order
//! on the same weights, for SmolLM2-135M's shapes (Q4_1, Q8_0) and a 1B model's FFN shape
//! (k = 2048, n = 8192) in Q4_K, Q6_K and Q4_1 — the last being what Q4_K would cost repacked
//! into Q4_1 panels (the same kernel and bytes: 24 per 32 weights against Q4_K panels' 19).
//!
//! `cargo run --release -p ferroserve-kernels --example panel_bench [kquant | fallback] [m...]`
//! (`fallback`: the formats K-quant mixes use for rows that are not a multiple of 256, on
//! SmolLM2's FFN shape; see [`fallback_round_robin`])
//!
//! Reports ns per (weight row, 32-block, activation row) — the unit the kernels' floors are
//! stated in (bench/NOTES.md) — median of 15 runs (5 for big ones, 51 at m = 1) after a
//! warm-up, both orders alternating in one loop, with the fast one's p10–p90 spread; at m = 1
//! also the GGUF weight bytes over the median time (GB/s), the figure the decode bandwidth
//! floor uses. The 1B shapes cycle through copies of the matrix totalling ≥ 96 MB (3× this
//! host's L3), so that, as in a decode step, the weights come from memory; SmolLM2's shapes
//! use one copy (in cache, as in the earlier notes).

use std::time::Instant;

use ferroserve_kernels::quant::{panel_matmul, quant_matmul_prepared, quantize_row, Panels, Q8Activations, QuantLevel, QuantType};

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rng() -> impl FnMut() -> f32 {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn quantized(t: QuantType, n: usize, k: usize, rnd: &mut impl FnMut() -> f32) -> Vec<u8> {
    let rb = t.row_bytes(k);
    let mut w = vec![0u8; n * rb];
    let mut row = vec![0f32; k];
    for bytes in w.chunks_exact_mut(rb) {
        row.iter_mut().for_each(|v| *v = rnd());
        quantize_row(t, &row, bytes);
    }
    w
}

/// One weight matrix `[n, k]` of each listed (format, fast?) — the exact kernels or the panels —
/// run round-robin in one loop, each over copies totalling ≥ 96 MB so the weights stream from
/// memory as in a decode step. Prints per run the median µs per matmul (p10–p90) and the GGUF
/// bytes over the median (GB/s); returns per `m` the medians in the order of `runs`.
fn round_robin(isa: QuantLevel, n: usize, k: usize, formats: &[(QuantType, bool)], ms: &[usize]) -> Vec<Vec<f64>> {
    let rounds = 41;
    let mut rnd = rng();
    // (name, GGUF bytes of one copy, copies, the run over all copies)
    type Run = (String, usize, usize, Box<dyn Fn(&Q8Activations, &mut [f32])>);
    let mut runs: Vec<Run> = Vec::new();
    for &(t, fast) in formats {
        let w = quantized(t, n, k, &mut rnd);
        let copies = 96_000_000usize.div_ceil(w.len());
        let ws: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
        let file_bytes = w.len();
        if fast {
            let ps: Vec<Panels> = ws.iter().map(|w| Panels::pack(t, w, n, k)).collect();
            let run = move |a: &Q8Activations, y: &mut [f32]| {
                for p in &ps {
                    panel_matmul(isa, p, a, y);
                }
            };
            runs.push((format!("{} panels", t.name()), file_bytes, copies, Box::new(run)));
        } else {
            let run = move |a: &Q8Activations, y: &mut [f32]| {
                for w in &ws {
                    quant_matmul_prepared(isa, t, w, n, a, y);
                }
            };
            runs.push((format!("{} exact", t.name()), file_bytes, copies, Box::new(run)));
        }
    }
    println!("# isa {isa:?}, n={n} k={k}, {rounds} rounds round-robin; median µs per matmul (p10–p90), GGUF bytes / median (GB/s)");
    let mut medians = Vec::new();
    for &m in ms {
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let mut acts = Q8Activations::new();
        acts.quantize_with_isa(isa, &x, m, k);
        let mut y = vec![0f32; m * n];
        let mut times = vec![Vec::new(); runs.len()];
        for round in 0..=rounds {
            for (i, (_, _, copies, run)) in runs.iter().enumerate() {
                let t0 = Instant::now();
                run(&acts, &mut y);
                if round > 0 {
                    times[i].push(t0.elapsed().as_secs_f64() / *copies as f64);
                }
            }
        }
        for (i, (name, bytes, _, _)) in runs.iter().enumerate() {
            let med = percentile(&times[i], 0.5);
            println!(
                "m={m:<3} {name:<13} {:9.1} µs ({:.1}–{:.1}) {:5.1} GB/s",
                med * 1e6,
                percentile(&times[i], 0.1) * 1e6,
                percentile(&times[i], 0.9) * 1e6,
                *bytes as f64 / med / 1e9
            );
        }
        medians.push(times.iter().map(|t| percentile(t, 0.5)).collect());
    }
    medians
}

/// `panel_bench kquant [m...]`: the 1B FFN shape (n = 8192, k = 2048) in Q4_K and Q6_K, exact
/// and panels, plus Q4_1 panels of the same shape (Q4_K's other option).
fn kquant_round_robin(isa: QuantLevel, ms: &[usize]) {
    use QuantType::*;
    let formats = [(Q4_K, false), (Q4_K, true), (Q6_K, false), (Q6_K, true), (Q4_1, true)];
    for (m, med) in ms.iter().zip(round_robin(isa, 8192, 2048, &formats, ms)) {
        println!(
            "m={m:<3} ratios: Q4_K exact/panels {:.2}x, Q6_K exact/panels {:.2}x, Q4_1-panels/Q4_K-panels time {:.2}x",
            med[0] / med[1],
            med[2] / med[3],
            med[4] / med[1]
        );
    }
}

/// `panel_bench fallback [m...]`: SmolLM2's FFN gate/up shape (n = 1536, k = 576), the rows of
/// 576 that llama.cpp's K-quant mixes store as Q5_0 (Q4_K_M) or Q5_1 (Q5_K_M): those formats
/// exact and in panels, Q8_0 panels of the same shape (= the cost of Q5_0 repacked into Q8_0
/// panels, codes `q − 16` as i8: the same kernel and bytes, 36 per 32 weights against the 5-bit
/// layout's 24), and Q4_0 and IQ4_NL panels.
fn fallback_round_robin(isa: QuantLevel, ms: &[usize]) {
    use QuantType::*;
    let formats = [(Q5_0, false), (Q5_0, true), (Q8_0, true), (Q5_1, false), (Q5_1, true), (Q4_0, true), (IQ4_NL, true)];
    for (m, med) in ms.iter().zip(round_robin(isa, 1536, 576, &formats, ms)) {
        println!(
            "m={m:<3} ratios: Q5_0 exact/panels {:.2}x, Q8_0-panels/Q5_0-panels time {:.2}x, Q5_1 exact/panels {:.2}x",
            med[0] / med[1],
            med[2] / med[1],
            med[3] / med[4]
        );
    }
}

fn main() {
    let isa = QuantLevel::selected();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(mode @ ("kquant" | "fallback")) = args.first().map(String::as_str) {
        let ms: Vec<usize> = args[1..].iter().map(|a| a.parse().expect("m")).collect();
        let ms = if ms.is_empty() { vec![1, 16] } else { ms };
        if mode == "kquant" {
            kquant_round_robin(isa, &ms);
        } else {
            fallback_round_robin(isa, &ms);
        }
        return;
    }
    let mut rnd = rng();
    println!(
        "# isa {:?}, {} threads; ns per (row, block, activation row): exact | fast (p10–p90) | exact/fast | m=1: GGUF GB/s exact, fast",
        isa,
        rayon::current_num_threads()
    );
    let small: &[usize] = &[1, 16, 512];
    let big: &[usize] = &[1, 16];
    for (t, n, k, ms) in [
        (QuantType::Q4_1, 1536, 576, small),
        (QuantType::Q4_1, 576, 1536, small),
        (QuantType::Q8_0, 49152, 576, small),
        (QuantType::Q4_K, 8192, 2048, big),
        (QuantType::Q6_K, 8192, 2048, big),
        (QuantType::Q4_1, 8192, 2048, big),
        (QuantType::Q8_0, 8192, 2048, big),
    ] {
        let w = quantized(t, n, k, &mut rnd);
        let copies = if ms == big { 96_000_000usize.div_ceil(w.len()) } else { 1 };
        let ws: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
        let ps: Vec<Panels> = ws.iter().map(|w| Panels::pack(t, w, n, k)).collect();
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut acts = Q8Activations::new();
            acts.quantize_with_isa(isa, &x, m, k);
            let mut y = vec![0f32; m * n];
            let reps = if m * n > 1 << 20 { 5 } else { 15 };
            let reps = if m == 1 { 51 } else { reps };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for i in 0..=reps {
                let t0 = Instant::now();
                for w in &ws {
                    quant_matmul_prepared(isa, t, w, n, &acts, &mut y);
                }
                let t1 = Instant::now();
                for panels in &ps {
                    panel_matmul(isa, panels, &acts, &mut y);
                }
                let t2 = Instant::now();
                if i > 0 {
                    a.push((t1 - t0).as_secs_f64() / copies as f64);
                    b.push((t2 - t1).as_secs_f64() / copies as f64);
                }
            }
            let unit = 1e9 / (n * (k / 32) * m) as f64;
            let (ea, eb) = (percentile(&a, 0.5) * unit, percentile(&b, 0.5) * unit);
            let (lo, hi) = (percentile(&b, 0.1) * unit, percentile(&b, 0.9) * unit);
            let gbs = |v: &[f64]| w.len() as f64 / percentile(v, 0.5) / 1e9;
            let bw = if m == 1 { format!(" | {:5.1} {:5.1}", gbs(&a), gbs(&b)) } else { String::new() };
            println!("{} n={n:<6} k={k:<5} m={m:<4} {ea:7.3} | {eb:7.3} ({lo:.3}–{hi:.3}) | {:5.2}x{bw}", t.name(), ea / eb);
        }
    }
}

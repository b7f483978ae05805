//! Micro-benchmark of `quant_matmul`: GB/s of weights streamed for one activation row
//! (decode) and GFLOP/s for 16 rows, per ISA level, side by side in one run.
//!
//! `cargo run --release -p ferroserve-kernels --example quant_bench [reps] [TYPE,…]`
//! (types default to Q4_1,Q8_0,Q4_0,Q4_K,Q6_K; `step` alone runs only the model step)
//!
//! Method: every measurement is warmed up, then timed `reps` times (default 41); we print
//! the median and the [min, max] spread. ISA levels alternate within each repetition
//! (A B C A B C …) so machine noise hits them alike. The memory anchor is a read of 1 GiB
//! on the rayon pool (larger than the 480 MiB L3 here), in the same run, so the decode
//! numbers can be read against the bandwidth the machine actually gave at the time.

use std::hint::black_box;
use std::time::Instant;

use ferroserve_kernels::quant::{quant_matmul_with_isa, quantize_row, QuantLevel, QuantType};
use rayon::prelude::*;

fn weights(t: QuantType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let row_bytes = t.row_bytes(k);
    let mut w = vec![0u8; n * row_bytes];
    w.par_chunks_exact_mut(row_bytes)
        .enumerate()
        .for_each(|(j, bytes)| {
            let mut s = seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let row: Vec<f32> = (0..k)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            quantize_row(t, &row, bytes);
        });
    w
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// Times `f` for each level, alternating levels within each repetition; seconds per call.
fn time_alternating(
    isas: &[QuantLevel],
    reps: usize,
    inner: usize,
    mut f: impl FnMut(QuantLevel),
) -> Vec<Stats> {
    for &isa in isas {
        for _ in 0..inner.max(3) {
            f(isa);
        }
    }
    let mut samples = vec![Vec::with_capacity(reps); isas.len()];
    for _ in 0..reps {
        for (i, &isa) in isas.iter().enumerate() {
            let t0 = Instant::now();
            for _ in 0..inner {
                f(isa);
            }
            samples[i].push(t0.elapsed().as_secs_f64() / inner as f64);
        }
    }
    samples.into_iter().map(stats).collect()
}

fn memory_anchor(reps: usize) -> Stats {
    let buf: Vec<u64> = (0..(1usize << 27))
        .into_par_iter()
        .map(|i| i as u64)
        .collect(); // 1 GiB
    let mut gbps = Vec::new();
    for _ in 0..reps.min(9) {
        let t0 = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a ^ v))
            .reduce(|| 0, |a, b| a ^ b);
        black_box(s);
        gbps.push((buf.len() * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    stats(gbps)
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(41);
    let wanted: Vec<String> = std::env::args()
        .nth(2)
        .map(|s| s.split(',').map(str::to_uppercase).collect())
        .unwrap_or_default();
    let want = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let isas = QuantLevel::available();
    println!(
        "# quant_matmul micro-benchmark: {} rayon threads, levels {:?}, selected {:?}, {reps} reps (median [min, max])",
        rayon::current_num_threads(),
        isas,
        QuantLevel::selected()
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "# machine: {}; load average at start: {}",
        cpu.unwrap_or_else(|| "unknown".into()),
        load.trim()
    );
    let anchor = memory_anchor(reps);
    println!(
        "memory anchor ({}-thread read of 1 GiB): {:.1} GB/s [{:.1}, {:.1}]",
        rayon::current_num_threads(),
        anchor.median,
        anchor.min,
        anchor.max
    );

    // [n, k]: SmolLM2-135M's FFN down (576×1536) and up/gate (1536×576), and its tied
    // embedding / LM head (49152×576).
    let shapes = [(576usize, 1536usize), (1536, 576), (49152, 576)];
    for t in [
        QuantType::Q4_1,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ] {
        if !want(t.name()) {
            continue;
        }
        for &(n, k) in &shapes {
            let k = if t.block_elems() == 256 && k % 256 != 0 {
                768
            } else {
                k
            };
            let w = weights(t, n, k, 7);
            let bytes = w.len() as f64;
            for m in [1usize, 16] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let mut y = vec![0f32; m * n];
                let inner = ((2e6 / bytes) as usize).clamp(1, 200);
                let res = time_alternating(&isas, reps, inner, |isa| {
                    quant_matmul_with_isa(isa, t, &w, n, k, &x, m, &mut y);
                    black_box(&y);
                });
                for (isa, s) in isas.iter().zip(&res) {
                    if m == 1 {
                        println!(
                            "{:5} m=1  [{n:5}×{k:4}] {:9}: {:8.1} µs  {:6.1} GB/s [{:.1}, {:.1}]",
                            t.name(),
                            isa.as_str(),
                            s.median * 1e6,
                            bytes / s.median / 1e9,
                            bytes / s.max / 1e9,
                            bytes / s.min / 1e9
                        );
                    } else {
                        let flop = 2.0 * (m * n * k) as f64;
                        println!(
                            "{:5} m={m} [{n:5}×{k:4}] {:9}: {:8.1} µs  {:6.1} GFLOP/s [{:.1}, {:.1}]",
                            t.name(),
                            isa.as_str(),
                            s.median * 1e6,
                            flop / s.median / 1e9,
                            flop / s.max / 1e9,
                            flop / s.min / 1e9
                        );
                    }
                }
            }
        }
    }

    if !want("STEP") {
        return;
    }
    // One decode step of SmolLM2-135M as its Q4_1 GGUF stores it: 30 layers of Q4_1 and the
    // tied embedding / LM head in Q8_0 (96.4 MB; every matrix its own buffer, so nothing is
    // reused from cache that the real model would not reuse).
    let layer: [(usize, usize); 7] = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let mut mats: Vec<(QuantType, usize, usize, Vec<u8>)> = Vec::new();
    for l in 0..30 {
        for (i, &(n, k)) in layer.iter().enumerate() {
            let w = weights(QuantType::Q4_1, n, k, (l * 7 + i) as u64);
            mats.push((QuantType::Q4_1, n, k, w));
        }
    }
    let head = weights(QuantType::Q8_0, 49152, 576, 999);
    mats.push((QuantType::Q8_0, 49152, 576, head));
    let total: f64 = mats.iter().map(|m| m.3.len() as f64).sum();
    let x: Vec<f32> = (0..1536 * 16)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let mut y = vec![0f32; 49152 * 16];
    for m in [1usize, 16] {
        let cpu_before = process_cpu_seconds();
        let res = time_alternating(&isas, reps.min(21), 1, |isa| {
            for (t, n, k, w) in &mats {
                quant_matmul_with_isa(isa, *t, w, *n, *k, &x[..m * k], m, &mut y[..m * n]);
            }
            black_box(&y);
        });
        let cpu = process_cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
        for (isa, s) in isas.iter().zip(&res) {
            println!(
                "SmolLM2-135M step, all matmuls, m={m:2} ({:.1} MB) {:9}: {:6.2} ms [{:.2}, {:.2}]  {:5.1} GB/s",
                total / 1e6,
                isa.as_str(),
                s.median * 1e3,
                s.min * 1e3,
                s.max * 1e3,
                total / s.median / 1e9
            );
        }
        if let Some(cpu) = cpu {
            let wall: f64 = res.iter().map(|s| s.median).sum::<f64>() * (reps.min(21) + 3) as f64;
            println!(
                "  (this process got ≈ {:.2} of {} cores during these runs)",
                cpu / wall,
                rayon::current_num_threads()
            );
        }
    }
}

/// CPU seconds used by all of this process's threads (Linux), to tell a slow kernel from a
/// machine whose cores were busy with something else.
fn process_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

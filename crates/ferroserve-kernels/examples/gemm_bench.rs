//! GFLOP/s of the f32 linear kernel at the BERT shapes (m = tokens in a batch).
//! `cargo run --release --example gemm_bench`
//!
//! `SHAPES=encoder`: instead, MiniLM's four linears (384→1152 QKV, 384→384 attention out,
//! 384→1536 FFN in, 1536→384 FFN out) at m = 19 (one sentence), 608 (32 sentences), 256 (one
//! passage) and 2048 (8 passages). `GFLOP=<n>` (20): work per timed repetition. The rayon
//! pool takes `RAYON_NUM_THREADS` (1 gives a per-core rate). Besides the best wall-clock
//! rate, `cpu` is the rate per CPU-second of the process (the best of the repetitions): on
//! a shared machine, with one thread, the steady measure of the kernel itself.
//! `COLD_MB=<n>`: cycle through copies of the weights totalling ≥ n MB, so each call reads
//! weights no cache holds (as a real encoder pass does: MiniLM's are 42.5 MB in f32).

use std::time::Instant;

use ferroserve_kernels::{Activation, CpuDevice, Device};

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU seconds used by this process so far (all threads).
fn process_cpu() -> f64 {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; glibc's clock_gettime fills it.
    assert_eq!(unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) }, 0);
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

fn main() {
    let dev = CpuDevice::new();
    println!("device {}", dev.name());
    let shapes: Vec<(usize, usize, usize)> = if std::env::var("SHAPES").is_ok_and(|s| s == "encoder") {
        [19, 608, 256, 2048].iter().flat_map(|&m| [(m, 1152, 384), (m, 384, 384), (m, 1536, 384), (m, 384, 1536)]).collect()
    } else {
        vec![(608, 1152, 384), (608, 384, 384), (608, 1536, 384), (608, 384, 1536), (20, 1536, 384), (2048, 2048, 2048)]
    };
    let flop_per_rep: f64 = std::env::var("GFLOP").ok().map_or(20.0, |g| g.parse().expect("GFLOP=<n>")) * 1e9;
    for &(m, n, k) in &shapes {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let cold_bytes: usize = std::env::var("COLD_MB").ok().map_or(0, |v| v.parse::<usize>().expect("COLD_MB=<n>") << 20);
        let copies = cold_bytes.div_ceil(n * k * 4).max(1);
        let packs: Vec<_> = (0..copies).map(|_| dev.pack_linear(&w, n, k, None)).collect();
        let mut next = packs.iter().cycle();
        let mut out = vec![0.0f32; m * n];
        let iters = (flop_per_rep / (2.0 * (m * n * k) as f64)).max(3.0) as usize;
        dev.linear(&x, m, next.next().unwrap(), Activation::None, &mut out);
        let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let (t, c) = (Instant::now(), process_cpu());
            for _ in 0..iters {
                dev.linear(&x, m, next.next().unwrap(), Activation::None, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / iters as f64);
            best_cpu = best_cpu.min((process_cpu() - c) / iters as f64);
        }
        let flop = 2.0 * (m * n * k) as f64;
        println!("m={m:5} n={n:5} k={k:5}: {:7.1} GFLOP/s ({:.3} ms), cpu {:7.1} GFLOP/s", flop / best / 1e9, best * 1e3, flop / best_cpu / 1e9);
    }
}

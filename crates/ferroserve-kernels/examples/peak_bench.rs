//! The arithmetic ceilings of this CPU's AVX2 units, measured: the denominators of the floor
//! arithmetic in bench/NOTES.md ("The floors of issue 14's open targets on Zen 1").
//! `cargo run --release -p ferroserve-kernels --example peak_bench`
//!
//! Each loop keeps twelve independent register chains of one instruction mix busy (enough to
//! cover any latency on current x86 cores), and runs on every CPU at once (`THREADS`, default:
//! all of them), as a step of the engine does. It prints multiply-accumulates (MACs) per second
//! per thread and in total:
//! - `fma`: `vfmadd231ps ymm` alone (8 f32 MACs each): the f32 kernels' ceiling.
//! - `maddubs`: `vpmaddubsw ymm` alone (32 u8×i8 MACs each, pairs summed to i16): no int8 dot
//!   on AVX2 does fewer instructions per product, so this is the int8 ceiling.
//! - `maddubs+maddwd 1:1`: one `vpmaddwd` (widening to i32) per `vpmaddubsw`, the mix of a dot
//!   whose block sums cannot stay in i16 (8-bit codes: Q8_0).
//! - `maddubs+maddwd 4:1`: one per four, the 5- and 6-bit codes' mix (Q5_0, Q5_1, Q6_K: four
//!   pair sums of 2·31·127 fit i16).
//! - `maddubs+maddwd 8:1`: one per eight, the least a 4-bit code can get by with (eight pair
//!   sums of 2·15·127 fit i16).
//! - `maddubs+fma 2:1` and `1:1`: f32 FMAs issued next to the int8 products (eight
//!   `vpmaddubsw` with four or eight `vfmadd231ps`), to see whether they run on other ports: on
//!   Zen 1 `vpmaddubsw` needs FP0 and an FMA FP0 or FP1, so a mix can exceed either alone.
//!
//! Refuses to run (exit 2) on a CPU without AVX2 and FMA: nothing here has a portable form.
//! `SECONDS=<s>` (default 1): time per mix.

use std::sync::{Arc, Barrier};
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// One kind of loop: its name, MACs per iteration, and the loop (iterations → a value that
    /// depends on every chain, so nothing is optimised away).
    pub type Mix = (&'static str, f64, unsafe fn(u64) -> i64);

    pub const MIXES: [Mix; 7] = [
        ("fma", 12.0 * 8.0, fma),
        ("maddubs", 12.0 * 32.0, int8::<12, 0>),
        ("maddubs+maddwd 1:1", 6.0 * 32.0, int8::<6, 6>),
        ("maddubs+maddwd 4:1", 8.0 * 32.0, int8::<8, 2>),
        ("maddubs+maddwd 8:1", 8.0 * 32.0, int8::<8, 1>),
        ("maddubs+fma 2:1", 8.0 * 32.0 + 4.0 * 8.0, maddubs_fma::<4>),
        ("maddubs+fma 1:1", 8.0 * 32.0 + 8.0 * 8.0, maddubs_fma::<8>),
    ];

    /// Keeps `v` in a register the compiler cannot see through (no hoisting, no folding).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn opaque(v: __m256i) -> __m256i {
        let mut v = v;
        asm!("/* {0} */", inout(ymm_reg) v, options(nomem, nostack, preserves_flags));
        v
    }

    #[target_feature(enable = "avx2")]
    unsafe fn fold_i(x: &[__m256i]) -> i64 {
        x.iter().map(|&v| _mm256_extract_epi16::<0>(v) as i64).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(n: u64) -> i64 {
        let mut x = [_mm256_set1_ps(0.5); 12];
        let (mut b, c) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-4));
        for _ in 0..n {
            for v in x.iter_mut() {
                *v = _mm256_fmadd_ps(*v, b, c);
            }
            b = _mm256_castsi256_ps(opaque(_mm256_castps_si256(b)));
        }
        x.iter().map(|v| _mm256_cvtss_f32(*v) as i64).sum()
    }

    /// `P` chains of `vpmaddubsw` and `W` of `vpmaddwd` (P + W ≤ 12), one step of each per
    /// iteration.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn int8<const P: usize, const W: usize>(n: u64) -> i64 {
        let mut x = [_mm256_set1_epi8(1); 12];
        let (mut w, ones) = (_mm256_set1_epi8(3), _mm256_set1_epi16(1));
        for _ in 0..n {
            for v in x.iter_mut().take(P) {
                *v = _mm256_maddubs_epi16(*v, w);
            }
            for v in x.iter_mut().skip(P).take(W) {
                *v = _mm256_madd_epi16(*v, ones);
            }
            w = opaque(w);
        }
        fold_i(&x)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn maddubs_fma<const F: usize>(n: u64) -> i64 {
        let mut x = [_mm256_set1_epi8(1); 8];
        let mut f = [_mm256_set1_ps(0.5); F];
        let (mut w, b, c) = (_mm256_set1_epi8(3), _mm256_set1_ps(0.999), _mm256_set1_ps(1e-4));
        for _ in 0..n {
            for v in x.iter_mut() {
                *v = _mm256_maddubs_epi16(*v, w);
            }
            for v in f.iter_mut() {
                *v = _mm256_fmadd_ps(*v, b, c);
            }
            w = opaque(w);
        }
        fold_i(&x) + f.iter().map(|v| _mm256_cvtss_f32(*v) as i64).sum::<i64>()
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        eprintln!("peak_bench: this CPU has no AVX2 + FMA; nothing to measure");
        std::process::exit(2);
    }
    let threads = std::env::var("THREADS").ok().map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t.parse().expect("THREADS=<count>"),
    );
    let seconds: f64 = std::env::var("SECONDS").ok().map_or(1.0, |s| s.parse().expect("SECONDS=<s>"));
    println!("# peak_bench: {threads} threads at once, {seconds} s per mix; G MAC/s (f32 or int8 multiply-accumulates)");
    for &(name, macs, run) in &x86::MIXES {
        // Calibrate on one thread: iterations for about `seconds`.
        let t = Instant::now();
        // SAFETY: AVX2 and FMA were detected above.
        std::hint::black_box(unsafe { run(1_000_000) });
        let iters = (1e6 * seconds / t.elapsed().as_secs_f64().max(1e-6)) as u64;
        let start = Arc::new(Barrier::new(threads));
        let rates: Vec<f64> = (0..threads)
            .map(|_| {
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    // SAFETY: as above.
                    std::hint::black_box(unsafe { run(iters) });
                    iters as f64 * macs / t.elapsed().as_secs_f64() / 1e9
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("a measuring thread panicked"))
            .collect();
        let each: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
        println!("{name:<22} {:7.1} G MAC/s in total ({} per thread)", rates.iter().sum::<f64>(), each.join(", "));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("peak_bench: x86-64 only");
    std::process::exit(2);
}

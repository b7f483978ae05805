//! Embeddings/s of the OpenCL runner against the CPU model, side by side in one process
//! (rounds alternate CPU, OpenCL, CPU, OpenCL, ...; medians and the ratio are reported).
//! `cargo run --release --example opencl_embed_bench -p ferroserve-core -- <model dir> [device index] [sentences]`
//! The sentences are embed_bench's (10–20 words, same generator), in batches of 32.

use std::time::Instant;

use ferroserve_core::models::bert::BertModel;
use ferroserve_core::tokenize::bert::EncoderTokenizer;
use ferroserve_kernels::opencl::KernelSource;
use ferroserve_kernels::{CpuBackend, OpenClBackend};

#[path = "common/sentences.rs"]
mod sentences;
use sentences::synthetic_sentences;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("model dir"));
    let index: usize = args.next().map_or(0, |s| s.parse().expect("device index"));
    let count: usize = args.next().map_or(256, |s| s.parse().expect("sentence count"));
    let cpu = BertModel::load(&dir, CpuBackend::default()).unwrap();
    let cpu_name = cpu.device_name();
    let t = Instant::now();
    let cl = BertModel::load(&dir, OpenClBackend::open(index, &KernelSource::Embedded).unwrap()).unwrap();
    println!("OpenCL load (weights + kernel builds): {:.2} s on {}", t.elapsed().as_secs_f64(), cl.device_name());
    let tok = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    let sentences = synthetic_sentences(&tok, count);
    let tokens: usize = sentences.iter().map(Vec::len).sum();
    println!("{count} sentences, {:.1} tokens avg; CPU {cpu_name}", tokens as f64 / count as f64);
    // Warm-up: PoCL specialises each kernel for its launch sizes on first use.
    let warm: Vec<&[u32]> = sentences.iter().take(32).map(Vec::as_slice).collect();
    cl.embed(&warm).unwrap();
    cl.embed(&warm[..1]).unwrap();
    cpu.embed(&warm).unwrap();

    let (mut cpu_rates, mut cl_rates) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for on_cl in [false, true] {
            let t = Instant::now();
            for chunk in sentences.chunks(32) {
                let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
                if on_cl {
                    std::hint::black_box(cl.embed(&refs).unwrap());
                } else {
                    std::hint::black_box(cpu.embed(&refs).unwrap());
                }
            }
            let rate = count as f64 / t.elapsed().as_secs_f64();
            println!("round {round} {}: {rate:.1} sentences/s", if on_cl { "opencl" } else { "cpu" });
            if on_cl {
                cl_rates.push(rate)
            } else {
                cpu_rates.push(rate)
            }
        }
    }
    let (c, o) = (median(&mut cpu_rates), median(&mut cl_rates));
    println!("batches of 32, median of 3: cpu {c:.1} sentences/s, opencl {o:.1} sentences/s, opencl/cpu {:.3}", o / c);

    let (mut cpu_ms, mut cl_ms) = (Vec::new(), Vec::new());
    for s in sentences.iter().take(40) {
        let t = Instant::now();
        std::hint::black_box(cpu.embed(&[s.as_slice()]).unwrap());
        cpu_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        std::hint::black_box(cl.embed(&[s.as_slice()]).unwrap());
        cl_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (c, o) = (median(&mut cpu_ms), median(&mut cl_ms));
    println!("one sentence, p50 of 40 (alternating): cpu {c:.2} ms, opencl {o:.2} ms, opencl/cpu {:.1}", o / c);
}

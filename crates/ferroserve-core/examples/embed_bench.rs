//! In-process embedding throughput/latency (no HTTP): the engine's own floor.
//! `cargo run --release --example embed_bench -- <model dir>`
//!
//! Env knobs: `SENTENCES=<n>` (2,048), `PASS_SIZES=1,8,32` (sentences per pass),
//! `SINGLE_ONLY=1` (only the one-sentence latency loop), `SINGLES=<n>` (single passes timed:
//! 3,000 with `SINGLE_ONLY`, else 300), `GAP_US=<µs>` (idle time between single passes),
//! `GAP_MODE=sleep|spin|spinall` (how the gap is spent: the calling thread asleep, the default;
//! the calling thread spinning; or every rayon worker spinning: what keeping threads awake
//! between requests would buy), `PASSAGES=<n>` (also n passages of 256 tokens in passes of 8,
//! as bench/embeddings.py's 200-word passages; `PASSAGES_ONLY=1` skips everything else),
//! `NUMERICS=f32,int8` (the linear layers' numerics, default f32; several are loaded side by
//! side and alternate within every round, and the single passes alternate one by one: an A/B
//! in one run; `int8:q5_0` or `int8:q8_0/q8_0/q5_0/q5_0` picks the weight formats, see
//! `Int8Formats`).

use std::time::Instant;

use ferroserve_core::models::bert::{BertModel, Int8Formats};
use ferroserve_core::tokenize::bert::EncoderTokenizer;
use ferroserve_kernels::{Backend, CpuBackend};

#[path = "common/sentences.rs"]
mod sentences;
use sentences::synthetic_sentences;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("model dir"));
    let models: Vec<(String, BertModel<CpuBackend>)> = std::env::var("NUMERICS")
        .unwrap_or_else(|_| "f32".into())
        .split(',')
        .map(|n| {
            let formats = match n.trim() {
                "f32" => None,
                "int8" => Some(Int8Formats::DEFAULT),
                other => Some(other.strip_prefix("int8:").and_then(Int8Formats::parse).expect("NUMERICS=f32|int8|int8:<formats>[,...]")),
            };
            let label = formats.map_or("f32".to_string(), |f| format!("int8:{}", f.describe()));
            (label, BertModel::load_with_formats(&dir, CpuBackend::default(), formats).unwrap())
        })
        .collect();
    let tok = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    // SENTENCES: fewer for slow levels (FERROSERVE_ISA=portable runs ~20x longer).
    let count: usize = std::env::var("SENTENCES").ok().map_or(2048, |n| n.parse().expect("SENTENCES=<count>"));
    let sentences = synthetic_sentences(&tok, count);
    let tokens: usize = sentences.iter().map(Vec::len).sum();
    println!("{} sentences, {:.1} tokens avg, device {}", sentences.len(), tokens as f64 / count as f64, CpuBackend::default().name());
    let passages: usize = std::env::var("PASSAGES").ok().map_or(0, |n| n.parse().expect("PASSAGES=<count>"));
    if passages > 0 {
        // 256 tokens each ([CLS] + the inner tokens of consecutive sentences + [SEP]).
        let (cls, sep) = (sentences[0][0], *sentences[0].last().unwrap());
        let mut inner = sentences.iter().flat_map(|s| s[1..s.len() - 1].iter().copied()).cycle();
        let docs: Vec<Vec<u32>> = (0..passages)
            .map(|_| std::iter::once(cls).chain(inner.by_ref().take(254)).chain(std::iter::once(sep)).collect())
            .collect();
        for round in 0..3 {
            for (label, model) in &models {
                let t = Instant::now();
                for chunk in docs.chunks(8) {
                    let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
                    std::hint::black_box(model.embed(&refs).unwrap());
                }
                let s = t.elapsed().as_secs_f64();
                println!("round {round} {label}: passages of 256 tokens, passes of 8: {:.1} passages/s, {:.1} ms a pass", passages as f64 / s, s * 1e3 / passages.div_ceil(8) as f64);
            }
        }
        if std::env::var("PASSAGES_ONLY").is_ok() {
            return;
        }
    }
    let rounds = if std::env::var("SINGLE_ONLY").is_ok() { 0 } else { 3 };
    // PASS_SIZES=1,8,32,256: sentences per forward pass (which pass size embeds fastest: the
    // embedding batcher's cap on batch-priority passes).
    let pass_sizes: Vec<usize> =
        std::env::var("PASS_SIZES").map_or(vec![32], |v| v.split(',').map(|n| n.trim().parse().expect("PASS_SIZES=<n>,<n>,...")).collect());
    for round in 0..rounds {
        for &size in &pass_sizes {
            for (label, model) in &models {
                let t = Instant::now();
                for chunk in sentences.chunks(size) {
                    let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
                    std::hint::black_box(model.embed(&refs).unwrap());
                }
                let s = t.elapsed().as_secs_f64();
                let passes = count.div_ceil(size);
                println!("round {round} {label}: batches of {size}: {:.0} sentences/s, {:.2} ms a pass", count as f64 / s, s * 1e3 / passes as f64);
            }
        }
    }
    // GAP_US: idle time between single requests, as a server at concurrency 1 sees
    // (client and HTTP work between passes); the workers may fall asleep in it.
    let gap = std::time::Duration::from_micros(std::env::var("GAP_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    let gap_mode = std::env::var("GAP_MODE").unwrap_or_else(|_| "sleep".into());
    let mut lat = vec![Vec::new(); models.len()];
    let singles = std::env::var("SINGLES").ok().map_or(if rounds == 0 { 3000 } else { 300 }, |n| n.parse().expect("SINGLES=<count>"));
    for (i, s) in sentences.iter().cycle().take(singles * models.len()).enumerate() {
        let m = i % models.len();
        if !gap.is_zero() {
            let until = Instant::now() + gap;
            match gap_mode.as_str() {
                "spin" => spin_until(until),
                "spinall" => {
                    rayon::broadcast(|_| spin_until(until));
                    spin_until(until);
                }
                _ => std::thread::sleep(gap),
            }
        }
        let t = Instant::now();
        std::hint::black_box(models[m].1.embed(&[s.as_slice()]).unwrap());
        lat[m].push(t.elapsed().as_secs_f64() * 1e3);
    }
    for ((label, _), lat) in models.iter().zip(&mut lat) {
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = lat.len();
        println!("{label} single sentence (gap {} us, {gap_mode}): p50 {:.3} ms p95 {:.3} ms", gap.as_micros(), lat[n / 2], lat[n * 95 / 100]);
    }
}

fn spin_until(until: Instant) {
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

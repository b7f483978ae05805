//! SmolLM2-135M on the OpenCL device (PoCL here) against the CPU device: greedy output
//! identical on every fixture prompt (and therefore llama.cpp's, which the CPU matches), with
//! the logits bitwise the CPU's on a device that rounds as IEEE requires (PoCL on x86 does).
//! The batches mix prefill chunks and decode rows and sequences join at different steps, so
//! the device's chunked prefill, paged KV writes and both attention kernels are all used.
//! Without an OpenCL platform the tests print why and return (`make test` installs PoCL).

mod common;

use ferroserve_core::embed::DeviceChoice;
use std::time::{Duration, Instant};

use ferroserve_core::engine::{ChatEngine, ChatEvent, EngineConfig};
use ferroserve_core::kv::KvCacheConfig;
use ferroserve_core::models::llama::{LlamaModel, Numerics, DEFAULT_BLOCK_TOKENS};
use ferroserve_core::sched::SeqChunk;
use ferroserve_core::sample::SamplingParams;
use ferroserve_core::ErrorKind;
use ferroserve_kernels::opencl::{list_devices, KernelSource};

const NEW_TOKENS: usize = 32;
/// Prompt tokens per prefill chunk: the longer fixture prompts take several steps.
const PREFILL_CHUNK: usize = 16;

fn fixture_prompts() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let fx = common::smollm2_fixture();
    let ids = common::token_ids;
    let mut out = Vec::new();
    for kind in ["completions", "chats"] {
        for (i, case) in fx[kind].as_array().unwrap().iter().enumerate() {
            out.push((format!("{kind}[{i}]"), ids(&case["prompt_tokens"]), ids(&case["completion_tokens"])));
        }
    }
    out
}

/// One sequence of a lock-step greedy run.
struct Seq {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    table: Vec<u32>,
    computed: usize,
    joins_at: usize,
    done: bool,
    /// Every logits row this sequence received.
    logits: Vec<Vec<f32>>,
}

/// Greedy decoding of every prompt through `forward`, one batch per step: sequence `i`
/// joins at step `i % 3`, prompts go in chunks of [`PREFILL_CHUNK`], each sequence owns a
/// fixed range of `blocks_per_seq` blocks. Stops a sequence at [`NEW_TOKENS`] or an EOS.
fn run(prompts: &[Vec<u32>], blocks_per_seq: usize, eos: &[u32], vocab: usize, mut forward: impl FnMut(&[SeqChunk<'_>]) -> Vec<f32>) -> Vec<Seq> {
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Seq {
            prompt: p.clone(),
            generated: Vec::new(),
            table: ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect(),
            computed: 0,
            joins_at: i % 3,
            done: false,
            logits: Vec::new(),
        })
        .collect();
    let mut step = 0;
    while seqs.iter().any(|s| !s.done) {
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].done && seqs[i].joins_at <= step).collect();
        let feeds: Vec<(Vec<u32>, bool)> = active
            .iter()
            .map(|&i| {
                let s = &seqs[i];
                if s.computed < s.prompt.len() {
                    let end = (s.computed + PREFILL_CHUNK).min(s.prompt.len());
                    (s.prompt[s.computed..end].to_vec(), end == s.prompt.len())
                } else {
                    (vec![*s.generated.last().unwrap()], true)
                }
            })
            .collect();
        let batch: Vec<SeqChunk<'_>> = active
            .iter()
            .zip(&feeds)
            .map(|(&i, (tokens, want))| SeqChunk { tokens, start_pos: seqs[i].computed, block_table: &seqs[i].table, want_logits: *want })
            .collect();
        let logits = if batch.is_empty() { Vec::new() } else { forward(&batch) };
        drop(batch);
        let mut rows = logits.chunks_exact(vocab);
        for (&i, (tokens, want)) in active.iter().zip(&feeds) {
            let s = &mut seqs[i];
            s.computed += tokens.len();
            if *want {
                let row = rows.next().expect("a logits row per chunk that wants one");
                let t = common::argmax(row);
                s.logits.push(row.to_vec());
                s.generated.push(t);
                s.done = s.generated.len() >= NEW_TOKENS || eos.contains(&t);
            }
        }
        assert!(rows.next().is_none(), "more logits rows than chunks wanting them");
        step += 1;
    }
    seqs
}

#[test]
fn greedy_fixture_output_equals_the_cpu_device() {
    let _serial = common::opencl_serial();
    let path = common::smollm2_gguf();
    let Some(info) = common::opencl_device() else { return };
    let (device, is_pocl) = (info.index, common::is_pocl(&info));
    let cpu = LlamaModel::load(&path).unwrap();
    let dev = LlamaModel::load_opencl(&path, device, &KernelSource::Embedded).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}: load check: {}", dev.device_name(), dev.check_summary());
    // PoCL has IEEE rounding, correctly rounded division and sqrt, and denormals on every
    // x86-64 host, and the kernels follow the CPU level's order: bitwise, whatever the host
    // and FERROSERVE_ISA. Another device promises only what its load check passed.
    if is_pocl {
        assert!(dev.check().bitwise, "PoCL on x86 should reproduce the CPU's logits bit for bit: {:?}", dev.check());
    } else if !dev.check().bitwise {
        eprintln!(
            "{} is not PoCL and its logits are not the CPU's bits: it holds only the load check's tolerance \
             (max |diff| {}); greedy tokens may differ at near-ties, so they are not compared",
            dev.device_name(),
            dev.check().max_abs_diff
        );
        return;
    }

    let cases = fixture_prompts();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.1.clone()).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap() + NEW_TOKENS;
    let blocks_per_seq = longest.div_ceil(DEFAULT_BLOCK_TOKENS);
    let cfg = KvCacheConfig { block_tokens: DEFAULT_BLOCK_TOKENS, num_blocks: blocks_per_seq * prompts.len() };
    let eos = cpu.tokenizer.eos_token_ids().to_vec();
    let vocab = cpu.vocab_size();

    let mut cpu_kv = cpu.new_kv_cache_with(cfg).unwrap();
    let want = run(&prompts, blocks_per_seq, &eos, vocab, |b| cpu.forward(b, &mut cpu_kv));
    let mut dev_kv = dev.new_kv_cache_with(cfg).unwrap();
    let started = std::time::Instant::now();
    let got = run(&prompts, blocks_per_seq, &eos, vocab, |b| dev.try_forward(b, &mut dev_kv).unwrap_or_else(|e| panic!("{e}")));
    let tokens: usize = got.iter().map(|s| s.prompt.len() + s.generated.len()).sum();
    eprintln!("device: {tokens} tokens (prompts + outputs) of {} sequences in {:.2?}", got.len(), started.elapsed());

    let mut differing_bits = 0;
    for ((label, _, fixture), (w, g)) in cases.iter().zip(want.iter().zip(&got)) {
        assert_eq!(g.generated, w.generated, "{label}: the OpenCL device's greedy tokens differ from the CPU's");
        // The CPU matches llama.cpp on all of them (tests/llama_reference.rs); say so here too,
        // so a fixture change shows up as such rather than as a device bug.
        let n = fixture.len().min(w.generated.len());
        assert_eq!(w.generated[..n], fixture[..n], "{label}: the CPU itself no longer matches the fixture");
        for (wr, gr) in w.logits.iter().zip(&g.logits) {
            differing_bits += wr.iter().zip(gr).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        }
    }
    eprintln!("{} sequences identical; {differing_bits} logits differ in any bit", cases.len());
    if is_pocl {
        assert_eq!(differing_bits, 0, "PoCL should give the CPU's logits bit for bit");
    }
}

/// Through the engine (scheduler, paged cache bookkeeping, sampling): the device's greedy
/// chat is the CPU engine's.
#[test]
fn chat_engine_on_opencl_generates_the_cpu_engines_tokens() {
    let _serial = common::opencl_serial();
    let path = common::smollm2_gguf();
    let Some(device) = common::opencl_device().map(|d| d.index) else { return };
    let cfg = |device| EngineConfig { kv_budget_bytes: 16 << 20, device, ..EngineConfig::default() };
    let on_cl = ChatEngine::load(&path, cfg(DeviceChoice::OpenCl { index: device, kernels: KernelSource::Embedded })).unwrap_or_else(|e| panic!("{e}"));
    assert!(on_cl.device_name().starts_with("opencl:"), "{}", on_cl.device_name());
    assert!(on_cl.device_check().is_some());
    let on_cpu = ChatEngine::load(&path, cfg(DeviceChoice::Cpu)).unwrap();
    assert!(on_cpu.device_name().starts_with("cpu("), "{}", on_cpu.device_name());
    let prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"];
    let mut outputs = Vec::new();
    for engine in [&on_cpu, &on_cl] {
        outputs.push(greedy_texts(engine, &prompts, 24));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert!(outputs[0].iter().all(|t| !t.is_empty()), "{:?}", outputs[0]);
}

/// Submits every prompt at once (the engine batches them) and collects each greedy text.
fn greedy_texts(engine: &ChatEngine, prompts: &[&str], max_tokens: usize) -> Vec<String> {
    for (i, p) in prompts.iter().enumerate() {
        let ids = engine.encode(p, true, false).unwrap();
        engine.submit(i as u64, ids, SamplingParams { max_tokens: Some(max_tokens), ..SamplingParams::greedy() }).unwrap();
    }
    let mut texts = vec![String::new(); prompts.len()];
    let mut open = prompts.len();
    let deadline = Instant::now() + Duration::from_secs(600);
    while open > 0 {
        assert!(Instant::now() < deadline, "no result after 10 minutes");
        for ev in engine.notifier().drain() {
            match ev {
                ChatEvent::Delta { request_id, text, .. } => texts[request_id as usize].push_str(&text),
                ChatEvent::Finished { .. } => open -= 1,
                ChatEvent::Error { message, .. } => panic!("{message}"),
                ChatEvent::Admitted { .. } => {}
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    texts
}

#[test]
fn fast_numerics_and_missing_devices_are_refused_clearly() {
    let _serial = common::opencl_serial();
    let path = common::smollm2_gguf();
    let fast = EngineConfig {
        numerics: Numerics::Fast,
        device: DeviceChoice::OpenCl { index: 0, kernels: KernelSource::Embedded },
        ..EngineConfig::default()
    };
    let e = ChatEngine::load(&path, fast).err().expect("fast numerics on OpenCL must be refused");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    assert!(e.to_string().contains("exact"), "{e}");

    let Ok(devices) = list_devices() else { return };
    let missing = EngineConfig { device: DeviceChoice::OpenCl { index: devices.len(), kernels: KernelSource::Embedded }, ..EngineConfig::default() };
    let e = ChatEngine::load(&path, missing).err().expect("a device index past the last must be refused");
    assert_eq!(e.kind(), ErrorKind::Device, "{e}");
    let dir = std::env::temp_dir().join(format!("ferroserve-no-binaries-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let no_bins = EngineConfig { device: DeviceChoice::OpenCl { index: 0, kernels: KernelSource::Binaries(dir.clone()) }, ..EngineConfig::default() };
    let e = ChatEngine::load(&path, no_bins).err().expect("an empty binaries folder must be refused");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.to_string().contains("rms_norm_f32") || e.to_string().contains(".bin"), "{e}");
}

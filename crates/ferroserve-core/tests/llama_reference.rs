//! SmolLM2-135M-Instruct (GGUF, Q4_1) through `LlamaModel` against llama.cpp
//! (../shared/fixtures/smollm2_reference.json): greedy continuations, first-token
//! log-probabilities, and the batch invariance the scheduler relies on (a sequence's logits
//! bitwise the same alone, in a batch of 16 at any position, with chunked prefill, or with its
//! prefix served from the prefix cache), and that KV blocks all come back.
//!
//! How close to llama.cpp is "correct": bitwise, on this model. Both implementations quantise
//! the activations to 8 bits before every matmul, which turns any tiny difference upstream
//! into a flipped 8-bit code now and then; SmolLM2-135M is tie-prone enough that such noise
//! alone changes 8–10 of the 14 greedy continuations (llama.cpp itself, run with `-fa off`,
//! keeps only 6 of its own 14). So the model reproduces llama.cpp's CPU arithmetic op by op —
//! Q4_1×Q8_1 lane order and f16 `s`, f64 RMSNorm sums, f32 RoPE angles, its vector `expf` in
//! SwiGLU, flash attention's f16 query and f16 value accumulator — and every intermediate of
//! a prompt matched llama.cpp's bit for bit when this was written (all but the logits, whose
//! Q8_0 sum order differs by ≈ 1e-5). The tests therefore expect:
//! - every free-running greedy continuation identical (the issue asks for ≥ 90 %; a miss
//!   must still be a near-tie, < 0.5 logits, and is reported);
//! - teacher-forced (llama.cpp's tokens fed back): our argmax is llama.cpp's token everywhere;
//! - first-token top-5 log-probabilities: mean |Δ| ≤ 0.005, max ≤ 0.02.

mod common;
use common::{smollm2_fixture as fixture, token_ids as ids};

use std::path::{Path, PathBuf};

use ferroserve_core::models::llama::{compare_backends, LlamaKv, LlamaModel, Numerics};
use ferroserve_core::sched::SeqChunk;
use ferroserve_kernels::quant::QuantLevel;

const NEW_TOKENS: usize = 32;
/// Bounds on |our first-token log-probability − llama.cpp's| over the fixture's top-5 tokens.
const LOGPROB_MEAN_TOLERANCE: f64 = 0.005;
const LOGPROB_MAX_TOLERANCE: f64 = 0.02;
/// Share of the fixture prompts whose 32 greedy tokens must equal llama.cpp's.
const IDENTICAL_SHARE: f64 = 0.9;
/// A disagreement on the greedy token is acceptable when llama.cpp's choice trails ours by
/// less than this many logits (our logits).
const NEAR_TIE_LOGITS: f32 = 0.5;

fn model_path() -> PathBuf {
    common::smollm2_gguf()
}

fn load(path: &Path) -> LlamaModel {
    LlamaModel::load(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Every fixture case (completions, then chats): (label, prompt tokens, case).
fn cases(fx: &serde_json::Value) -> Vec<(String, Vec<u32>, serde_json::Value)> {
    let mut out = Vec::new();
    for kind in ["completions", "chats"] {
        for (i, case) in fx[kind].as_array().unwrap().iter().enumerate() {
            out.push((format!("{kind}[{i}]"), ids(&case["prompt_tokens"]), case.clone()));
        }
    }
    out
}

/// The two largest logits' difference.
fn top2_gap(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let z: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits.iter().map(|&v| v as f64 - max - z.ln()).collect()
}

/// One generating sequence, driven the way a scheduler would.
struct Gen {
    prompt: Vec<u32>,
    /// Tokens fed back after the prompt: our greedy choices, or `forced` when given.
    generated: Vec<u32>,
    /// Teacher forcing: feed these instead of our choices.
    forced: Vec<u32>,
    /// Our greedy choice at every step.
    choices: Vec<u32>,
    table: Vec<u32>,
    /// Positions whose KV is in the cache.
    computed: usize,
    /// Logits of every generated token, in order.
    logits: Vec<Vec<f32>>,
    /// Step at which this sequence joins the batch.
    joins_at: usize,
    done: bool,
}

impl Gen {
    fn new(prompt: Vec<u32>, joins_at: usize) -> Self {
        Gen {
            prompt,
            generated: Vec::new(),
            forced: Vec::new(),
            choices: Vec::new(),
            table: Vec::new(),
            computed: 0,
            logits: Vec::new(),
            joins_at,
            done: false,
        }
    }

    /// The tokens to feed this step, allocating blocks for them.
    fn next_chunk(&mut self, kv: &mut LlamaKv, prefill_chunk: usize) -> (Vec<u32>, bool) {
        let tokens: Vec<u32> = if self.computed < self.prompt.len() {
            let end = (self.computed + prefill_chunk).min(self.prompt.len());
            self.prompt[self.computed..end].to_vec()
        } else {
            vec![*self.generated.last().expect("decoding starts after the prompt")]
        };
        let want_logits = self.computed + tokens.len() >= self.prompt.len();
        let need = (self.computed + tokens.len()).div_ceil(kv.block_tokens());
        while self.table.len() < need {
            self.table.push(kv.allocate().expect("KV cache exhausted"));
        }
        (tokens, want_logits)
    }

    fn release(&mut self, kv: &mut LlamaKv) {
        for b in self.table.drain(..) {
            kv.release(b);
        }
    }
}

/// Runs `seqs` to `max_new` tokens each (or an EOS id), greedily. Each step batches every
/// joined, unfinished sequence; `order(step, n)` permutes their positions in the batch.
fn generate(
    model: &LlamaModel,
    kv: &mut LlamaKv,
    seqs: &mut [Gen],
    max_new: usize,
    prefill_chunk: usize,
    eos: &[u32],
    order: impl Fn(usize, usize) -> Vec<usize>,
) {
    let mut step = 0;
    while seqs.iter().any(|s| !s.done) {
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].done && seqs[i].joins_at <= step).collect();
        let perm = order(step, active.len());
        let picked: Vec<usize> = perm.iter().map(|&p| active[p]).collect();
        let mut feeds = Vec::new();
        for &i in &picked {
            feeds.push(seqs[i].next_chunk(kv, prefill_chunk));
        }
        let batch: Vec<SeqChunk<'_>> = picked
            .iter()
            .zip(&feeds)
            .map(|(&i, (tokens, want))| SeqChunk {
                tokens,
                start_pos: seqs[i].computed,
                block_table: &seqs[i].table,
                want_logits: *want,
            })
            .collect();
        let logits = if batch.is_empty() { Vec::new() } else { model.forward(&batch, kv) };
        drop(batch);
        let vocab = model.vocab_size();
        assert_eq!(logits.len(), feeds.iter().filter(|f| f.1).count() * vocab);
        let mut rows = logits.chunks_exact(vocab);
        for (&i, (tokens, want)) in picked.iter().zip(&feeds) {
            let s = &mut seqs[i];
            s.computed += tokens.len();
            if *want {
                let row = rows.next().unwrap();
                let choice = common::argmax(row);
                let t = s.forced.get(s.generated.len()).copied().unwrap_or(choice);
                s.logits.push(row.to_vec());
                s.choices.push(choice);
                s.generated.push(t);
                let limit = if s.forced.is_empty() { max_new } else { max_new.min(s.forced.len()) };
                if s.generated.len() >= limit || eos.contains(&t) {
                    s.done = true;
                    s.release(kv);
                }
            }
        }
        step += 1;
    }
}

fn in_order(_: usize, n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// Our logit for `token` below our best, at one step.
fn trails_by(logits: &[f32], token: u32) -> f32 {
    logits[common::argmax(logits) as usize] - logits[token as usize]
}

/// How a model's greedy decoding compares with llama.cpp's on the fixture prompts.
struct Comparison {
    identical: usize,
    cases: usize,
    agree: usize,
    positions: usize,
    logprob_mean_err: f64,
    logprob_max_err: f64,
    /// Divergences (free-running or teacher-forced) that are no near-tie.
    failures: Vec<String>,
}

fn compare_with_llama_cpp(model: &LlamaModel) -> Comparison {
    let fx = fixture();
    let mut kv = model.new_kv_cache(64 << 20).unwrap();
    let eos = model.tokenizer.eos_token_ids().to_vec();
    let cases = cases(&fx);
    let wants: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c.2["completion_tokens"])).collect();

    // Free-running greedy, all prompts in one batch (batch invariance is tested below).
    let mut free: Vec<Gen> = cases.iter().map(|c| Gen::new(c.1.clone(), 0)).collect();
    generate(model, &mut kv, &mut free, NEW_TOKENS, usize::MAX, &eos, in_order);
    // Teacher-forced: llama.cpp's tokens fed back, our choice recorded at every step.
    let mut forced: Vec<Gen> = cases.iter().map(|c| Gen::new(c.1.clone(), 0)).collect();
    for (g, want) in forced.iter_mut().zip(&wants) {
        g.forced = want.clone();
    }
    generate(model, &mut kv, &mut forced, NEW_TOKENS, usize::MAX, &[], in_order);

    let mut identical = 0;
    let (mut agree, mut positions) = (0, 0);
    let mut failures = Vec::new();
    let mut logprob_errs = Vec::new();
    for (((label, _, case), want), (free, forced)) in cases.iter().zip(&wants).zip(free.iter().zip(&forced)) {
        match free.generated.iter().zip(want).position(|(a, b)| a != b) {
            None if free.generated.len() == want.len() => {
                identical += 1;
                println!("{label}: all {} tokens identical", want.len());
            }
            None => failures.push(format!("{label}: ours stops after {} tokens, llama.cpp after {}", free.generated.len(), want.len())),
            Some(step) => {
                let gap = trails_by(&free.logits[step], want[step]);
                println!(
                    "{label}: diverges at step {step}: ours {} vs llama.cpp {}, which trails ours by {gap:.4} logits (top-2 gap {:.4})",
                    free.generated[step],
                    want[step],
                    top2_gap(&free.logits[step])
                );
                if gap >= NEAR_TIE_LOGITS {
                    failures.push(format!("{label}: free-running divergence at step {step} is no near-tie ({gap:.4} logits)"));
                }
            }
        }
        for (step, (&choice, &theirs)) in forced.choices.iter().zip(want).enumerate() {
            positions += 1;
            if choice == theirs {
                agree += 1;
                continue;
            }
            let gap = trails_by(&forced.logits[step], theirs);
            println!("{label}: teacher-forced step {step}: ours {choice} vs llama.cpp {theirs}, trailing by {gap:.4} logits");
            if gap >= NEAR_TIE_LOGITS {
                failures.push(format!("{label}: teacher-forced step {step}: llama.cpp's token trails ours by {gap:.4} logits"));
            }
        }

        // First token: llama.cpp's top-5 log-probabilities, by token id.
        let lp = log_softmax(&free.logits[0]);
        let mut line = format!("{label}: first-token top-5 logprobs (llama.cpp → ours):");
        for entry in case["first_token_top5"].as_array().unwrap() {
            let id = entry["id"].as_u64().unwrap() as usize;
            let want = entry["logprob"].as_f64().unwrap();
            logprob_errs.push((lp[id] - want).abs());
            line += &format!(" {id}: {want:.3} → {:.3};", lp[id]);
        }
        println!("{line}");
    }
    let mean_err = logprob_errs.iter().sum::<f64>() / logprob_errs.len() as f64;
    let max_err = logprob_errs.iter().cloned().fold(0.0, f64::max);
    println!(
        "SUMMARY: {identical}/{} prompts identical over all tokens; teacher-forced argmax agreement {agree}/{positions} \
         ({:.1} %); first-token top-5 logprob |Δ| mean {mean_err:.4}, max {max_err:.4}",
        cases.len(),
        100.0 * agree as f64 / positions as f64
    );
    assert_eq!(kv.num_free_blocks(), kv.num_blocks(), "every block is back");
    Comparison {
        identical,
        cases: cases.len(),
        agree,
        positions,
        logprob_mean_err: mean_err,
        logprob_max_err: max_err,
        failures,
    }
}

#[test]
fn greedy_continuations_and_first_token_logprobs_match_llama_cpp() {
    let path = model_path();
    let Comparison { identical, cases, agree, positions, logprob_mean_err: mean_err, logprob_max_err: max_err, failures } =
        compare_with_llama_cpp(&load(&path));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        identical as f64 >= IDENTICAL_SHARE * cases as f64,
        "{identical}/{cases} greedy continuations identical to llama.cpp's (need {:.0} %)",
        IDENTICAL_SHARE * 100.0
    );
    assert_eq!(agree, positions, "teacher-forced: our argmax differs from llama.cpp's token at {} positions", positions - agree);
    assert!(
        mean_err <= LOGPROB_MEAN_TOLERANCE && max_err <= LOGPROB_MAX_TOLERANCE,
        "first-token logprobs: mean |Δ| {mean_err:.4} (bound {LOGPROB_MEAN_TOLERANCE}), max {max_err:.4} (bound {LOGPROB_MAX_TOLERANCE})"
    );
}

/// `Numerics::Fast` sums each block's integer dot before scaling, so its roundings differ from
/// llama.cpp's and greedy text on this tie-prone model differs often (4/14 identical when
/// measured). What must hold: every divergence from llama.cpp, free-running or teacher-forced,
/// is a near-tie, and the first-token distribution stays close — the mean |Δ| bound is about
/// twice the size measured (0.07 with the query rounded to f16 as llama.cpp does; 0.086 since
/// the fast attention keeps it in f32, bench/NOTES.md), the max a little above llama.cpp's own
/// `-fa on/off` spread (0.32; measured 0.351 on a fifth-ranked token, p ≈ 0.05). The closer
/// authority is the f64 reference (tests/numerics_quality.rs), where fast mode's mean KL is
/// 0.995× exact's.
#[test]
fn fast_numerics_diverge_from_llama_cpp_only_at_near_ties() {
    let path = model_path();
    if QuantLevel::selected() < QuantLevel::Avx2 {
        println!("skipped: fast numerics need AVX2 or AVX-512");
        return;
    }
    let model = LlamaModel::load_with(&path, Numerics::Fast).unwrap_or_else(|e| panic!("{e}"));
    let c = compare_with_llama_cpp(&model);
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
    assert!(c.logprob_mean_err <= 0.15 && c.logprob_max_err <= 0.40, "first-token logprobs: mean |Δ| {:.4}, max {:.4}", c.logprob_mean_err, c.logprob_max_err);
    println!("fast numerics: {}/{} identical, teacher-forced {}/{}", c.identical, c.cases, c.agree, c.positions);
}

/// Compares two runs' logits bit for bit.
fn assert_same_logits(label: &str, alone: &Gen, other: &Gen) {
    assert_eq!(alone.generated, other.generated, "{label}: tokens differ");
    for (step, (a, b)) in alone.logits.iter().zip(&other.logits).enumerate() {
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
            panic!("{label}: step {step}: logit {i} differs: alone {} vs {}", a[i], b[i]);
        }
    }
}

#[test]
fn logits_are_bitwise_batch_invariant() {
    let path = model_path();
    check_batch_invariance(&load(&path));
}

#[test]
fn fast_numerics_logits_are_bitwise_batch_invariant() {
    let path = model_path();
    if QuantLevel::selected() < QuantLevel::Avx2 {
        println!("skipped: fast numerics need AVX2 or AVX-512");
        return;
    }
    check_batch_invariance(&LlamaModel::load_with(&path, Numerics::Fast).unwrap_or_else(|e| panic!("{e}")));
}

fn check_batch_invariance(model: &LlamaModel) {
    let fx = fixture();
    let mut kv = model.new_kv_cache(64 << 20).unwrap();
    let total = kv.num_blocks();
    const STEPS: usize = 6;
    // 16 sequences from the 14 fixture prompts (two repeated), 4 to 57 tokens long.
    let prompts: Vec<Vec<u32>> = cases(&fx).into_iter().map(|c| c.1).cycle().take(16).collect();

    // Reference: each alone, prompt in one chunk.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut seq = [Gen::new(p.clone(), 0)];
        generate(model, &mut kv, &mut seq, STEPS, usize::MAX, &[], in_order);
        let [seq] = seq;
        alone.push(seq);
    }

    // All 16 in one batch: prompts in chunks of 7 tokens, sequences joining at different
    // steps (so prefill chunks and decode tokens share steps), and the batch order rotated
    // every step (so each sequence visits many positions in the batch).
    let mut batched: Vec<Gen> = prompts.iter().enumerate().map(|(i, p)| Gen::new(p.clone(), i % 5)).collect();
    let rotate = |step: usize, n: usize| (0..n).map(|i| (i + step * 3) % n.max(1)).rev().collect();
    generate(model, &mut kv, &mut batched, STEPS, 7, &[], rotate);
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_same_logits(&format!("sequence {i}: alone vs batch of 16, chunks of 7"), a, b);
    }

    // Single-token prefill chunks, alone.
    let mut one = [Gen::new(prompts[12].clone(), 0)];
    generate(model, &mut kv, &mut one, STEPS, 1, &[], in_order);
    assert_same_logits("prompt fed one token per step", &alone[12], &one[0]);
    println!("16 sequences: logits bitwise identical alone, batched (rotating positions, chunks of 7) and token by token");
    assert_eq!(kv.num_free_blocks(), total, "every block is back");
}

#[test]
fn prefix_cache_hits_give_identical_logits() {
    let path = model_path();
    let model = load(&path);
    let fx = fixture();
    let mut kv = model.new_kv_cache(16 << 20).unwrap();
    let bt = kv.block_tokens();
    // The longest chat prompt (57 tokens: three full blocks).
    let prompt = cases(&fx).into_iter().map(|c| c.1).max_by_key(|p| p.len()).unwrap();
    assert!(prompt.len() > 2 * bt);

    // First run: compute everything, then register the prompt's full blocks.
    let mut first = [Gen::new(prompt.clone(), 0)];
    let mut first_table = Vec::new();
    {
        let seq = &mut first[0];
        let (tokens, want) = seq.next_chunk(&mut kv, usize::MAX);
        let logits = model.forward(&[SeqChunk { tokens: &tokens, start_pos: 0, block_table: &seq.table, want_logits: want }], &mut kv);
        seq.computed = tokens.len();
        seq.logits.push(logits);
        for (hash, &block) in kv.block_hashes(&prompt).iter().zip(&seq.table) {
            kv.register_full_block(*hash, block);
        }
        first_table.clone_from(&seq.table);
        seq.release(&mut kv);
    }
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());

    // Second run: the cached blocks cover the full blocks of prompt[..len - 1]; only the rest
    // is computed, on top of blocks released by the first run but not yet reused.
    let hit = kv.lookup_prefix(&prompt[..prompt.len() - 1]);
    assert_eq!(hit.len(), (prompt.len() - 1) / bt);
    assert_eq!(hit, first_table[..hit.len()]);
    let mut table = hit.clone();
    let start = hit.len() * bt;
    while table.len() * bt < prompt.len() {
        table.push(kv.allocate().unwrap());
    }
    let logits = model.forward(
        &[SeqChunk { tokens: &prompt[start..], start_pos: start, block_table: &table, want_logits: true }],
        &mut kv,
    );
    assert!(
        logits.iter().zip(&first[0].logits[0]).all(|(a, b)| a.to_bits() == b.to_bits()),
        "logits after a prefix-cache hit of {start} tokens differ from a full prefill"
    );
    for b in table {
        kv.release(b);
    }
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
    println!("prefix cache: {start} of {} prompt tokens reused, logits bitwise identical", prompt.len());
}

/// The load check is one comparison over any two backends (`compare_backends`, what an
/// OpenCL model must pass against the CPU): two CPU models of the file agree bit for bit, and
/// a model whose logits are not the reference's (fast numerics) is measured as such.
#[test]
fn the_load_check_compares_any_two_backends() {
    let path = model_path();
    let reference = load(&path);
    let same = compare_backends(&reference, &load(&path)).unwrap_or_else(|e| panic!("{e}"));
    assert!(same.bitwise && same.max_abs_diff == 0.0, "{same:?}");
    if QuantLevel::selected() >= QuantLevel::Avx2 {
        let fast = LlamaModel::load_with(&path, Numerics::Fast).unwrap_or_else(|e| panic!("{e}"));
        // Within the check's tolerance or refused by it; either way not called bitwise.
        match compare_backends(&reference, &fast) {
            Ok(r) => assert!(!r.bitwise && r.max_abs_diff > 0.0, "{r:?}"),
            Err(e) => assert!(e.to_string().contains("load check"), "{e}"),
        }
    }
}

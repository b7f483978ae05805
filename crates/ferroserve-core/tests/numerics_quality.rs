//! Fast numerics' quality gate: both modes of SmolLM2-135M-Instruct (Q4_1) measured against
//! an f64 reference forward pass of the same GGUF (tests/common/llama_f64.rs), teacher-forced
//! over the llama.cpp fixture (each prompt followed by llama.cpp's greedy continuation) and
//! the opening of the GNU GPL v3 as Debian ships it (/usr/share/common-licenses/GPL-3, from
//! `base-files`) in independent 64-token windows.
//!
//! Per position: KL(reference ‖ mode) of the next-token distributions, whether the mode's
//! argmax is the reference's, and the log-probability of the token that follows in the text
//! (perplexity). Exact mode reproduces llama.cpp's arithmetic, so the gate says that trading
//! bit-equality with llama.cpp for speed costs no fidelity to the model itself.
//!
//! The gate (issue 14: fast no worse than exact, +5 %), paired and noise-aware. Per gated
//! position i, d_i = KL_fast,i − KL_exact,i. Positions within one sequence share their context
//! and are correlated, so the unit of sampling is the sequence: each prose window and each
//! fixture prompt. SE is the standard error of mean(d) over those units (the cluster formula
//! for a position-weighted mean: SE² = n/(n−1) · Σ_u (D_u − m_u·mean(d))² / N², with D_u the
//! sum of d over unit u's m_u positions, n units, N positions). It passes iff
//!     mean(KL_fast) ≤ 1.05 · mean(KL_exact) + 2 · SE,
//! and the same for top-1 disagreement (d_i = disagrees_fast,i − disagrees_exact,i). The 5 %
//! alone is below this measurement's noise at test-sized samples (per-sequence fast/exact
//! ranges 0.77–3.0×; bench/NOTES.md, "Fast numerics against an f64 reference"), so without the
//! 2·SE term the verdict would be a coin toss on which sample was drawn.
//!
//! Sized to ≈ 4,800 scored positions, 55–80 s in `cargo test --release` on 2 cores (the f64
//! pass, ≈ 9 ms per position in 64-token windows, is most of it). A larger
//! `FERROSERVE_QUALITY_PROSE_TOKENS` (default 4096) measures on more prose.
//!
//! Runs at the CPU level `FERROSERVE_ISA` selects; fast numerics have kernels only on AVX2 and
//! AVX-512, so below that the comparison is skipped, saying so.

mod common;
#[path = "common/llama_f64.rs"]
mod llama_f64;

use std::time::Instant;

use ferroserve_core::models::llama::{LlamaModel, Numerics};
use ferroserve_core::sched::SeqChunk;
use ferroserve_kernels::quant::QuantLevel;
use llama_f64::{log_softmax, LlamaF64};

/// The prose: this many tokens from the start of the text, in independent windows of
/// `PROSE_WINDOW_TOKENS` (each scored from its second token on, each one sampling unit of the
/// gate). Sized so the whole test, dominated by the f64 pass, takes 55–80 s in release on a
/// 2-core machine.
const PROSE_SOURCE: &str = "/usr/share/common-licenses/GPL-3";
const PROSE_TOKENS: usize = 4096;
const PROSE_WINDOW_TOKENS: usize = 64;
/// What the gate counts: the fixture's prompts and the prose. The fixture's continuations
/// (llama.cpp's greedy tokens after each prompt) are reported but not gated: llama.cpp's
/// arithmetic — exact mode's, bit for bit — chose them, so they are exact mode's own
/// trajectory, not text independent of either mode.
const GATED_SOURCES: [&str; 2] = ["prompts", "prose"];
/// Fast may be this much worse than exact (relative) on mean KL and on top-1 disagreement,
/// beyond `NOISE_SES` standard errors of the paired difference.
const TOLERANCE: f64 = 0.05;
const NOISE_SES: f64 = 2.0;

/// One teacher-forced sequence and where it comes from.
struct Sequence {
    source: &'static str,
    tokens: Vec<u32>,
    /// Positions scored under `source` (from 1); those after are `continued_source`'s.
    own_tokens: usize,
    continued_source: &'static str,
}

fn sequences(model: &LlamaModel) -> Vec<Sequence> {
    let fx = common::smollm2_fixture();
    let ids = common::token_ids;
    let mut out = Vec::new();
    for kind in ["completions", "chats"] {
        for case in fx[kind].as_array().unwrap() {
            let mut tokens = ids(&case["prompt_tokens"]);
            let own_tokens = tokens.len();
            tokens.extend(ids(&case["completion_tokens"]));
            out.push(Sequence { source: "prompts", tokens, own_tokens, continued_source: "llama.cpp continuations" });
        }
    }
    let text = std::fs::read_to_string(PROSE_SOURCE)
        .unwrap_or_else(|e| panic!("{PROSE_SOURCE}: {e} (Debian's base-files package ships it)"));
    let tokens = model.tokenizer.encode(&text, false).unwrap();
    // A longer sample for exploring (the gate itself uses the default).
    let prose_tokens = std::env::var("FERROSERVE_QUALITY_PROSE_TOKENS").map(|v| v.parse().unwrap()).unwrap_or(PROSE_TOKENS);
    assert!(tokens.len() >= prose_tokens, "{PROSE_SOURCE} has only {} tokens", tokens.len());
    for chunk in tokens[..prose_tokens].chunks(PROSE_WINDOW_TOKENS).filter(|c| c.len() > 1) {
        out.push(Sequence { source: "prose", tokens: chunk.to_vec(), own_tokens: chunk.len(), continued_source: "" });
    }
    out
}

/// Every position's logits (`[tokens.len()][vocab]`) of every sequence under `model`, fed
/// one token per step with all sequences in each step: the engine's own decode path, whose
/// logits are bitwise those of any other chunking (tests/llama_reference.rs).
fn teacher_forced_logits(model: &LlamaModel, seqs: &[Sequence]) -> Vec<Vec<Vec<f32>>> {
    let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut kv = model.new_kv_cache((total + 16 * seqs.len()) * model.kv_bytes_per_token()).unwrap();
    let bt = kv.block_tokens();
    let tables: Vec<Vec<u32>> =
        seqs.iter().map(|s| (0..s.tokens.len().div_ceil(bt)).map(|_| kv.allocate().expect("KV cache sized for all")).collect()).collect();
    let vocab = model.vocab_size();
    let mut out: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| Vec::with_capacity(s.tokens.len())).collect();
    let longest = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    for pos in 0..longest {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| pos < seqs[i].tokens.len()).collect();
        let batch: Vec<SeqChunk<'_>> = live
            .iter()
            .map(|&i| SeqChunk { tokens: &seqs[i].tokens[pos..pos + 1], start_pos: pos, block_table: &tables[i], want_logits: true })
            .collect();
        let logits = model.forward(&batch, &mut kv);
        for (&i, row) in live.iter().zip(logits.chunks_exact(vocab)) {
            out[i].push(row.to_vec());
        }
    }
    for b in tables.into_iter().flatten() {
        kv.release(b);
    }
    out
}

/// Sums over scored positions.
#[derive(Default, Clone)]
struct Tally {
    positions: usize,
    /// Per position KL, for the spread (empty for the reference).
    kls: Vec<f64>,
    /// The position of each of `kls`.
    kl_positions: Vec<usize>,
    kl: f64,
    top1_agree: usize,
    /// −Σ log p(next token).
    nll: f64,
}

impl Tally {
    fn mean_kl(&self) -> f64 {
        self.kl / self.positions as f64
    }
    fn disagreement(&self) -> f64 {
        1.0 - self.top1_agree as f64 / self.positions as f64
    }
    fn perplexity(&self) -> f64 {
        (self.nll / self.positions as f64).exp()
    }
    fn add(&mut self, o: &Tally) {
        self.positions += o.positions;
        self.kls.extend_from_slice(&o.kls);
        self.kl_positions.extend_from_slice(&o.kl_positions);
        self.kl += o.kl;
        self.top1_agree += o.top1_agree;
        self.nll += o.nll;
    }
}

fn argmax(x: &[f64]) -> usize {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best })
}

/// `tokens[i + 1]` scored under row `i`, for `i` in `rows`.
fn tally(reference: &[Vec<f64>], mode: Option<&[Vec<f32>]>, tokens: &[u32], rows: std::ops::Range<usize>) -> Tally {
    let mut t = Tally::default();
    for i in rows {
        let r = &reference[i];
        let next = tokens[i + 1] as usize;
        t.positions += 1;
        match mode {
            None => {
                t.nll -= r[next];
                t.top1_agree += 1;
            }
            Some(rows) => {
                let m = log_softmax(&rows[i].iter().map(|&v| v as f64).collect::<Vec<_>>());
                let kl = r.iter().zip(&m).map(|(&lr, &lm)| lr.exp() * (lr - lm)).sum::<f64>();
                t.kl += kl;
                t.kls.push(kl);
                t.kl_positions.push(i);
                t.top1_agree += (argmax(r) == argmax(&m)) as usize;
                t.nll -= m[next];
            }
        }
    }
    t
}

/// How the per-position KLs spread, and how they depend on the position in the sequence.
fn spread(e: &Tally, f: &Tally) {
    for (name, t) in [("exact", e), ("fast", f)] {
        let mut k = t.kls.clone();
        k.sort_by(f64::total_cmp);
        let q = |p: f64| k[((k.len() - 1) as f64 * p) as usize];
        let top = k.len() / 100;
        let top_share = k[k.len() - top..].iter().sum::<f64>() / t.kl;
        println!(
            "{name:>7} KL per position: median {:.2e}, p90 {:.2e}, p99 {:.2e}, max {:.2e}; the top 1 % of positions carry {:.0} % of the total",
            q(0.5),
            q(0.9),
            q(0.99),
            k[k.len() - 1],
            100.0 * top_share
        );
    }
    for (lo, hi) in [(0, 8), (8, 24), (24, 40), (40, usize::MAX)] {
        let mean = |t: &Tally| {
            let v: Vec<f64> = t.kls.iter().zip(&t.kl_positions).filter(|(_, &p)| p >= lo && p < hi).map(|(k, _)| *k).collect();
            (v.iter().sum::<f64>() / v.len() as f64, v.len())
        };
        let ((me, n), (mf, _)) = (mean(e), mean(f));
        let end = if hi == usize::MAX { String::new() } else { hi.to_string() };
        println!("positions {lo}..{end}: {n}, mean KL exact {me:.2e}, fast {mf:.2e} (fast/exact {:.3})", mf / me);
    }
}

/// One sampling unit of the gate (a gated sequence): its scored positions and, per mode
/// `[exact, fast]`, the sums of KL and of top-1 disagreements over them.
struct Unit {
    positions: usize,
    kl: [f64; 2],
    disagreements: [f64; 2],
}

/// One gated quantity per position, averaged over all gated positions for both modes, with
/// the standard error of the paired difference's mean over units (module doc).
struct Paired {
    exact: f64,
    fast: f64,
    se: f64,
    units: usize,
}

impl Paired {
    fn over(units: &[Unit], sums: impl Fn(&Unit) -> [f64; 2]) -> Paired {
        let positions: f64 = units.iter().map(|u| u.positions as f64).sum();
        let exact = units.iter().map(|u| sums(u)[0]).sum::<f64>() / positions;
        let fast = units.iter().map(|u| sums(u)[1]).sum::<f64>() / positions;
        let mean_d = fast - exact;
        let n = units.len() as f64;
        let squares: f64 = units
            .iter()
            .map(|u| {
                let [e, f] = sums(u);
                (f - e - u.positions as f64 * mean_d).powi(2)
            })
            .sum();
        Paired { exact, fast, se: (n / (n - 1.0) * squares).sqrt() / positions, units: units.len() }
    }
    fn bound(&self) -> f64 {
        (1.0 + TOLERANCE) * self.exact + NOISE_SES * self.se
    }
    fn holds(&self) -> bool {
        self.fast <= self.bound()
    }
    fn report(&self, what: &str) -> String {
        format!(
            "{what}: exact {:.4e}, fast {:.4e} (fast/exact {:.3}); paired difference fast − exact {:+.3e}, SE {:.3e} over {} units; \
             bound {:.2}·exact + {}·SE = {:.4e} ({:.3}× exact): {}",
            self.exact,
            self.fast,
            self.fast / self.exact,
            self.fast - self.exact,
            self.se,
            self.units,
            1.0 + TOLERANCE,
            NOISE_SES,
            self.bound(),
            self.bound() / self.exact,
            if self.holds() { "holds" } else { "FAILS" }
        )
    }
}

#[test]
fn fast_numerics_are_at_least_as_close_to_an_f64_reference_as_exact() {
    let path = common::smollm2_gguf();
    let level = QuantLevel::selected();
    if level < QuantLevel::Avx2 {
        println!("SKIPPED at the {} level: fast numerics' kernels exist only on AVX2 and AVX-512", level.as_str());
        return;
    }
    let started = Instant::now();
    let exact = LlamaModel::load_with(&path, Numerics::Exact).unwrap_or_else(|e| panic!("{e}"));
    let fast = LlamaModel::load_with(&path, Numerics::Fast).unwrap_or_else(|e| panic!("{e}"));
    let seqs = sequences(&exact);

    let t = Instant::now();
    let exact_logits = teacher_forced_logits(&exact, &seqs);
    let fast_logits = teacher_forced_logits(&fast, &seqs);
    let engine_secs = t.elapsed().as_secs_f64();
    drop((exact, fast));

    let t = Instant::now();
    let reference = LlamaF64::from_model(&LlamaModel::load(&path).unwrap());
    let load_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // [reference, exact, fast] per source.
    let mut by_source: Vec<(&str, [Tally; 3])> = Vec::new();
    let mut per_sequence = Vec::new();
    let mut units = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let lp = reference.log_probs(&s.tokens);
        let parts = [(s.source, 0..s.own_tokens - 1), (s.continued_source, s.own_tokens - 1..s.tokens.len() - 1)];
        let mut seq_kl = [0.0; 2];
        for (source, rows) in parts.into_iter().filter(|(_, rows)| !rows.is_empty()) {
            let tallies = [
                tally(&lp, None, &s.tokens, rows.clone()),
                tally(&lp, Some(&exact_logits[i]), &s.tokens, rows.clone()),
                tally(&lp, Some(&fast_logits[i]), &s.tokens, rows),
            ];
            seq_kl[0] += tallies[1].kl / (s.tokens.len() - 1) as f64;
            seq_kl[1] += tallies[2].kl / (s.tokens.len() - 1) as f64;
            if GATED_SOURCES.contains(&source) {
                let disagreements = |t: &Tally| (t.positions - t.top1_agree) as f64;
                units.push(Unit {
                    positions: tallies[0].positions,
                    kl: [tallies[1].kl, tallies[2].kl],
                    disagreements: [disagreements(&tallies[1]), disagreements(&tallies[2])],
                });
            }
            match by_source.iter_mut().find(|(name, _)| *name == source) {
                Some((_, sums)) => sums.iter_mut().zip(&tallies).for_each(|(a, b)| a.add(b)),
                None => by_source.push((source, tallies)),
            }
        }
        println!(
            "sequence {i:>2} ({}, {} tokens): mean KL exact {:.2e}, fast {:.2e} (fast/exact {:.2})",
            s.source,
            s.tokens.len(),
            seq_kl[0],
            seq_kl[1],
            seq_kl[1] / seq_kl[0]
        );
        per_sequence.push(seq_kl[1] - seq_kl[0]);
    }
    let reference_secs = t.elapsed().as_secs_f64();

    let mut all: [Tally; 3] = Default::default();
    for (_, sums) in by_source.iter().filter(|(name, _)| GATED_SOURCES.contains(name)) {
        all.iter_mut().zip(sums).for_each(|(a, b)| a.add(b));
    }
    println!("CPU level {}; {} sequences; engine passes {engine_secs:.1} s, f64 weights {load_secs:.1} s, f64 passes {reference_secs:.1} s, total {:.1} s",
        level.as_str(), seqs.len(), started.elapsed().as_secs_f64());
    by_source.push(("gated (prompts + prose)", all));
    for (name, [r, e, f]) in &by_source {
        println!(
            "{name}: {} positions; perplexity reference {:.4}, exact {:.4}, fast {:.4}; mean KL(ref‖mode) exact {:.3e}, fast {:.3e}; \
             top-1 agreement exact {:.2} % ({}), fast {:.2} % ({})",
            r.positions,
            r.perplexity(),
            e.perplexity(),
            f.perplexity(),
            e.mean_kl(),
            f.mean_kl(),
            100.0 * (1.0 - e.disagreement()),
            e.top1_agree,
            100.0 * (1.0 - f.disagreement()),
            f.top1_agree,
        );
    }
    let [_, e, f] = &by_source.last().unwrap().1;
    spread(e, f);
    println!(
        "sequences where fast's mean KL is the lower: {} of {}",
        per_sequence.iter().filter(|&&d| d < 0.0).count(),
        per_sequence.len()
    );
    let kl = Paired::over(&units, |u| u.kl);
    let disagreement = Paired::over(&units, |u| u.disagreements);
    let (kl_report, disagreement_report) = (kl.report("mean KL(ref‖mode)"), disagreement.report("top-1 disagreement"));
    println!("gate, fast ≤ {:.2}·exact + {NOISE_SES}·SE:\n  {kl_report}\n  {disagreement_report}", 1.0 + TOLERANCE);
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    assert!(kl.holds(), "fast mode is further from the f64 reference than exact mode: {kl_report}");
    assert!(disagreement.holds(), "fast mode is further from the f64 reference than exact mode: {disagreement_report}");
}

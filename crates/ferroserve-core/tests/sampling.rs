//! Sampling (processors, truncation, the seeded draw, logprobs), parameter validation and
//! the streaming detokenizer, on hand-made logits and byte streams.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ferroserve_core::sample::{CounterRng, SamplingParams, SequenceSampler};
use ferroserve_core::tokenize::detok::Detokenizer;
use ferroserve_core::ErrorKind;

fn sampler(params: SamplingParams, seed: u64) -> SequenceSampler {
    SequenceSampler::new(Arc::new(params), seed, 0)
}

/// Deterministic pseudo-random logits in roughly [-4, 4).
fn random_logits(vocab: usize, salt: u64) -> Vec<f32> {
    let rng = CounterRng::new(salt, 99);
    (0..vocab as u64)
        .map(|i| (rng.uniform_at(i) * 8.0 - 4.0) as f32)
        .collect()
}

fn draw_many(params: SamplingParams, logits: &[f32], draws: usize) -> HashMap<u32, usize> {
    let mut s = sampler(params, 7);
    let mut counts = HashMap::new();
    for _ in 0..draws {
        // Penalties are off in these tests, so one sampler gives independent draws.
        *counts.entry(s.sample(logits).token_id).or_insert(0) += 1;
    }
    counts
}

#[test]
fn same_seed_same_tokens_and_other_seeds_differ() {
    let params = SamplingParams {
        temperature: 1.2,
        top_p: 0.9,
        ..SamplingParams::default()
    };
    let run = |seed: u64, stream: u64| {
        let mut s = SequenceSampler::new(Arc::new(params.clone()), seed, stream);
        (0..64)
            .map(|step| s.sample(&random_logits(500, step)).token_id)
            .collect::<Vec<u32>>()
    };
    assert_eq!(run(1, 0), run(1, 0));
    assert_ne!(run(1, 0), run(2, 0));
    assert_ne!(
        run(1, 0),
        run(1, 1),
        "choices of one request draw differently"
    );
}

#[test]
fn greedy_breaks_ties_to_the_lowest_id() {
    let logits = [0.5, 3.0, -1.0, 3.0, 3.0, 2.9];
    let mut s = sampler(SamplingParams::greedy(), 0);
    assert_eq!(s.sample(&logits).token_id, 1);
}

#[test]
fn top_k_one_is_greedy() {
    let params = SamplingParams {
        temperature: 1.7,
        top_k: 1,
        top_p: 0.5,
        min_p: 0.1,
        ..SamplingParams::default()
    };
    for salt in 0..50 {
        let mut logits = random_logits(300, salt);
        if salt % 5 == 0 {
            // A tie for the maximum.
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            logits[299] = max;
        }
        let greedy = sampler(SamplingParams::greedy(), salt)
            .sample(&logits)
            .token_id;
        assert_eq!(
            sampler(params.clone(), salt).sample(&logits).token_id,
            greedy,
            "salt {salt}"
        );
    }
}

#[test]
fn temperature_one_follows_the_softmax() {
    let probs = [0.5f64, 0.3, 0.2];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let draws = 40_000;
    let counts = draw_many(SamplingParams::default(), &logits, draws);
    for (id, p) in probs.iter().enumerate() {
        let freq = counts[&(id as u32)] as f64 / draws as f64;
        assert!((freq - p).abs() < 0.01, "token {id}: {freq} vs {p}");
    }
    // Temperature 0.5 squares the odds: 25 : 9 : 4.
    let counts = draw_many(
        SamplingParams {
            temperature: 0.5,
            ..SamplingParams::default()
        },
        &logits,
        draws,
    );
    let freq0 = counts[&0] as f64 / draws as f64;
    assert!((freq0 - 25.0 / 38.0).abs() < 0.01, "{freq0}");
}

#[test]
fn truncation_keeps_only_the_allowed_tokens() {
    let probs = [0.5f64, 0.3, 0.15, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let kept = |params: SamplingParams| {
        draw_many(params, &logits, 4000)
            .into_keys()
            .collect::<BTreeSet<u32>>()
    };
    assert_eq!(
        kept(SamplingParams::default()),
        BTreeSet::from([0, 1, 2, 3])
    );
    assert_eq!(
        kept(SamplingParams {
            top_k: 3,
            ..SamplingParams::default()
        }),
        BTreeSet::from([0, 1, 2])
    );
    assert_eq!(
        kept(SamplingParams {
            top_p: 0.75,
            ..SamplingParams::default()
        }),
        BTreeSet::from([0, 1])
    );
    assert_eq!(
        kept(SamplingParams {
            top_p: 0.1,
            ..SamplingParams::default()
        }),
        BTreeSet::from([0])
    );
    // min_p: at least 0.35 × the top probability (0.5) = 0.175.
    assert_eq!(
        kept(SamplingParams {
            min_p: 0.35,
            ..SamplingParams::default()
        }),
        BTreeSet::from([0, 1])
    );
    // Over the top-3 (mass 0.95) the first two hold 0.84 ≥ 0.82; over all tokens only 0.8.
    assert_eq!(
        kept(SamplingParams {
            top_k: 3,
            top_p: 0.82,
            ..SamplingParams::default()
        }),
        BTreeSet::from([0, 1]),
        "top-p renormalises over the top-k"
    );
}

#[test]
fn nucleus_over_a_large_vocabulary() {
    // 49k tokens, nucleus of a few hundred: the probing path must find the same set a
    // full sort would.
    let logits = random_logits(49_152, 3);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap()
            .then(a.cmp(&b))
    });
    let max = logits[order[0] as usize] as f64;
    let total: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let mut acc = 0.0;
    let nucleus: BTreeSet<u32> = order
        .iter()
        .take_while(|&&id| {
            let before = acc;
            acc += (logits[id as usize] as f64 - max).exp() / total;
            before < 0.3
        })
        .copied()
        .collect();
    assert!(
        nucleus.len() > 1024,
        "the test should need more than two probes: {}",
        nucleus.len()
    );
    let drawn = draw_many(
        SamplingParams {
            top_p: 0.3,
            ..SamplingParams::default()
        },
        &logits,
        3000,
    );
    assert!(drawn.keys().all(|id| nucleus.contains(id)));
    assert!(drawn.len() > 500, "{} distinct tokens", drawn.len());
}

#[test]
fn presence_and_frequency_penalties() {
    let logits = [2.0f32, 1.8, 0.0];
    let run = |params: SamplingParams| {
        let mut s = sampler(params, 0);
        (0..4)
            .map(|_| s.sample(&logits).token_id)
            .collect::<Vec<u32>>()
    };
    assert_eq!(run(SamplingParams::greedy()), vec![0, 0, 0, 0]);
    // Presence: once generated, 0 drops to 1.5 < 1.8; then both are penalised once.
    assert_eq!(
        run(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        }),
        vec![0, 1, 0, 0]
    );
    // Frequency: 2.0 − 0.15·count stays ahead of 1.8 for two more steps.
    assert_eq!(
        run(SamplingParams {
            frequency_penalty: 0.15,
            ..SamplingParams::greedy()
        }),
        vec![0, 0, 1, 0]
    );
    // A negative penalty encourages repetition.
    let logits = [1.8f32, 2.0];
    let mut s = sampler(
        SamplingParams {
            presence_penalty: -0.5,
            ..SamplingParams::greedy()
        },
        0,
    );
    assert_eq!(
        (0..3)
            .map(|_| s.sample(&logits).token_id)
            .collect::<Vec<_>>(),
        vec![1, 1, 1]
    );
}

#[test]
fn logit_bias_forces_and_bans_tokens() {
    let mut force = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    force.logit_bias.insert(777, 100.0);
    let mut ban = SamplingParams::greedy();
    for salt in 0..100 {
        let logits = random_logits(1000, salt);
        assert_eq!(sampler(force.clone(), salt).sample(&logits).token_id, 777);
        let best = sampler(SamplingParams::greedy(), 0)
            .sample(&logits)
            .token_id;
        ban.logit_bias.clear();
        ban.logit_bias.insert(best, -100.0);
        assert_ne!(sampler(ban.clone(), 0).sample(&logits).token_id, best);
    }
}

#[test]
fn logprobs_are_the_processed_log_softmax() {
    let logits = random_logits(200, 11);
    let mut params = SamplingParams {
        logprobs: true,
        top_logprobs: 5,
        ..SamplingParams::greedy()
    };
    params.logit_bias.insert(3, 2.5);
    let out = sampler(params, 0).sample(&logits);
    let lp = out.logprobs.expect("requested");

    let mut processed: Vec<f64> = logits.iter().map(|&l| l as f64).collect();
    processed[3] += 2.5;
    let max = processed.iter().copied().fold(f64::MIN, f64::max);
    let lse = max + processed.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    assert!((lp.logprob as f64 - (processed[out.token_id as usize] - lse)).abs() < 1e-5);
    assert_eq!(lp.top.len(), 5);
    assert_eq!(lp.top[0].0, out.token_id, "greedy picks the most likely");
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    for &(id, l) in &lp.top {
        assert!((l as f64 - (processed[id as usize] - lse)).abs() < 1e-5);
    }
    let mut sorted = processed.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    assert!(
        (lp.top[4].1 as f64 - (sorted[4] - lse)).abs() < 1e-5,
        "top-5 are the five largest"
    );
    // Without logprobs requested there are none; a -inf logit is floored, not -inf.
    assert!(sampler(SamplingParams::greedy(), 0)
        .sample(&logits)
        .logprobs
        .is_none());
    let mut lopsided = vec![f32::NEG_INFINITY; 10];
    lopsided[4] = 0.0;
    let params = SamplingParams {
        logprobs: true,
        top_logprobs: 2,
        ..SamplingParams::greedy()
    };
    let lp = sampler(params, 0).sample(&lopsided).logprobs.unwrap();
    assert_eq!(lp.top, vec![(4, 0.0), (0, -9999.0)]);
}

#[test]
fn validation_names_the_parameter() {
    let check = |params: SamplingParams, name: &str| {
        let err = params.validate(1000).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest);
        assert_eq!(err.param(), Some(name.trim()), "{err}");
        assert!(
            err.to_string().starts_with(name),
            "{err} should start with {name}"
        );
    };
    let d = SamplingParams::default;
    check(SamplingParams { n: 0, ..d() }, "n ");
    check(SamplingParams { n: 17, ..d() }, "n ");
    check(
        SamplingParams {
            max_tokens: Some(0),
            ..d()
        },
        "max_tokens",
    );
    check(
        SamplingParams {
            temperature: 2.01,
            ..d()
        },
        "temperature",
    );
    check(
        SamplingParams {
            temperature: -0.1,
            ..d()
        },
        "temperature",
    );
    check(
        SamplingParams {
            temperature: f32::NAN,
            ..d()
        },
        "temperature",
    );
    check(SamplingParams { top_p: 0.0, ..d() }, "top_p");
    check(SamplingParams { top_p: 1.5, ..d() }, "top_p");
    check(SamplingParams { min_p: 1.5, ..d() }, "min_p");
    check(
        SamplingParams {
            presence_penalty: 2.5,
            ..d()
        },
        "presence_penalty",
    );
    check(
        SamplingParams {
            frequency_penalty: -3.0,
            ..d()
        },
        "frequency_penalty",
    );
    check(
        SamplingParams {
            stop: vec!["a".into(); 5],
            ..d()
        },
        "stop",
    );
    check(
        SamplingParams {
            stop: vec![String::new()],
            ..d()
        },
        "stop",
    );
    check(
        SamplingParams {
            logprobs: true,
            top_logprobs: 21,
            ..d()
        },
        "top_logprobs",
    );
    check(
        SamplingParams {
            top_logprobs: 2,
            ..d()
        },
        "top_logprobs",
    );
    let mut bias = d();
    bias.logit_bias.insert(1000, 1.0);
    check(bias, "logit_bias");
    let mut bias = d();
    bias.logit_bias.insert(5, 101.0);
    check(bias, "logit_bias");
    let ok = SamplingParams {
        n: 16,
        temperature: 2.0,
        top_p: 1.0,
        stop: vec!["x".into(); 4],
        logprobs: true,
        top_logprobs: 20,
        ..d()
    };
    ok.validate(1000).unwrap();
}

// ---------------------------------------------------------------------------------------
// Detokenizer

/// Feeds pieces; returns the deltas up to and including a stop, then the final flush.
fn stream(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, Option<usize>) {
    let mut d = Detokenizer::new(stops.iter().map(|s| s.to_string()).collect());
    let mut deltas = Vec::new();
    for p in pieces {
        let out = d.push(p);
        deltas.push(out.text);
        if out.stopped_by.is_some() {
            return (deltas, out.stopped_by);
        }
    }
    deltas.push(d.finish());
    (deltas, None)
}

#[test]
fn utf8_is_never_split_whatever_the_byte_boundaries() {
    let text = "Grüße, 世界! 🎉🚀 naïve café — ok";
    let bytes = text.as_bytes();
    for split in 1..=5 {
        let pieces: Vec<&[u8]> = bytes.chunks(split).collect();
        let (deltas, stopped) = stream(&[], &pieces);
        assert_eq!(stopped, None);
        assert_eq!(deltas.concat(), text, "chunks of {split}");
        assert!(
            deltas.iter().all(|d| !d.contains('\u{FFFD}')),
            "chunks of {split}: {deltas:?}"
        );
    }
}

#[test]
fn stop_strings_match_across_token_boundaries_and_are_not_emitted() {
    // "###" arrives one character per token.
    let (deltas, stopped) = stream(&["###"], &[b"Answer: 42", b"#", b"#", b"#", b" trailing"]);
    assert_eq!(stopped, Some(0));
    assert_eq!(deltas.concat(), "Answer: 42");
    assert_eq!(deltas, vec!["Answer: 42", "", "", ""]);

    // The earliest match wins, whichever stop string it is.
    let (deltas, stopped) = stream(&["world", "lo w"], &[b"hel", b"lo wor", b"ld"]);
    assert_eq!((deltas.concat(), stopped), ("hel".to_string(), Some(1)));

    // A stop string with a multi-byte character split across tokens.
    let e = "é".as_bytes();
    let (deltas, stopped) = stream(&["café"], &[b"un caf", &e[..1], &e[1..], b"!"]);
    assert_eq!((deltas.concat(), stopped), ("un ".to_string(), Some(0)));

    // A partial match that fails is released, then a later full match stops.
    let (deltas, stopped) = stream(&["</s>"], &[b"a </", b"b> c </", b"s> d"]);
    assert_eq!(
        (deltas.concat(), stopped),
        ("a </b> c ".to_string(), Some(0))
    );
    assert_eq!(
        deltas[0], "a ",
        "'</' is held back while it may start the stop string"
    );

    // Never completed: everything held back comes out at the end.
    let (deltas, stopped) = stream(&["STOP"], &[b"ends with ST", b"O"]);
    assert_eq!(
        (deltas.concat(), stopped),
        ("ends with STO".to_string(), None)
    );
    assert_eq!(deltas.last().unwrap(), "STO");
}

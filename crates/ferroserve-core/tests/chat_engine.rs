//! The chat engine (its thread, events, sampling, stop strings, aborts, preemption,
//! priorities, the gathering wait) on the fake model of `support/fakes.rs`, whose logits
//! hash the context it reads back through the block tables.

#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferroserve_core::engine::{ChatEngine, ChatEvent, EngineConfig, FinishReason};
use ferroserve_core::sample::SamplingParams;
use ferroserve_core::sched::InteractiveLoad;
use ferroserve_core::sched::Priority::{self, Batch, Interactive};
use ferroserve_core::ErrorKind;

use support::events::*;
use support::fakes::*;

fn fake_engine(
    logits: Logits,
    kv_blocks: usize,
    cfg: EngineConfig,
) -> (ChatEngine, Arc<Mutex<Vec<usize>>>) {
    let model = FakeModel::new(logits);
    let batches = model.batch_tokens.clone();
    let engine = ChatEngine::start(
        model,
        EngineConfig {
            kv_budget_bytes: kv_blocks * BLOCK_BYTES,
            ..cfg
        },
    )
    .unwrap();
    (engine, batches)
}

fn sampled(seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens: Some(max_tokens),
        logprobs: true,
        top_logprobs: 3,
        ..SamplingParams::default()
    }
}

/// A mixed workload: different prompt lengths, greedy and seeded sampling, n up to 3,
/// a stop string, a shared prefix.
fn workload() -> Vec<(u64, Vec<u32>, SamplingParams)> {
    (0..12u64)
        .map(|r| {
            let mut prompt: Vec<u32> = if r % 4 == 0 {
                (0..20).collect()
            } else {
                Vec::new()
            };
            prompt.extend((0..(5 + r * 7) as u32).map(|i| (i * 31 + r as u32 * 7) % 60));
            let mut params = if r % 3 == 0 {
                SamplingParams {
                    max_tokens: Some(30),
                    ..SamplingParams::greedy()
                }
            } else {
                sampled(r, 30)
            };
            params.n = 1 + (r as usize % 3);
            params.ignore_eos = r % 2 == 0;
            if r == 5 {
                params.stop = vec!["q".into()];
            }
            (r, prompt, params)
        })
        .collect()
}

fn run_workload(kv_blocks: usize, max_running: usize) -> (Outcome, u64) {
    run_workload_at(kv_blocks, max_running, |_| Interactive)
}

/// [`run_workload`] with each request's priority chosen by its id.
fn run_workload_at(
    kv_blocks: usize,
    max_running: usize,
    priority_of: fn(u64) -> Priority,
) -> (Outcome, u64) {
    let (engine, _) = fake_engine(
        Logits::ContextHash,
        kv_blocks,
        EngineConfig {
            max_batch_tokens: 48,
            max_running,
            ..EngineConfig::default()
        },
    );
    let mut expected = HashMap::new();
    for (id, prompt, params) in workload() {
        expected.insert(id, params.n);
        engine
            .submit_with_priority(id, prompt, params, priority_of(id))
            .unwrap();
    }
    let outcome = collect(&engine, &expected);
    let stats = engine.stats();
    assert_eq!(
        stats.kv_blocks_free, stats.kv_blocks_total,
        "all blocks are back"
    );
    (outcome, stats.preemptions)
}

#[test]
fn preemption_under_a_tiny_kv_budget_gives_the_same_outputs() {
    let _watchdog = watchdog(Duration::from_secs(120));
    let (roomy, roomy_preemptions) = run_workload(10_000, 64);
    // 30 blocks = 120 tokens: about one long request's prompt plus output at a time.
    let (tight, tight_preemptions) = run_workload(30, 64);
    assert_eq!(roomy_preemptions, 0);
    assert!(tight_preemptions > 0, "the tight budget must preempt");
    assert_eq!(
        roomy.choices.len(),
        workload().iter().map(|w| w.2.n).sum::<usize>()
    );
    for (key, choice) in &roomy.choices {
        let other = &tight.choices[key];
        assert_eq!(choice.tokens, other.tokens, "{key:?}");
        assert_eq!(choice.text, other.text, "{key:?}");
        assert_eq!(choice.logprobs, other.logprobs, "{key:?}");
        assert_eq!(choice.finish, other.finish, "{key:?}");
    }
    // n > 1 with a seed: the choices differ from each other.
    let (a, b) = (&roomy.choices[&(1, 0)], &roomy.choices[&(1, 1)]);
    assert_ne!(a.tokens, b.tokens);
    // The stop string cut request 5 short, and its text was not emitted.
    let five = &roomy.choices[&(5, 0)];
    if five.finish == Some(FinishReason::Stop) && five.completion_tokens < 30 {
        assert!(!five.text.contains('q'));
    }
}

fn even_ids_batch(request_id: u64) -> Priority {
    if request_id % 2 == 0 {
        Batch
    } else {
        Interactive
    }
}

#[test]
fn batch_priority_changes_when_sequences_run_not_what_they_output() {
    let _watchdog = watchdog(Duration::from_secs(120));
    let (interactive, _) = run_workload(10_000, 64);
    for kv_blocks in [10_000, 30] {
        let (mixed, preemptions) = run_workload_at(kv_blocks, 64, even_ids_batch);
        assert_eq!(preemptions > 0, kv_blocks == 30);
        assert_eq!(mixed.choices.len(), interactive.choices.len());
        for (key, choice) in &interactive.choices {
            let other = &mixed.choices[key];
            assert_eq!(choice.tokens, other.tokens, "{key:?}");
            assert_eq!(choice.text, other.text, "{key:?}");
            assert_eq!(choice.logprobs, other.logprobs, "{key:?}");
            assert_eq!(choice.finish, other.finish, "{key:?}");
        }
    }
}

/// While another engine of the server has an interactive request in flight, steps of batch
/// sequences alone wait; this engine's own interactive requests still run (and count in the
/// server's load while they do); the batch request runs once the other engine's ends.
#[test]
fn batch_steps_wait_for_interactive_work_on_other_engines() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let load = InteractiveLoad::new();
    let (engine, _) = fake_engine(
        Logits::ContextHash,
        1000,
        EngineConfig {
            interactive: Arc::clone(&load),
            // Never forced through: this test is about order, not the starvation bound.
            batch_max_yield: Duration::from_secs(3600),
            ..EngineConfig::default()
        },
    );
    let params = SamplingParams {
        max_tokens: Some(4),
        ignore_eos: true,
        seed: Some(7),
        ..SamplingParams::default()
    };
    let embedding_elsewhere = load.enter();
    let long = SamplingParams {
        max_tokens: Some(40),
        ..params.clone()
    };
    engine
        .submit_with_priority(1, vec![3, 4, 5], long, Batch)
        .unwrap();
    assert_eq!(load.in_flight(), 1, "batch requests are not counted");
    engine.submit(2, vec![6, 7, 8], params.clone()).unwrap();
    let own = collect(&engine, &HashMap::from([(2, 1)]));
    assert_eq!(own.choices[&(2, 0)].completion_tokens, 4);
    // The interactive request is counted out once it ends; the other engine's is still in.
    assert_eq!(load.in_flight(), 1);
    // The batch request ran only in the steps its interactive neighbour shared (the
    // scheduler's own rule), so it is not finished; and no step runs it alone now.
    let steps = engine.stats().steps;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(engine.stats().steps, steps);
    assert!(own.choices.get(&(1, 0)).is_none_or(|c| c.finish.is_none()));
    drop(embedding_elsewhere);
    let rest = collect(&engine, &HashMap::from([(1, 1)]));
    let batch = &rest.choices[&(1, 0)];
    assert_eq!(batch.finish, Some(FinishReason::Length));
    assert_eq!(
        own.choices.get(&(1, 0)).map_or(0, |c| c.tokens.len()) + batch.tokens.len(),
        40
    );
}

/// Three one-token requests 20 ms apart into an idle engine with `burst_gather`; the token
/// counts of its forward passes.
fn steps_of_a_spread_burst(burst_gather: Duration) -> Vec<usize> {
    let (engine, batches) = fake_engine(
        Logits::ContextHash,
        1000,
        EngineConfig {
            burst_gather,
            ..EngineConfig::default()
        },
    );
    let params = SamplingParams {
        max_tokens: Some(1),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    for id in 1..=3u64 {
        if id > 1 {
            std::thread::sleep(Duration::from_millis(20));
        }
        engine
            .submit(id, vec![id as u32; 5], params.clone())
            .unwrap();
    }
    collect(&engine, &HashMap::from([(1, 1), (2, 1), (3, 1)]));
    let steps = batches.lock().unwrap().clone();
    steps
}

#[test]
fn an_idle_engine_gathers_a_burst_into_its_first_step() {
    let _watchdog = watchdog(Duration::from_secs(60));
    // Each arrival restarts the wait: the three prompts share one pass.
    assert_eq!(
        steps_of_a_spread_burst(Duration::from_millis(300)),
        vec![15]
    );
    // Without the wait, each prompt runs as it comes (the fake pass takes no time).
    assert_eq!(steps_of_a_spread_burst(Duration::ZERO), vec![5, 5, 5]);
}

#[test]
fn the_gathering_wait_ends_once_the_waiting_prompts_fill_a_step() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let (engine, batches) = fake_engine(
        Logits::ContextHash,
        1000,
        EngineConfig {
            max_batch_tokens: 8,
            burst_batch_tokens: 8,
            burst_gather: Duration::from_secs(30),
            ..EngineConfig::default()
        },
    );
    let params = SamplingParams {
        max_tokens: Some(2),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let t0 = Instant::now();
    engine.submit(1, vec![1; 8], params.clone()).unwrap();
    collect(&engine, &HashMap::from([(1, 1)]));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "waited {:?} with a full step ready",
        t0.elapsed()
    );
    // Idle again: the next full prompt starts at once too.
    engine.submit(2, vec![2; 8], params).unwrap();
    collect(&engine, &HashMap::from([(2, 1)]));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(batches.lock().unwrap().clone(), vec![8, 1, 8, 1]);
}

#[test]
fn a_lone_request_waits_one_gap_at_most_once() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let gap = Duration::from_millis(150);
    let (engine, batches) = fake_engine(
        Logits::ContextHash,
        1000,
        EngineConfig {
            burst_gather: gap,
            ..EngineConfig::default()
        },
    );
    let params = SamplingParams {
        max_tokens: Some(20),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let t0 = Instant::now();
    engine.submit(1, vec![1; 5], params).unwrap();
    collect(&engine, &HashMap::from([(1, 1)]));
    let took = t0.elapsed();
    // One gap before the first step; the 19 decode steps after it never wait.
    assert!(took >= gap, "{took:?}");
    assert!(took < gap * 5, "{took:?}: decode steps waited too");
    assert_eq!(batches.lock().unwrap().len(), 20);
}

#[test]
fn max_running_one_serialises_and_still_matches() {
    let _watchdog = watchdog(Duration::from_secs(120));
    let (roomy, _) = run_workload(10_000, 64);
    let (serial, _) = run_workload(10_000, 1);
    for (key, choice) in &roomy.choices {
        assert_eq!(choice.tokens, serial.choices[key].tokens, "{key:?}");
    }
}

#[test]
fn batches_respect_the_token_budget_and_decode_alongside_prefill() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let (engine, batches) = fake_engine(
        Logits::ContextHash,
        10_000,
        EngineConfig {
            max_batch_tokens: 32,
            burst_batch_tokens: 0,
            max_running: 8,
            ..EngineConfig::default()
        },
    );
    let params = SamplingParams {
        max_tokens: Some(50),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    engine.submit(1, vec![1; 10], params.clone()).unwrap();
    engine.submit(2, vec![2; 300], params.clone()).unwrap();
    let out = collect(&engine, &HashMap::from([(1, 1), (2, 1)]));
    let batches = batches.lock().unwrap().clone();
    assert!(batches.iter().all(|&t| t <= 32), "{batches:?}");
    assert!(
        batches.iter().filter(|&&t| t == 32).count() >= 9,
        "the long prompt is prefilled in full chunks: {batches:?}"
    );
    assert_eq!(out.choices[&(1, 0)].tokens.len(), 50);
    assert_eq!(out.choices[&(2, 0)].tokens.len(), 50);
    assert_eq!(out.admitted[&2], (300, 0));
}

#[test]
fn repeated_prompts_report_cached_tokens() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let (engine, _) = fake_engine(Logits::ContextHash, 1000, EngineConfig::default());
    let prompt: Vec<u32> = (0..37).map(|i| i % 60).collect();
    let params = SamplingParams {
        max_tokens: Some(3),
        ..SamplingParams::greedy()
    };
    engine.submit(1, prompt.clone(), params.clone()).unwrap();
    let first = collect(&engine, &HashMap::from([(1, 1)]));
    engine.submit(2, prompt.clone(), params.clone()).unwrap();
    let second = collect(&engine, &HashMap::from([(2, 1)]));
    assert_eq!(first.admitted[&1], (37, 0));
    assert_eq!(second.admitted[&2], (37, 36));
    assert_eq!(
        first.choices[&(1, 0)].tokens,
        second.choices[&(2, 0)].tokens
    );
    assert!(engine.stats().cached_prompt_tokens >= 36);
}

#[test]
fn fifty_aborts_return_kv_usage_to_zero() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let (engine, _) = fake_engine(
        Logits::ContextHash,
        2000,
        EngineConfig {
            max_batch_tokens: 256,
            ..EngineConfig::default()
        },
    );
    let mut expected = HashMap::new();
    for r in 0..50u64 {
        let params = SamplingParams {
            max_tokens: Some(2000),
            ignore_eos: true,
            n: 1 + r as usize % 2,
            seed: Some(r),
            ..SamplingParams::default()
        };
        expected.insert(r, params.n);
        engine
            .submit(r, (0..40).map(|i| (i + r as u32) % 60).collect(), params)
            .unwrap();
    }
    // Let them run a little, then abort every one.
    let mut seen = 0;
    while seen < 20 {
        seen += next_events(&engine)
            .iter()
            .filter(|e| matches!(e, ChatEvent::Delta { .. }))
            .count();
    }
    assert!(engine.kv_usage() > 0.0);
    for r in 0..50u64 {
        engine.abort(r);
    }
    let out = collect(&engine, &expected);
    assert!(out
        .choices
        .values()
        .all(|c| c.finish == Some(FinishReason::Abort)));
    assert_eq!(engine.kv_usage(), 0.0);
    assert_eq!(
        engine.stats().running_sequences + engine.stats().waiting_sequences,
        0
    );
    // Aborting again, or an unknown id, is harmless; the engine still serves.
    engine.abort(3);
    engine.abort(12345);
    engine
        .submit(
            99,
            vec![1, 2, 3],
            SamplingParams {
                max_tokens: Some(4),
                ..SamplingParams::greedy()
            },
        )
        .unwrap();
    let out = collect(&engine, &HashMap::from([(99, 1)]));
    assert_eq!(out.choices[&(99, 0)].completion_tokens, 4);
}

#[test]
fn stop_strings_across_tokens_and_split_characters() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let (engine, _) = fake_engine(Logits::Successor, 1000, EngineConfig::default());
    // "a" → b c d e f g …, one letter per token; "def" spans three tokens.
    let params = SamplingParams {
        max_tokens: Some(20),
        stop: vec!["xyz".into(), "def".into()],
        ..SamplingParams::greedy()
    };
    engine.submit(1, vec![0], params).unwrap();
    // 26 (" ") → é (2 tokens) → € (2 tokens) → 😀 (2 tokens) → "\n" → …
    let params = SamplingParams {
        max_tokens: Some(8),
        ..SamplingParams::greedy()
    };
    engine.submit(2, vec![26], params).unwrap();
    let out = collect(&engine, &HashMap::from([(1, 1), (2, 1)]));

    let one = &out.choices[&(1, 0)];
    assert_eq!(one.text, "bc");
    assert_eq!(one.finish, Some(FinishReason::Stop));
    assert_eq!(
        one.tokens,
        vec![1, 2, 3, 4, 5],
        "the tokens that completed the stop string are reported"
    );
    assert_eq!(one.completion_tokens, 5);

    let two = &out.choices[&(2, 0)];
    assert_eq!(two.text, "é€😀\nI4");
    assert_eq!(two.finish, Some(FinishReason::Length));
    assert!(
        two.deltas.iter().all(|d| !d.contains('\u{FFFD}')),
        "{:?}",
        two.deltas
    );
    assert_eq!(two.deltas[..3], ["", "é", ""]);
}

#[test]
fn eos_ends_a_choice_unless_ignored() {
    let _watchdog = watchdog(Duration::from_secs(60));
    // Bias EOS up so it is the greedy pick after a few tokens are penalised.
    let (engine, _) = fake_engine(Logits::Successor, 1000, EngineConfig::default());
    let mut params = SamplingParams {
        max_tokens: Some(5),
        ..SamplingParams::greedy()
    };
    params.logit_bias.insert(EOS, 50.0);
    engine.submit(1, vec![0], params.clone()).unwrap();
    params.ignore_eos = true;
    engine.submit(2, vec![0], params).unwrap();
    let out = collect(&engine, &HashMap::from([(1, 1), (2, 1)]));
    let stopped = &out.choices[&(1, 0)];
    assert_eq!(
        (
            stopped.finish,
            stopped.completion_tokens,
            stopped.tokens.len()
        ),
        (Some(FinishReason::Stop), 1, 0)
    );
    assert_eq!(stopped.text, "");
    let ignored = &out.choices[&(2, 0)];
    assert_eq!(
        (ignored.finish, ignored.tokens.clone()),
        (Some(FinishReason::Length), vec![EOS; 5])
    );
    assert_eq!(ignored.text, "", "EOS is a control token: no text");
}

#[test]
fn the_engine_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatEngine>();
    assert_send_sync::<ChatEvent>();
}

#[test]
fn submit_validates_synchronously() {
    let model = FakeModel {
        step_delay: Duration::from_millis(20),
        ..FakeModel::new(Logits::ContextHash)
    };
    let engine = ChatEngine::start(
        model,
        EngineConfig {
            kv_budget_bytes: 100 * BLOCK_BYTES,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let kind = |r: ferroserve_core::Result<_>| r.unwrap_err().kind();
    let msg = |r: ferroserve_core::Result<_>| r.unwrap_err().to_string();
    let param = |r: ferroserve_core::Result<_>| r.unwrap_err().param();
    // 100 blocks of 4 tokens: the KV cache caps the context at 400 tokens.
    assert_eq!(engine.context_length(), 400);
    let too_long = SamplingParams {
        max_tokens: Some(391),
        ..SamplingParams::default()
    };
    assert_eq!(
        kind(engine.submit(1, vec![1; 10], too_long)),
        ErrorKind::ContextLengthExceeded
    );
    assert_eq!(
        kind(engine.submit(1, vec![1; 400], SamplingParams::default())),
        ErrorKind::ContextLengthExceeded
    );
    // Whether the prompt came as `messages` or `prompt` only the API layer knows.
    assert_eq!(
        param(engine.submit(1, vec![1; 400], SamplingParams::default())),
        None
    );
    let info = engine
        .submit(
            1,
            vec![1; 10],
            SamplingParams {
                max_tokens: Some(390),
                ..SamplingParams::default()
            },
        )
        .unwrap();
    assert_eq!((info.prompt_tokens, info.max_tokens), (10, 390));
    engine.abort(1);
    assert!(msg(engine.submit(2, vec![], SamplingParams::default())).starts_with("prompt"));
    assert_eq!(
        param(engine.submit(2, vec![VOCAB as u32], SamplingParams::default())),
        Some("prompt")
    );
    assert_eq!(
        param(engine.submit(
            2,
            vec![1],
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            }
        )),
        Some("temperature")
    );
    assert!(
        msg(engine.submit(2, vec![VOCAB as u32], SamplingParams::default())).starts_with("prompt")
    );
    assert!(msg(engine.submit(
        2,
        vec![1],
        SamplingParams {
            temperature: 2.5,
            ..SamplingParams::default()
        }
    ))
    .starts_with("temperature"));
    let mut bias = SamplingParams::default();
    bias.logit_bias.insert(VOCAB as u32, 1.0);
    assert!(msg(engine.submit(2, vec![1], bias)).starts_with("logit_bias"));
    let info = engine
        .submit(3, vec![1, 2], SamplingParams::default())
        .unwrap();
    assert_eq!(
        info.max_tokens, 398,
        "no max_tokens: the rest of the context"
    );
    assert_eq!(
        kind(engine.submit(3, vec![1, 2], SamplingParams::default())),
        ErrorKind::InvalidRequest,
        "duplicate id"
    );
    assert_eq!(
        param(engine.submit(3, vec![1, 2], SamplingParams::default())),
        None,
        "an engine-level error, no parameter at fault"
    );
    engine.abort(3);
}

#[test]
fn a_panicking_engine_fails_in_flight_requests() {
    let _watchdog = watchdog(Duration::from_secs(60));
    // Slow steps: request 1 is still running when the poisoned request 2 arrives.
    let model = FakeModel {
        step_delay: Duration::from_millis(5),
        ..FakeModel::new(Logits::ContextHash)
    };
    let engine = ChatEngine::start(
        model,
        EngineConfig {
            kv_budget_bytes: 1000 * BLOCK_BYTES,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let params = SamplingParams {
        max_tokens: Some(300),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    engine.submit(1, vec![1, 2, 3], params.clone()).unwrap();
    engine.submit(2, vec![POISON], params.clone()).unwrap();
    let out = collect(&engine, &HashMap::from([(1, 1), (2, 1)]));
    assert_eq!(out.errors.get(&1), Some(&ErrorKind::EngineDead));
    assert_eq!(out.errors.get(&2), Some(&ErrorKind::EngineDead));
    assert!(!engine.is_alive());
    assert_eq!(
        engine.submit(3, vec![1], params).unwrap_err().kind(),
        ErrorKind::EngineDead
    );
    engine.abort(1);
}

#[test]
fn seeded_requests_repeat_and_unseeded_ones_vary() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let (engine, _) = fake_engine(Logits::ContextHash, 1000, EngineConfig::default());
    let prompt = vec![5, 6, 7];
    let seeded = SamplingParams {
        temperature: 1.5,
        seed: Some(42),
        max_tokens: Some(40),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let unseeded = SamplingParams {
        seed: None,
        ..seeded.clone()
    };
    for (id, params) in [(1, &seeded), (2, &seeded), (3, &unseeded), (4, &unseeded)] {
        engine.submit(id, prompt.clone(), params.clone()).unwrap();
    }
    let out = collect(&engine, &HashMap::from([(1, 1), (2, 1), (3, 1), (4, 1)]));
    assert_eq!(out.choices[&(1, 0)].tokens, out.choices[&(2, 0)].tokens);
    assert_ne!(out.choices[&(3, 0)].tokens, out.choices[&(4, 0)].tokens);
}

//! `Delivery::Whole` (answers sent whole): the same output as `Delivery::PerStep`, in one
//! `Delta` per choice right before its `Finished`, and no wake-ups in between — on the fake
//! model of `support/fakes.rs`.

#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use ferroserve_core::engine::{ChatEngine, ChatEvent, Delivery, EngineConfig, FinishReason};
use ferroserve_core::sample::SamplingParams;
use ferroserve_core::sched::Priority::Interactive;

use support::events::*;
use support::fakes::*;

fn engine(logits: Logits, step_delay: Duration) -> ChatEngine {
    let model = FakeModel {
        step_delay,
        ..FakeModel::new(logits)
    };
    let cfg = EngineConfig {
        kv_budget_bytes: 2000 * BLOCK_BYTES,
        max_batch_tokens: 48,
        ..EngineConfig::default()
    };
    ChatEngine::start(model, cfg).unwrap()
}

/// Requests that exercise what the output goes through: n up to 3, seeded sampling with
/// top logprobs, greedy, `ignore_eos` or not, end-of-generation, a stop string across
/// tokens, and (tokens 27-32 on the successor model) characters split over tokens.
fn requests() -> Vec<(u64, Vec<u32>, SamplingParams)> {
    (0..12u64)
        .map(|r| {
            let prompt: Vec<u32> = (0..(3 + r * 5) as u32).map(|i| (i * 31 + r as u32 * 7) % 60).collect();
            let mut params = if r % 3 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    seed: Some(r),
                    logprobs: true,
                    top_logprobs: 3,
                    ..SamplingParams::default()
                }
            };
            params.max_tokens = Some(25);
            params.n = 1 + (r as usize % 3);
            params.ignore_eos = r % 2 == 0;
            if r == 5 {
                // "J5K6" is tokens 35 and 36, which the successor model reaches from 32.
                params.stop = vec!["q".into(), "J5K6".into()];
            }
            if r % 4 == 3 {
                params.logit_bias.insert(EOS, 4.0); // ends some choices early (`ignore_eos` off)
            }
            (r, prompt, params)
        })
        .collect()
}

/// Every event batch (one per wake-up) until each request has `n` finished choices.
fn event_batches(engine: &ChatEngine, expected: &HashMap<u64, usize>) -> Vec<Vec<ChatEvent>> {
    let mut open: usize = expected.values().sum();
    let mut batches = Vec::new();
    while open > 0 {
        let batch = next_events(engine);
        assert!(!batch.is_empty(), "a wake-up without events");
        open -= batch.iter().filter(|e| matches!(e, ChatEvent::Finished { .. })).count();
        batches.push(batch);
    }
    batches
}

/// Each choice's folded output, by (request id, index).
type Choices = HashMap<(u64, u32), Choice>;

fn fold(batches: &[Vec<ChatEvent>]) -> Choices {
    let mut choices = Choices::new();
    for event in batches.iter().flatten() {
        match event.clone() {
            ChatEvent::Delta { request_id, index, text, token_ids, logprobs } => {
                let c = choices.entry((request_id, index)).or_default();
                assert!(c.finish.is_none(), "delta after finish");
                c.text.push_str(&text);
                c.deltas.push(text);
                c.tokens.extend(token_ids);
                c.logprobs.extend(logprobs);
            }
            ChatEvent::Finished { request_id, index, finish_reason, usage } => {
                let c = choices.entry((request_id, index)).or_default();
                assert!(c.finish.replace(finish_reason).is_none(), "finished twice");
                c.completion_tokens = usage.completion_tokens;
            }
            ChatEvent::Admitted { .. } => {}
            ChatEvent::Error { request_id, message, .. } => panic!("request {request_id} failed: {message}"),
        }
    }
    choices
}

/// In whole delivery, a choice's `Delta` is the event right before its `Finished`.
fn assert_whole(batches: &[Vec<ChatEvent>]) {
    for batch in batches {
        for (i, event) in batch.iter().enumerate() {
            if let ChatEvent::Delta { request_id, index, .. } = event {
                let next = batch.get(i + 1);
                assert!(
                    matches!(next, Some(ChatEvent::Finished { request_id: r, index: x, .. }) if r == request_id && x == index),
                    "the Delta of {request_id}/{index} is followed by {next:?}"
                );
            }
        }
    }
}

fn run(logits: Logits, delivery: Delivery) -> (Choices, Vec<Vec<ChatEvent>>) {
    let engine = engine(logits, Duration::ZERO);
    let mut expected = HashMap::new();
    for (id, prompt, params) in requests() {
        expected.insert(id, params.n);
        engine.submit_with(id, prompt, params, Interactive, delivery).unwrap();
    }
    let batches = event_batches(&engine, &expected);
    let stats = engine.stats();
    assert_eq!(stats.kv_blocks_free, stats.kv_blocks_total, "all blocks are back");
    (fold(&batches), batches)
}

#[test]
fn whole_delivery_gives_the_same_output_in_one_delta_per_choice() {
    let _watchdog = watchdog(Duration::from_secs(120));
    for logits in [Logits::ContextHash, Logits::Successor] {
        let (per_step, _) = run(logits, Delivery::PerStep);
        let (whole, batches) = run(logits, Delivery::Whole);
        assert_eq!(per_step.len(), requests().iter().map(|r| r.2.n).sum::<usize>());
        assert_eq!(per_step.keys().collect::<std::collections::BTreeSet<_>>(), whole.keys().collect());
        for (key, a) in &per_step {
            let b = &whole[key];
            assert_eq!(
                (&a.text, &a.tokens, &a.logprobs, a.finish, a.completion_tokens),
                (&b.text, &b.tokens, &b.logprobs, b.finish, b.completion_tokens),
                "{key:?}"
            );
            assert!(b.deltas.len() <= 1, "{key:?}: {} deltas", b.deltas.len());
        }
        assert_whole(&batches);
        // The workload means something: many tokens, logprobs, a stop, split characters.
        assert!(per_step.values().map(|c| c.deltas.len()).sum::<usize>() > 200);
        assert!(per_step.values().any(|c| !c.logprobs.is_empty()));
        assert!(per_step.values().any(|c| c.finish == Some(FinishReason::Stop)));
    }
    let (whole, _) = run(Logits::Successor, Delivery::Whole);
    assert!(whole.values().any(|c| c.text.contains('é')), "split characters are whole in the one delta");
}

#[test]
fn a_request_delivered_whole_wakes_its_consumer_twice_at_most() {
    let _watchdog = watchdog(Duration::from_secs(60));
    // Slow steps: the consumer is waiting on the pipe while the request decodes.
    let engine = engine(Logits::ContextHash, Duration::from_millis(1));
    let params = SamplingParams {
        max_tokens: Some(60),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    engine.submit_with(1, vec![1, 2, 3], params, Interactive, Delivery::Whole).unwrap();
    let batches = event_batches(&engine, &HashMap::from([(1, 1)]));
    // `Admitted` (after the first step), then the one `Delta` with its `Finished`.
    assert!(batches.len() <= 2, "{} wake-ups: {batches:?}", batches.len());
    let choice = &fold(&batches)[&(1, 0)];
    assert_eq!((choice.tokens.len(), choice.completion_tokens, choice.deltas.len()), (60, 60, 1));
    assert!(engine.stats().steps >= 60);
}

#[test]
fn an_aborted_request_delivered_whole_still_reports_what_it_generated() {
    let _watchdog = watchdog(Duration::from_secs(60));
    let engine = engine(Logits::ContextHash, Duration::from_millis(1));
    let params = SamplingParams {
        max_tokens: Some(2000),
        ignore_eos: true,
        n: 2,
        seed: Some(7),
        ..SamplingParams::default()
    };
    engine.submit_with(1, vec![4, 5, 6], params, Interactive, Delivery::Whole).unwrap();
    let admitted = next_events(&engine);
    assert!(matches!(admitted[..], [ChatEvent::Admitted { request_id: 1, .. }]), "{admitted:?}");
    while engine.stats().generated_tokens < 20 {
        std::thread::sleep(Duration::from_millis(2));
    }
    engine.abort(1);
    let batches = event_batches(&engine, &HashMap::from([(1, 2)]));
    assert_whole(&batches);
    let choices = fold(&batches);
    for index in 0..2 {
        let c = &choices[&(1, index)];
        assert_eq!(c.finish, Some(FinishReason::Abort));
        assert_eq!(c.tokens.len(), c.completion_tokens);
        assert!(c.completion_tokens >= 5, "{c:?}");
    }
    assert_eq!(engine.kv_usage(), 0.0);
}

//! Batching on the real model: concurrent requests through the chat engine match solo runs
//! bit for bit, and the chat fixtures come out of the engine as they do from llama.cpp.

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferroserve_core::engine::{ChatEngine, EngineConfig, FinishReason};
use ferroserve_core::sample::SamplingParams;

use support::events::*;

/// Logprobs as exact bit patterns, for bitwise comparisons.
fn logprob_bits(c: &Choice) -> Vec<(u32, Vec<(u32, u32)>)> {
    c.logprobs
        .iter()
        .map(|l| {
            (
                l.logprob.to_bits(),
                l.top
                    .iter()
                    .map(|t| (t.token_id, t.logprob.to_bits()))
                    .collect(),
            )
        })
        .collect()
}

fn smollm2_path() -> PathBuf {
    common::smollm2_gguf()
}

#[test]
fn smollm2_concurrent_greedy_requests_match_solo_runs_bitwise() {
    let path = smollm2_path();
    let _watchdog = watchdog(Duration::from_secs(900));
    let engine = ChatEngine::load(
        &path,
        EngineConfig {
            kv_budget_bytes: 64 << 20,
            max_batch_tokens: 256,
            max_running: 32,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let questions = [
        "What is the capital of France?",
        "Write a haiku about rust.",
        "List three prime numbers.",
        "Explain gravity in one sentence.",
        "What color is the sky?",
        "Say hello in Spanish.",
        "How many legs does a spider have?",
        "Name a famous painter.",
        "What is 12 times 12?",
        "Give me a synonym for happy.",
        "What is the boiling point of water?",
        "Who wrote Hamlet?",
        "Translate 'cat' to French.",
        "What is the largest ocean?",
        "Describe a tree in five words.",
        "What day comes after Monday?",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            engine
                .encode_chat(
                    &[ferroserve_core::tokenize::chat_template::ChatMessage::text(
                        "user", *q,
                    )],
                    true,
                )
                .unwrap()
        })
        .collect();
    let params = SamplingParams {
        max_tokens: Some(24),
        logprobs: true,
        top_logprobs: 3,
        ..SamplingParams::greedy()
    };

    let started = Instant::now();
    let mut solo = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let id = 1000 + i as u64;
        engine.submit(id, prompt.clone(), params.clone()).unwrap();
        solo.push(
            collect(&engine, &HashMap::from([(id, 1)]))
                .choices
                .remove(&(id, 0))
                .unwrap(),
        );
    }
    let solo_time = started.elapsed();
    let started = Instant::now();
    let mut expected = HashMap::new();
    for (i, prompt) in prompts.iter().enumerate() {
        expected.insert(i as u64, 1);
        engine
            .submit(i as u64, prompt.clone(), params.clone())
            .unwrap();
    }
    let batched = collect(&engine, &expected);
    eprintln!(
        "16 requests: solo {solo_time:?}, batched {:?}",
        started.elapsed()
    );
    for (i, alone) in solo.iter().enumerate() {
        let together = &batched.choices[&(i as u64, 0)];
        assert!(!alone.tokens.is_empty());
        assert_eq!(
            alone.tokens, together.tokens,
            "request {i}: {:?} vs {:?}",
            alone.text, together.text
        );
        assert_eq!(alone.text, together.text);
        assert_eq!(
            logprob_bits(alone),
            logprob_bits(together),
            "request {i}: logprobs differ"
        );
    }
    eprintln!("first answer: {:?}", solo[0].text);
    assert_eq!(engine.kv_usage(), 0.0);

    // Again through a cache of 7 blocks (112 tokens: one request at a time fits, barely
    // two): constant preemption and recomputation from the prefix cache, same bits.
    drop(engine);
    // SmolLM2-135M: 30 layers, 3 KV heads of 64; the cache decides its element size.
    let block_bytes = ferroserve_core::kv::KvCache::block_bytes(16, 30, 3, 64);
    let tight = ChatEngine::load(
        &path,
        EngineConfig {
            kv_budget_bytes: 7 * block_bytes,
            max_batch_tokens: 256,
            max_running: 32,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert_eq!(tight.context_length(), 112);
    let mut expected = HashMap::new();
    for (i, prompt) in prompts.iter().enumerate().take(8) {
        expected.insert(i as u64, 1);
        tight
            .submit(i as u64, prompt.clone(), params.clone())
            .unwrap();
    }
    let squeezed = collect(&tight, &expected);
    assert!(tight.stats().preemptions > 0);
    for (i, alone) in solo.iter().enumerate().take(8) {
        let got = &squeezed.choices[&(i as u64, 0)];
        assert_eq!(alone.tokens, got.tokens, "request {i} under preemption");
        assert_eq!(
            logprob_bits(alone),
            logprob_bits(got),
            "request {i}: logprobs differ under preemption"
        );
    }
    eprintln!("tight cache: {} preemptions", tight.stats().preemptions);
    assert_eq!(tight.kv_usage(), 0.0);
}

#[test]
fn smollm2_chat_fixtures_through_the_engine() {
    let path = smollm2_path();
    let _watchdog = watchdog(Duration::from_secs(600));
    let fixture = common::smollm2_fixture();
    let ids = common::token_ids;
    let engine = ChatEngine::load(
        &path,
        EngineConfig {
            kv_budget_bytes: 32 << 20,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let chats = fixture["chats"].as_array().unwrap();
    let mut expected = HashMap::new();
    for (i, chat) in chats.iter().enumerate() {
        let messages = common::fixture_messages(chat);
        assert_eq!(
            engine.render_chat(&messages, true).unwrap(),
            chat["prompt"].as_str().unwrap()
        );
        let prompt = engine.encode_chat(&messages, true).unwrap();
        assert_eq!(prompt, ids(&chat["prompt_tokens"]), "chat {i}");
        let reference = ids(&chat["completion_tokens"]);
        let text: String = chat["completion"].as_str().unwrap().into();
        assert_eq!(engine.decode(&reference, true).unwrap(), text);
        engine
            .submit(
                i as u64,
                prompt,
                SamplingParams {
                    max_tokens: Some(32),
                    logprobs: true,
                    top_logprobs: 5,
                    ..SamplingParams::greedy()
                },
            )
            .unwrap();
        expected.insert(i as u64, 1);
    }
    let out = collect(&engine, &expected);
    let eos = engine.eos_token_ids();
    for (i, chat) in chats.iter().enumerate() {
        let got = &out.choices[&(i as u64, 0)];
        let reference = ids(&chat["completion_tokens"]);
        let agree = got
            .tokens
            .iter()
            .zip(&reference)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "chat {i}: {agree}/{} tokens agree with llama.cpp, text {:?}",
            reference.len(),
            got.text
        );
        assert_eq!(got.tokens[0], reference[0], "chat {i}: first token");
        assert_eq!(got.logprobs[0].top.len(), 5);
        // Where llama.cpp stopped at EOS and we agree up to it, the engine stops there too,
        // without outputting the EOS token, and its text is llama.cpp's.
        if chat["stop_type"] == "eos" && agree == reference.len() - 1 {
            assert!(eos.contains(reference.last().unwrap()));
            assert_eq!(got.finish, Some(FinishReason::Stop));
            assert_eq!(got.completion_tokens, reference.len());
            assert_eq!(got.text, chat["completion"].as_str().unwrap());
        }
    }
    assert_eq!(engine.kv_usage(), 0.0);
}

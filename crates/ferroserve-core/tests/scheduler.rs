//! The generation scheduler driven by hand on the fakes in `support/fakes.rs`: chunked
//! prefill, admission, the prefix cache, forks, aborts, preemption, bursts and priorities.
//! The engine around it is tested in `chat_engine.rs`, batching on the real model in
//! `chat_engine_smollm2.rs`.

#[allow(dead_code)]
mod support;


use ferroserve_core::engine::StepModel;
use ferroserve_core::sched::scheduler::{
    KvPool, Scheduler, SchedulerConfig, SeqId, StepPlan,
};
use ferroserve_core::sched::Priority::{self, Batch, Interactive};

use support::fakes::*;

// ---------------------------------------------------------------------------------------
// Driving the scheduler by hand

/// Runs the fake model over a plan: writes the chunks' tokens into their slots and checks
/// every position read back through the block tables.
fn run_forward(sched: &Scheduler, plan: &StepPlan, kv: &mut FakeKv) {
    FakeModel::new(Logits::ContextHash).forward(&sched.batch(plan), kv);
}

/// Runs one step with a fake "sampler" (the next token is a function of the sequence).
fn step_by_hand(sched: &mut Scheduler, kv: &mut FakeKv) -> StepPlan {
    let plan = sched.schedule(kv);
    run_forward(sched, &plan, kv);
    let sampled: Vec<(SeqId, u32)> = plan
        .chunks
        .iter()
        .filter(|c| c.want_logits)
        .map(|c| (c.seq, (sched.tokens(c.seq).unwrap().len() % 50) as u32))
        .collect();
    sched.update(&plan, &sampled, kv);
    plan
}

#[test]
fn chunked_prefill_respects_the_budget() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 128,
        burst_batch_tokens: 0,
        max_running: 8,
    });
    let seq = sched.add_request(1, (0..1000).map(|i| i % 50).collect(), 1, Interactive);
    let mut steps = 0;
    let mut expected_start = 0;
    loop {
        let plan = step_by_hand(&mut sched, &mut kv);
        steps += 1;
        assert!(plan.num_tokens() <= 128, "{}", plan.num_tokens());
        let chunk = plan.chunks[0];
        assert_eq!(chunk.start_pos, expected_start);
        expected_start += chunk.num_tokens;
        assert_eq!(chunk.want_logits, expected_start == 1000);
        if chunk.want_logits {
            break;
        }
    }
    assert_eq!(steps, 1000usize.div_ceil(128));
    assert_eq!(sched.tokens(seq).unwrap().len(), 1001);
    assert_eq!(sched.num_blocks_held(seq), 1000usize.div_ceil(BLOCK_TOKENS));
}

#[test]
fn new_requests_are_admitted_while_others_decode() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 8,
    });
    let a = sched.add_request(1, vec![1; 10], 1, Interactive);
    let b = sched.add_request(2, vec![2; 20], 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(a, 0), (b, 0)]);
    assert_eq!(plan.num_tokens(), 30);
    // Both decode now; a long third prompt takes the rest of the budget alongside them.
    let c = sched.add_request(3, vec![3; 500], 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    let shape: Vec<(SeqId, usize, bool)> = plan
        .chunks
        .iter()
        .map(|ch| (ch.seq, ch.num_tokens, ch.want_logits))
        .collect();
    assert_eq!(shape, vec![(a, 1, true), (b, 1, true), (c, 62, false)]);
    // The decodes keep going every step while the prompt is prefilled in chunks.
    for _ in 0..5 {
        let plan = step_by_hand(&mut sched, &mut kv);
        assert_eq!(plan.chunks.len(), 3);
        assert_eq!(
            (
                plan.chunks[0].num_tokens,
                plan.chunks[1].num_tokens,
                plan.chunks[2].num_tokens
            ),
            (1, 1, 62)
        );
    }
}

#[test]
fn prefix_cache_supplies_full_blocks_of_a_repeated_prompt() {
    let mut kv = FakeKv::new(100, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    let prompt: Vec<u32> = (0..23).collect();
    let first = sched.add_request(1, prompt.clone(), 1, Interactive);
    step_by_hand(&mut sched, &mut kv);
    sched.finish(first, &mut kv);
    assert_eq!(kv.num_free_blocks(), 100);
    // 22 of 23 tokens could come from the cache; whole blocks only: 20.
    let second = sched.add_request(2, prompt.clone(), 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(second, 20)]);
    assert_eq!(
        (plan.chunks[0].start_pos, plan.chunks[0].num_tokens),
        (20, 3)
    );
    // A prompt of exactly whole blocks recomputes its whole last block (privately): the
    // last token's logits are needed, and shared blocks are never written.
    let exact: Vec<u32> = (0..24).collect();
    let third = sched.add_request(3, exact, 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(third, 20)]);
}

#[test]
fn forks_share_the_prompt_blocks() {
    let mut kv = FakeKv::new(100, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    let parent = sched.add_request(7, (0..18).collect(), 3, Interactive);
    let plan = sched.schedule(&mut kv);
    run_forward(&sched, &plan, &mut kv);
    let forks = sched.update(&plan, &[(parent, 5)], &mut kv);
    assert_eq!(
        forks
            .iter()
            .map(|f| (f.request_id, f.index))
            .collect::<Vec<_>>(),
        vec![(7, 1), (7, 2)]
    );
    let plan = sched.schedule(&mut kv);
    // The parent decodes; each fork recomputes only the prompt's partial last block.
    let shape: Vec<(usize, usize)> = plan
        .chunks
        .iter()
        .map(|c| (c.start_pos, c.num_tokens))
        .collect();
    assert_eq!(shape, vec![(18, 1), (16, 2), (16, 2)]);
    let used = kv.num_blocks() - kv.num_free_blocks();
    assert_eq!(
        used,
        4 + 1 + 2,
        "4 shared full blocks + the parent's partial one + one per fork"
    );
    for id in sched.abort(7, &mut kv) {
        assert!(sched.tokens(id).is_none());
    }
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

#[test]
fn aborting_fifty_scheduled_requests_frees_every_block() {
    let mut kv = FakeKv::new(300, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 256,
        burst_batch_tokens: 0,
        max_running: 64,
    });
    for r in 0..50 {
        sched.add_request(
            r,
            (0..30).map(|i| (i * r as u32) % 60).collect(),
            1 + (r as usize % 3),
            Interactive,
        );
    }
    for _ in 0..12 {
        step_by_hand(&mut sched, &mut kv);
    }
    assert!(kv.num_free_blocks() < kv.num_blocks());
    for r in 0..50 {
        sched.abort(r, &mut kv);
    }
    assert!(!sched.has_work());
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

#[test]
fn memory_pressure_preempts_the_newest_and_never_deadlocks() {
    // 12 blocks of 4 tokens; each sequence grows to 40 tokens (10 blocks) on its own.
    let mut kv = FakeKv::new(12, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 8,
    });
    let ids: Vec<SeqId> = (0..4)
        .map(|r| sched.add_request(r, vec![r as u32 + 1; 8], 1, Interactive))
        .collect();
    let mut done = 0;
    for _ in 0..2000 {
        let plan = step_by_hand(&mut sched, &mut kv);
        for &id in &ids {
            if sched.tokens(id).is_some_and(|t| t.len() >= 40) {
                sched.finish(id, &mut kv);
                done += 1;
            }
        }
        let _ = plan;
        if done == ids.len() {
            break;
        }
    }
    assert_eq!(done, 4, "all sequences complete");
    assert!(sched.num_preemptions() > 0);
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

// ---------------------------------------------------------------------------------------
// Bursts: prompts arriving together

fn burst_config() -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 256,
        max_running: 32,
    }
}

/// Sequences decoding now (one token each), for setting up a step.
fn decode_until_all_running(sched: &mut Scheduler, kv: &mut FakeKv) {
    while sched.num_waiting() > 0 {
        step_by_hand(sched, kv);
    }
    step_by_hand(sched, kv);
}

#[test]
fn prompts_arriving_together_are_prefilled_in_one_step() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    let seqs: Vec<SeqId> = (0..5)
        .map(|r| sched.add_request(r, vec![r as u32 + 1; 41], 1, Interactive))
        .collect();
    // 205 prompt tokens, more than max_batch_tokens: no stream is decoding, so the step
    // grows and every prompt gets its first token from it.
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.num_tokens(), 205);
    assert!(plan.chunks.iter().all(|c| c.want_logits));
    assert!(seqs.iter().all(|&s| sched.tokens(s).unwrap().len() == 42));
    // Decoding from then on: back to max_batch_tokens (here five tokens).
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.num_tokens(), 5);

    // Without the burst budget the same prompts take four steps to all get a token.
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        burst_batch_tokens: 0,
        ..burst_config()
    });
    let seqs: Vec<SeqId> = (0..5)
        .map(|r| sched.add_request(r, vec![r as u32 + 1; 41], 1, Interactive))
        .collect();
    let mut steps = 0;
    while seqs.iter().any(|&s| sched.tokens(s).unwrap().len() == 41) {
        let plan = step_by_hand(&mut sched, &mut kv);
        assert!(plan.num_tokens() <= 64);
        steps += 1;
    }
    assert_eq!(steps, 4);
}

#[test]
fn long_prompts_keep_to_max_batch_tokens_and_short_ones_burst_beside_them() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    let long = sched.add_request(1, (0..600).map(|i| i % 50).collect(), 1, Interactive);
    let short: Vec<SeqId> = (2..6)
        .map(|r| sched.add_request(r, vec![r as u32; 41], 1, Interactive))
        .collect();
    // The long prompt takes an ordinary chunk; the four short ones come whole with the
    // burst tokens instead of waiting up to ten steps behind it.
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.num_tokens(), 64 + 4 * 41);
    assert!(short.iter().all(|&s| sched.tokens(s).unwrap().len() == 42));
    // Then it goes on in chunks of max_batch_tokens: no burst for the long prompt.
    let mut chunks = Vec::new();
    while sched.tokens(long).unwrap().len() == 600 {
        let plan = step_by_hand(&mut sched, &mut kv);
        assert!(plan.num_tokens() <= 64);
        chunks.push(plan.chunks[0].num_tokens);
    }
    assert_eq!(chunks, vec![64, 64, 64, 64, 64, 64, 64, 64, 24]);
}

#[test]
fn a_step_grows_only_while_waiting_prompts_outnumber_the_streams_it_delays() {
    // One stream decodes; six prompts arrive (120 tokens): the six outnumber the one
    // stream, so they all join its next step.
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    sched.add_request(0, vec![9; 10], 1, Interactive);
    decode_until_all_running(&mut sched, &mut kv);
    for r in 1..=6 {
        sched.add_request(r, vec![r as u32; 20], 1, Interactive);
    }
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.num_tokens(), 1 + 6 * 20);
    assert_eq!(sched.num_waiting(), 0);

    // Eight streams decode; four prompts arrive (120 tokens): the step keeps to
    // max_batch_tokens, and the streams' next token is not held up by all four prompts.
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    for r in 0..8 {
        sched.add_request(r, vec![r as u32 + 1; 10], 1, Interactive);
    }
    decode_until_all_running(&mut sched, &mut kv);
    for r in 8..12 {
        sched.add_request(r, vec![r as u32; 30], 1, Interactive);
    }
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.num_tokens(), 64);
    assert_eq!(
        plan.chunks.iter().filter(|c| c.num_tokens == 1).count(),
        8,
        "every stream still decodes"
    );
}

#[test]
fn batch_work_never_gets_the_burst_budget() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    for r in 0..5 {
        sched.add_request(r, vec![r as u32 + 1; 41], 1, Batch);
    }
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (0, 64));

    // Interactive prompts burst past max_batch_tokens: batch work gets what is left of
    // max_batch_tokens, here nothing.
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    for r in 0..3 {
        sched.add_request(r, vec![r as u32 + 1; 30], 1, Batch);
    }
    for r in 3..6 {
        sched.add_request(r, vec![r as u32 + 1; 30], 1, Interactive);
    }
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (90, 0));
    // A small interactive burst leaves the rest of max_batch_tokens to batch work.
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(burst_config());
    sched.add_request(0, vec![1; 100], 1, Batch);
    sched.add_request(1, vec![2; 20], 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (20, 44));
}

// ---------------------------------------------------------------------------------------
// Priorities

/// Tokens of a plan per class: `(interactive, batch)`.
fn tokens_by_class(sched: &Scheduler, plan: &StepPlan) -> (usize, usize) {
    plan.chunks
        .iter()
        .fold((0, 0), |(i, b), c| match sched.priority(c.seq).unwrap() {
            Interactive => (i + c.num_tokens, b),
            Batch => (i, b + c.num_tokens),
        })
}

#[test]
fn batch_sequences_get_only_the_budget_interactive_ones_leave() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 16,
    });
    // Submitted first, yet served last: age does not outrank priority.
    let batch = sched.add_request(1, vec![1; 100], 1, Batch);
    let interactive = sched.add_request(2, (0..200).map(|i| i % 50).collect(), 1, Interactive);
    // The interactive prompt takes the whole budget; the batch one is not even admitted.
    for _ in 0..3 {
        let plan = step_by_hand(&mut sched, &mut kv);
        assert_eq!(tokens_by_class(&sched, &plan), (64, 0));
        assert!(plan.first_admissions.iter().all(|&(s, _)| s != batch));
        assert_eq!(sched.num_blocks_held(batch), 0);
    }
    // 8 interactive prompt tokens are left: the batch prompt gets the other 56.
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(batch, 0)]);
    assert_eq!(tokens_by_class(&sched, &plan), (8, 56));
    assert_eq!(sched.tokens(interactive).unwrap().len(), 201);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (1, 44));
    assert_eq!(sched.tokens(batch).unwrap().len(), 101);
    // A second interactive prompt fills the budget next to the first one's decodes: the
    // running batch sequence gets no token, not even its decode, but keeps its blocks.
    let late = sched.add_request(3, (0..150).map(|i| (i * 7) % 50).collect(), 1, Interactive);
    for _ in 0..2 {
        let plan = step_by_hand(&mut sched, &mut kv);
        assert_eq!(tokens_by_class(&sched, &plan), (64, 0));
        assert!(plan.preempted.is_empty());
        assert_eq!(sched.tokens(batch).unwrap().len(), 101);
        assert_eq!(
            sched.num_blocks_held(batch),
            100usize.div_ceil(BLOCK_TOKENS)
        );
    }
    // The last 24 prompt tokens and a decode leave room: the batch sequence decodes again.
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (25, 1));
    assert_eq!(sched.tokens(late).unwrap().len(), 151);
    assert_eq!(sched.tokens(batch).unwrap().len(), 102);
}

#[test]
fn batch_sequences_use_the_whole_budget_without_interactive_demand() {
    let mut kv = FakeKv::new(1000, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 16,
    });
    let interactive = sched.add_request(1, vec![1; 10], 1, Interactive);
    let batch: Vec<SeqId> = (0..3)
        .map(|r| sched.add_request(10 + r, vec![r as u32 + 2; 100], 1, Batch))
        .collect();
    // A short interactive prompt, then its decodes: the batch prompts take the rest.
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (10, 54));
    for _ in 0..2 {
        let plan = step_by_hand(&mut sched, &mut kv);
        assert_eq!(tokens_by_class(&sched, &plan), (1, 63));
    }
    // No interactive demand: batch work fills every step while it has that much to do.
    sched.finish(interactive, &mut kv);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (0, 64));
    // Two decodes and the last 58 prompt tokens: all of it runs at once.
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(tokens_by_class(&sched, &plan), (0, 60));
    assert!(batch
        .iter()
        .all(|&s| plan.chunks.iter().any(|c| c.seq == s && c.want_logits)));
}

#[test]
fn memory_pressure_preempts_batch_sequences_first_whatever_their_age() {
    // 10 blocks of 4 tokens, shared by an interactive sequence between two batch ones.
    let mut kv = FakeKv::new(10, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 8,
    });
    let older = sched.add_request(1, vec![1; 8], 1, Batch);
    step_by_hand(&mut sched, &mut kv);
    let interactive = sched.add_request(2, vec![2; 8], 1, Interactive);
    step_by_hand(&mut sched, &mut kv);
    let younger = sched.add_request(3, vec![3; 8], 1, Batch);
    step_by_hand(&mut sched, &mut kv);
    assert_eq!(sched.num_running(), 3);
    // The interactive sequence grows to 9 of the 10 blocks, decoding every step; only batch
    // sequences make room, the younger first, then the older one.
    let mut preempted = Vec::new();
    while sched.tokens(interactive).unwrap().len() < 37 {
        let before = sched.tokens(interactive).unwrap().len();
        let plan = step_by_hand(&mut sched, &mut kv);
        assert_eq!(sched.tokens(interactive).unwrap().len(), before + 1);
        preempted.extend(plan.preempted.iter().copied());
    }
    assert!(
        preempted.iter().all(|&s| s == older || s == younger),
        "{preempted:?}"
    );
    assert_eq!(preempted[0], younger);
    assert!(preempted.contains(&older), "{preempted:?}");
    // Once the interactive sequence is done, the batch ones complete.
    sched.finish(interactive, &mut kv);
    for _ in 0..2000 {
        step_by_hand(&mut sched, &mut kv);
        for id in [older, younger] {
            if sched.tokens(id).is_some_and(|t| t.len() >= 20) {
                sched.finish(id, &mut kv);
            }
        }
        if !sched.has_work() {
            break;
        }
    }
    assert!(!sched.has_work());
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

#[test]
fn an_interactive_arrival_takes_memory_and_slots_from_batch_work() {
    // 8 blocks of 4 tokens, all held by two batch prompts of 16 tokens.
    let mut kv = FakeKv::new(8, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 8,
    });
    let first = sched.add_request(1, vec![1; 16], 1, Batch);
    let second = sched.add_request(2, vec![2; 16], 1, Batch);
    step_by_hand(&mut sched, &mut kv);
    assert_eq!(kv.num_free_blocks(), 0);
    // Admitted at the next step: the newest batch sequence gives up its blocks.
    let interactive = sched.add_request(3, vec![3; 6], 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(interactive, 0)]);
    assert_eq!(plan.preempted, vec![second]);
    let shape: Vec<(SeqId, usize, usize)> = plan
        .chunks
        .iter()
        .map(|c| (c.seq, c.start_pos, c.num_tokens))
        .collect();
    assert_eq!(shape, vec![(interactive, 0, 6), (first, 16, 1)]);

    // Running slots likewise: with `max_running` taken by batch sequences, an interactive
    // request takes the newest one's slot.
    let mut kv = FakeKv::new(100, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 64,
        burst_batch_tokens: 0,
        max_running: 2,
    });
    sched.add_request(1, vec![1; 5], 1, Batch);
    let second = sched.add_request(2, vec![2; 5], 1, Batch);
    step_by_hand(&mut sched, &mut kv);
    assert_eq!(sched.num_running_of(Batch), 2);
    let interactive = sched.add_request(3, vec![3; 5], 1, Interactive);
    let plan = step_by_hand(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(interactive, 0)]);
    assert_eq!(plan.preempted, vec![second]);
    assert_eq!(
        (
            sched.num_running_of(Interactive),
            sched.num_running_of(Batch),
            sched.num_waiting_of(Batch)
        ),
        (1, 1, 1)
    );
}

#[test]
fn mixed_priorities_under_memory_pressure_all_complete() {
    // 16 blocks of 4 tokens; each sequence grows to 40 tokens (10 blocks).
    let mut kv = FakeKv::new(16, BLOCK_TOKENS);
    let mut sched = Scheduler::new(SchedulerConfig {
        max_batch_tokens: 32,
        burst_batch_tokens: 0,
        max_running: 8,
    });
    let ids: Vec<SeqId> = (0..8u64)
        .map(|r| {
            let priority = if r % 2 == 0 { Batch } else { Interactive };
            sched.add_request(r, vec![r as u32 + 1; 6 + r as usize], 1, priority)
        })
        .collect();
    let mut finished: Vec<Priority> = Vec::new();
    for _ in 0..5000 {
        let plan = step_by_hand(&mut sched, &mut kv);
        if plan
            .preempted
            .iter()
            .any(|&s| sched.priority(s) == Some(Interactive))
        {
            assert_eq!(
                sched.num_running_of(Batch),
                0,
                "an interactive sequence was preempted while a batch one held blocks"
            );
        }
        for &id in &ids {
            if sched.tokens(id).is_some_and(|t| t.len() >= 40) {
                finished.push(sched.priority(id).unwrap());
                sched.finish(id, &mut kv);
            }
        }
        if finished.len() == ids.len() {
            break;
        }
    }
    assert_eq!(finished.len(), 8, "all sequences complete");
    assert!(sched.num_preemptions() > 0);
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

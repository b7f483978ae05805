//! KV blocks go back to the real pool by `Drop` of the sequences' block tables: when a
//! sequence finishes, when its request is cancelled, when it is preempted, and when the
//! scheduler itself is dropped (as after a panic in a step). `BlockPool` panics on a second
//! release of a block, so "every block is free again" also means "each was freed once".

use ferroserve_core::kv::{KvCache, KvCacheConfig};
use ferroserve_core::sched::scheduler::{Scheduler, SchedulerConfig, SeqId, StepPlan};
use ferroserve_core::sched::Priority::Interactive;

const BLOCK_TOKENS: usize = 16;

/// Bookkeeping only: the scheduler never touches K and V.
fn cache(num_blocks: usize) -> KvCache {
    KvCache::new(KvCacheConfig { block_tokens: BLOCK_TOKENS, num_blocks }, 2, 2, 64)
}

/// One step without a model: every chunk is computed and sequences wanting logits get token 1.
fn step(sched: &mut Scheduler, kv: &mut KvCache) -> StepPlan {
    let plan = sched.schedule(kv);
    let sampled: Vec<(SeqId, u32)> = plan.chunks.iter().filter(|c| c.want_logits).map(|c| (c.seq, 1)).collect();
    sched.update(&plan, &sampled, kv);
    plan
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 1000 + i).collect()
}

#[test]
fn blocks_return_on_finish_and_cancel() {
    let mut kv = cache(64);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    let a = sched.add_request(1, prompt(1, 40), 1, Interactive); // 3 blocks
    let b = sched.add_request(2, prompt(2, 70), 1, Interactive); // 5 blocks
    step(&mut sched, &mut kv);
    assert_eq!((sched.num_blocks_held(a), sched.num_blocks_held(b)), (3, 5));
    assert_eq!(kv.num_free_blocks(), 64 - 8);

    sched.finish(a, &mut kv);
    assert_eq!(kv.num_free_blocks(), 64 - 5, "finished: its 3 blocks are back");
    sched.finish(a, &mut kv); // finishing twice frees nothing twice
    assert_eq!(kv.num_free_blocks(), 64 - 5);

    assert_eq!(sched.abort(2, &mut kv), vec![b]);
    assert_eq!(kv.num_free_blocks(), 64, "cancelled: its 5 blocks are back");
    assert!(sched.abort(2, &mut kv).is_empty());
    assert_eq!(kv.num_free_blocks(), 64);
}

#[test]
fn shared_prefix_blocks_are_released_once_per_holder() {
    let mut kv = cache(64);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    let first = sched.add_request(1, prompt(3, 40), 1, Interactive);
    step(&mut sched, &mut kv);
    // The same prompt again: its first two (full) blocks come from the prefix cache, shared.
    let second = sched.add_request(2, prompt(3, 40), 1, Interactive);
    let plan = step(&mut sched, &mut kv);
    assert_eq!(plan.first_admissions, vec![(second, 32)]);
    assert_eq!(kv.num_free_blocks(), 64 - 3 - 1, "two shared blocks plus one partial block each");
    sched.finish(first, &mut kv);
    assert_eq!(kv.num_free_blocks(), 64 - 3, "the shared blocks are still held by the second");
    sched.finish(second, &mut kv);
    assert_eq!(kv.num_free_blocks(), 64);
}

#[test]
fn preemption_returns_the_victims_blocks() {
    // 6 blocks: two 40-token prompts take 3 each; decoding past 48 tokens needs a 4th.
    let mut kv = cache(6);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched.add_request(1, prompt(4, 47), 1, Interactive);
    sched.add_request(2, prompt(5, 47), 1, Interactive);
    step(&mut sched, &mut kv);
    assert_eq!(kv.num_free_blocks(), 0);
    let mut preempted = Vec::new();
    for _ in 0..3 {
        preempted.extend(step(&mut sched, &mut kv).preempted);
    }
    assert!(!preempted.is_empty(), "one of the two had to give way");
    assert_eq!(kv.num_free_blocks() + sched.num_blocks_held(0) + sched.num_blocks_held(1), 6);
}

#[test]
fn dropping_the_scheduler_returns_every_block() {
    let mut kv = cache(64);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    for r in 0..4 {
        sched.add_request(r, prompt(r as u32 + 10, 30 + 7 * r as usize), 2, Interactive);
    }
    for _ in 0..3 {
        step(&mut sched, &mut kv);
    }
    assert!(kv.num_free_blocks() < kv.num_blocks());
    assert!(kv.usage().used_blocks > 0);
    drop(sched); // as when the engine thread unwinds from a panic mid-step
    assert_eq!(kv.num_free_blocks(), kv.num_blocks());
}

//! The generation scheduler and the chat engine on a fake model whose "KV cache" stores
//! token ids: its logits hash the context it reads back through the block tables, so any
//! block-table, prefix-cache or preemption mistake changes the output (or trips an
//! assertion). Then, when the SmolLM2 GGUF is present, batching on the real model.

#[allow(dead_code)]
mod common;

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferroserve_core::engine::{
    ChatEngine, ChatEvent, EngineConfig, FinishReason, StepModel, TokenLogprob,
};
use ferroserve_core::kv::BlockHash;
use ferroserve_core::sample::SamplingParams;
use ferroserve_core::sched::scheduler::{
    BlockTable, KvPool, ReleaseBlocks, Scheduler, SchedulerConfig, SeqChunk, SeqId, StepPlan,
};
use ferroserve_core::sched::InteractiveLoad;
use ferroserve_core::sched::Priority::{self, Batch, Interactive};
use ferroserve_core::tokenize::detok::Vocab;
use ferroserve_core::ErrorKind;

// ---------------------------------------------------------------------------------------
// Fakes

/// A KV pool with the real cache's rules (refcounts, LRU reuse of freed registered blocks,
/// eviction on reuse) whose slots hold the token written there. The counts are shared with
/// the block tables, which release into them when dropped.
struct FakeKv {
    block_tokens: usize,
    books: Arc<SharedBooks>,
    slots: Vec<Option<u32>>,
}

struct FakeBooks {
    refcounts: Vec<u32>,
    /// Free blocks, next to reuse first.
    free: VecDeque<u32>,
    by_hash: HashMap<BlockHash, u32>,
    hash_of: Vec<Option<BlockHash>>,
}

struct SharedBooks(Mutex<FakeBooks>);

impl ReleaseBlocks for SharedBooks {
    fn release_blocks(&self, blocks: &[u32]) {
        let mut books = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for &block in blocks {
            let count = &mut books.refcounts[block as usize];
            assert!(*count > 0, "double release of block {block}");
            *count -= 1;
            if *count == 0 {
                if books.hash_of[block as usize].is_some() {
                    books.free.push_back(block);
                } else {
                    books.free.push_front(block);
                }
            }
        }
    }
}

impl FakeKv {
    fn new(num_blocks: usize, block_tokens: usize) -> Self {
        let books = FakeBooks {
            refcounts: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; num_blocks],
        };
        Self { block_tokens, books: Arc::new(SharedBooks(Mutex::new(books))), slots: vec![None; num_blocks * block_tokens] }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, FakeBooks> {
        self.books.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refcount(&self, block: u32) -> u32 {
        self.books().refcounts[block as usize]
    }

    fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        let block = block_table[pos / self.block_tokens];
        assert!(
            self.refcount(block) > 0,
            "position {pos} is in free block {block}"
        );
        block as usize * self.block_tokens + pos % self.block_tokens
    }
}

impl KvPool for FakeKv {
    fn block_tokens(&self) -> usize {
        self.block_tokens
    }
    fn num_blocks(&self) -> usize {
        self.books().refcounts.len()
    }
    fn num_free_blocks(&self) -> usize {
        self.books().free.len()
    }
    fn allocate(&mut self) -> Option<u32> {
        let mut books = self.books();
        let block = books.free.pop_front()?;
        if let Some(hash) = books.hash_of[block as usize].take() {
            books.by_hash.remove(&hash);
        }
        books.refcounts[block as usize] = 1;
        drop(books);
        let bt = self.block_tokens;
        self.slots[block as usize * bt..(block as usize + 1) * bt].fill(None);
        Some(block)
    }
    fn retain(&mut self, block: u32) {
        let mut books = self.books();
        assert!(books.refcounts[block as usize] > 0);
        books.refcounts[block as usize] += 1;
    }
    fn block_table(&self) -> BlockTable {
        BlockTable::new(self.books.clone())
    }
    fn lookup_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        let mut blocks = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_tokens) {
            let hash = self.block_hash(parent, chunk);
            let mut books = self.books();
            let Some(&block) = books.by_hash.get(&hash) else {
                break;
            };
            if books.refcounts[block as usize] == 0 {
                books.free.retain(|&b| b != block);
            }
            books.refcounts[block as usize] += 1;
            blocks.push(block);
            parent = Some(hash);
        }
        blocks
    }
    fn register_full_block(&mut self, hash: BlockHash, block: u32) {
        let start = block as usize * self.block_tokens;
        assert!(
            self.slots[start..start + self.block_tokens]
                .iter()
                .all(Option::is_some),
            "registered block {block} is not full"
        );
        let mut books = self.books();
        if books.hash_of[block as usize].is_none() && !books.by_hash.contains_key(&hash) {
            books.by_hash.insert(hash, block);
            books.hash_of[block as usize] = Some(hash);
        }
    }
}

const VOCAB: usize = 64;
const EOS: u32 = 63;
/// A token whose presence in a batch makes the fake model panic.
const POISON: u32 = 62;
const BLOCK_TOKENS: usize = 4;
const BLOCK_BYTES: usize = 1024;

/// Token texts: letters, a space, UTF-8 characters split over tokens, and an EOS.
fn fake_token_bytes() -> Vec<Vec<u8>> {
    let mut t: Vec<Vec<u8>> = (b'a'..=b'z').map(|c| vec![c]).collect(); // 0..=25
    t.push(b" ".to_vec()); // 26
    t.push(vec![0xC3]); // 27: "é" = C3 A9
    t.push(vec![0xA9]); // 28
    t.push(vec![0xE2]); // 29: "€" = E2 82 AC
    t.push(vec![0x82, 0xAC]); // 30
    t.push(vec![0xF0, 0x9F]); // 31: "😀" = F0 9F 98 80
    t.push(vec![0x98, 0x80]); // 32
    t.push(b"\n".to_vec()); // 33
    while t.len() < EOS as usize {
        let i = t.len() as u8;
        t.push(vec![b'A' + (i % 26), b'0' + (i % 10)]);
    }
    t.push(b"<eos>".to_vec()); // 63
    t
}

struct FakeVocab {
    bytes: Vec<Vec<u8>>,
    eos: Vec<u32>,
}

impl Vocab for FakeVocab {
    fn vocab_size(&self) -> usize {
        self.bytes.len()
    }
    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(Vec::as_slice)
    }
    fn is_special(&self, id: u32) -> bool {
        id == EOS
    }
    fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Logits {
    /// Pseudo-random logits from a hash of the whole context (read back from the cache).
    ContextHash,
    /// The next token is the last one plus one (wrapping below EOS): scripted text.
    Successor,
}

struct FakeModel {
    vocab: FakeVocab,
    logits: Logits,
    context_length: usize,
    /// Tokens per forward pass, for assertions on batch shapes.
    batch_tokens: Arc<Mutex<Vec<usize>>>,
    /// Time each pass takes (to keep requests in flight while a test pokes at them).
    step_delay: Duration,
}

impl FakeModel {
    fn new(logits: Logits) -> Self {
        Self {
            vocab: FakeVocab {
                bytes: fake_token_bytes(),
                eos: vec![EOS],
            },
            logits,
            context_length: 4096,
            batch_tokens: Arc::default(),
            step_delay: Duration::ZERO,
        }
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl StepModel for FakeModel {
    type Kv = FakeKv;
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn context_length(&self) -> usize {
        self.context_length
    }
    fn new_kv_cache(&self, budget_bytes: usize) -> ferroserve_core::error::Result<FakeKv> {
        Ok(FakeKv::new(budget_bytes / BLOCK_BYTES, BLOCK_TOKENS))
    }
    fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut FakeKv) -> Vec<f32> {
        self.batch_tokens
            .lock()
            .unwrap()
            .push(batch.iter().map(|c| c.tokens.len()).sum());
        std::thread::sleep(self.step_delay);
        let mut out = Vec::new();
        for chunk in batch {
            assert!(!chunk.tokens.contains(&POISON), "poisoned batch");
            for (i, &t) in chunk.tokens.iter().enumerate() {
                let pos = chunk.start_pos + i;
                let slot = kv.slot(chunk.block_table, pos);
                let block = chunk.block_table[pos / BLOCK_TOKENS];
                assert_eq!(
                    kv.refcount(block), 1,
                    "write into shared block {block}"
                );
                kv.slots[slot] = Some(t);
            }
            if !chunk.want_logits {
                continue;
            }
            let last = chunk.start_pos + chunk.tokens.len() - 1;
            let context: Vec<u32> = (0..=last)
                .map(|p| {
                    kv.slots[kv.slot(chunk.block_table, p)]
                        .unwrap_or_else(|| panic!("position {p} was never computed"))
                })
                .collect();
            match self.logits {
                Logits::ContextHash => {
                    let h = context
                        .iter()
                        .fold(0x1234_5678u64, |h, &t| mix64(h ^ t as u64));
                    out.extend((0..VOCAB as u64).map(|v| {
                        if v == POISON as u64 {
                            -100.0
                        } else {
                            (mix64(h ^ (v << 32)) % 1000) as f32 / 150.0
                        }
                    }));
                }
                Logits::Successor => {
                    let next = (context[last] + 1) % (EOS - 1);
                    out.extend((0..VOCAB as u32).map(|v| if v == next { 10.0 } else { 0.0 }));
                }
            }
        }
        out
    }
    fn vocab(&self) -> &dyn Vocab {
        &self.vocab
    }
}

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

// ---------------------------------------------------------------------------------------
// The engine on the fake model

/// Aborts the test process if a test hangs (a deadlocked engine would otherwise block the
/// event read forever).
fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("test timed out after {limit:?}");
        std::process::abort();
    });
}

/// Blocks on the notifier's fd, then drains.
fn next_events(engine: &ChatEngine) -> Vec<ChatEvent> {
    // SAFETY: the fd stays owned by the notifier; ManuallyDrop never closes it.
    let mut pipe = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(engine.notifier().fd()) });
    let mut buf = [0u8; 64];
    let _ = pipe.read(&mut buf).unwrap();
    engine.notifier().drain()
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Choice {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    deltas: Vec<String>,
}

#[derive(Debug, Default)]
struct Outcome {
    choices: HashMap<(u64, u32), Choice>,
    admitted: HashMap<u64, (usize, usize)>,
    errors: HashMap<u64, ErrorKind>,
}

/// Collects events until every request has `n` finished choices (or an error).
fn collect(engine: &ChatEngine, expected: &HashMap<u64, usize>) -> Outcome {
    let mut out = Outcome::default();
    let done = |out: &Outcome| {
        expected.iter().all(|(&id, &n)| {
            out.errors.contains_key(&id)
                || (0..n as u32).all(|i| {
                    out.choices
                        .get(&(id, i))
                        .is_some_and(|c| c.finish.is_some())
                })
        })
    };
    while !done(&out) {
        for event in next_events(engine) {
            match event {
                ChatEvent::Admitted {
                    request_id,
                    prompt_tokens,
                    cached_tokens,
                } => {
                    assert!(
                        out.admitted
                            .insert(request_id, (prompt_tokens, cached_tokens))
                            .is_none(),
                        "admitted twice"
                    );
                }
                ChatEvent::Delta {
                    request_id,
                    index,
                    text,
                    token_ids,
                    logprobs,
                } => {
                    let c = out.choices.entry((request_id, index)).or_default();
                    assert!(c.finish.is_none(), "delta after finish");
                    c.text.push_str(&text);
                    c.deltas.push(text);
                    c.tokens.extend(token_ids);
                    c.logprobs.extend(logprobs);
                }
                ChatEvent::Finished {
                    request_id,
                    index,
                    finish_reason,
                    usage,
                } => {
                    let c = out.choices.entry((request_id, index)).or_default();
                    assert!(c.finish.replace(finish_reason).is_none(), "finished twice");
                    c.completion_tokens = usage.completion_tokens;
                }
                ChatEvent::Error {
                    request_id, kind, ..
                } => {
                    out.errors.insert(request_id, kind);
                }
            }
        }
    }
    out
}

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
    watchdog(Duration::from_secs(120));
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
    watchdog(Duration::from_secs(120));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(120));
    let (roomy, _) = run_workload(10_000, 64);
    let (serial, _) = run_workload(10_000, 1);
    for (key, choice) in &roomy.choices {
        assert_eq!(choice.tokens, serial.choices[key].tokens, "{key:?}");
    }
}

#[test]
fn batches_respect_the_token_budget_and_decode_alongside_prefill() {
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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
    watchdog(Duration::from_secs(60));
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

// ---------------------------------------------------------------------------------------
// The real model

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

fn smollm2_path() -> Option<PathBuf> {
    common::smollm2_gguf()
}

#[test]
fn smollm2_concurrent_greedy_requests_match_solo_runs_bitwise() {
    let Some(path) = smollm2_path() else { return };
    watchdog(Duration::from_secs(900));
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
    let Some(path) = smollm2_path() else { return };
    watchdog(Duration::from_secs(600));
    use ferroserve_core::tokenize::chat_template::ChatMessage;
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures_dir().join("smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<u32>>()
    };
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
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
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

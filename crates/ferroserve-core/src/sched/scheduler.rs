//! The continuous-batching scheduler for generation, after vLLM's v1 scheduler: a pure
//! function of its state. Each step, [`Scheduler::schedule`] picks, under a token budget,
//! the next token of every running sequence plus chunks of prompts still being prefilled,
//! allocating KV blocks as positions are needed; the caller runs the model and samples, and
//! [`Scheduler::update`] folds the sampled tokens back in. No model, no threads: tests
//! drive it with fake step outputs.
//!
//! Memory pressure never fails a request: when no block is free, the newest running
//! sequence is preempted (its blocks released, its prompt plus generated tokens queued to
//! be recomputed, usually mostly from the prefix cache). The oldest running sequence
//! therefore always progresses, and since every request fits the cache on its own (checked
//! at submit), every request completes.
//!
//! Priorities: each step serves the interactive class first (its running sequences, then
//! its admissions), and only then the batch class, with the token budget, blocks and
//! running slots interactive work left. A batch sequence is always preempted before an
//! interactive one, and an interactive sequence that finds no block or slot takes one from
//! the newest batch sequence. Batch work thus progresses exactly when interactive demand
//! leaves room, and uses the whole step when there is none. Priorities only choose which
//! sequences run in a step, never how a sequence is computed.

use std::collections::{HashMap, VecDeque};

pub use crate::kv::{BlockHash, BlockTable, ReleaseBlocks};
pub use crate::sched::Priority;

/// One sequence's share of a forward step: what the scheduler hands the model for each
/// sequence it runs (`crate::engine::StepModel::forward`).
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// New tokens of this sequence for this step (a prefill chunk, or one when decoding).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; the KV of positions `0..start_pos` is already in the cache.
    pub start_pos: usize,
    /// This sequence's blocks, enough for `start_pos + tokens.len()` positions.
    pub block_table: &'a [u32],
    /// Return logits for the last token of this chunk.
    pub want_logits: bool,
}

/// The paged KV cache as the scheduler sees it: reference-counted blocks plus a prefix
/// cache of full blocks, keyed by a hash chained over the blocks before them. Implemented
/// by [`crate::kv::KvCache`] and by the fakes of the tests. Blocks are released only by
/// dropping (or shortening) the [`BlockTable`] holding them.
pub trait KvPool {
    fn block_tokens(&self) -> usize;
    fn num_blocks(&self) -> usize;
    /// Blocks `allocate` can hand out (including cached blocks it may evict).
    fn num_free_blocks(&self) -> usize;
    /// A block with one reference, or `None` when all are in use.
    fn allocate(&mut self) -> Option<u32>;
    fn retain(&mut self, block: u32);
    /// An empty table whose blocks go back to this pool when it is dropped.
    fn block_table(&self) -> BlockTable;
    /// The retained blocks holding the longest cached run of full blocks of `tokens`.
    fn lookup_prefix(&mut self, tokens: &[u32]) -> Vec<u32>;
    /// The prefix-cache key of a full block: `tokens` (one block's worth) after the block
    /// whose key is `parent` (`None` for the first block).
    fn block_hash(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        BlockHash::of(parent, tokens)
    }
    /// Makes a full, computed block findable by `lookup_prefix`.
    fn register_full_block(&mut self, hash: BlockHash, block: u32);
}

/// The scheduler's handle of one sequence (one choice of one request).
pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per forward pass: decodes count one each, prefill chunks their length.
    pub max_batch_tokens: usize,
    /// Tokens per forward pass for a burst of short interactive prompts: a pass that delays
    /// no decoding interactive stream, or that has more interactive prompts waiting than
    /// streams it delays, may grow to this size with whole prompts of at most
    /// `max_batch_tokens` each, so that prompts arriving together get their first tokens
    /// after one pass instead of some of them waiting for a second one (each deferred
    /// prompt waits a whole extra pass, while each delayed stream waits only the extra
    /// tokens' share of one). Longer prompts are still prefilled in chunks of at most
    /// `max_batch_tokens`, so they never stall running streams or later arrivals for more
    /// than a normal pass, and batch work never gets more than `max_batch_tokens`. At or
    /// below `max_batch_tokens`: no bursts.
    pub burst_batch_tokens: usize,
    /// Sequences holding KV blocks at once.
    pub max_running: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            // Off: on SmolLM2 a burst of 16 short prompts gains only a step's fixed cost
            // at the p95 and loses at the p50 (bench/NOTES.md, "Step token budget").
            burst_batch_tokens: 512,
            max_running: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub seq: SeqId,
    pub start_pos: usize,
    pub num_tokens: usize,
    /// The chunk reaches the sequence's last token: its logits give the next token.
    pub want_logits: bool,
}

/// One step's decisions.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Requests' first sequences admitted for the first time, with how many prompt tokens
    /// the prefix cache supplied.
    pub first_admissions: Vec<(SeqId, usize)>,
    /// Sequences sent back to waiting to be recomputed later.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.num_tokens).sum()
    }
}

/// What is left of one step's tokens while it is planned.
#[derive(Debug)]
struct Budget {
    /// Of `max_batch_tokens`: for any work.
    tokens: usize,
    /// Beyond it: for the current class's short prompts, whole (see
    /// [`SchedulerConfig::burst_batch_tokens`]).
    burst_tokens: usize,
    /// The longest remaining prompt the burst tokens may take whole.
    max_whole_prompt: usize,
}

impl Budget {
    /// Tokens granted to a sequence with `remaining` tokens to compute: all of them if they
    /// fit the ordinary tokens, or are a short prompt that fits with the burst tokens; else
    /// a chunk of the ordinary tokens (possibly none).
    fn grant(&self, remaining: usize) -> usize {
        if remaining <= self.tokens
            || remaining <= self.max_whole_prompt && remaining <= self.tokens + self.burst_tokens
        {
            remaining
        } else {
            self.tokens
        }
    }

    /// Takes `n` granted tokens, the ordinary ones first.
    fn spend(&mut self, n: usize) {
        let from_tokens = n.min(self.tokens);
        self.tokens -= from_tokens;
        self.burst_tokens = self.burst_tokens.saturating_sub(n - from_tokens);
    }

    fn is_spent(&self) -> bool {
        self.tokens == 0 && self.burst_tokens == 0
    }
}

/// A choice created when its request's prompt finished prefilling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forked {
    pub seq: SeqId,
    pub request_id: u64,
    pub index: u32,
}

#[derive(Debug)]
struct Sequence {
    request_id: u64,
    index: u32,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose KV is in `blocks`.
    num_computed: usize,
    /// `None` while the sequence holds no blocks (waiting); dropping the table releases them.
    blocks: Option<BlockTable>,
    /// Prefix-cache keys of the full blocks of `tokens` computed so far (kept across
    /// preemption: they depend on tokens only).
    block_hashes: Vec<BlockHash>,
    /// Leading blocks already in the prefix cache.
    num_registered: usize,
    /// Choices to fork off once the prompt is prefilled (`n - 1` on a request's first
    /// sequence).
    forks_pending: u32,
    /// Whether admission is still to be reported (a request's first sequence only).
    report_admission: bool,
    /// The request's (shared by its forks).
    priority: Priority,
}

/// The queues of one priority class.
#[derive(Debug, Default)]
struct Lane {
    /// Oldest first; preempted sequences go back to the front.
    waiting: VecDeque<SeqId>,
    /// In admission order: the oldest is never preempted while a newer one of its class
    /// holds blocks.
    running: Vec<SeqId>,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    seqs: HashMap<SeqId, Sequence>,
    /// One per priority, by [`Priority::index`].
    lanes: [Lane; Priority::ALL.len()],
    next_seq_id: SeqId,
    num_preemptions: u64,
}

impl Scheduler {
    /// `max_running` is capped at `max_batch_tokens`: every running sequence must be able to
    /// decode each step, or the newest ones would starve behind the oldest.
    pub fn new(mut cfg: SchedulerConfig) -> Self {
        assert!(
            cfg.max_batch_tokens > 0 && cfg.max_running > 0,
            "empty scheduler budget"
        );
        cfg.max_running = cfg.max_running.min(cfg.max_batch_tokens);
        Self {
            cfg,
            ..Self::default()
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request; its other `n - 1` choices are forked once the prompt is prefilled,
    /// so they find its blocks in the prefix cache. Returns the first choice's sequence.
    pub fn add_request(
        &mut self,
        request_id: u64,
        prompt: Vec<u32>,
        n: usize,
        priority: Priority,
    ) -> SeqId {
        assert!(!prompt.is_empty(), "empty prompt");
        let id = self.new_sequence(request_id, 0, prompt, n.max(1) as u32 - 1, true, priority);
        self.lane_mut(priority).waiting.push_back(id);
        id
    }

    fn new_sequence(
        &mut self,
        request_id: u64,
        index: u32,
        tokens: Vec<u32>,
        forks_pending: u32,
        report_admission: bool,
        priority: Priority,
    ) -> SeqId {
        let id = self.next_seq_id;
        self.next_seq_id += 1;
        let prompt_len = tokens.len();
        self.seqs.insert(
            id,
            Sequence {
                request_id,
                index,
                tokens,
                prompt_len,
                num_computed: 0,
                blocks: None,
                block_hashes: Vec::new(),
                num_registered: 0,
                forks_pending,
                report_admission,
                priority,
            },
        );
        id
    }

    fn lane(&self, priority: Priority) -> &Lane {
        &self.lanes[priority.index()]
    }
    fn lane_mut(&mut self, priority: Priority) -> &mut Lane {
        &mut self.lanes[priority.index()]
    }

    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }
    pub fn num_running(&self) -> usize {
        self.lanes.iter().map(|l| l.running.len()).sum()
    }
    pub fn num_waiting(&self) -> usize {
        self.lanes.iter().map(|l| l.waiting.len()).sum()
    }
    /// Sequences of one class holding KV blocks.
    pub fn num_running_of(&self, priority: Priority) -> usize {
        self.lane(priority).running.len()
    }
    /// Sequences of one class queued for admission (preempted ones included).
    pub fn num_waiting_of(&self, priority: Priority) -> usize {
        self.lane(priority).waiting.len()
    }
    /// Tokens of the sequences of one class queued for admission (their whole contexts).
    pub fn waiting_tokens_of(&self, priority: Priority) -> usize {
        self.lane(priority)
            .waiting
            .iter()
            .map(|id| self.seqs[id].tokens.len())
            .sum()
    }
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }
    /// A sequence's prompt plus generated tokens.
    pub fn tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }
    /// `(request_id, index)` of a sequence.
    pub fn owner(&self, seq: SeqId) -> Option<(u64, u32)> {
        self.seqs.get(&seq).map(|s| (s.request_id, s.index))
    }
    /// KV blocks a sequence holds now.
    pub fn num_blocks_held(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.blocks.as_ref().map_or(0, BlockTable::len))
    }
    pub fn priority(&self, seq: SeqId) -> Option<Priority> {
        self.seqs.get(&seq).map(|s| s.priority)
    }

    /// Decides the next forward pass: each class in turn, most urgent first, schedules its
    /// running sequences and then admits waiting ones, under what budget is left.
    pub fn schedule<K: KvPool>(&mut self, kv: &mut K) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = Budget {
            tokens: self.cfg.max_batch_tokens,
            burst_tokens: 0,
            max_whole_prompt: self.cfg.max_batch_tokens,
        };
        for priority in Priority::ALL {
            // Less urgent classes get only what is left of `max_batch_tokens`.
            budget.burst_tokens = if priority == Priority::Interactive {
                self.burst_extra_tokens()
            } else {
                0
            };
            self.schedule_running(priority, &mut plan, &mut budget, kv);
            self.admit_waiting(priority, &mut plan, &mut budget, kv);
        }
        plan
    }

    /// Tokens the interactive class may use beyond `max_batch_tokens` this step (see
    /// [`SchedulerConfig::burst_batch_tokens`]).
    fn burst_extra_tokens(&self) -> usize {
        let extra = self
            .cfg
            .burst_batch_tokens
            .saturating_sub(self.cfg.max_batch_tokens);
        let lane = self.lane(Priority::Interactive);
        if extra == 0 || lane.waiting.is_empty() && lane.running.is_empty() {
            return 0;
        }
        let decoding = lane
            .running
            .iter()
            .filter(|id| {
                let seq = &self.seqs[*id];
                seq.num_computed >= seq.prompt_len && seq.tokens.len() - seq.num_computed == 1
            })
            .count();
        if decoding == 0 || lane.waiting.len() > decoding {
            extra
        } else {
            0
        }
    }

    /// Running sequences of one class, oldest first: decodes, and prompts partway through
    /// prefill. Short of blocks, the newest sequence of the least urgent class present is
    /// preempted; in its own class that may be the sequence itself.
    fn schedule_running<K: KvPool>(
        &mut self,
        priority: Priority,
        plan: &mut StepPlan,
        budget: &mut Budget,
        kv: &mut K,
    ) {
        let mut i = 0;
        while i < self.lane(priority).running.len() && !budget.is_spent() {
            let id = self.lane(priority).running[i];
            let seq = &self.seqs[&id];
            let start_pos = seq.num_computed;
            let wanted = budget.grant(seq.tokens.len() - start_pos);
            if wanted == 0 {
                i += 1;
                continue;
            }
            let fit = loop {
                let fit = self
                    .grow_blocks(id, start_pos + wanted, kv)
                    .saturating_sub(start_pos)
                    .min(wanted);
                if fit > 0 {
                    break fit;
                }
                let victim = self
                    .victim(priority, true)
                    .expect("the current sequence is running");
                self.preempt_for(victim, plan);
                if victim == id {
                    break 0;
                }
            };
            if fit == 0 {
                continue; // `id` was the newest and went back to waiting; the loop ends
            }
            plan.chunks.push(self.chunk(id, start_pos, fit));
            budget.spend(fit);
            i += 1;
        }
    }

    /// Admissions of one class, oldest first. A class is not admitted while a more urgent
    /// one still waits, nor once memory was short for it this step (one of its own, or a
    /// more urgent sequence, was preempted). A waiting sequence short of a block or a
    /// running slot takes it from the newest sequence of a less urgent class, if any.
    fn admit_waiting<K: KvPool>(
        &mut self,
        priority: Priority,
        plan: &mut StepPlan,
        budget: &mut Budget,
        kv: &mut K,
    ) {
        let more_urgent_waiting = Priority::ALL
            .iter()
            .any(|&p| p < priority && !self.lane(p).waiting.is_empty());
        if more_urgent_waiting {
            return;
        }
        while !budget.is_spent() && !self.memory_was_short(priority, plan) {
            let Some(&id) = self.lane(priority).waiting.front() else {
                break;
            };
            if self.num_running() >= self.cfg.max_running {
                let Some(victim) = self.victim(priority, false) else {
                    break;
                };
                self.preempt_for(victim, plan);
                continue;
            }
            let cached_tokens = self.attach_cached_prefix(id, kv);
            let seq = &self.seqs[&id];
            let start_pos = seq.num_computed;
            let wanted = budget.grant(seq.tokens.len() - start_pos);
            if wanted == 0 {
                // Only burst tokens are left, and this prompt is not short: next step.
                self.release_blocks(id);
                break;
            }
            let fit = loop {
                let fit = self
                    .grow_blocks(id, start_pos + wanted, kv)
                    .saturating_sub(start_pos)
                    .min(wanted);
                if fit > 0 {
                    break fit;
                }
                match self.victim(priority, false) {
                    Some(victim) => self.preempt_for(victim, plan),
                    None => break 0,
                }
            };
            if fit == 0 {
                // Not even one block: wait for running sequences to free some.
                self.release_blocks(id);
                break;
            }
            let lane = self.lane_mut(priority);
            lane.waiting.pop_front();
            lane.running.push(id);
            let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
            if seq.report_admission {
                seq.report_admission = false;
                plan.first_admissions.push((id, cached_tokens));
            }
            plan.chunks.push(self.chunk(id, start_pos, fit));
            budget.spend(fit);
        }
    }

    /// Whether a sequence as urgent as `priority`, or more, was preempted this step.
    fn memory_was_short(&self, priority: Priority, plan: &StepPlan) -> bool {
        plan.preempted
            .iter()
            .any(|id| self.seqs[id].priority <= priority)
    }

    /// The sequence to preempt when one of class `priority` lacks a block or a slot: the
    /// newest running one of the least urgent class that has any, down to `priority` itself
    /// if `own_class`. Those classes have nothing scheduled yet this step, except the class
    /// being scheduled, whose newest sequence is not scheduled before its elders.
    fn victim(&self, priority: Priority, own_class: bool) -> Option<SeqId> {
        Priority::ALL
            .iter()
            .rev()
            .filter(|&&p| p > priority || (own_class && p == priority))
            .find_map(|&p| self.lane(p).running.last().copied())
    }

    fn preempt_for(&mut self, victim: SeqId, plan: &mut StepPlan) {
        debug_assert!(
            plan.chunks.iter().all(|c| c.seq != victim),
            "a scheduled sequence is preempted"
        );
        self.preempt(victim);
        plan.preempted.push(victim);
    }

    fn chunk(&self, id: SeqId, start_pos: usize, num_tokens: usize) -> ScheduledChunk {
        ScheduledChunk {
            seq: id,
            start_pos,
            num_tokens,
            want_logits: start_pos + num_tokens == self.seqs[&id].tokens.len(),
        }
    }

    /// The model's view of a plan: token slices and block tables, in plan order.
    pub fn batch(&self, plan: &StepPlan) -> Vec<SeqChunk<'_>> {
        plan.chunks
            .iter()
            .map(|c| {
                let seq = &self.seqs[&c.seq];
                SeqChunk {
                    tokens: &seq.tokens[c.start_pos..c.start_pos + c.num_tokens],
                    start_pos: c.start_pos,
                    block_table: seq.blocks.as_ref().map_or(&[], BlockTable::ids),
                    want_logits: c.want_logits,
                }
            })
            .collect()
    }

    /// Folds a finished pass back in: the planned chunks are now computed, `sampled` holds
    /// the token drawn for each chunk that wanted logits. Returns choices forked off
    /// requests whose prompt just finished prefilling.
    pub fn update<K: KvPool>(
        &mut self,
        plan: &StepPlan,
        sampled: &[(SeqId, u32)],
        kv: &mut K,
    ) -> Vec<Forked> {
        let block_tokens = kv.block_tokens();
        let mut forked = Vec::new();
        for chunk in &plan.chunks {
            let Some(seq) = self.seqs.get_mut(&chunk.seq) else {
                continue;
            };
            debug_assert_eq!(seq.num_computed, chunk.start_pos);
            seq.num_computed = chunk.start_pos + chunk.num_tokens;
            let full_blocks = seq.num_computed / block_tokens;
            while seq.num_registered < full_blocks {
                let b = seq.num_registered;
                while seq.block_hashes.len() <= b {
                    let k = seq.block_hashes.len();
                    let hash = kv.block_hash(
                        seq.block_hashes.last().copied(),
                        &seq.tokens[k * block_tokens..(k + 1) * block_tokens],
                    );
                    seq.block_hashes.push(hash);
                }
                let block = seq.blocks.as_ref().expect("computed sequences hold blocks").ids()[b];
                kv.register_full_block(seq.block_hashes[b], block);
                seq.num_registered += 1;
            }
            if seq.forks_pending > 0 && seq.num_computed >= seq.prompt_len {
                let (request_id, priority, n_forks) = (
                    seq.request_id,
                    seq.priority,
                    std::mem::take(&mut seq.forks_pending),
                );
                let prompt = seq.tokens[..seq.prompt_len].to_vec();
                let new: Vec<SeqId> = (1..=n_forks)
                    .map(|index| {
                        self.new_sequence(request_id, index, prompt.clone(), 0, false, priority)
                    })
                    .collect();
                for (i, &seq) in new.iter().enumerate().rev() {
                    self.lane_mut(priority).waiting.push_front(seq);
                    forked.push(Forked {
                        seq,
                        request_id,
                        index: i as u32 + 1,
                    });
                }
            }
        }
        forked.sort_by_key(|f| (f.request_id, f.index));
        for &(id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.tokens.push(token);
            }
        }
        forked
    }

    /// Removes a finished sequence; dropping it returns its blocks to `_kv`.
    pub fn finish<K: KvPool>(&mut self, seq: SeqId, _kv: &mut K) {
        if let Some(s) = self.seqs.remove(&seq) {
            let lane = self.lane_mut(s.priority);
            lane.running.retain(|&r| r != seq);
            lane.waiting.retain(|&w| w != seq);
        }
    }

    /// Removes every sequence of a request (choices not forked yet included), which returns
    /// their blocks. Returns the removed sequences.
    pub fn abort<K: KvPool>(&mut self, request_id: u64, kv: &mut K) -> Vec<SeqId> {
        let mut ids: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.request_id == request_id)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for &id in &ids {
            self.finish(id, kv);
        }
        ids
    }

    /// Retains the cached blocks of the longest known prefix of a waiting sequence; at
    /// least its last token is left to compute, since its logits are needed. Returns the
    /// tokens covered.
    fn attach_cached_prefix<K: KvPool>(&mut self, id: SeqId, kv: &mut K) -> usize {
        let block_tokens = kv.block_tokens();
        let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
        debug_assert!(seq.blocks.is_none());
        let mut table = kv.block_table();
        for block in kv.lookup_prefix(&seq.tokens[..seq.tokens.len() - 1]) {
            table.push(block);
        }
        table.truncate((seq.tokens.len() - 1) / block_tokens);
        seq.num_computed = table.len() * block_tokens;
        seq.num_registered = table.len();
        seq.blocks = Some(table);
        seq.num_computed
    }

    /// Allocates blocks until positions `..upto` are covered or none is left; returns the
    /// positions covered.
    fn grow_blocks<K: KvPool>(&mut self, id: SeqId, upto: usize, kv: &mut K) -> usize {
        let block_tokens = kv.block_tokens();
        let seq = self.seqs.get_mut(&id).expect("scheduled sequences exist");
        let table = seq.blocks.get_or_insert_with(|| kv.block_table());
        while table.len() * block_tokens < upto {
            match kv.allocate() {
                Some(b) => table.push(b),
                None => break,
            }
        }
        table.len() * block_tokens
    }

    /// Drops a sequence's block table (returning its blocks) and forgets what it computed.
    fn release_blocks(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("sequence exists");
        seq.blocks = None;
        seq.num_computed = 0;
        seq.num_registered = 0;
    }

    /// Sends a running sequence back to the front of its class's waiting queue, to be
    /// recomputed.
    fn preempt(&mut self, id: SeqId) {
        self.release_blocks(id);
        let lane = self.lane_mut(self.seqs[&id].priority);
        lane.running.retain(|&r| r != id);
        lane.waiting.push_front(id);
        self.num_preemptions += 1;
    }
}

/// The engine's KV caches: [`crate::kv::KvCache`] itself (bookkeeping only, as the
/// scheduler's tests use it) and a model's cache that keeps its K and V blocks in a backend's
/// storage (`models::llama::LlamaKv`) are scheduled through the same block bookkeeping.
impl<T: AsRef<crate::kv::KvCache> + AsMut<crate::kv::KvCache>> KvPool for T {
    fn block_tokens(&self) -> usize {
        self.as_ref().block_tokens()
    }
    fn num_blocks(&self) -> usize {
        self.as_ref().num_blocks()
    }
    fn num_free_blocks(&self) -> usize {
        self.as_ref().num_free_blocks()
    }
    fn allocate(&mut self) -> Option<u32> {
        self.as_mut().allocate()
    }
    fn retain(&mut self, block: u32) {
        self.as_mut().retain(block)
    }
    fn block_table(&self) -> BlockTable {
        self.as_ref().block_table()
    }
    fn lookup_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        self.as_mut().lookup_prefix(tokens)
    }
    fn register_full_block(&mut self, hash: BlockHash, block: u32) {
        self.as_mut().register_full_block(hash, block)
    }
}

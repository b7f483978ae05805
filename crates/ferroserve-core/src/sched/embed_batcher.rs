//! The dynamic batcher for embeddings: one thread owns the model's compute queue,
//! merges concurrent requests into forward passes and hands results back in order.
//!
//! Policy: take everything already queued; if the previous merge held several
//! requests (i.e. there is concurrency), wait up to `max_wait` for more, so
//! concurrent clients share passes while a lone client never waits. A pass is capped at
//! `max_batch_tokens`; sequences are packed back to back (no padding), so grouping by
//! length is unnecessary: a pass costs what its real tokens cost.
//!
//! Priorities: a pass holds one class. While interactive sequences wait, passes take only
//! them, oldest request first; batch sequences run in short passes, so an interactive request
//! that arrives during one waits for little, not for a whole batch chunk: at most
//! `batch_pass_tokens` (sized for throughput), and only `batch_pass_tokens_busy` (one short
//! input) while interactive traffic is recent on the server. Requests that arrive between
//! passes join the queue at once. Before a batch pass, the server-wide rule of [`BatchYield`]
//! applies: while an interactive request is in flight on another engine (a chat), the batcher
//! waits between passes instead of taking the cores from it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sched::interactive::{BatchYield, InteractiveRequest, YIELD_POLL};
use crate::sched::Priority;

/// One request: tokenized sequences plus what to do with the vectors.
pub struct BatchJob {
    pub seqs: Vec<Vec<u32>>,
    pub priority: Priority,
    /// An interactive request's place in the server's count of interactive work, held until
    /// the job is done (dropped with it).
    pub in_flight: Option<InteractiveRequest>,
    /// Called once with `[seqs.len(), dim]` vectors, or the pass's error (on the batcher
    /// thread).
    pub done: Box<dyn FnOnce(Result<Vec<f32>>) + Send>,
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_wait: Duration,
    pub max_batch_tokens: usize,
    /// Tokens in a pass of batch-priority sequences (at most `max_batch_tokens`; a pass
    /// always takes at least one sequence) ...
    pub batch_pass_tokens: usize,
    /// ... and while interactive traffic is recent ([`BatchYield::recently_busy`]).
    pub batch_pass_tokens_busy: usize,
}

impl BatcherConfig {
    /// The token cap of a pass of `priority` sequences; `busy`: interactive traffic is recent.
    fn pass_tokens(&self, priority: Priority, busy: bool) -> usize {
        match priority {
            Priority::Interactive => self.max_batch_tokens,
            Priority::Batch if busy => self.batch_pass_tokens_busy.min(self.max_batch_tokens),
            Priority::Batch => self.batch_pass_tokens.min(self.max_batch_tokens),
        }
    }
}

/// What the batcher is doing, per priority, for the engine's stats (written by the batcher
/// thread, read by anyone).
#[derive(Debug, Default)]
pub struct BatcherStats {
    waiting_inputs: [AtomicUsize; Priority::ALL.len()],
    passes: [AtomicU64; Priority::ALL.len()],
    embedded_inputs: [AtomicU64; Priority::ALL.len()],
}

impl BatcherStats {
    /// Inputs queued and not embedded yet.
    pub fn waiting_inputs(&self, priority: Priority) -> usize {
        self.waiting_inputs[priority.index()].load(Ordering::Acquire)
    }
    /// Forward passes run so far (each holds one class).
    pub fn passes(&self, priority: Priority) -> u64 {
        self.passes[priority.index()].load(Ordering::Acquire)
    }
    /// Inputs embedded so far.
    pub fn embedded_inputs(&self, priority: Priority) -> u64 {
        self.embedded_inputs[priority.index()].load(Ordering::Acquire)
    }

    fn publish_waiting(&self, queue: &Queue) {
        for p in Priority::ALL {
            let waiting = queue.lanes[p.index()].iter().map(|q| q.job.seqs.len() - q.next_seq).sum();
            self.waiting_inputs[p.index()].store(waiting, Ordering::Release);
        }
    }
}

/// A job some of whose sequences may have run already.
struct Pending {
    job: BatchJob,
    /// Sequences embedded so far (a prefix of `job.seqs`).
    next_seq: usize,
    vectors: Vec<f32>,
}

/// Jobs waiting or partway through, one FIFO per priority.
#[derive(Default)]
struct Queue {
    lanes: [VecDeque<Pending>; Priority::ALL.len()],
    /// Tokens of the sequences not embedded yet.
    tokens: usize,
}

/// The next pass: jobs taken from the front of one lane, and how many sequences of the
/// last of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pass {
    priority: Priority,
    jobs: usize,
    last_seqs: usize,
}

impl Queue {
    fn push(&mut self, job: BatchJob) {
        self.tokens += job.seqs.iter().map(Vec::len).sum::<usize>();
        self.lanes[job.priority.index()].push_back(Pending { job, next_seq: 0, vectors: Vec::new() });
    }

    fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// The most urgent class with work waiting.
    fn next_priority(&self) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| !self.lanes[p.index()].is_empty())
    }

    /// The next pass: sequences of the most urgent waiting class, in queue order, until one
    /// would pass that class's token cap (a pass always takes at least one).
    fn plan_pass(&self, cfg: &BatcherConfig, busy: bool) -> Option<Pass> {
        let priority = self.next_priority()?;
        let cap = cfg.pass_tokens(priority, busy);
        let (mut tokens, mut jobs, mut last_seqs) = (0usize, 0usize, 0usize);
        for p in &self.lanes[priority.index()] {
            let mut taken = 0;
            for seq in &p.job.seqs[p.next_seq..] {
                if tokens > 0 && tokens + seq.len() > cap {
                    break;
                }
                tokens += seq.len();
                taken += 1;
            }
            if taken == 0 {
                break;
            }
            jobs += 1;
            last_seqs = taken;
            if p.next_seq + taken < p.job.seqs.len() {
                break;
            }
        }
        Some(Pass { priority, jobs, last_seqs })
    }
}

/// Runs until every sender is dropped and the queue is empty. `forward` maps sequences to
/// `[n, dim]` vectors; it may fail (a device error), which fails the jobs of that pass and
/// nothing after them. `FnMut`: a device runner reuses its scratch buffers from pass to pass.
/// `yielding` decides when batch passes give way to interactive work elsewhere; `stats`
/// is kept up to date.
pub fn run(
    rx: Receiver<BatchJob>,
    cfg: BatcherConfig,
    dim: usize,
    mut yielding: BatchYield,
    stats: &BatcherStats,
    mut forward: impl FnMut(&[&[u32]]) -> Result<Vec<f32>>,
) {
    let mut queue = Queue::default();
    let mut last_merge_jobs = 0usize;
    let mut merge_jobs = 0usize;
    loop {
        if queue.is_empty() {
            last_merge_jobs = std::mem::take(&mut merge_jobs);
            let Ok(first) = rx.recv() else { return };
            queue.push(first);
            merge_jobs += 1;
        }
        loop {
            match rx.try_recv() {
                Ok(j) => {
                    queue.push(j);
                    merge_jobs += 1;
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        if last_merge_jobs > 1 && queue.tokens < cfg.max_batch_tokens {
            let deadline = Instant::now() + cfg.max_wait;
            while queue.tokens < cfg.max_batch_tokens {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => {
                        queue.push(j);
                        merge_jobs += 1;
                    }
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            // Waited once for this merge; later passes of it go as soon as they can.
            last_merge_jobs = 0;
        }
        stats.publish_waiting(&queue);
        if queue.next_priority() == Some(Priority::Batch) && !yielding.may_run(Instant::now()) {
            // Interactive work runs elsewhere on the server: wait for it to end, or for a
            // job of our own (an interactive one runs at once).
            match rx.recv_timeout(YIELD_POLL) {
                Ok(j) => {
                    queue.push(j);
                    merge_jobs += 1;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(YIELD_POLL),
            }
            continue;
        }
        let busy = yielding.recently_busy(Instant::now());
        run_pass(&mut queue, &cfg, busy, dim, stats, &mut forward);
        stats.publish_waiting(&queue);
    }
}

/// Runs the next pass of the queue, then hands every job it completed (or failed) its result.
fn run_pass(
    queue: &mut Queue,
    cfg: &BatcherConfig,
    busy: bool,
    dim: usize,
    stats: &BatcherStats,
    forward: &mut impl FnMut(&[&[u32]]) -> Result<Vec<f32>>,
) {
    let Some(Pass { priority, jobs, last_seqs }) = queue.plan_pass(cfg, busy) else { return };
    let lane = priority.index();
    stats.passes[lane].fetch_add(1, Ordering::AcqRel);
    let seqs_of = |p: &Pending, j: usize| {
        let end = if j + 1 == jobs { p.next_seq + last_seqs } else { p.job.seqs.len() };
        p.next_seq..end
    };
    let result = {
        let mut batch: Vec<&[u32]> = Vec::new();
        for (j, p) in queue.lanes[lane].iter().take(jobs).enumerate() {
            batch.extend(p.job.seqs[seqs_of(p, j)].iter().map(Vec::as_slice));
        }
        stats.embedded_inputs[lane].fetch_add(batch.len() as u64, Ordering::AcqRel);
        forward(&batch)
    };
    let vectors = match result {
        Ok(v) => v,
        Err(e) => {
            // Every job of the pass gets the error (Error is not Clone): as a device error,
            // the only kind a forward pass produces, without repeating its prefix.
            let message = match &e {
                Error::Device(m) => m.clone(),
                other => other.to_string(),
            };
            for p in queue.lanes[lane].drain(..jobs) {
                queue.tokens -= p.job.seqs[p.next_seq..].iter().map(Vec::len).sum::<usize>();
                (p.job.done)(Err(Error::Device(message.clone())));
            }
            return;
        }
    };
    let mut at = 0;
    for j in 0..jobs {
        let p = &mut queue.lanes[lane][j];
        let range = seqs_of(p, j);
        let n = range.len() * dim;
        queue.tokens -= p.job.seqs[range.clone()].iter().map(Vec::len).sum::<usize>();
        p.vectors.extend_from_slice(&vectors[at..at + n]);
        p.next_seq = range.end;
        at += n;
    }
    while queue.lanes[lane].front().is_some_and(|p| p.next_seq == p.job.seqs.len()) {
        let p = queue.lanes[lane].pop_front().expect("non-empty");
        (p.job.done)(Ok(p.vectors));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::interactive::{InteractiveLoad, BATCH_MAX_YIELD};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    fn config(max_batch_tokens: usize, batch_pass_tokens: usize) -> BatcherConfig {
        BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens, batch_pass_tokens, batch_pass_tokens_busy: 0 }
    }

    /// A batcher alone on its server: batch passes never wait.
    fn alone() -> BatchYield {
        BatchYield::new(InteractiveLoad::new(), BATCH_MAX_YIELD)
    }

    /// A fake forward: each sequence's vector is [len, first id]; records pass sizes.
    #[test]
    fn merges_splits_and_returns_in_order() {
        let (tx, rx) = mpsc::channel();
        let passes = Arc::new(Mutex::new(Vec::new()));
        let p2 = passes.clone();
        let results = Arc::new(Mutex::new(Vec::new()));
        for j in 0..5u32 {
            let r = results.clone();
            let seqs: Vec<Vec<u32>> = (0..3).map(|s| vec![j * 10 + s; (s + 1) as usize]).collect();
            tx.send(BatchJob { seqs, priority: Priority::Interactive, in_flight: None, done: Box::new(move |v| r.lock().unwrap().push((j, v.unwrap()))) }).unwrap();
        }
        drop(tx);
        run(rx, config(8, 8), 2, alone(), &BatcherStats::default(), move |seqs| {
            p2.lock().unwrap().push(seqs.iter().map(|s| s.len()).sum::<usize>());
            Ok(seqs.iter().flat_map(|s| [s.len() as f32, s[0] as f32]).collect())
        });
        let results = results.lock().unwrap();
        assert_eq!(results.len(), 5);
        for (j, v) in results.iter() {
            assert_eq!(v, &vec![1.0, (j * 10) as f32, 2.0, (j * 10 + 1) as f32, 3.0, (j * 10 + 2) as f32]);
        }
        // All 5 jobs were queued before the batcher started: one merge, split by tokens.
        let passes = passes.lock().unwrap();
        assert!(passes.iter().all(|&t| t <= 8), "{passes:?}");
        assert_eq!(passes.iter().sum::<usize>(), 30);
    }

    /// A failing pass fails the jobs it carried, with the device's message, and the batcher
    /// goes on serving the next ones.
    #[test]
    fn a_failed_pass_fails_its_jobs_and_the_batcher_continues() {
        let (tx, rx) = mpsc::channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        let send = |j: u32, tx: &mpsc::Sender<BatchJob>| {
            let r = results.clone();
            tx.send(BatchJob { seqs: vec![vec![j]], priority: Priority::Interactive, in_flight: None, done: Box::new(move |v| r.lock().unwrap().push((j, v.map_err(|e| e.to_string())))) }).unwrap();
        };
        send(1, &tx);
        send(2, &tx);
        let worker = std::thread::spawn(move || run(rx, config(1, 1), 1, alone(), &BatcherStats::default(), |seqs| if seqs[0][0] == 1 { Err(Error::Device("launch failed".into())) } else { Ok(vec![seqs[0][0] as f32]) }));
        // Job 1's pass fails; job 2 fails with it only if they shared that pass.
        while results.lock().unwrap().len() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        send(3, &tx);
        drop(tx);
        worker.join().unwrap();
        let results = results.lock().unwrap();
        assert_eq!(results[0], (1, Err("device error: launch failed".to_string())));
        assert_eq!(results.last().unwrap(), &(3, Ok(vec![3.0])));
    }

    type Results = Arc<Mutex<Vec<(u32, Vec<f32>)>>>;

    /// Records each pass as `(request, sequence)` pairs: a sequence's ids are
    /// `[request, sequence, ...]`, its vector `[request, sequence]`.
    fn tagged_job(request: u32, priority: Priority, seqs: u32, len: usize, results: &Results) -> BatchJob {
        let r = results.clone();
        let seqs = (0..seqs).map(|s| { let mut ids = vec![request, s]; ids.resize(len, 0); ids }).collect();
        BatchJob { seqs, priority, in_flight: None, done: Box::new(move |v| r.lock().unwrap().push((request, v.unwrap()))) }
    }

    fn tagged_forward(passes: &Arc<Mutex<Vec<Vec<(u32, u32)>>>>) -> impl FnMut(&[&[u32]]) -> Result<Vec<f32>> {
        let passes = passes.clone();
        move |seqs| {
            passes.lock().unwrap().push(seqs.iter().map(|s| (s[0], s[1])).collect());
            Ok(seqs.iter().flat_map(|s| [s[0] as f32, s[1] as f32]).collect())
        }
    }

    #[test]
    fn interactive_inputs_go_first_and_batch_passes_are_short() {
        let (tx, rx) = mpsc::channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        // Queued before the batcher starts: a large batch job, then interactive ones.
        tx.send(tagged_job(1, Priority::Batch, 6, 4, &results)).unwrap();
        tx.send(tagged_job(2, Priority::Interactive, 2, 4, &results)).unwrap();
        tx.send(tagged_job(3, Priority::Batch, 1, 4, &results)).unwrap();
        tx.send(tagged_job(4, Priority::Interactive, 1, 4, &results)).unwrap();
        let passes = Arc::new(Mutex::new(Vec::<Vec<(u32, u32)>>::new()));
        let mut forward = tagged_forward(&passes);
        // An interactive request that arrives while the first pass runs.
        let (late, r2) = (tx.clone(), results.clone());
        drop(tx);
        let mut late = Some((late, r2));
        run(rx, config(16, 8), 2, alone(), &BatcherStats::default(), move |seqs| {
            if let Some((tx, r)) = late.take() {
                tx.send(tagged_job(5, Priority::Interactive, 2, 4, &r)).unwrap();
            }
            forward(seqs)
        });
        // A pass holds one class. Interactive passes take up to 16 tokens (four sequences of
        // 4), batch passes 8: the late interactive job goes before all batch work, which
        // then runs in arrival order, two sequences a pass.
        let passes = passes.lock().unwrap();
        assert_eq!(
            *passes,
            vec![
                vec![(2, 0), (2, 1), (4, 0)],
                vec![(5, 0), (5, 1)],
                vec![(1, 0), (1, 1)],
                vec![(1, 2), (1, 3)],
                vec![(1, 4), (1, 5)],
                vec![(3, 0)],
            ]
        );
        // Each job gets its own vectors, in order, once all its sequences ran.
        let results = results.lock().unwrap();
        assert_eq!(results.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 4, 5, 1, 3]);
        for (request, v) in results.iter() {
            let want: Vec<f32> = (0..v.len() / 2).flat_map(|s| [*request as f32, s as f32]).collect();
            assert_eq!(v, &want);
        }
    }

    /// Batch passes hold `batch_pass_tokens`, across job boundaries.
    #[test]
    fn batch_passes_are_capped_when_alone() {
        let (tx, rx) = mpsc::channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        for request in 0..3 {
            tx.send(tagged_job(request, Priority::Batch, 3, 4, &results)).unwrap();
        }
        drop(tx);
        let passes = Arc::new(Mutex::new(Vec::new()));
        let p2 = passes.clone();
        run(rx, config(16, 8), 2, alone(), &BatcherStats::default(), move |seqs| {
            p2.lock().unwrap().push(seqs.iter().map(|s| s.len()).sum::<usize>());
            Ok(seqs.iter().flat_map(|s| [s[0] as f32, s[1] as f32]).collect())
        });
        assert_eq!(*passes.lock().unwrap(), vec![8, 8, 8, 8, 4]);
        assert_eq!(results.lock().unwrap().iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    /// While another engine's interactive request is in flight, batch passes wait; the
    /// batcher's own interactive work still runs; the batch work runs once the other ends.
    #[test]
    fn batch_passes_wait_for_interactive_work_elsewhere() {
        let load = InteractiveLoad::new();
        let chat_elsewhere = load.enter();
        let (tx, rx) = mpsc::channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        let passes = Arc::new(Mutex::new(Vec::<Vec<(u32, u32)>>::new()));
        let forward = tagged_forward(&passes);
        // Never forced through: this test is about order, not the starvation bound.
        let yielding = BatchYield::new(Arc::clone(&load), Duration::from_secs(3600));
        let stats = Arc::new(BatcherStats::default());
        let stats2 = Arc::clone(&stats);
        let cfg = BatcherConfig { batch_pass_tokens_busy: 4, ..config(16, 8) };
        let worker = std::thread::spawn(move || run(rx, cfg, 2, yielding, &stats2, forward));
        tx.send(tagged_job(1, Priority::Batch, 3, 4, &results)).unwrap();
        let mut own = tagged_job(2, Priority::Interactive, 1, 4, &results);
        own.in_flight = Some(load.enter());
        tx.send(own).unwrap();
        while results.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The interactive job ran (and counted itself out); the batch job did not start.
        assert_eq!(*passes.lock().unwrap(), vec![vec![(2, 0)]]);
        assert_eq!(load.in_flight(), 1);
        drop(chat_elsewhere);
        drop(tx);
        worker.join().unwrap();
        // Interactive traffic is recent: batch passes take `batch_pass_tokens_busy` (one input).
        assert_eq!(*passes.lock().unwrap(), vec![vec![(2, 0)], vec![(1, 0)], vec![(1, 1)], vec![(1, 2)]]);
        assert_eq!(results.lock().unwrap().iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!((stats.passes(Priority::Interactive), stats.passes(Priority::Batch)), (1, 3));
        assert_eq!((stats.embedded_inputs(Priority::Interactive), stats.embedded_inputs(Priority::Batch)), (1, 3));
        assert_eq!(stats.waiting_inputs(Priority::Batch), 0);
    }
}

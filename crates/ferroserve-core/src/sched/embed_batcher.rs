//! The dynamic batcher for embeddings: one thread owns the model's compute queue,
//! merges concurrent requests into forward passes and hands results back in order.
//!
//! Policy: take everything already queued; if the previous merge held several
//! requests (i.e. there is concurrency), wait up to `max_wait` for more, so
//! concurrent clients share passes while a lone client never waits. A pass is capped at
//! `max_batch_tokens`; sequences are packed back to back (no padding), so grouping by
//! length is unnecessary: a pass costs what its real tokens cost.
//!
//! Priorities: each pass takes the waiting interactive sequences first, oldest request
//! first, and batch sequences only after all of them; requests that arrive between passes
//! join the queue at once, so a large batch job never holds interactive inputs back for
//! more than the pass in flight.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sched::Priority;

/// One request: tokenized sequences plus what to do with the vectors.
pub struct BatchJob {
    pub seqs: Vec<Vec<u32>>,
    pub priority: Priority,
    /// Called once with `[seqs.len(), dim]` vectors, or the pass's error (on the batcher
    /// thread).
    pub done: Box<dyn FnOnce(Result<Vec<f32>>) + Send>,
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_wait: Duration,
    pub max_batch_tokens: usize,
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

impl Queue {
    fn push(&mut self, job: BatchJob) {
        self.tokens += job.seqs.iter().map(Vec::len).sum::<usize>();
        self.lanes[job.priority.index()].push_back(Pending { job, next_seq: 0, vectors: Vec::new() });
    }

    fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// The next pass: `(lane, jobs taken from its front, sequences of its last job taken)`
    /// per lane, most urgent first. Sequences go in queue order until one would pass
    /// `max_batch_tokens` (a pass always takes at least one); a lane is reached only when
    /// every sequence of the lanes before it is in the pass.
    fn plan_pass(&self, max_batch_tokens: usize) -> Vec<(usize, usize, usize)> {
        let mut pass = Vec::new();
        let (mut tokens, mut any) = (0usize, false);
        for (lane, queue) in self.lanes.iter().enumerate() {
            let mut jobs = 0;
            let mut last_seqs = 0;
            for p in queue {
                let mut taken = 0;
                for seq in &p.job.seqs[p.next_seq..] {
                    if any && tokens + seq.len() > max_batch_tokens {
                        break;
                    }
                    tokens += seq.len();
                    any = true;
                    taken += 1;
                }
                if taken == 0 && p.next_seq < p.job.seqs.len() {
                    break;
                }
                jobs += 1;
                last_seqs = taken;
                if p.next_seq + taken < p.job.seqs.len() {
                    break;
                }
            }
            if jobs > 0 {
                pass.push((lane, jobs, last_seqs));
            }
            let lane_done = jobs == queue.len() && queue.back().is_none_or(|p| p.next_seq + last_seqs == p.job.seqs.len());
            if !lane_done {
                break;
            }
        }
        pass
    }
}

/// Runs until every sender is dropped and the queue is empty. `forward` maps sequences to
/// `[n, dim]` vectors; it may fail (a device error), which fails the jobs of that pass and
/// nothing after them. `FnMut`: a device runner reuses its scratch buffers from pass to pass.
pub fn run(rx: Receiver<BatchJob>, cfg: BatcherConfig, dim: usize, mut forward: impl FnMut(&[&[u32]]) -> Result<Vec<f32>>) {
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
        run_pass(&mut queue, &cfg, dim, &mut forward);
    }
}

/// Runs the next pass of the queue, then hands every job it completed (or failed) its result.
fn run_pass(queue: &mut Queue, cfg: &BatcherConfig, dim: usize, forward: &mut impl FnMut(&[&[u32]]) -> Result<Vec<f32>>) {
    let pass = queue.plan_pass(cfg.max_batch_tokens);
    let seqs_of = |p: &Pending, j: usize, jobs: usize, last_seqs: usize| {
        let end = if j + 1 == jobs { p.next_seq + last_seqs } else { p.job.seqs.len() };
        p.next_seq..end
    };
    let result = {
        let mut batch: Vec<&[u32]> = Vec::new();
        for &(lane, jobs, last_seqs) in &pass {
            for (j, p) in queue.lanes[lane].iter().take(jobs).enumerate() {
                batch.extend(p.job.seqs[seqs_of(p, j, jobs, last_seqs)].iter().map(Vec::as_slice));
            }
        }
        if batch.is_empty() {
            Ok(Vec::new())
        } else {
            forward(&batch)
        }
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
            for &(lane, jobs, _) in &pass {
                for p in queue.lanes[lane].drain(..jobs) {
                    queue.tokens -= p.job.seqs[p.next_seq..].iter().map(Vec::len).sum::<usize>();
                    (p.job.done)(Err(Error::Device(message.clone())));
                }
            }
            return;
        }
    };
    let mut at = 0;
    for &(lane, jobs, last_seqs) in &pass {
        for j in 0..jobs {
            let p = &mut queue.lanes[lane][j];
            let range = seqs_of(p, j, jobs, last_seqs);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

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
            tx.send(BatchJob { seqs, priority: Priority::Interactive, done: Box::new(move |v| r.lock().unwrap().push((j, v.unwrap()))) }).unwrap();
        }
        drop(tx);
        let cfg = BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens: 8 };
        run(rx, cfg, 2, move |seqs| {
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
            tx.send(BatchJob { seqs: vec![vec![j]], priority: Priority::Interactive, done: Box::new(move |v| r.lock().unwrap().push((j, v.map_err(|e| e.to_string())))) }).unwrap();
        };
        send(1, &tx);
        send(2, &tx);
        let cfg = BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens: 1 };
        let worker = std::thread::spawn(move || run(rx, cfg, 1, |seqs| if seqs[0][0] == 1 { Err(Error::Device("launch failed".into())) } else { Ok(vec![seqs[0][0] as f32]) }));
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

    /// Records each pass as `(request, sequence)` pairs: a sequence's ids are
    /// `[request, sequence, ...]`, its vector `[request, sequence]`.
    fn tagged_job(request: u32, priority: Priority, seqs: u32, len: usize, results: &Arc<Mutex<Vec<(u32, Vec<f32>)>>>) -> BatchJob {
        let r = results.clone();
        let seqs = (0..seqs).map(|s| { let mut ids = vec![request, s]; ids.resize(len, 0); ids }).collect();
        BatchJob { seqs, priority, done: Box::new(move |v| r.lock().unwrap().push((request, v.unwrap()))) }
    }

    #[test]
    fn interactive_inputs_go_first_in_every_pass() {
        let (tx, rx) = mpsc::channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        // Queued before the batcher starts: a large batch job, then interactive ones.
        tx.send(tagged_job(1, Priority::Batch, 6, 4, &results)).unwrap();
        tx.send(tagged_job(2, Priority::Interactive, 2, 4, &results)).unwrap();
        tx.send(tagged_job(3, Priority::Batch, 1, 4, &results)).unwrap();
        tx.send(tagged_job(4, Priority::Interactive, 1, 4, &results)).unwrap();
        let passes = Arc::new(Mutex::new(Vec::<Vec<(u32, u32)>>::new()));
        let p2 = passes.clone();
        // An interactive request that arrives while the first pass runs.
        let (late, r2) = (tx.clone(), results.clone());
        drop(tx);
        let mut late = Some((late, r2));
        let cfg = BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens: 16 };
        run(rx, cfg, 2, move |seqs| {
            if let Some((tx, r)) = late.take() {
                tx.send(tagged_job(5, Priority::Interactive, 2, 4, &r)).unwrap();
            }
            p2.lock().unwrap().push(seqs.iter().map(|s| (s[0], s[1])).collect());
            Ok(seqs.iter().flat_map(|s| [s[0] as f32, s[1] as f32]).collect())
        });
        // Four sequences of 4 tokens per pass. The first: both interactive jobs, then the
        // batch job's first sequence. The second: the late interactive job before the rest
        // of the batch work, which goes on in arrival order.
        let passes = passes.lock().unwrap();
        assert_eq!(
            *passes,
            vec![
                vec![(2, 0), (2, 1), (4, 0), (1, 0)],
                vec![(5, 0), (5, 1), (1, 1), (1, 2)],
                vec![(1, 3), (1, 4), (1, 5), (3, 0)],
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

    /// With no interactive input waiting, batch work fills whole passes.
    #[test]
    fn batch_inputs_fill_passes_when_alone() {
        let (tx, rx) = mpsc::channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        for request in 0..3 {
            tx.send(tagged_job(request, Priority::Batch, 3, 4, &results)).unwrap();
        }
        drop(tx);
        let passes = Arc::new(Mutex::new(Vec::new()));
        let p2 = passes.clone();
        let cfg = BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens: 16 };
        run(rx, cfg, 2, move |seqs| {
            p2.lock().unwrap().push(seqs.iter().map(|s| s.len()).sum::<usize>());
            Ok(seqs.iter().flat_map(|s| [s[0] as f32, s[1] as f32]).collect())
        });
        assert_eq!(*passes.lock().unwrap(), vec![16, 16, 4]);
        assert_eq!(results.lock().unwrap().iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}

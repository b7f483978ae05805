//! The dynamic batcher for embeddings: one thread owns the model's compute queue,
//! merges concurrent requests into forward passes and hands results back in order.
//!
//! Policy: take everything already queued; if the previous pass merged several
//! requests (i.e. there is concurrency), wait up to `max_wait` for more, so
//! concurrent clients share passes while a lone client never waits. A pass is capped at
//! `max_batch_tokens`; sequences are packed back to back (no padding), so grouping by
//! length is unnecessary: a pass costs what its real tokens cost.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// One request: tokenized sequences plus what to do with the vectors.
pub struct BatchJob {
    pub seqs: Vec<Vec<u32>>,
    /// Called once with `[seqs.len(), dim]` vectors (on the batcher thread).
    pub done: Box<dyn FnOnce(Vec<f32>) + Send>,
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_wait: Duration,
    pub max_batch_tokens: usize,
}

/// Runs until every sender is dropped. `forward` maps sequences to `[n, dim]` vectors.
pub fn run(rx: Receiver<BatchJob>, cfg: BatcherConfig, dim: usize, forward: impl Fn(&[&[u32]]) -> Vec<f32>) {
    let mut last_pass_jobs = 0usize;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut tokens: usize = jobs[0].seqs.iter().map(Vec::len).sum();
        while let Ok(j) = rx.try_recv() {
            tokens += j.seqs.iter().map(Vec::len).sum::<usize>();
            jobs.push(j);
        }
        if last_pass_jobs > 1 && tokens < cfg.max_batch_tokens {
            let deadline = Instant::now() + cfg.max_wait;
            while tokens < cfg.max_batch_tokens {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => {
                        tokens += j.seqs.iter().map(Vec::len).sum::<usize>();
                        jobs.push(j);
                    }
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        last_pass_jobs = jobs.len();
        run_jobs(jobs, &cfg, dim, &forward);
    }
}

/// Splits the merged sequences into passes of at most `max_batch_tokens` and returns
/// each job's vectors.
fn run_jobs(jobs: Vec<BatchJob>, cfg: &BatcherConfig, dim: usize, forward: &impl Fn(&[&[u32]]) -> Vec<f32>) {
    let all: Vec<&[u32]> = jobs.iter().flat_map(|j| j.seqs.iter().map(Vec::as_slice)).collect();
    let mut vectors = Vec::with_capacity(all.len() * dim);
    let mut start = 0;
    while start < all.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < all.len() && (end == start || tokens + all[end].len() <= cfg.max_batch_tokens) {
            tokens += all[end].len();
            end += 1;
        }
        vectors.extend(forward(&all[start..end]));
        start = end;
    }
    let mut at = 0;
    for job in jobs {
        let n = job.seqs.len() * dim;
        (job.done)(vectors[at..at + n].to_vec());
        at += n;
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
            tx.send(BatchJob { seqs, done: Box::new(move |v| r.lock().unwrap().push((j, v))) }).unwrap();
        }
        drop(tx);
        let cfg = BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens: 8 };
        run(rx, cfg, 2, move |seqs| {
            p2.lock().unwrap().push(seqs.iter().map(|s| s.len()).sum::<usize>());
            seqs.iter().flat_map(|s| [s.len() as f32, s[0] as f32]).collect()
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
}

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

use crate::error::{Error, Result};

/// One request: tokenized sequences plus what to do with the vectors.
pub struct BatchJob {
    pub seqs: Vec<Vec<u32>>,
    /// Called once with `[seqs.len(), dim]` vectors, or the pass's error (on the batcher
    /// thread).
    pub done: Box<dyn FnOnce(Result<Vec<f32>>) + Send>,
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_wait: Duration,
    pub max_batch_tokens: usize,
}

/// Runs until every sender is dropped. `forward` maps sequences to `[n, dim]` vectors; it
/// may fail (a device error), which fails the jobs of that merge and nothing after them.
/// `FnMut`: a device runner reuses its scratch buffers from pass to pass.
pub fn run(rx: Receiver<BatchJob>, cfg: BatcherConfig, dim: usize, mut forward: impl FnMut(&[&[u32]]) -> Result<Vec<f32>>) {
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
        run_jobs(jobs, &cfg, dim, &mut forward);
    }
}

/// Splits the merged sequences into passes of at most `max_batch_tokens` and returns
/// each job's vectors.
fn run_jobs(jobs: Vec<BatchJob>, cfg: &BatcherConfig, dim: usize, forward: &mut impl FnMut(&[&[u32]]) -> Result<Vec<f32>>) {
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
        match forward(&all[start..end]) {
            Ok(v) => vectors.extend(v),
            Err(e) => {
                // Every job of the merge gets the error (Error is not Clone): as a device error,
                // the only kind a forward pass produces, without repeating its prefix.
                let message = match &e {
                    Error::Device(m) => m.clone(),
                    other => other.to_string(),
                };
                drop(all);
                for job in jobs {
                    (job.done)(Err(Error::Device(message.clone())));
                }
                return;
            }
        }
        start = end;
    }
    drop(all);
    let mut at = 0;
    for job in jobs {
        let n = job.seqs.len() * dim;
        (job.done)(Ok(vectors[at..at + n].to_vec()));
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
            tx.send(BatchJob { seqs, done: Box::new(move |v| r.lock().unwrap().push((j, v.unwrap()))) }).unwrap();
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
            tx.send(BatchJob { seqs: vec![vec![j]], done: Box::new(move |v| r.lock().unwrap().push((j, v.map_err(|e| e.to_string())))) }).unwrap();
        };
        send(1, &tx);
        send(2, &tx);
        let cfg = BatcherConfig { max_wait: Duration::from_millis(1), max_batch_tokens: 1 };
        let worker = std::thread::spawn(move || run(rx, cfg, 1, |seqs| if seqs[0][0] == 1 { Err(Error::Device("launch failed".into())) } else { Ok(vec![seqs[0][0] as f32]) }));
        // Both jobs may merge into one split batch: job 1's pass fails, so the merge fails.
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
}

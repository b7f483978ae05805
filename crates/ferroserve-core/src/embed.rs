//! The embedding engine: tokenizer + BERT model + batcher thread + completion queue.

use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use ferroserve_kernels::opencl::KernelSource;
use ferroserve_kernels::{Backend, CpuBackend, OpenClBackend};

use crate::error::{Error, Result};
use crate::models::bert::{compare_backends, normalize, BertModel, EmbedNumerics};
use crate::notify::Notifier;
use crate::sched::embed_batcher::{self, BatchJob, BatcherConfig, BatcherStats};
use crate::sched::interactive::{BatchYield, InteractiveLoad, BATCH_MAX_YIELD};
use crate::sched::Priority;
use crate::tokenize::bert::EncoderTokenizer;

pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// One finished request: its vectors, one row of `dim` float32 per input, back to back (cut
/// to the request's `dimensions` and re-normalised). The engine hands back numbers only; the
/// wire format (OpenAI's JSON, base64) is the HTTP layer's business.
pub struct EmbedOutput {
    pub vectors: Vec<f32>,
    pub dim: usize,
    pub prompt_tokens: usize,
}

pub struct EmbedEvent {
    pub request_id: u64,
    pub result: Result<EmbedOutput>,
}

/// Where the model runs.
#[derive(Debug, Clone)]
pub enum DeviceChoice {
    Cpu,
    /// OpenCL device `index` (as `ferroserve devices` numbers them), kernels built from the
    /// embedded sources or loaded as precompiled binaries.
    OpenCl {
        index: usize,
        kernels: KernelSource,
    },
}

impl DeviceChoice {
    /// `cpu`, `opencl` (= `opencl:0`) or `opencl:N`.
    pub fn parse(spec: &str, kernel_binaries: Option<&Path>) -> Result<Self> {
        let kernels = kernel_binaries.map_or(KernelSource::Embedded, |d| KernelSource::Binaries(d.to_path_buf()));
        match spec {
            "cpu" => Ok(DeviceChoice::Cpu),
            "opencl" => Ok(DeviceChoice::OpenCl { index: 0, kernels }),
            _ => spec
                .strip_prefix("opencl:")
                .and_then(|n| n.parse().ok())
                .map(|index| DeviceChoice::OpenCl { index, kernels })
                .ok_or_else(|| Error::invalid_request(format!("device must be cpu, opencl or opencl:N, got {spec:?}"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmbeddingEngineConfig {
    pub max_batch_tokens: usize,
    /// Tokens in a forward pass of batch-priority inputs: an interactive request arriving
    /// during one waits for at most this much work (see [`embed_batcher`]).
    pub batch_pass_tokens: usize,
    /// The same while interactive traffic is recent on the server (a pass always takes at
    /// least one input).
    pub batch_pass_tokens_busy: usize,
    pub max_wait: Duration,
    pub device: DeviceChoice,
    /// The interactive requests in flight on this server's engines: batch passes wait while
    /// there are any. A server shares [`InteractiveLoad::server`] between its engines.
    pub interactive: Arc<InteractiveLoad>,
    /// The longest batch passes wait in a row before one runs anyway.
    pub batch_max_yield: Duration,
    /// The linear layers' arithmetic. Int8 is CPU-only: asking for it with an OpenCL
    /// device is a load error (not a silent fallback to the CPU or to f32).
    pub numerics: EmbedNumerics,
}

/// The default [`EmbeddingEngineConfig::batch_pass_tokens`] (no interactive traffic in the
/// last second): about the pass a synchronous request of 128 short inputs makes, so a sparse
/// interactive request waits at most as long as behind one ordinary request. Smaller passes
/// cost throughput (bench/NOTES.md, issue 15: 256 tokens ran at 0.70x the synchronous best,
/// 1,024 at 0.86x, 4,096 at 0.98x, same run).
pub const DEFAULT_BATCH_PASS_TOKENS: usize = 2048;
/// The default [`EmbeddingEngineConfig::batch_pass_tokens_busy`]: one short sentence.
pub const DEFAULT_BATCH_PASS_TOKENS_BUSY: usize = 16;

impl Default for EmbeddingEngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 16 * 1024,
            batch_pass_tokens: DEFAULT_BATCH_PASS_TOKENS,
            batch_pass_tokens_busy: DEFAULT_BATCH_PASS_TOKENS_BUSY,
            max_wait: Duration::from_millis(1),
            device: DeviceChoice::Cpu,
            interactive: InteractiveLoad::new(),
            batch_max_yield: BATCH_MAX_YIELD,
            numerics: EmbedNumerics::F32,
        }
    }
}

/// Sentences embedded on a model's backend and on the CPU when a model loads on another
/// backend: a device whose kernels build but compute something else (a broken driver,
/// flushed denormals gone wrong) is refused at startup instead of serving wrong vectors. Two
/// sequences of different lengths in one pass, so the packing is checked too.
const PROBE_TEXTS: [&str; 2] = [
    "A device check: the quick brown fox jumps over the lazy dog.",
    "Embeddings computed on an OpenCL device must match the CPU's, sentence by sentence, to within rounding.",
];
/// What the end-to-end tests require of the OpenCL device against the reference.
const PROBE_MIN_COSINE: f64 = 0.9999;

/// Runs [`PROBE_TEXTS`] through `model` and through `reference` (the same checkpoint on
/// another backend); an error says which sentence disagreed and by how much.
fn probe_backend<A: Backend, R: Backend>(model: &BertModel<A>, reference: &BertModel<R>, tokenizer: &EncoderTokenizer) -> Result<()> {
    let seqs: Vec<Vec<u32>> = PROBE_TEXTS.iter().map(|t| tokenizer.encode(t)).collect::<Result<_>>()?;
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let agreement = compare_backends(model, reference, &refs)?;
    let c = agreement.worst_cosine;
    // Negated on purpose: a NaN cosine (non-finite output) must fail too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(c >= PROBE_MIN_COSINE) {
        return Err(Error::Device(format!(
            "{} computes embeddings that differ from {}'s (cosine {c:.6} < {PROBE_MIN_COSINE} on {:?})",
            model.device_name(),
            reference.device_name(),
            PROBE_TEXTS[agreement.worst_index]
        )));
    }
    Ok(())
}

pub struct EmbeddingEngine {
    tokenizer: EncoderTokenizer,
    dim: usize,
    vocab_size: usize,
    max_len: usize,
    device_name: String,
    jobs: Sender<BatchJob>,
    notifier: Arc<Notifier<EmbedEvent>>,
    interactive: Arc<InteractiveLoad>,
    stats: Arc<BatcherStats>,
}

/// What the engine keeps of a model once its batcher thread owns it.
struct Started {
    tokenizer: EncoderTokenizer,
    dim: usize,
    vocab_size: usize,
    max_len: usize,
    device_name: String,
}

/// Moves `model` onto its batcher thread (one for every backend).
fn start<B: Backend>(
    model: BertModel<B>,
    tokenizer: EncoderTokenizer,
    cfg: &EmbeddingEngineConfig,
    rx: mpsc::Receiver<BatchJob>,
    stats: Arc<BatcherStats>,
    spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> Result<()>,
) -> Result<Started> {
    let max_len = model.sentence.max_seq_length;
    let started = Started { tokenizer, dim: model.hidden_size(), vocab_size: model.config.vocab_size, max_len, device_name: model.device_name() };
    let (bcfg, dim) = (batcher_config(cfg, max_len), started.dim);
    let yielding = BatchYield::new(Arc::clone(&cfg.interactive), cfg.batch_max_yield);
    spawn(Box::new(move || embed_batcher::run(rx, bcfg, dim, yielding, &stats, |seqs| model.embed(seqs))))?;
    Ok(started)
}

impl EmbeddingEngine {
    /// Loads a sentence-transformers folder and starts its batcher thread.
    pub fn load(dir: &Path, cfg: EmbeddingEngineConfig) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model_load(dir, "not a directory"));
        }
        let notifier = Arc::new(Notifier::new().map_err(|e| Error::Internal(e.to_string()))?);
        let (jobs, rx) = mpsc::channel();
        let stats = Arc::new(BatcherStats::default());
        let batcher_stats = Arc::clone(&stats);
        crate::sched::compute_priority::lower_compute_pool();
        let spawn = |f: Box<dyn FnOnce() + Send>| {
            let f = move || {
                crate::sched::compute_priority::lower_this_thread();
                f()
            };
            std::thread::Builder::new().name("ferroserve-embed".into()).spawn(f).map(drop).map_err(|e| Error::Internal(e.to_string()))
        };
        let started = match &cfg.device {
            DeviceChoice::Cpu => {
                let model = BertModel::load_with_numerics(dir, CpuBackend::default(), cfg.numerics)?;
                let tokenizer = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), model.sentence.max_seq_length)?;
                start(model, tokenizer, &cfg, rx, batcher_stats, spawn)?
            }
            DeviceChoice::OpenCl { .. } if cfg.numerics != EmbedNumerics::F32 => {
                return Err(Error::Device(format!(
                    "embedding numerics {} run on the CPU only; the OpenCL kernels compute f32 (use embedding numerics f32 with an OpenCL device, or the cpu device)",
                    cfg.numerics.as_str()
                )));
            }
            DeviceChoice::OpenCl { index, kernels } => {
                // The device first: without one, reading 90 MB of weights would be wasted.
                let backend = OpenClBackend::open(*index, kernels).map_err(|e| Error::Device(e.0))?;
                let model = BertModel::load(dir, backend)?;
                let tokenizer = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), model.sentence.max_seq_length)?;
                probe_backend(&model, &BertModel::load(dir, CpuBackend::default())?, &tokenizer)?;
                start(model, tokenizer, &cfg, rx, batcher_stats, spawn)?
            }
        };
        let Started { tokenizer, dim, vocab_size, max_len, device_name } = started;
        Ok(Self { tokenizer, dim, vocab_size, max_len, device_name, jobs, notifier, interactive: cfg.interactive, stats })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    pub fn notifier(&self) -> &Notifier<EmbedEvent> {
        &self.notifier
    }
    /// Inputs waiting, passes and inputs embedded, per priority.
    pub fn stats(&self) -> &BatcherStats {
        &self.stats
    }

    /// Tokenizes (errors are returned at once) and queues the request; the result
    /// arrives as an [`EmbedEvent`] on the notifier. Returns the prompt token count.
    /// Batch-priority inputs go into passes only after every waiting interactive input, and
    /// not while interactive requests are in flight elsewhere on the server.
    pub fn submit(&self, request_id: u64, inputs: Vec<EmbedInput>, dimensions: Option<usize>, priority: Priority) -> Result<usize> {
        if inputs.is_empty() {
            return Err(Error::invalid("input", "input must not be empty"));
        }
        if let Some(d) = dimensions {
            if d == 0 || d > self.dim {
                return Err(Error::invalid("dimensions", format!("dimensions must be between 1 and {} for this model", self.dim)));
            }
        }
        let seqs = self.tokenize(inputs)?;
        let prompt_tokens = seqs.iter().map(Vec::len).sum();
        let notifier = self.notifier.clone();
        let dim = self.dim;
        let done = Box::new(move |vectors: Result<Vec<f32>>| {
            let result = vectors.map(|vectors| match dimensions {
                Some(d) if d < dim => EmbedOutput { vectors: truncated_rows(&vectors, dim, d), dim: d, prompt_tokens },
                _ => EmbedOutput { vectors, dim, prompt_tokens },
            });
            notifier.push(EmbedEvent { request_id, result });
        });
        let in_flight = (priority == Priority::Interactive).then(|| self.interactive.enter());
        self.jobs.send(BatchJob { seqs, priority, in_flight, done }).map_err(|_| Error::EngineDead)?;
        Ok(prompt_tokens)
    }

    /// The prompt tokens [`submit`](Self::submit) would count (same validation), without
    /// queueing anything: lets the gateway charge rate limits and budgets before the call.
    pub fn count_tokens(&self, inputs: Vec<EmbedInput>) -> Result<usize> {
        Ok(self.tokenize(inputs)?.iter().map(Vec::len).sum())
    }

    fn tokenize(&self, inputs: Vec<EmbedInput>) -> Result<Vec<Vec<u32>>> {
        inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| match input {
                EmbedInput::Text(t) if t.is_empty() => Err(Error::invalid("input", format!("input[{i}] is an empty string"))),
                EmbedInput::Text(t) => self.tokenizer.encode(&t),
                EmbedInput::Tokens(ids) if ids.is_empty() => Err(Error::invalid("input", format!("input[{i}] is an empty token list"))),
                EmbedInput::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                        return Err(Error::invalid("input", format!("input[{i}] has token id {bad}, outside the vocabulary (size {})", self.vocab_size)));
                    }
                    Ok(self.tokenizer.wrap_ids(&ids))
                }
            })
            .collect()
    }
}

fn batcher_config(cfg: &EmbeddingEngineConfig, max_len: usize) -> BatcherConfig {
    // A pass must fit the longest sequence.
    let max_batch_tokens = cfg.max_batch_tokens.max(max_len);
    BatcherConfig {
        max_wait: cfg.max_wait,
        max_batch_tokens,
        batch_pass_tokens: cfg.batch_pass_tokens.min(max_batch_tokens),
        batch_pass_tokens_busy: cfg.batch_pass_tokens_busy.min(max_batch_tokens),
    }
}

/// Each row of `dim` cut to its first `dimensions` values and re-normalised (as OpenAI does).
fn truncated_rows(vectors: &[f32], dim: usize, dimensions: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(vectors.len() / dim * dimensions);
    for row in vectors.chunks_exact(dim) {
        let start = out.len();
        out.extend_from_slice(&row[..dimensions]);
        normalize(&mut out[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_truncate_and_renormalise() {
        let rows = truncated_rows(&[3.0, 4.0, 12.0, 0.0, 5.0, 1.0], 3, 2);
        assert_eq!(rows, [0.6, 0.8, 0.0, 1.0]);
    }
}

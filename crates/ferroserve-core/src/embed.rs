//! The embedding engine: tokenizer + BERT model + batcher thread + completion queue.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use ferroserve_kernels::{CpuDevice, Device};

use crate::error::{Error, Result};
use crate::models::bert::{normalize, BertModel};
use crate::notify::Notifier;
use crate::sched::embed_batcher::{self, BatchJob, BatcherConfig};
use crate::tokenize::bert::EncoderTokenizer;

pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A JSON array of numbers.
    Float,
    /// A JSON string: base64 of little-endian float32 (OpenAI's format).
    Base64,
}

/// One finished request: the response's whole `data` array, already JSON-encoded
/// (built on the batcher thread so the HTTP layer only wraps it).
pub struct EmbedOutput {
    pub data_json: Vec<u8>,
    pub prompt_tokens: usize,
}

pub struct EmbedEvent {
    pub request_id: u64,
    pub result: Result<EmbedOutput>,
}

#[derive(Debug, Clone)]
pub struct EmbeddingEngineConfig {
    pub max_batch_tokens: usize,
    pub max_wait: Duration,
}

impl Default for EmbeddingEngineConfig {
    fn default() -> Self {
        Self { max_batch_tokens: 16 * 1024, max_wait: Duration::from_millis(1) }
    }
}

pub struct EmbeddingEngine {
    tokenizer: EncoderTokenizer,
    dim: usize,
    vocab_size: usize,
    max_len: usize,
    device_name: String,
    jobs: Sender<BatchJob>,
    notifier: Arc<Notifier<EmbedEvent>>,
}

impl EmbeddingEngine {
    /// Loads a sentence-transformers folder and starts its batcher thread.
    pub fn load(dir: &Path, cfg: EmbeddingEngineConfig) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model_load(dir, "not a directory"));
        }
        let device: Arc<dyn Device> = Arc::new(CpuDevice::new());
        let device_name = device.name();
        let model = BertModel::load(dir, device)?;
        let max_len = model.sentence.max_seq_length;
        let tokenizer = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), max_len)?;
        let dim = model.hidden_size();
        let vocab_size = model.config.vocab_size;
        let notifier = Arc::new(Notifier::new().map_err(|e| Error::Internal(e.to_string()))?);
        let (jobs, rx) = mpsc::channel();
        let bcfg = BatcherConfig { max_wait: cfg.max_wait, max_batch_tokens: cfg.max_batch_tokens.max(max_len) };
        std::thread::Builder::new()
            .name("ferroserve-embed".into())
            .spawn(move || embed_batcher::run(rx, bcfg, dim, |seqs| model.embed(seqs)))
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Self { tokenizer, dim, vocab_size, max_len, device_name, jobs, notifier })
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

    /// Tokenizes (errors are returned at once) and queues the request; the result
    /// arrives as an [`EmbedEvent`] on the notifier. Returns the prompt token count.
    pub fn submit(&self, request_id: u64, inputs: Vec<EmbedInput>, dimensions: Option<usize>, encoding: Encoding) -> Result<usize> {
        if inputs.is_empty() {
            return Err(Error::InvalidRequest("input must not be empty".into()));
        }
        if let Some(d) = dimensions {
            if d == 0 || d > self.dim {
                return Err(Error::InvalidRequest(format!("dimensions must be between 1 and {} for this model", self.dim)));
            }
        }
        let seqs = self.tokenize(inputs)?;
        let prompt_tokens = seqs.iter().map(Vec::len).sum();
        let notifier = self.notifier.clone();
        let dim = self.dim;
        let done = Box::new(move |vectors: Vec<f32>| {
            let mut data_json = Vec::with_capacity(vectors.len() * 12 + 64);
            data_json.push(b'[');
            for (i, v) in vectors.chunks_exact(dim).enumerate() {
                if i > 0 {
                    data_json.push(b',');
                }
                let _ = write!(data_json, "{{\"object\":\"embedding\",\"index\":{i},\"embedding\":");
                data_json.extend(encode_row(v, dimensions, encoding));
                data_json.push(b'}');
            }
            data_json.push(b']');
            notifier.push(EmbedEvent { request_id, result: Ok(EmbedOutput { data_json, prompt_tokens }) });
        });
        self.jobs.send(BatchJob { seqs, done }).map_err(|_| Error::EngineDead)?;
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
                EmbedInput::Text(t) if t.is_empty() => Err(Error::InvalidRequest(format!("input[{i}] is an empty string"))),
                EmbedInput::Text(t) => self.tokenizer.encode(&t),
                EmbedInput::Tokens(ids) if ids.is_empty() => Err(Error::InvalidRequest(format!("input[{i}] is an empty token list"))),
                EmbedInput::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                        return Err(Error::InvalidRequest(format!("input[{i}] has token id {bad}, outside the vocabulary (size {})", self.vocab_size)));
                    }
                    Ok(self.tokenizer.wrap_ids(&ids))
                }
            })
            .collect()
    }
}

/// Truncates to `dimensions` (re-normalising, as OpenAI does) and encodes as JSON.
fn encode_row(v: &[f32], dimensions: Option<usize>, encoding: Encoding) -> Vec<u8> {
    let mut v = v.to_vec();
    if let Some(d) = dimensions {
        if d < v.len() {
            v.truncate(d);
            normalize(&mut v);
        }
    }
    match encoding {
        Encoding::Float => {
            let mut s = String::with_capacity(v.len() * 12 + 2);
            s.push('[');
            for (i, x) in v.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                // Shortest repr that round-trips the f32; JSON has no NaN/inf.
                let x = if x.is_finite() { *x } else { 0.0 };
                let _ = write!(s, "{x}");
            }
            s.push(']');
            s.into_bytes()
        }
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut out = Vec::with_capacity(bytes.len() * 4 / 3 + 4);
            out.push(b'"');
            base64_into(&bytes, &mut out);
            out.push(b'"');
            out
        }
    }
}

/// Standard base64 with padding (RFC 4648), appended to `out`.
fn base64_into(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(ALPHABET[(n >> 18) as usize & 63]);
        out.push(ALPHABET[(n >> 12) as usize & 63]);
        out.push(if chunk.len() > 1 { ALPHABET[(n >> 6) as usize & 63] } else { b'=' });
        out.push(if chunk.len() > 2 { ALPHABET[n as usize & 63] } else { b'=' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            let mut out = Vec::new();
            base64_into(input.as_bytes(), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn rows_truncate_and_renormalise() {
        let row = encode_row(&[3.0, 4.0, 12.0], Some(2), Encoding::Float);
        assert_eq!(String::from_utf8(row).unwrap(), "[0.6,0.8]");
    }
}

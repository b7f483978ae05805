//! Per-request sampling parameters and their validation.
//!
//! The API layer maps OpenAI's request fields onto [`SamplingParams`]; the engine never sees
//! OpenAI JSON. Validation errors name the parameter by its OpenAI name ([`Error::param`]),
//! which the bindings report as `param` in the error body; messages start with it too.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Most choices (`n`) one request may ask for: each is a sequence with its own KV blocks.
pub const MAX_CHOICES: usize = 16;
/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Most alternatives per token in `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Choices to generate; they share the prompt's KV blocks.
    pub n: usize,
    /// Most tokens to generate per choice; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    /// 0 is greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of most likely tokens whose mass reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Same seed, prompt and parameters → same output. `None`: a fresh seed per request.
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids (OpenAI's range: -100..=100).
    pub logit_bias: BTreeMap<u32, f32>,
    /// Generation ends before the first occurrence of any of these; the stop text is not
    /// part of the output.
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`, also the `top_logprobs` most likely alternatives per token.
    pub top_logprobs: usize,
    /// Structured output: every choice is a JSON document valid under this JSON schema
    /// (JSON text; `{"type": "object"}` for any object). The engine compiles it at submit
    /// and refuses what it cannot enforce (`param` `response_format`).
    pub json_schema: Option<String>,
    /// Tool calls: every choice matches this llguidance Lark grammar (JSON schemas embedded
    /// with `%json`), compiled at submit like `json_schema`; what it cannot enforce is refused
    /// on `param` `tools`. At most one of `json_schema` and `lark_grammar`.
    pub lark_grammar: Option<String>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults.
    fn default() -> Self {
        Self {
            n: 1,
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: BTreeMap::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
            json_schema: None,
            lark_grammar: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with default everything else.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every value against its allowed range; `vocab_size` bounds `logit_bias` ids.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let invalid = |param: &'static str, msg: String| Err(Error::invalid(param, msg));
        if self.n == 0 || self.n > MAX_CHOICES {
            return invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}, got {}", self.n),
            );
        }
        if self.max_tokens == Some(0) {
            return invalid("max_tokens", "max_tokens must be at least 1".into());
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return invalid(
                "temperature",
                format!(
                    "temperature must be between 0 and 2, got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(
                "top_p",
                format!(
                    "top_p must be greater than 0 and at most 1, got {}",
                    self.top_p
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(
                "min_p",
                format!("min_p must be between 0 and 1, got {}", self.min_p),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return invalid(
                "presence_penalty",
                format!(
                    "presence_penalty must be between -2 and 2, got {}",
                    self.presence_penalty
                ),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return invalid(
                "frequency_penalty",
                format!(
                    "frequency_penalty must be between -2 and 2, got {}",
                    self.frequency_penalty
                ),
            );
        }
        for (&id, &bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return invalid(
                    "logit_bias",
                    format!(
                        "logit_bias has token id {id}, outside the vocabulary (size {vocab_size})"
                    ),
                );
            }
            if !(-100.0..=100.0).contains(&bias) {
                return invalid(
                    "logit_bias",
                    format!("logit_bias for token {id} must be between -100 and 100, got {bias}"),
                );
            }
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return invalid(
                "stop",
                format!(
                    "stop may have at most {MAX_STOP_STRINGS} sequences, got {}",
                    self.stop.len()
                ),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("stop", "stop sequences must not be empty".into());
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return invalid(
                "top_logprobs",
                format!(
                    "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {}",
                    self.top_logprobs
                ),
            );
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true".into(),
            );
        }
        Ok(())
    }
}

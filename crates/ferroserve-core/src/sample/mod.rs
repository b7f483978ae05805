//! Sampling: per-request parameters, logits processors, truncation, the random draw and
//! logprobs, and grammar masks (structured output). Everything here works on one sequence's row
//! of logits at a time.

pub mod grammar;
pub mod logprobs;
mod params;
mod rng;
mod sampler;

pub use params::{SamplingParams, MAX_CHOICES, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS};
pub use rng::CounterRng;
pub use sampler::{Sampled, SequenceSampler, TokenLogprobs};

//! One sequence's sampler: logits processors (penalties, logit bias, temperature),
//! truncation (top-k, top-p, min-p), the draw, and logprobs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::grammar::{apply_mask, TokenMask};
use super::logprobs::{argmax, key_id, log_sum_exp, logprob, rank_key, top_ids_into};
use super::params::SamplingParams;
use super::rng::CounterRng;

/// A token's log-probability under the processed distribution (after penalties, logit bias
/// and temperature; before truncation, so it is finite for every token), plus the most
/// likely alternatives when `top_logprobs > 0`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    /// Present when the request asked for `logprobs`.
    pub logprobs: Option<TokenLogprobs>,
}

pub struct SequenceSampler {
    params: Arc<SamplingParams>,
    rng: CounterRng,
    /// How often each token was generated so far (for the penalties).
    generated_counts: HashMap<u32, u32>,
    /// Tokens sampled so far: the counter of the next random draw.
    step: u64,
}

/// Vocabulary-sized work buffers, one set per thread rather than per sequence (at a 49k
/// vocabulary they are ~800 KB).
#[derive(Default)]
struct Scratch {
    /// The row after penalties, bias and temperature.
    processed: Vec<f32>,
    /// `exp(logit - max)` of `processed`.
    weights: Vec<f32>,
    candidate_ids: Vec<u32>,
    rank_keys: Vec<u64>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

impl SequenceSampler {
    /// `stream` tells apart the choices of one request (its `index`).
    pub fn new(params: Arc<SamplingParams>, seed: u64, stream: u64) -> Self {
        Self {
            params,
            rng: CounterRng::new(seed, stream),
            generated_counts: HashMap::new(),
            step: 0,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Tokens sampled so far.
    pub fn num_sampled(&self) -> u64 {
        self.step
    }

    /// Picks the next token from one row of raw logits and records it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_masked(logits, None)
    }

    /// [`sample`](Self::sample) among the tokens `allowed` (a grammar's mask): the others
    /// get probability 0 before truncation and the draw, and in the logprobs.
    pub fn sample_masked(&mut self, logits: &[f32], allowed: Option<&TokenMask>) -> Sampled {
        SCRATCH.with(|scratch| self.sample_with(logits, allowed, &mut scratch.borrow_mut()))
    }

    fn sample_with(&mut self, logits: &[f32], allowed: Option<&TokenMask>, scratch: &mut Scratch) -> Sampled {
        self.process(logits, &mut scratch.processed);
        if let Some(mask) = allowed {
            apply_mask(mask, &mut scratch.processed);
        }
        let params = Arc::clone(&self.params);
        let mut token_id = if params.temperature == 0.0 || params.top_k == 1 {
            argmax(&scratch.processed)
        } else {
            self.draw(scratch)
        };
        if let Some(mask) = allowed {
            // The draw's rounding fallbacks may land on a zero-weight candidate (top-k wider
            // than the allowed set, a raw logit of -inf): never leave the mask.
            if !mask.is_allowed(token_id) {
                token_id = argmax(&scratch.processed);
            }
            if !mask.is_allowed(token_id) {
                // Every allowed token's raw logit was -inf (or NaN): the mask still rules.
                token_id = mask.first_bit_set().map_or(token_id, |id| id as u32);
            }
        }
        let logprobs = params.logprobs.then(|| {
            let x = &scratch.processed;
            let lse = log_sum_exp(x);
            let mut top = Vec::with_capacity(params.top_logprobs);
            if params.top_logprobs > 0 {
                top_ids_into(x, params.top_logprobs, &mut scratch.candidate_ids);
                top.extend(
                    scratch
                        .candidate_ids
                        .iter()
                        .map(|&id| (id, logprob(x[id as usize], lse))),
                );
            }
            TokenLogprobs {
                logprob: logprob(x[token_id as usize], lse),
                top,
            }
        });
        *self.generated_counts.entry(token_id).or_insert(0) += 1;
        self.step += 1;
        Sampled { token_id, logprobs }
    }

    /// Raw logits → `x`: NaN to -inf, penalties, bias, temperature.
    fn process(&self, logits: &[f32], x: &mut Vec<f32>) {
        let p = &*self.params;
        x.clear();
        x.extend(
            logits
                .iter()
                .map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v }),
        );
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated_counts {
                if let Some(v) = x.get_mut(id as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
        for (&id, &bias) in &p.logit_bias {
            if let Some(v) = x.get_mut(id as usize) {
                *v += bias;
            }
        }
        if p.temperature > 0.0 && p.temperature != 1.0 {
            for v in x.iter_mut() {
                *v /= p.temperature;
            }
        }
    }

    /// A random token from the truncated distribution. Candidates are walked in an order
    /// fixed by the logits alone, so the same uniform draw always gives the same token.
    fn draw(&self, scratch: &mut Scratch) -> u32 {
        let p = &*self.params;
        let Scratch {
            processed: x,
            weights: w,
            candidate_ids: ids,
            rank_keys,
        } = scratch;
        let max = x[argmax(x) as usize];
        if max == f32::NEG_INFINITY {
            return 0;
        }
        let u = self.rng.uniform_at(self.step);
        // Weights relative to the most likely token (weight 1). Top-k needs only its
        // candidates'; top-p and plain sampling need the whole row, computed once.
        let whole_row = p.top_k == 0;
        w.clear();
        if whole_row {
            w.extend(x.iter().map(|&v| (v - max).exp()));
        }
        let weight = |id: u32| -> f64 {
            if whole_row {
                w[id as usize] as f64
            } else {
                (x[id as usize] - max).exp() as f64
            }
        };
        let min_weight = p.min_p as f64;

        if p.top_k > 0 {
            top_ids_into(x, p.top_k, ids);
            if p.top_p < 1.0 {
                // Top-p over the top-k, renormalised.
                let need = p.top_p as f64 * ids.iter().map(|&id| weight(id)).sum::<f64>();
                truncate_to_mass(ids, &weight, need);
            }
        } else if p.top_p < 1.0 {
            let need = p.top_p as f64 * w.iter().map(|&v| v as f64).sum::<f64>();
            // Usually a few dozen tokens hold the nucleus; otherwise select on mass.
            top_ids_into(x, NUCLEUS_FIRST_TRY, ids);
            if !truncate_to_mass(ids, &weight, need) {
                nucleus_into(x, &weight, need, ids, rank_keys);
            }
        } else {
            // No truncation (min-p aside): walk the vocabulary by id, nothing to select.
            let kept = |id: u32| {
                if weight(id) >= min_weight {
                    weight(id)
                } else {
                    0.0
                }
            };
            let target = u * (0..x.len() as u32).map(kept).sum::<f64>();
            let mut acc = 0.0;
            let mut last = 0;
            for id in 0..x.len() as u32 {
                let k = kept(id);
                if k > 0.0 {
                    acc += k;
                    last = id;
                    if acc > target {
                        return id;
                    }
                }
            }
            return last;
        }
        // min-p never drops the most likely token (weight 1 ≥ min_p), so `ids` stays non-empty.
        if min_weight > 0.0 {
            ids.retain(|&id| weight(id) >= min_weight);
        }
        let target = u * ids.iter().map(|&id| weight(id)).sum::<f64>();
        let mut acc = 0.0;
        for &id in ids.iter() {
            acc += weight(id);
            if acc > target {
                return id;
            }
        }
        *ids.last()
            .expect("the most likely token is always a candidate")
    }
}

/// How many of the most likely tokens top-p looks at before selecting on mass.
const NUCLEUS_FIRST_TRY: usize = 64;

/// Cuts sorted `ids` after the shortest prefix whose weights reach `need`; false (and
/// `ids` unchanged) if the whole slice falls short.
fn truncate_to_mass(ids: &mut Vec<u32>, weight: &impl Fn(u32) -> f64, need: f64) -> bool {
    let mut acc = 0.0;
    match ids.iter().position(|&id| {
        acc += weight(id);
        acc >= need
    }) {
        Some(i) => {
            ids.truncate(i + 1);
            true
        }
        None => false,
    }
}

/// The nucleus: the shortest run of tokens, in [`rank_key`] order, whose weights sum to at
/// least `need`, into `ids` (in an order fixed by the logits, not sorted). A quickselect on
/// mass: partition around a pivot, keep the side holding the boundary, so the cost is
/// O(vocab) expected, not a sort of the vocabulary or of a nucleus of thousands of tokens.
fn nucleus_into(
    x: &[f32],
    weight_of: &impl Fn(u32) -> f64,
    need: f64,
    ids: &mut Vec<u32>,
    keys: &mut Vec<u64>,
) {
    const SORT_BELOW: usize = 64;
    keys.clear();
    keys.extend(
        x.iter()
            .enumerate()
            .map(|(id, &logit)| rank_key(logit, id as u32)),
    );
    let weight = |key: u64| weight_of(key_id(key));
    // `keys[..lo]` are in the nucleus (mass `acc`); the boundary lies in `keys[lo..hi]`.
    let (mut lo, mut hi, mut acc) = (0usize, keys.len(), 0.0f64);
    let end = loop {
        if hi - lo <= SORT_BELOW {
            keys[lo..hi].sort_unstable();
            let cut = keys[lo..hi].iter().position(|&k| {
                acc += weight(k);
                acc >= need
            });
            // If rounding leaves `need` just out of reach, the boundary is `hi`.
            break cut.map_or(hi, |i| lo + i + 1);
        }
        let (a, b, c) = (keys[lo], keys[lo + (hi - lo) / 2], keys[hi - 1]);
        let pivot = a.max(b).min(a.min(b).max(c)); // median of three
        let mut store = lo;
        for i in lo..hi {
            if keys[i] < pivot {
                keys.swap(i, store);
                store += 1;
            }
        }
        let at = (store..hi)
            .find(|&i| keys[i] == pivot)
            .expect("the pivot is in the range");
        keys.swap(store, at);
        let better_mass: f64 = keys[lo..store].iter().map(|&k| weight(k)).sum();
        if acc + better_mass >= need {
            hi = store;
        } else {
            acc += better_mass + weight(pivot);
            if acc >= need {
                break store + 1;
            }
            lo = store + 1;
        }
    };
    ids.clear();
    ids.extend(keys[..end].iter().map(|&k| key_id(k)));
}

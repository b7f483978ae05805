//! Log-probabilities and partial top-k selection over one row of logits.

use std::cmp::Ordering;

/// OpenAI's floor for a log-probability that is really minus infinity (JSON has no -inf).
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// Descending by logit, ties to the lower id: the order every truncation and the greedy
/// choice agree on. Logits must not be NaN (the sampler maps NaN to -inf first).
pub fn by_logit_desc(logits: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + '_ {
    move |&a, &b| rank_key(logits[a as usize], a).cmp(&rank_key(logits[b as usize], b))
}

/// A `u64` whose ascending order is [`by_logit_desc`] order: the logit's bits made
/// order-preserving and inverted in the high half, the id in the low half. Sorting and
/// selecting plain integers is several times faster than comparing through the logits.
#[inline]
pub fn rank_key(logit: f32, id: u32) -> u64 {
    let bits = (logit + 0.0).to_bits(); // + 0.0 turns -0.0 into +0.0: they tie
    let ordered = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ordered) << 32) | u64::from(id)
}

/// The id inside a [`rank_key`].
#[inline]
pub fn key_id(key: u64) -> u32 {
    key as u32
}

/// Below this many, [`top_ids_into`] keeps a sorted buffer in one pass over the logits
/// (almost every logit is rejected by one comparison with the buffer's worst entry).
const BUFFERED_TOP_MAX: usize = 128;

/// The `m` most likely ids in [`by_logit_desc`] order, into `out`: one pass with a small
/// sorted buffer, or for large `m` a partial selection then a sort of the `m` survivors;
/// never a sort of the vocabulary.
pub fn top_ids_into(logits: &[f32], m: usize, out: &mut Vec<u32>) {
    let m = m.min(logits.len());
    out.clear();
    if m == 0 {
        return;
    }
    if m <= BUFFERED_TOP_MAX {
        let mut best: Vec<u64> = Vec::with_capacity(m + 1);
        for (id, &logit) in logits.iter().enumerate() {
            let key = rank_key(logit, id as u32);
            if best.len() == m {
                if key >= best[m - 1] {
                    continue;
                }
                best.pop();
            }
            let at = best.partition_point(|&k| k < key);
            best.insert(at, key);
        }
        out.extend(best.into_iter().map(key_id));
    } else {
        let mut keys: Vec<u64> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| rank_key(l, id as u32))
            .collect();
        if m < keys.len() {
            keys.select_nth_unstable(m - 1);
            keys.truncate(m);
        }
        keys.sort_unstable();
        out.extend(keys.into_iter().map(key_id));
    }
}

/// The lowest id among the largest logits.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log Σ exp(x)`: exponentials in f32 (each term is at most 1), summed in f64.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = logits.iter().map(|&v| (v - max).exp() as f64).sum();
    max as f64 + sum.ln()
}

/// `logit - log_sum_exp`, floored at [`LOGPROB_FLOOR`].
pub fn logprob(logit: f32, log_sum_exp: f64) -> f32 {
    let lp = (logit as f64 - log_sum_exp) as f32;
    if lp.is_nan() {
        LOGPROB_FLOOR
    } else {
        lp.max(LOGPROB_FLOOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_ids_break_ties_to_lower_ids() {
        let logits = [1.0, 3.0, 2.0, 3.0, -1.0, 3.0];
        let mut out = Vec::new();
        top_ids_into(&logits, 4, &mut out);
        assert_eq!(out, vec![1, 3, 5, 2]);
        top_ids_into(&logits, 10, &mut out);
        assert_eq!(out, vec![1, 3, 5, 2, 0, 4]);
        assert_eq!(argmax(&logits), 1);
    }

    #[test]
    fn rank_keys_order_like_the_comparator() {
        let logits = [
            0.0f32,
            -0.0,
            1.5,
            f32::NEG_INFINITY,
            -2.0,
            1.5,
            f32::INFINITY,
            -1e-30,
        ];
        let cmp = by_logit_desc(&logits);
        for a in 0..logits.len() as u32 {
            for b in 0..logits.len() as u32 {
                let by_key = rank_key(logits[a as usize], a).cmp(&rank_key(logits[b as usize], b));
                let by_value = logits[b as usize]
                    .partial_cmp(&logits[a as usize])
                    .unwrap()
                    .then(a.cmp(&b));
                assert_eq!(by_key, by_value, "{a} vs {b}");
                assert_eq!(cmp(&a, &b), by_value);
            }
        }
        let mut large = Vec::new();
        top_ids_into(&logits, 200, &mut large);
        let mut small = Vec::new();
        top_ids_into(&logits, 8, &mut small);
        assert_eq!(large, small);
        assert_eq!(small, vec![6, 2, 5, 0, 1, 7, 4, 3]);
    }

    #[test]
    fn logprobs_normalise() {
        let logits = [0.5f32, -1.0, 2.0, 0.0];
        let lse = log_sum_exp(&logits);
        let total: f64 = logits.iter().map(|&l| (logprob(l, lse) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(logprob(f32::NEG_INFINITY, lse), LOGPROB_FLOOR);
    }
}

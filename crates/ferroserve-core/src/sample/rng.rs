//! A counter-based random generator: draw `k` of stream `s` is a pure function of
//! `(seed, s, k)`. A sequence's `k`-th sampled token therefore uses the same random number
//! whatever else shares its batch, however often it was preempted and recomputed, and with
//! no generator state to carry around or to share between requests.

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer whose
/// outputs pass BigCrush for consecutive inputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRng {
    key: u64,
}

impl CounterRng {
    /// `stream` separates the `n` choices of one request that share its seed.
    pub fn new(seed: u64, stream: u64) -> Self {
        Self {
            key: mix64(seed ^ mix64(stream.wrapping_add(0x9E37_79B9_7F4A_7C15))),
        }
    }

    pub fn next_u64_at(&self, counter: u64) -> u64 {
        mix64(
            self.key
                ^ mix64(
                    counter
                        .wrapping_mul(0xD1B5_4A32_D192_ED03)
                        .wrapping_add(0x632B_E59B_D9B4_E019),
                ),
        )
    }

    /// Uniform in `[0, 1)`, 53 bits.
    pub fn uniform_at(&self, counter: u64) -> f64 {
        (self.next_u64_at(counter) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_enough_and_streams_differ() {
        let rng = CounterRng::new(42, 0);
        let n = 100_000;
        let mean = (0..n).map(|k| rng.uniform_at(k)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mut buckets = [0u32; 10];
        for k in 0..n {
            buckets[(rng.uniform_at(k) * 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (9_000..11_000).contains(&b)),
            "{buckets:?}"
        );
        assert_ne!(CounterRng::new(42, 1).uniform_at(0), rng.uniform_at(0));
        assert_ne!(CounterRng::new(43, 0).uniform_at(0), rng.uniform_at(0));
        assert_eq!(CounterRng::new(42, 0).uniform_at(7), rng.uniform_at(7));
    }
}

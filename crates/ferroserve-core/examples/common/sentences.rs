//! Synthetic sentences for the embedding benchmarks (shared by `embed_bench` and
//! `opencl_embed_bench` through `#[path]`): 10–20 words from a small vocabulary, from a fixed
//! xorshift seed, so every run and both benchmarks see the same token streams.

use ferroserve_core::tokenize::bert::EncoderTokenizer;

pub fn synthetic_sentences(tok: &EncoderTokenizer, count: usize) -> Vec<Vec<u32>> {
    let words = [
        "the", "quick", "server", "batches", "requests", "into", "one", "forward", "pass", "while", "kernels", "stream", "weights", "from", "memory", "and", "tokens", "flow",
        "back", "to", "clients",
    ];
    let mut seed = 12345u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..count)
        .map(|_| {
            let n = 10 + (next() % 11) as usize;
            let s: Vec<&str> = (0..n).map(|_| words[(next() % words.len() as u64) as usize]).collect();
            tok.encode(&s.join(" ")).unwrap()
        })
        .collect()
}

//! A model repacked at load must not also keep its file's form resident: the kernels read the
//! panels only, so the GGUF's pages are dropped from the process's RSS after packing
//! (`GgufFile::release_resident`), and the embedding rows a forward pass gathers are read from
//! the file, not through the map (`GgufFile::read_copy`). Its own test binary, so the file is
//! mapped once here.

mod common;

use ferroserve_core::models::llama::{LlamaModel, Numerics};
use ferroserve_core::sched::SeqChunk;

/// Resident kB of this process's mappings of `path` (from /proc/self/smaps).
fn resident_kb_of(path: &std::path::Path) -> u64 {
    let path = path.canonicalize().unwrap();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_file = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(first) = line.split_whitespace().next() {
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                in_file = line.split_whitespace().nth(5).is_some_and(|p| std::path::Path::new(p) == path);
                continue;
            }
        }
        if in_file {
            if let Some(kb) = line.strip_prefix("Rss:") {
                total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
            }
        }
    }
    total
}

/// One test, not two: the tests of a binary run in parallel threads, and a second model
/// loading beside this one would hold its file's pages while it packs.
#[test]
fn a_repacked_model_does_not_keep_its_file_resident() {
    let path = common::smollm2_gguf();
    let file_kb = std::fs::metadata(&path).unwrap().len() / 1024;
    let model = LlamaModel::load_with(&path, Numerics::Fast).unwrap_or_else(|e| panic!("{e}"));
    let fast_kb = resident_kb_of(&path);
    // What stays is the norms and whatever shares a page with them: a few percent of the
    // file. Before the release, packing had read (and kept) all of it.
    assert!(fast_kb * 5 < file_kb, "fast model keeps {fast_kb} kB of the {file_kb} kB file resident");

    // Then a prompt of tokens from all over the vocabulary: gathered through the map, their
    // embedding rows brought the (tied, already packed) table back, 64 KiB around each row.
    let vocab = model.vocab_size() as u32;
    let tokens: Vec<u32> = (0..512).map(|i| i * (vocab / 512)).collect();
    let table_kb = model.gguf().tensor("token_embd.weight").unwrap().bytes.len() as u64 / 1024;
    let mut kv = model.new_kv_cache(16 << 20).unwrap();
    let blocks: Vec<u32> = (0..tokens.len().div_ceil(kv.block_tokens())).map(|_| kv.allocate().unwrap()).collect();
    let logits = model.forward(&[SeqChunk { tokens: &tokens, start_pos: 0, block_table: &blocks, want_logits: true }], &mut kv);
    assert_eq!(logits.len(), model.vocab_size());
    let after_kb = resident_kb_of(&path);
    assert!(
        after_kb.saturating_sub(fast_kb) * 10 < table_kb,
        "embedding gathers made {} kB of the file resident (the table is {table_kb} kB)",
        after_kb.saturating_sub(fast_kb)
    );
}

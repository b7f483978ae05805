//! Fakes for the scheduler and engine tests: a KV pool with the real cache's rules whose
//! "KV" is the token ids written there, a byte vocabulary and a model whose logits hash the
//! context it reads back through the block tables (so any block-table, prefix-cache or
//! preemption mistake changes the output or trips an assertion).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferroserve_core::engine::StepModel;
use ferroserve_core::kv::BlockHash;
use ferroserve_core::sched::scheduler::{BlockTable, KvPool, ReleaseBlocks, SeqChunk};
use ferroserve_core::tokenize::detok::Vocab;

/// A KV pool with the real cache's rules (refcounts, LRU reuse of freed registered blocks,
/// eviction on reuse) whose slots hold the token written there. The counts are shared with
/// the block tables, which release into them when dropped.
pub struct FakeKv {
    pub block_tokens: usize,
    pub books: Arc<SharedBooks>,
    pub slots: Vec<Option<u32>>,
}

pub struct FakeBooks {
    pub refcounts: Vec<u32>,
    /// Free blocks, next to reuse first.
    pub free: VecDeque<u32>,
    pub by_hash: HashMap<BlockHash, u32>,
    pub hash_of: Vec<Option<BlockHash>>,
}

pub struct SharedBooks(Mutex<FakeBooks>);

impl ReleaseBlocks for SharedBooks {
    fn release_blocks(&self, blocks: &[u32]) {
        let mut books = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for &block in blocks {
            let count = &mut books.refcounts[block as usize];
            assert!(*count > 0, "double release of block {block}");
            *count -= 1;
            if *count == 0 {
                if books.hash_of[block as usize].is_some() {
                    books.free.push_back(block);
                } else {
                    books.free.push_front(block);
                }
            }
        }
    }
}

impl FakeKv {
    pub fn new(num_blocks: usize, block_tokens: usize) -> Self {
        let books = FakeBooks {
            refcounts: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; num_blocks],
        };
        Self { block_tokens, books: Arc::new(SharedBooks(Mutex::new(books))), slots: vec![None; num_blocks * block_tokens] }
    }

    pub fn books(&self) -> std::sync::MutexGuard<'_, FakeBooks> {
        self.books.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn refcount(&self, block: u32) -> u32 {
        self.books().refcounts[block as usize]
    }

    pub fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        let block = block_table[pos / self.block_tokens];
        assert!(
            self.refcount(block) > 0,
            "position {pos} is in free block {block}"
        );
        block as usize * self.block_tokens + pos % self.block_tokens
    }
}

impl KvPool for FakeKv {
    fn block_tokens(&self) -> usize {
        self.block_tokens
    }
    fn num_blocks(&self) -> usize {
        self.books().refcounts.len()
    }
    fn num_free_blocks(&self) -> usize {
        self.books().free.len()
    }
    fn allocate(&mut self) -> Option<u32> {
        let mut books = self.books();
        let block = books.free.pop_front()?;
        if let Some(hash) = books.hash_of[block as usize].take() {
            books.by_hash.remove(&hash);
        }
        books.refcounts[block as usize] = 1;
        drop(books);
        let bt = self.block_tokens;
        self.slots[block as usize * bt..(block as usize + 1) * bt].fill(None);
        Some(block)
    }
    fn retain(&mut self, block: u32) {
        let mut books = self.books();
        assert!(books.refcounts[block as usize] > 0);
        books.refcounts[block as usize] += 1;
    }
    fn block_table(&self) -> BlockTable {
        BlockTable::new(self.books.clone())
    }
    fn lookup_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        let mut blocks = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_tokens) {
            let hash = self.block_hash(parent, chunk);
            let mut books = self.books();
            let Some(&block) = books.by_hash.get(&hash) else {
                break;
            };
            if books.refcounts[block as usize] == 0 {
                books.free.retain(|&b| b != block);
            }
            books.refcounts[block as usize] += 1;
            blocks.push(block);
            parent = Some(hash);
        }
        blocks
    }
    fn register_full_block(&mut self, hash: BlockHash, block: u32) {
        let start = block as usize * self.block_tokens;
        assert!(
            self.slots[start..start + self.block_tokens]
                .iter()
                .all(Option::is_some),
            "registered block {block} is not full"
        );
        let mut books = self.books();
        if books.hash_of[block as usize].is_none() && !books.by_hash.contains_key(&hash) {
            books.by_hash.insert(hash, block);
            books.hash_of[block as usize] = Some(hash);
        }
    }
}

pub const VOCAB: usize = 64;
pub const EOS: u32 = 63;
/// A token whose presence in a batch makes the fake model panic.
pub const POISON: u32 = 62;
pub const BLOCK_TOKENS: usize = 4;
pub const BLOCK_BYTES: usize = 1024;

/// Token texts: letters, a space, UTF-8 characters split over tokens, and an EOS.
pub fn fake_token_bytes() -> Vec<Vec<u8>> {
    let mut t: Vec<Vec<u8>> = (b'a'..=b'z').map(|c| vec![c]).collect(); // 0..=25
    t.push(b" ".to_vec()); // 26
    t.push(vec![0xC3]); // 27: "é" = C3 A9
    t.push(vec![0xA9]); // 28
    t.push(vec![0xE2]); // 29: "€" = E2 82 AC
    t.push(vec![0x82, 0xAC]); // 30
    t.push(vec![0xF0, 0x9F]); // 31: "😀" = F0 9F 98 80
    t.push(vec![0x98, 0x80]); // 32
    t.push(b"\n".to_vec()); // 33
    while t.len() < EOS as usize {
        let i = t.len() as u8;
        t.push(vec![b'A' + (i % 26), b'0' + (i % 10)]);
    }
    t.push(b"<eos>".to_vec()); // 63
    t
}

pub struct FakeVocab {
    pub bytes: Vec<Vec<u8>>,
    pub eos: Vec<u32>,
}

impl Vocab for FakeVocab {
    fn vocab_size(&self) -> usize {
        self.bytes.len()
    }
    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(Vec::as_slice)
    }
    fn is_special(&self, id: u32) -> bool {
        id == EOS
    }
    fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Pseudo-random logits from a hash of the whole context (read back from the cache).
    ContextHash,
    /// The next token is the last one plus one (wrapping below EOS): scripted text.
    Successor,
}

pub struct FakeModel {
    pub vocab: FakeVocab,
    pub logits: Logits,
    pub context_length: usize,
    /// Tokens per forward pass, for assertions on batch shapes.
    pub batch_tokens: Arc<Mutex<Vec<usize>>>,
    /// Time each pass takes (to keep requests in flight while a test pokes at them).
    pub step_delay: Duration,
}

impl FakeModel {
    pub fn new(logits: Logits) -> Self {
        Self {
            vocab: FakeVocab {
                bytes: fake_token_bytes(),
                eos: vec![EOS],
            },
            logits,
            context_length: 4096,
            batch_tokens: Arc::default(),
            step_delay: Duration::ZERO,
        }
    }
}

pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl StepModel for FakeModel {
    type Kv = FakeKv;
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn context_length(&self) -> usize {
        self.context_length
    }
    fn new_kv_cache(&self, budget_bytes: usize) -> ferroserve_core::error::Result<FakeKv> {
        Ok(FakeKv::new(budget_bytes / BLOCK_BYTES, BLOCK_TOKENS))
    }
    fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut FakeKv) -> Vec<f32> {
        self.batch_tokens
            .lock()
            .unwrap()
            .push(batch.iter().map(|c| c.tokens.len()).sum());
        std::thread::sleep(self.step_delay);
        let mut out = Vec::new();
        for chunk in batch {
            assert!(!chunk.tokens.contains(&POISON), "poisoned batch");
            for (i, &t) in chunk.tokens.iter().enumerate() {
                let pos = chunk.start_pos + i;
                let slot = kv.slot(chunk.block_table, pos);
                let block = chunk.block_table[pos / BLOCK_TOKENS];
                assert_eq!(
                    kv.refcount(block), 1,
                    "write into shared block {block}"
                );
                kv.slots[slot] = Some(t);
            }
            if !chunk.want_logits {
                continue;
            }
            let last = chunk.start_pos + chunk.tokens.len() - 1;
            let context: Vec<u32> = (0..=last)
                .map(|p| {
                    kv.slots[kv.slot(chunk.block_table, p)]
                        .unwrap_or_else(|| panic!("position {p} was never computed"))
                })
                .collect();
            match self.logits {
                Logits::ContextHash => {
                    let h = context
                        .iter()
                        .fold(0x1234_5678u64, |h, &t| mix64(h ^ t as u64));
                    out.extend((0..VOCAB as u64).map(|v| {
                        if v == POISON as u64 {
                            -100.0
                        } else {
                            (mix64(h ^ (v << 32)) % 1000) as f32 / 150.0
                        }
                    }));
                }
                Logits::Successor => {
                    let next = (context[last] + 1) % (EOS - 1);
                    out.extend((0..VOCAB as u32).map(|v| if v == next { 10.0 } else { 0.0 }));
                }
            }
        }
        out
    }
    fn vocab(&self) -> &dyn Vocab {
        &self.vocab
    }
}

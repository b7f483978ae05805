//! The paged KV cache's books: fixed-size blocks of token slots handed out by a pool with
//! reference counts, and a prefix cache that lets sequences with a common prompt prefix share
//! its full blocks. The K and V storage itself lives in the backend's memory, which the model
//! owns (`models::llama::LlamaKv`); this module decides only which block holds what.
//!
//! A sequence owns a *block table* ([`BlockTable`]: its block ids in position order; position
//! `p` lives in slot `p % block_tokens` of block `table[p / block_tokens]`). The scheduler
//! fills the tables from [`KvCache::allocate`] and [`KvCache::lookup_prefix`]; a table gives
//! its blocks back to the pool when it is dropped (a sequence finished, cancelled, preempted,
//! or dropped with the scheduler), so each block is released exactly once without anyone
//! calling [`KvCache::release`]. The model reads and writes the blocks through the tables it
//! is given ([`crate::sched::SeqChunk`]).
//!
//! Prefix caching (as vLLM's): when a block fills up, the scheduler registers it under the
//! hash of the whole token prefix it ends ([`KvCache::register_full_block`],
//! [`BlockHash::chain`]). A new prompt first asks [`KvCache::lookup_prefix`] for the blocks
//! of its longest registered full-block prefix and computes only the rest. A released block
//! keeps its contents and registration while it waits in the free list; free blocks that hold
//! nothing registered are reused first, then registered ones, least recently freed first, and
//! a registered block is forgotten only when it is reused.
//!
//! The backends store IEEE half precision (as llama.cpp's default cache),
//! `[block][kv_head][head_dim][block_tokens]` for K and `[block][kv_head][block_tokens]
//! [head_dim]` for V (see [`PagedKvLayout`] for why): batched decode streams the cache of
//! every sequence each step, as many bytes as the weights at a few hundred tokens of
//! context per sequence, so halving them matters; widening is exact and one instruction.

mod block_pool;
mod prefix_cache;

pub use prefix_cache::BlockHash;
/// The storage contract of the cache (where a token's K and V go), shared with every device's kernels.
pub use ferroserve_kernels::kv_layout::PagedKvLayout;

use std::sync::{Arc, Mutex, MutexGuard};

use block_pool::BlockPool;
use prefix_cache::PrefixCache;

/// Bytes per stored K or V value (an f16).
const ELEM_BYTES: usize = std::mem::size_of::<u16>();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Token slots per block; a positive multiple of 16 (the attention kernel scores keys
    /// sixteen at a time).
    pub block_tokens: usize,
    pub num_blocks: usize,
}

impl KvCacheConfig {
    /// Blocks of `block_tokens` slots, as many as fit in `budget_bytes` (K and V of every layer).
    pub fn for_budget(budget_bytes: usize, block_tokens: usize, layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let num_blocks = budget_bytes / KvCache::block_bytes(block_tokens, layers, kv_heads, head_dim).max(1);
        KvCacheConfig { block_tokens, num_blocks }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvUsage {
    /// Blocks held by at least one sequence.
    pub used_blocks: usize,
    pub total_blocks: usize,
}

/// What a [`BlockTable`] gives its blocks back to when it is dropped.
pub trait ReleaseBlocks: Send + Sync {
    /// One holder fewer for each of `blocks`.
    fn release_blocks(&self, blocks: &[u32]);
}

/// A sequence's KV blocks in position order, each holding one reference it releases when the
/// table is dropped (or shortened): whoever owns the table owns the blocks.
pub struct BlockTable {
    blocks: Vec<u32>,
    pool: Arc<dyn ReleaseBlocks>,
}

impl BlockTable {
    /// An empty table whose blocks will go back to `pool`.
    pub fn new(pool: Arc<dyn ReleaseBlocks>) -> Self {
        BlockTable { blocks: Vec::new(), pool }
    }

    /// Takes over one reference to `block` (from an allocation or a prefix lookup).
    pub fn push(&mut self, block: u32) {
        self.blocks.push(block);
    }

    /// Keeps the first `len` blocks and releases the rest.
    pub fn truncate(&mut self, len: usize) {
        if len < self.blocks.len() {
            self.pool.release_blocks(&self.blocks[len..]);
            self.blocks.truncate(len);
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.truncate(0);
    }
}

impl std::fmt::Debug for BlockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.blocks).finish()
    }
}

/// The reference counts and the prefix cache, shared with the block tables that release into
/// them (only the scheduler's thread takes the lock: it is never contended).
#[derive(Debug)]
struct Books {
    pool: BlockPool,
    prefix: PrefixCache,
}

impl Books {
    fn shared(num_blocks: usize) -> Arc<Mutex<Books>> {
        Arc::new(Mutex::new(Books { pool: BlockPool::new(num_blocks), prefix: PrefixCache::new(num_blocks) }))
    }

    fn release(&mut self, block: u32) {
        let keep = self.prefix.is_registered(block);
        self.pool.release(block, keep);
    }
}

impl ReleaseBlocks for Mutex<Books> {
    fn release_blocks(&self, blocks: &[u32]) {
        let mut books = self.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for &block in blocks {
            books.release(block);
        }
    }
}

pub struct KvCache {
    cfg: KvCacheConfig,
    layout: PagedKvLayout,
    layers: usize,
    books: Arc<Mutex<Books>>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("cfg", &self.cfg)
            .field("layers", &self.layers)
            .field("layout", &self.layout)
            .field("free_blocks", &self.num_free_blocks())
            .field("registered_blocks", &self.num_cached_blocks())
            .finish()
    }
}

impl KvCache {
    /// The books for `cfg.num_blocks` blocks of `layers` layers; the storage they describe is
    /// the model's (its backend allocates it from [`KvCache::layout`]). Panics if
    /// `block_tokens` is not a positive multiple of 16 or a dimension is zero.
    pub fn new(cfg: KvCacheConfig, layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let layout = PagedKvLayout::new(cfg.block_tokens, kv_heads, head_dim);
        KvCache { cfg, layout, layers, books: Books::shared(cfg.num_blocks) }
    }

    /// Bytes one block takes across all layers, K and V.
    pub fn block_bytes(block_tokens: usize, layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * layers * block_tokens * kv_heads * head_dim * ELEM_BYTES
    }

    pub fn config(&self) -> KvCacheConfig {
        self.cfg
    }

    pub fn block_tokens(&self) -> usize {
        self.cfg.block_tokens
    }

    pub fn num_blocks(&self) -> usize {
        self.cfg.num_blocks
    }

    pub fn num_layers(&self) -> usize {
        self.layers
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        // A panic while the lock was held left the counts consistent (every change is one
        // step), so a poisoned lock is still usable.
        self.books.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks no sequence holds (some may still serve prefix-cache hits until reused).
    pub fn num_free_blocks(&self) -> usize {
        self.books().pool.num_free()
    }

    /// Blocks registered in the prefix cache, in use or free.
    pub fn num_cached_blocks(&self) -> usize {
        self.books().prefix.len()
    }

    pub fn usage(&self) -> KvUsage {
        let books = self.books();
        KvUsage { used_blocks: books.pool.num_blocks() - books.pool.num_free(), total_blocks: books.pool.num_blocks() }
    }

    /// An empty block table whose blocks return to this cache when it is dropped.
    pub fn block_table(&self) -> BlockTable {
        BlockTable::new(self.books.clone())
    }

    /// A free block with a reference count of one, or `None` when all are in use. Reusing a
    /// block that was registered in the prefix cache forgets its registration.
    pub fn allocate(&mut self) -> Option<u32> {
        let mut books = self.books();
        let block = books.pool.peek_free()?;
        books.prefix.evict(block);
        books.pool.take()
    }

    /// One more holder of an allocated block (a sequence sharing it). Panics on a free block:
    /// free blocks are revived only through [`KvCache::lookup_prefix`].
    pub fn retain(&mut self, block: u32) {
        let mut books = self.books();
        assert!(books.pool.refcount(block) > 0, "retain of free KV block {block}");
        books.pool.retain(block);
    }

    /// One holder fewer; at zero the block is free (and stays findable by its prefix hash,
    /// if registered, until reused). Panics when the count is already zero. Blocks held in a
    /// [`BlockTable`] are released by dropping it instead.
    pub fn release(&mut self, block: u32) {
        self.books().release(block);
    }

    /// Registers a block whose `block_tokens` slots are all written under `hash` (its
    /// [`BlockHash::chain`] entry), so later prompts with the same prefix can reuse it. A
    /// hash already registered keeps its first block.
    pub fn register_full_block(&mut self, hash: BlockHash, block: u32) {
        assert!((block as usize) < self.num_blocks(), "block {block} is outside the cache");
        self.books().prefix.register(hash, block);
    }

    /// The hashes of the full blocks of `tokens` (a sequence's tokens from position 0).
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        BlockHash::chain(tokens, self.cfg.block_tokens)
    }

    /// The blocks of the longest registered full-block prefix of `tokens`, each retained
    /// for the caller (release them like allocated ones). Pass a prompt without its last
    /// token, so that at least one token is left to compute and yield logits.
    pub fn lookup_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        let mut books = self.books();
        let mut blocks = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.cfg.block_tokens) {
            let hash = BlockHash::of(parent, chunk);
            let Some(block) = books.prefix.get(&hash) else { break };
            books.pool.retain(block);
            blocks.push(block);
            parent = Some(hash);
        }
        blocks
    }

    /// How the model's kernels address the blocks.
    pub fn layout(&self) -> PagedKvLayout {
        self.layout
    }
}

/// The scheduler's `KvPool` is implemented over `AsRef`/`AsMut<KvCache>`: the cache itself,
/// and a model's cache wrapping it with the K and V storage.
impl AsRef<KvCache> for KvCache {
    fn as_ref(&self) -> &KvCache {
        self
    }
}

impl AsMut<KvCache> for KvCache {
    fn as_mut(&mut self) -> &mut KvCache {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(num_blocks: usize) -> KvCache {
        KvCache::new(KvCacheConfig { block_tokens: 16, num_blocks }, 2, 3, 64)
    }

    #[test]
    fn budget_sizes_the_pool() {
        let per_block = KvCache::block_bytes(16, 30, 3, 64);
        assert_eq!(per_block, 2 * 30 * 16 * 3 * 64 * 2);
        let kv = KvCache::new(KvCacheConfig::for_budget(10 * per_block + per_block / 2, 16, 30, 3, 64), 30, 3, 64);
        assert_eq!((kv.num_blocks(), kv.num_free_blocks(), kv.num_layers()), (10, 10, 30));
        assert_eq!(KvCacheConfig::for_budget(per_block - 1, 16, 30, 3, 64).num_blocks, 0);
    }

    #[test]
    fn allocate_release_and_usage() {
        let mut kv = cache(3);
        let a = kv.allocate().unwrap();
        let b = kv.allocate().unwrap();
        kv.retain(a);
        assert_eq!(kv.usage(), KvUsage { used_blocks: 2, total_blocks: 3 });
        kv.release(a);
        kv.release(b);
        assert_eq!(kv.num_free_blocks(), 2, "a is still held once");
        kv.release(a);
        assert_eq!(kv.usage(), KvUsage { used_blocks: 0, total_blocks: 3 });
        assert!(kv.allocate().is_some() && kv.allocate().is_some() && kv.allocate().is_some());
        assert_eq!(kv.allocate(), None);
    }

    #[test]
    fn prefix_hits_share_and_survive_release() {
        let mut kv = cache(4);
        let prompt: Vec<u32> = (0..40).collect(); // two full blocks and a partial one
        let hashes = kv.block_hashes(&prompt);
        assert_eq!(hashes.len(), 2);
        let blocks: Vec<u32> = (0..3).map(|_| kv.allocate().unwrap()).collect();
        kv.register_full_block(hashes[0], blocks[0]);
        kv.register_full_block(hashes[1], blocks[1]);

        // A second sequence with the same first 32 tokens shares both full blocks.
        let mut other = prompt[..32].to_vec();
        other.extend([7, 7, 7]);
        assert_eq!(kv.lookup_prefix(&other), &blocks[..2]);
        // A prompt differing in the first block shares nothing.
        let mut different = prompt.clone();
        different[3] = 99;
        assert!(kv.lookup_prefix(&different).is_empty());

        // Everyone lets go: the blocks are free, yet still found (and revived) by prefix.
        for &b in blocks.iter().chain(&blocks[..2]) {
            kv.release(b);
        }
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.lookup_prefix(&prompt[..39]), &blocks[..2]);
        assert_eq!(kv.num_free_blocks(), 2);
        for &b in &blocks[..2] {
            kv.release(b);
        }

        // Unregistered free blocks are reused before registered ones, and reusing a
        // registered block forgets it: the first two allocations take the plain blocks.
        let plain: Vec<u32> = (0..2).map(|_| kv.allocate().unwrap()).collect();
        assert!(!plain.contains(&blocks[0]) && !plain.contains(&blocks[1]), "{plain:?}");
        assert_eq!(kv.lookup_prefix(&prompt).len(), 2);
        for b in kv.lookup_prefix(&prompt) {
            kv.release(b);
        }
        for &b in &blocks[..2] {
            kv.release(b);
        }
        // Now a third allocation evicts the least recently freed registered block (the first).
        let reused = kv.allocate().unwrap();
        assert_eq!(reused, blocks[0]);
        assert!(kv.lookup_prefix(&prompt).is_empty(), "the chain is broken at its first block");
        assert_eq!(kv.num_cached_blocks(), 1);
    }

    #[test]
    fn a_block_table_releases_its_blocks_once_when_dropped_or_shortened() {
        let mut kv = cache(4);
        let mut table = kv.block_table();
        for _ in 0..3 {
            let b = kv.allocate().unwrap();
            table.push(b);
        }
        kv.retain(table.ids()[0]); // shared with someone else
        assert_eq!(kv.num_free_blocks(), 1);
        table.truncate(1);
        assert_eq!((table.len(), kv.num_free_blocks()), (1, 3));
        drop(table);
        assert_eq!(kv.num_free_blocks(), 3, "the shared block is still held once");
        kv.release(0);
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    #[should_panic(expected = "retain of free KV block")]
    fn retaining_a_free_block_panics() {
        let mut kv = cache(1);
        kv.retain(0);
    }
}

//! Which full KV blocks hold which token prefixes.
//!
//! A full block is named by a hash chain: `hash(parent's hash, the block's tokens)`, so one
//! hash stands for the block's whole prefix from position 0 and equal hashes mean equal KV
//! contents (positions included). The hash is 128 bits (two independent SipHash-1-3 runs),
//! which makes an accidental collision — silently reusing another prompt's KV — far less
//! likely than a hardware fault.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The hash of a full block's whole token prefix (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// The hash of the block holding `tokens` after the block hashed `parent` (`None` for
    /// the first block of a sequence).
    pub fn of(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let half = |salt: u64| {
            // `DefaultHasher::new()` has fixed keys: the same input hashes the same way for
            // the life of the process, which is all an in-memory cache needs.
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            parent.map(|p| p.0).hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        BlockHash((u128::from(half(0x6b76_5f68_6173_6831)) << 64) | u128::from(half(0x6b76_5f68_6173_6832)))
    }

    /// The chain of hashes of the full blocks of `tokens` (`block_tokens` tokens each); a
    /// partial last block has none.
    pub fn chain(tokens: &[u32], block_tokens: usize) -> Vec<BlockHash> {
        let mut parent = None;
        tokens
            .chunks_exact(block_tokens)
            .map(|block| {
                let h = BlockHash::of(parent, block);
                parent = Some(h);
                h
            })
            .collect()
    }
}

/// Hash → block and block → hash for registered blocks, in use or free.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrefixCache {
    by_hash: HashMap<BlockHash, u32>,
    /// Indexed by block id.
    of_block: Vec<Option<BlockHash>>,
}

impl PrefixCache {
    pub(crate) fn new(num_blocks: usize) -> Self {
        PrefixCache { by_hash: HashMap::new(), of_block: vec![None; num_blocks] }
    }

    pub(crate) fn get(&self, hash: &BlockHash) -> Option<u32> {
        self.by_hash.get(hash).copied()
    }

    pub(crate) fn is_registered(&self, block: u32) -> bool {
        self.of_block[block as usize].is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Registers `block` under `hash`, unless the hash already names a block (then the
    /// first one stays, and `block` remains private to its sequence) or the block already
    /// has a hash (its contents cannot change while it is in use). Returns whether it did.
    pub(crate) fn register(&mut self, hash: BlockHash, block: u32) -> bool {
        if self.of_block[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return false;
        }
        self.by_hash.insert(hash, block);
        self.of_block[block as usize] = Some(hash);
        true
    }

    /// Forgets `block` (it is being reused for other tokens).
    pub(crate) fn evict(&mut self, block: u32) {
        if let Some(hash) = self.of_block[block as usize].take() {
            self.by_hash.remove(&hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_and_differ() {
        let a = BlockHash::of(None, &[1, 2, 3]);
        assert_eq!(a, BlockHash::of(None, &[1, 2, 3]));
        assert_ne!(a, BlockHash::of(None, &[1, 2, 4]));
        // Same tokens after a different prefix: a different block.
        assert_ne!(BlockHash::of(Some(a), &[5, 6]), BlockHash::of(None, &[5, 6]));
        let chain = BlockHash::chain(&[1, 2, 3, 4, 5, 6, 7], 3);
        assert_eq!(chain, [a, BlockHash::of(Some(a), &[4, 5, 6])]);
    }

    #[test]
    fn register_and_evict() {
        let mut c = PrefixCache::new(3);
        let h = BlockHash::of(None, &[9]);
        assert!(c.register(h, 1));
        assert!(!c.register(h, 2), "a second block with the same hash stays private");
        assert!(!c.register(BlockHash::of(None, &[8]), 1), "a block keeps its first hash");
        assert_eq!((c.get(&h), c.is_registered(1), c.is_registered(2)), (Some(1), true, false));
        c.evict(1);
        assert_eq!((c.get(&h), c.is_registered(1), c.len()), (None, false, 0));
    }
}

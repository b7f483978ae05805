//! The paged KV cache's storage contract, shared by every device that runs attention over it
//! (the CPU kernels in [`crate::cpu::llama_ops`], the OpenCL kernels, and the engine's block
//! pool in `ferroserve-core`'s `kv` module, which re-exports it). Only the layout lives here;
//! each device writes and reads it with its own kernels.

/// Score lanes of the attention kernels: `block_tokens` is a multiple of this.
pub const KV_LANES: usize = 16;

/// How a layer's K and V caches are laid out: IEEE half floats (as llama.cpp's default cache:
/// half the bytes to stream per attention step, widened exactly by one instruction), in
/// `num_blocks` blocks of `block_tokens` token slots; within a block, per KV head,
/// - K transposed, `[head_dim][block_tokens]`, so that scoring a query against sixteen keys is
///   sixteen independent lanes (no horizontal sums);
/// - V as rows, `[block_tokens][head_dim]`, so that the weighted sum is unit-stride.
///
/// A block of one layer's K cache is `kv_heads · head_dim · block_tokens` halves, the KV head
/// outermost; V alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    /// A multiple of 16 (the score lanes).
    pub block_tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PagedKvLayout {
    pub fn new(block_tokens: usize, kv_heads: usize, head_dim: usize) -> Self {
        assert!(
            block_tokens > 0 && block_tokens.is_multiple_of(KV_LANES),
            "block_tokens {block_tokens} must be a positive multiple of {KV_LANES}"
        );
        assert!(kv_heads > 0 && head_dim > 0, "kv_heads and head_dim must be positive");
        PagedKvLayout { block_tokens, kv_heads, head_dim }
    }

    /// Values (halves) of one block in one layer's K (or V) cache.
    pub fn block_elems(&self) -> usize {
        self.block_tokens * self.kv_heads * self.head_dim
    }
}

/* Stores the step's K and V rows (f32) into the paged f16 cache, rounded to nearest even,
 * as the CPU's PagedKvLayout::write_token (bitwise equal). Layout: see common.h.
 *
 * k, v:          rows * kv_heads * head_dim floats
 * slot_mapping:  rows uints, block * block_tokens + slot of each row's position
 * k_cache, v_cache: one layer's caches, num_blocks * kv_heads * head_dim * block_tokens halves
 * Global size: (kv_heads * head_dim, rows).
 */
#include "common.h"

__kernel void kv_write_f16_f32(const __global float *k, const __global float *v,
                               const __global uint *slot_mapping, __global half *k_cache,
                               __global half *v_cache, const uint kv_heads, const uint head_dim,
                               const uint block_tokens) {
    const uint i = get_global_id(0);
    const uint r = get_global_id(1);
    const uint width = kv_heads * head_dim;
    if (i >= width)
        return;
    const uint g = i / head_dim, c = i % head_dim;
    const uint block = slot_mapping[r] / block_tokens, slot = slot_mapping[r] % block_tokens;
    vstore_half_rte(k[(size_t)r * width + i], kv_k_index(block, g, c, slot, kv_heads, head_dim, block_tokens), k_cache);
    vstore_half_rte(v[(size_t)r * width + i], kv_v_index(block, g, c, slot, kv_heads, head_dim, block_tokens), v_cache);
}

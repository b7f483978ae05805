/* Causal multi-head attention with grouped KV heads over the paged f16 cache, for many
 * query rows per sequence (prefill chunks; any batch of rows works): row r at position
 * pos attends to its sequence's keys 0..=pos, which must already be in the cache
 * (kv_write_f16_f32.cl first). out[r, h] = softmax(q[r, h] . K^T / sqrt(D)) . V with head h
 * reading KV head h / (heads / kv_heads).
 *
 * Arithmetic: the CPU's llama_ops::attend_one (llama.cpp's f16 flash attention): query
 * rounded to f16, scores in the fixed tree of attention_score_f16, online softmax over the
 * keys in position order with the value sum kept in f16 (common.h). Every step depends only
 * on the query, its position and the cached keys/values, so rows are batch-invariant, and
 * this kernel gives the bits of attention_paged_f16_decode.cl. Bitwise the CPU's with the
 * default ATTENTION_EXP (glibc's expf emulated, common.h); see README.md.
 *
 * Compile with -DHEAD_DIM=D (the accumulators are private arrays of D floats).
 * q, out:       rows * heads * D floats
 * k_cache, v_cache: one layer's caches (common.h layout)
 * block_tables: num_seqs * max_blocks uints (row s: sequence s's blocks in position order)
 * row_seq, row_pos: rows uints, each row's sequence and absolute position
 * Global size: (heads, rows): one work-item per (row, head).
 */
#include "common.h"

__kernel void attention_paged_f16_prefill(const __global float *q, const __global half *k_cache,
                                          const __global half *v_cache,
                                          const __global uint *block_tables,
                                          const __global uint *row_seq,
                                          const __global uint *row_pos, __global float *out,
                                          const uint heads, const uint kv_heads,
                                          const uint block_tokens, const uint max_blocks) {
    const uint h = get_global_id(0);
    const uint r = get_global_id(1);
    if (h >= heads)
        return;
    const uint g = h / (heads / kv_heads);
    const __global uint *table = block_tables + (size_t)row_seq[r] * max_blocks;
    const uint n_keys = row_pos[r] + 1;
    const float scale = 1.0f / sqrt((float)HEAD_DIM);
    const size_t at = ((size_t)r * heads + h) * HEAD_DIM;

    float qh[HEAD_DIM];
    float acc[HEAD_DIM];
    for (uint c = 0; c < HEAD_DIM; c++) {
        qh[c] = round_f16(q[at + c]);
        acc[c] = 0.0f;
    }
    softmax_state st;
    st.m = -INFINITY;
    st.total = 0.0f;
    for (uint j = 0; j < n_keys; j++) {
        const uint block = table[j / block_tokens], slot = j % block_tokens;
        const float s = attention_score_f16(qh, k_cache, block, slot, g, kv_heads, block_tokens, scale);
        float ms;
        const float vs = online_softmax_step(&st, s, &ms);
        const size_t vbase = kv_v_index(block, g, 0, slot, kv_heads, HEAD_DIM, block_tokens);
        for (uint c = 0; c < HEAD_DIM; c++) {
            float a = acc[c];
            if (ms != 1.0f) /* a new maximum: rescale (acc * 1 would round to acc anyway) */
                a = round_f16(a * ms);
            acc[c] = round_f16(fma(vload_half(vbase + c, v_cache), vs, a));
        }
    }
    const float inv = st.total == 0.0f ? 0.0f : 1.0f / st.total;
    for (uint c = 0; c < HEAD_DIM; c++)
        out[at + c] = acc[c] * inv;
}

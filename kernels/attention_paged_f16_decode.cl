/* Causal attention over the paged f16 cache (see attention_paged_f16_prefill.cl for the
 * arguments, layout and arithmetic), parallel within one (row, head) for decode steps,
 * where there are few rows: a work-group of D work-items per (row, head). Keys go in
 * chunks of D: work-item i scores key chunk + i (a whole score each, same tree), then every
 * work-item runs the online softmax over the chunk's keys in position order for its own
 * value channel (the running maximum and total are computed identically by all of them).
 * No reduction is split, so the result is bitwise the prefill kernel's for the same row,
 * whatever the batch: a prompt's prefill and a decode step agree.
 *
 * Compile with -DHEAD_DIM=D. Global size: (heads * D, rows) with local size (D, 1).
 */
#include "common.h"

__kernel void attention_paged_f16_decode(const __global float *q, const __global half *k_cache,
                                         const __global half *v_cache,
                                         const __global uint *block_tables,
                                         const __global uint *row_seq,
                                         const __global uint *row_pos, __global float *out,
                                         const uint heads, const uint kv_heads,
                                         const uint block_tokens, const uint max_blocks) {
    const uint h = get_group_id(0);
    const uint r = get_global_id(1);
    const uint c = get_local_id(0); /* this work-item's value channel */
    const uint g = h / (heads / kv_heads);
    const __global uint *table = block_tables + (size_t)row_seq[r] * max_blocks;
    const uint n_keys = row_pos[r] + 1;
    const float scale = 1.0f / sqrt((float)HEAD_DIM);
    const size_t at = ((size_t)r * heads + h) * HEAD_DIM;

    __local float qh_shared[HEAD_DIM];
    __local float scores[HEAD_DIM];
    qh_shared[c] = round_f16(q[at + c]);
    barrier(CLK_LOCAL_MEM_FENCE);
    float qh[HEAD_DIM]; /* private copy: attention_score_f16 reads a private array */
    for (uint i = 0; i < HEAD_DIM; i++)
        qh[i] = qh_shared[i];

    softmax_state st;
    st.m = -INFINITY;
    st.total = 0.0f;
    float acc = 0.0f;
    for (uint chunk = 0; chunk < n_keys; chunk += HEAD_DIM) {
        const uint j = chunk + c;
        if (j < n_keys)
            scores[c] = attention_score_f16(qh, k_cache, table[j / block_tokens], j % block_tokens, g,
                                            kv_heads, block_tokens, scale);
        barrier(CLK_LOCAL_MEM_FENCE);
        const uint end = min(n_keys - chunk, (uint)HEAD_DIM);
        for (uint i = 0; i < end; i++) {
            const uint key = chunk + i;
            const uint block = table[key / block_tokens], slot = key % block_tokens;
            float ms;
            const float vs = online_softmax_step(&st, scores[i], &ms);
            if (ms != 1.0f)
                acc = round_f16(acc * ms);
            acc = round_f16(fma(vload_half(kv_v_index(block, g, c, slot, kv_heads, HEAD_DIM, block_tokens), v_cache), vs, acc));
        }
        barrier(CLK_LOCAL_MEM_FENCE); /* scores are rewritten by the next chunk */
    }
    const float inv = st.total == 0.0f ? 0.0f : 1.0f / st.total;
    out[at + c] = acc * inv;
}

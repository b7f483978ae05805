/* Sentence embeddings: per sequence, the mean of its rows (summed in row order in f32, then
 * divided by the row count, as the CPU's bert::pool: bitwise equal), then optionally
 * L2-normalised (the CPU sums the squares in f64; here a work-group tree in f32: within
 * tolerance).
 *
 * hidden:      rows * dim floats (sequences packed back to back)
 * seq_offsets: num_seqs + 1 uints, sequence s is rows seq_offsets[s]..seq_offsets[s+1] (>= 1 row)
 * out:         num_seqs * dim floats
 * normalize:   0 or 1
 * Global size: (L * num_seqs,) with local size (L,), L a power of two. Local scratch: L floats.
 */
#include "common.h"

__kernel void mean_pool_f32(const __global float *hidden, const __global uint *seq_offsets,
                            __global float *out, const uint dim, const uint normalize,
                            __local float *scratch) {
    const uint s = get_group_id(0);
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    const uint start = seq_offsets[s], end = seq_offsets[s + 1];
    const float count = (float)(end - start);
    __global float *o = out + (size_t)s * dim;
    float sq = 0.0f;
    for (uint c = lid; c < dim; c += lsize) {
        float acc = 0.0f;
        for (uint r = start; r < end; r++)
            acc += hidden[(size_t)r * dim + c];
        const float mean = acc / count;
        o[c] = mean;
        sq += mean * mean;
    }
    if (normalize) {
        const float norm = sqrt(group_sum(sq, scratch));
        if (norm > 0.0f)
            for (uint c = lid; c < dim; c += lsize)
                o[c] = o[c] / norm;
    }
}

/* Sentence embeddings: per sequence, one vector from its rows as sentence-transformers'
 * Pooling module makes it, each mode as the CPU's backend computes it (bitwise equal before
 * normalisation):
 *   mode 0, mean:          the rows summed in row order in f32, divided by the row count;
 *   mode 1, CLS:           the sequence's first row;
 *   mode 2, max:           the element-wise maximum, starting from -infinity;
 *   mode 3, mean sqrt len: the row-order sum divided by the square root of the row count.
 * Then optionally L2-normalised (the CPU sums the squares in f64; here a work-group tree in
 * f32: within tolerance).
 *
 * hidden:      rows * dim floats (sequences packed back to back)
 * seq_offsets: num_seqs + 1 uints, sequence s is rows seq_offsets[s]..seq_offsets[s+1] (>= 1 row)
 * out:         num_seqs * dim floats
 * mode:        0..3 as above
 * normalize:   0 or 1
 * Global size: (L * num_seqs,) with local size (L,), L a power of two. Local scratch: L floats.
 */
#include "common.h"

__kernel void pool_f32(const __global float *hidden, const __global uint *seq_offsets, __global float *out,
                       const uint dim, const uint mode, const uint normalize, __local float *scratch) {
    const uint s = get_group_id(0);
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    const uint start = seq_offsets[s], end = seq_offsets[s + 1];
    const float count = (float)(end - start);
    const float divisor = mode == 3 ? sqrt(count) : count;
    __global float *o = out + (size_t)s * dim;
    float sq = 0.0f;
    for (uint c = lid; c < dim; c += lsize) {
        float v;
        if (mode == 1) {
            v = hidden[(size_t)start * dim + c];
        } else if (mode == 2) {
            v = -INFINITY;
            for (uint r = start; r < end; r++)
                v = fmax(v, hidden[(size_t)r * dim + c]);
        } else {
            float acc = 0.0f;
            for (uint r = start; r < end; r++)
                acc += hidden[(size_t)r * dim + c];
            v = acc / divisor;
        }
        o[c] = v;
        sq += v * v;
    }
    if (normalize) {
        const float norm = sqrt(group_sum(sq, scratch));
        if (norm > 0.0f)
            for (uint c = lid; c < dim; c += lsize)
                o[c] = o[c] / norm;
    }
}

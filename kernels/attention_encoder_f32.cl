/* Bidirectional multi-head attention over packed variable-length sequences (BERT; the CPU
 * Device's encoder_attention): out[r, h] = softmax((q . K^T) / sqrt(D)) . V over the rows of
 * r's own sequence. qkv rows hold Q, K and V side by side, each [heads * D] with the heads
 * contiguous. Scores as the CPU (sum of (q * scale) * k in element order), a two-pass
 * softmax with OpenCL's exp: within tolerance, not bitwise.
 *
 * Compile with -DHEAD_DIM=D.
 * qkv:         rows * 3 * heads * D floats
 * seq_offsets: num_seqs + 1 uints; row_seq: rows uints (each row's sequence)
 * out:         rows * heads * D floats
 * Global size: (heads, rows): one work-item per (row, head).
 */
#include "common.h"

__kernel void attention_encoder_f32(const __global float *qkv, const __global uint *seq_offsets,
                                    const __global uint *row_seq, __global float *out,
                                    const uint heads) {
    const uint h = get_global_id(0);
    const uint r = get_global_id(1);
    if (h >= heads)
        return;
    const uint hidden = heads * HEAD_DIM;
    const size_t stride = 3 * (size_t)hidden;
    const uint s = row_seq[r];
    const uint start = seq_offsets[s], end = seq_offsets[s + 1];
    const float scale = 1.0f / sqrt((float)HEAD_DIM);
    float q[HEAD_DIM];
    for (uint c = 0; c < HEAD_DIM; c++)
        q[c] = qkv[(size_t)r * stride + h * HEAD_DIM + c] * scale;

    float m = -INFINITY;
    for (uint j = start; j < end; j++) {
        const __global float *k = qkv + (size_t)j * stride + hidden + h * HEAD_DIM;
        float sc = 0.0f;
        for (uint c = 0; c < HEAD_DIM; c++)
            sc += q[c] * k[c];
        m = fmax(m, sc);
    }
    float acc[HEAD_DIM];
    for (uint c = 0; c < HEAD_DIM; c++)
        acc[c] = 0.0f;
    float total = 0.0f;
    for (uint j = start; j < end; j++) {
        const __global float *k = qkv + (size_t)j * stride + hidden + h * HEAD_DIM;
        const __global float *v = k + hidden;
        float sc = 0.0f;
        for (uint c = 0; c < HEAD_DIM; c++)
            sc += q[c] * k[c];
        const float p = exp(sc - m);
        total += p;
        for (uint c = 0; c < HEAD_DIM; c++)
            acc[c] += p * v[c];
    }
    const float inv = 1.0f / total;
    for (uint c = 0; c < HEAD_DIM; c++)
        out[(size_t)r * hidden + h * HEAD_DIM + c] = acc[c] * inv;
}

/* BERT input embeddings: x[r, :] = (word[tokens[r]] + pos[positions[r]]) + type0, in the
 * CPU's order (crates/ferroserve-core/src/models/bert.rs, `encode`): bitwise equal.
 *
 * word:  vocab * dim floats; pos: max_positions * dim floats; type0: dim floats (token
 *        type 0 row)
 * tokens, positions: rows uints (position within the row's own sequence)
 * x:     rows * dim floats
 * Global size: (dim, rows).
 */
#include "common.h"

__kernel void embedding_lookup_f32(const __global float *word, const __global float *pos,
                                   const __global float *type0, const __global uint *tokens,
                                   const __global uint *positions, __global float *x,
                                   const uint dim) {
    const uint c = get_global_id(0);
    const uint r = get_global_id(1);
    if (c >= dim)
        return;
    const float v = word[(size_t)tokens[r] * dim + c] + pos[(size_t)positions[r] * dim + c];
    x[(size_t)r * dim + c] = v + type0[c];
}

/* out[i, :] = x[rows[i], :]: picks the rows whose logits are wanted (the last row of each
 * chunk that asks for logits) before the final norm and the vocabulary matmul, as
 * llama.rs does on the host. Exact copy.
 *
 * x: * x dim floats; rows: count uints; out: count * dim floats
 * Global size: (dim, count).
 */
#include "common.h"

__kernel void gather_rows_f32(const __global float *x, const __global uint *rows,
                              __global float *out, const uint dim) {
    const uint c = get_global_id(0);
    const uint i = get_global_id(1);
    if (c < dim)
        out[(size_t)i * dim + c] = x[(size_t)rows[i] * dim + c];
}

/* Rotary position embeddings in place, llama.cpp's LLAMA_ROPE_TYPE_NORM (adjacent pairs
 * (x[2i], x[2i+1]) of the first rope_dims values of every head), as the CPU's
 * llama_ops::rope_pairs, with its explicit fused multiply-adds:
 *   x0' = fma(x0, cos, -(x1 * sin));  x1' = fma(x0, sin, x1 * cos)   -> bitwise equal.
 * The [cos, sin] table comes from the host (llama_ops::rope_cos_sin: libm cosf/sinf of
 * llama.cpp's f32 angle recurrence; OpenCL's cos/sin are allowed 4 ulp), indexed by
 * position, so it can be uploaded once for the whole context.
 *
 * x:         rows * heads * head_dim floats (Q or K rows), rotated in place
 * positions: rows uints
 * cos_sin:   max_positions * rope_dims floats, [cos t0, sin t0, cos t1, sin t1, ...] per position
 * Global size: (rope_dims / 2, heads, rows).
 */
#include "common.h"

__kernel void rope_f32(__global float *x, const __global uint *positions,
                       const __global float *cos_sin, const uint heads, const uint head_dim,
                       const uint rope_dims) {
    const uint i = get_global_id(0);
    const uint h = get_global_id(1);
    const uint r = get_global_id(2);
    if (2 * i >= rope_dims)
        return;
    const __global float *cs = cos_sin + (size_t)positions[r] * rope_dims + 2 * i;
    const float c = cs[0], s = cs[1];
    __global float *pair = x + ((size_t)r * heads + h) * head_dim + 2 * i;
    const float a = pair[0], b = pair[1];
    pair[0] = fma(a, c, -(b * s));
    pair[1] = fma(a, s, b * c);
}

/* Row-wise x = LayerNorm(x + residual) * gamma + beta (the CPU Device's add_layer_norm,
 * crates/ferroserve-kernels/src/cpu/elementwise.rs), in place. Mean and variance are
 * work-group tree sums in f32 (two passes: the variance sums (x - mean)^2 like the CPU),
 * so within tolerance of the CPU, whose sums run in 16 lanes: not bitwise.
 *
 * x:        rows * dim floats, updated in place
 * residual: rows * dim floats, or NULL for none
 * gamma, beta: dim floats
 * Global size: (L * rows,) with local size (L,), L a power of two; one group per row.
 * Local scratch: L floats (argument `scratch`).
 */
#include "common.h"

__kernel void layer_norm_f32(__global float *x, const __global float *residual,
                             const __global float *gamma, const __global float *beta,
                             const uint dim, const float eps, __local float *scratch) {
    const uint row = get_group_id(0);
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    __global float *xr = x + (size_t)row * dim;
    float part = 0.0f;
    for (uint i = lid; i < dim; i += lsize) {
        float v = xr[i];
        if (residual)
            v += residual[(size_t)row * dim + i];
        xr[i] = v; /* each element is read back only by the work-item that wrote it */
        part += v;
    }
    const float mean = group_sum(part, scratch) / (float)dim;
    float var_part = 0.0f;
    for (uint i = lid; i < dim; i += lsize) {
        const float d = xr[i] - mean;
        var_part += d * d;
    }
    const float var = group_sum(var_part, scratch) / (float)dim;
    const float inv = 1.0f / sqrt(var + eps);
    for (uint i = lid; i < dim; i += lsize)
        xr[i] = (xr[i] - mean) * inv * gamma[i] + beta[i];
}

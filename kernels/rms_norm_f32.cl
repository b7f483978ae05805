/* Row-wise RMSNorm: out = x * (1 / sqrt(mean(x^2) + eps)) * weight, with the CPU kernel's
 * arithmetic (crates/ferroserve-kernels/src/cpu/llama_ops.rs `rms_norm_rows`, which is
 * llama.cpp's ggml_compute_forward_rms_norm_f32): squares rounded to f32 and summed in f64
 * in element order, the mean rounded to f32, scale = 1 / sqrt(mean + eps) in f32, then
 * (x * scale) * w. fp64 is an extension, so the f64 sum and division are emulated exactly
 * in integer arithmetic (common.h); with correctly rounded division and sqrt
 * (-cl-fp32-correctly-rounded-divide-sqrt) the result is bitwise the CPU's.
 *
 * The f64 chain is sequential by definition: one work-item of the group computes the
 * row's scale (a few microseconds for 576 values), then the group writes the outputs.
 *
 * x, out: rows * dim floats (may not alias); weight: dim floats
 * Global size: (L * rows,) with local size (L,), L any work-group size: one group per row.
 */
#include "common.h"

__kernel void rms_norm_f32(const __global float *x, const __global float *weight,
                           __global float *out, const uint dim, const float eps) {
    const uint row = get_group_id(0);
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    const __global float *xr = x + (size_t)row * dim;
    __local float scale_shared;
    if (lid == 0) {
        soft_f64_sum s = soft_f64_zero();
        for (uint i = 0; i < dim; i++) {
            const float v = xr[i];
            s = soft_f64_add(s, v * v);
        }
        const float mean = soft_f64_div_to_f32(s, dim);
        scale_shared = 1.0f / sqrt(mean + eps);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const float scale = scale_shared;
    for (uint i = lid; i < dim; i += lsize)
        out[(size_t)row * dim + i] = (xr[i] * scale) * weight[i];
}

/* gate = silu(gate) * up element-wise, silu(x) = x / (1 + e^-x), as the CPU's
 * llama_ops::silu_mul: (g / (1 + ggml_expf(0 - g))) * u, where ggml_expf is llama.cpp's
 * vectorised expf (Arm optimized-routines algorithm) ported operation for operation with
 * its fused multiply-adds (common.h). The final j * 2^n is one rounding on the CPU (exact
 * in f64, then rounded); here ldexp, which OpenCL defines as correctly rounded. With
 * correctly rounded division the result is bitwise the CPU's.
 *
 * gate: count floats, updated in place; up: count floats
 * Global size: (count,).
 */
#include "common.h"

__kernel void silu_mul_f32(__global float *gate, const __global float *up, const uint count) {
    const uint i = get_global_id(0);
    if (i >= count)
        return;
    const float g = gate[i];
    gate[i] = (g / (1.0f + ggml_expf(0.0f - g))) * up[i];
}

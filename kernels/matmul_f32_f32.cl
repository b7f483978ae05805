/* y[r, j] = act(sum_k x[r, k] * w[j, k] + bias[j]): the f32 linear layer of the BERT
 * encoder (the CPU Device's linear) and of GGUF F32 weight matrices. W is [n, k] row-major
 * (PyTorch's and GGUF's layout, no repacking). The dot runs in k order in one f32
 * accumulator; the CPU's GEMM (f32 panels, or bf16 with AVX512-BF16/AMX) blocks k
 * differently: within tolerance, not bitwise.
 *
 * x: m * k floats; w: n * k floats; bias: n floats or NULL; y: m * n floats
 * act: 0 none, 1 exact GELU (fused, as Device::linear's Activation::Gelu)
 * Global size: (n, m).
 */
#include "common.h"

__kernel void matmul_f32_f32(const __global float *x, const __global float *w,
                             const __global float *bias, __global float *y, const uint n,
                             const uint k, const uint act) {
    const uint j = get_global_id(0);
    const uint r = get_global_id(1);
    if (j >= n)
        return;
    const __global float *xr = x + (size_t)r * k;
    const __global float *wr = w + (size_t)j * k;
    float acc = 0.0f;
    for (uint i = 0; i < k; i++)
        acc = fma(xr[i], wr[i], acc);
    if (bias)
        acc += bias[j];
    if (act == 1)
        acc = gelu_erf(acc);
    y[(size_t)r * n + j] = acc;
}

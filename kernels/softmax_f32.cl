/* Row-wise softmax in place (the CPU Device's softmax): max, e^(x - max), sum, scale by
 * 1 / sum. Work-group tree reductions and OpenCL's exp (3 ulp; the CPU uses a polynomial
 * of about 2e-7 relative error): within tolerance, not bitwise. A row of all -inf gives NaN,
 * as on the CPU.
 *
 * x: rows * cols floats, in place
 * Global size: (L * rows,) with local size (L,), L a power of two. Local scratch: L floats.
 */
#include "common.h"

__kernel void softmax_f32(__global float *x, const uint cols, __local float *scratch) {
    const uint row = get_group_id(0);
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    __global float *xr = x + (size_t)row * cols;
    float m = -INFINITY;
    for (uint i = lid; i < cols; i += lsize)
        m = fmax(m, xr[i]);
    m = group_max(m, scratch);
    float part = 0.0f;
    for (uint i = lid; i < cols; i += lsize) {
        const float e = exp(xr[i] - m);
        xr[i] = e;
        part += e;
    }
    const float inv = 1.0f / group_sum(part, scratch);
    for (uint i = lid; i < cols; i += lsize)
        xr[i] = xr[i] * inv;
}

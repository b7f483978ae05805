/* x += y element-wise: the decoder's residual connections (llama.rs add_in_place;
 * bitwise equal).
 * x, y: count floats. Global size: (count,).
 */
#include "common.h"

__kernel void add_f32(__global float *x, const __global float *y, const uint count) {
    const uint i = get_global_id(0);
    if (i < count)
        x[i] = x[i] + y[i];
}

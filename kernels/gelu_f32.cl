/* Exact (erf) GELU in place: 0.5 x (1 + erf(x / sqrt 2)), the CPU Device's gelu. Within
 * tolerance, not bitwise (erf differs; see gelu_erf in common.h).
 *
 * x: count floats. Global size: (count,).
 */
#include "common.h"

__kernel void gelu_f32(__global float *x, const uint count) {
    const uint i = get_global_id(0);
    if (i < count)
        x[i] = gelu_erf(x[i]);
}

/* Activation rows (f32) to 8-bit blocks of 32, as the CPU's Q8Activations::quantize
 * (crates/ferroserve-kernels/src/quant/q8_0.rs, `quantize_block`), bit for bit:
 *   amax = max |x| over the block; inv = 127 / amax (0 if amax = 0);
 *   q = round-half-even(x * inv) clamped to [-127, 127]; isum = sum q (exact);
 *   d  = f16(amax / 127)                 -> scales[2b]      (ggml's q8_0/q8_1 d)
 *   ds = d * isum (f32, with the rounded d) -> scales[2b + 1] (Q8_0 offsets, see matmul)
 *   s  = f16((amax / 127) * isum)        -> sums[b]         (ggml's q8_1 s, for Q4_1 m)
 * A block holding NaN or +-inf gets q = 0 and d = ds = s = NaN, so the outputs it feeds
 * are NaN. One work-item per block.
 *
 * x:      rows * k floats, row-major (k a multiple of 32)
 * qs:     rows * k chars, same positions as x
 * scales: rows * (k/32) float2 as [d, d*isum], block-major within the row
 * sums:   rows * (k/32) floats
 * Global size: (k/32, rows).
 */
#include "common.h"

__kernel void quantize_q8_f32(const __global float *x, __global char *qs, __global float *scales,
                              __global float *sums, const uint k) {
    const uint b = get_global_id(0);
    const uint row = get_global_id(1);
    const uint nb = k / QK;
    if (b >= nb)
        return;
    const size_t at = (size_t)row * k + (size_t)b * QK;
    const size_t blk = (size_t)row * nb + b;
    const __global float *xb = x + at;

    float amax = 0.0f;
    int finite = 1;
    for (int i = 0; i < QK; i++) {
        float v = xb[i];
        finite &= isfinite(v) ? 1 : 0;
        amax = fmax(amax, fabs(v));
    }
    if (!finite) {
        for (int i = 0; i < QK; i++)
            qs[at + i] = 0;
        scales[2 * blk] = NAN;
        scales[2 * blk + 1] = NAN;
        sums[blk] = NAN;
        return;
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int isum = 0;
    for (int i = 0; i < QK; i++) {
        /* |x * inv| <= 127 up to one rounding; rint rounds half to even. */
        float q = clamp(rint(xb[i] * inv), -127.0f, 127.0f);
        int qi = (int)q;
        qs[at + i] = (char)qi;
        isum += qi;
    }
    const float d_exact = amax / 127.0f;
    const float d = round_f16(d_exact);
    scales[2 * blk] = d;
    scales[2 * blk + 1] = d * (float)isum;
    sums[blk] = round_f16(d_exact * (float)isum);
}

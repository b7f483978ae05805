/* y[r, j] = sum_k w[j, k] * x[r, k] with W in GGUF Q4_1 blocks and x quantised by
 * quantize_q8_f32.cl: the CPU's Q4_1 kernel (crates/ferroserve-kernels/src/quant/q4_1.rs,
 * `dot_portable`, whose bits every CPU ISA level reproduces), i.e. llama.cpp's
 * ggml_vec_dot_q4_1_q8_1 order:
 *   per block b, in block order: dd = d_w * d_x;
 *     for g in 0..8: lane[g] = fma(dd, (float)(sum of the 4 code*act products of group g), lane[g])
 *       (groups 0-3 are the low nibbles = weights 0..15, 4-7 the high nibbles = 16..31);
 *     mins = fma(m_w, s_x, mins)   (s_x the f16-rounded q8_1 sum)
 *   y = hsum8(lane) + mins.
 * Integer group sums are exact, so the result is bitwise the CPU's.
 *
 * w:      n rows of k/32 blocks of 20 bytes (GGUF layout, read in place)
 * qs, scales, sums: the quantised activations, m rows (see quantize_q8_f32.cl)
 * y:      m * n floats, row-major ([m, n])
 * Global size: (n, m); one work-item per output element (mat-vec when m = 1).
 */
#include "common.h"

__kernel void matmul_q4_1_q8_1(const __global uchar *w, const __global char *qs,
                               const __global float *scales, const __global float *sums,
                               __global float *y, const uint n, const uint k) {
    const uint j = get_global_id(0);
    const uint r = get_global_id(1);
    if (j >= n)
        return;
    const uint nb = k / QK;
    const __global uchar *wrow = w + (size_t)j * nb * Q4_1_BLOCK_BYTES;
    const __global char *arow = qs + (size_t)r * k;
    const __global float *srow = scales + (size_t)r * nb * 2;
    const __global float *s81 = sums + (size_t)r * nb;

    float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    float mins = 0.0f;
    for (uint b = 0; b < nb; b++) {
        const __global uchar *blk = wrow + (size_t)b * Q4_1_BLOCK_BYTES;
        const float d = load_f16(blk);
        const float m = load_f16(blk + 2);
        const __global uchar *nib = blk + 4;
        const __global char *a = arow + (size_t)b * QK;
        const float dd = d * srow[2 * b];
        for (int g = 0; g < 8; g++) {
            int isum = 0;
            for (int t = 0; t < 4; t++) {
                int i = 4 * g + t; /* weight index in the block */
                int code = i < 16 ? (nib[i] & 0x0f) : (nib[i - 16] >> 4);
                isum += code * (int)a[i];
            }
            lane[g] = fma(dd, (float)isum, lane[g]);
        }
        mins = fma(m, s81[b], mins);
    }
    y[(size_t)r * n + j] = hsum8(lane) + mins;
}

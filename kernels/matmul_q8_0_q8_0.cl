/* y[r, j] = sum_k w[j, k] * x[r, k] with W in GGUF Q8_0 blocks and x quantised by
 * quantize_q8_f32.cl, in the operation order of the CPU's AVX-512 Q8_0 kernel
 * (crates/ferroserve-kernels/src/quant/{q8_0.rs,matmul.rs}: `group_kernel`, `group_step`,
 * `finish`), the level the CPU device runs on AVX-512 VNNI machines. (The CPU's Q8_0 bits
 * depend on its ISA level; see README.md.) That kernel writes a weight as d*u + m with
 * u = q + 128 (unsigned) and m = -128 d, and per (activation row, weight row):
 *   blocks in groups of four (the last group may be short: its missing blocks have
 *   zero codes, activations and scales);
 *   p[0..8] = [d0*dx0, (-128 d0)*(dx0*isum0), d1*dx1, ..., (-128 d3)*(dx3*isum3)];
 *   16 lanes acc0 (blocks 0, 1 of the group: lane L -> block L/8, codes 4(L%8)..+4) and 16
 *   lanes acc1 (blocks 2, 3): acc[L] = fma((float)(sum of 4 u*a), p[2*block], acc[L]);
 *   acc1 is skipped in a last group of one or two blocks; off[i] += p[i] (8 lanes).
 *   Finally v = acc0 + acc1; dots = hsum8(v[0..8] + v[8..16]);
 *   offsets = (off1 + off5) + (off3 + off7); y = dots + offsets.
 * Integer group sums are exact (|sum| <= 4*255*127 < 2^24), so the result is bitwise the
 * AVX-512 CPU kernel's.
 *
 * w:      n rows of k/32 blocks of 34 bytes (GGUF layout, read in place)
 * qs, scales: the quantised activations, m rows (see quantize_q8_f32.cl); sums unused
 * y:      m * n floats, row-major
 * Global size: (n, m); one work-item per output element.
 */
#include "common.h"

__kernel void matmul_q8_0_q8_0(const __global uchar *w, const __global char *qs,
                               const __global float *scales, __global float *y, const uint n,
                               const uint k) {
    const uint j = get_global_id(0);
    const uint r = get_global_id(1);
    if (j >= n)
        return;
    const uint nb = k / QK;
    const __global uchar *wrow = w + (size_t)j * nb * Q8_0_BLOCK_BYTES;
    const __global char *arow = qs + (size_t)r * k;
    const __global float *srow = scales + (size_t)r * nb * 2;

    float acc[2][16];
    float off[8];
    for (int l = 0; l < 16; l++) {
        acc[0][l] = 0.0f;
        acc[1][l] = 0.0f;
    }
    for (int i = 0; i < 8; i++)
        off[i] = 0.0f;

    for (uint b0 = 0; b0 < nb; b0 += 4) {
        const uint n_in = min(4u, nb - b0);
        float p[8];
        for (uint i = 0; i < 4; i++) {
            if (i < n_in) {
                const float d = load_f16(wrow + (size_t)(b0 + i) * Q8_0_BLOCK_BYTES);
                p[2 * i] = d * srow[2 * (b0 + i)];
                p[2 * i + 1] = (d * -128.0f) * srow[2 * (b0 + i) + 1];
            } else {
                /* A missing block's [d, -128 d] = [0, -0] times masked-out scales [0, 0]. */
                p[2 * i] = 0.0f;
                p[2 * i + 1] = -0.0f;
            }
        }
        const int regs = (n_in > 2) ? 2 : 1;
        for (int reg = 0; reg < regs; reg++) {
            for (int l = 0; l < 16; l++) {
                const uint blk = 2 * reg + l / 8; /* block within the group */
                int dot = 0;
                if (blk < n_in) {
                    const __global uchar *q = wrow + (size_t)(b0 + blk) * Q8_0_BLOCK_BYTES + 2;
                    const __global char *a = arow + (size_t)(b0 + blk) * QK;
                    for (int t = 0; t < 4; t++) {
                        int i = 4 * (l % 8) + t;
                        dot += (int)(q[i] ^ 0x80) * (int)a[i]; /* u = q + 128 */
                    }
                }
                acc[reg][l] = fma((float)dot, p[2 * blk], acc[reg][l]);
            }
        }
        for (int i = 0; i < 8; i++)
            off[i] = off[i] + p[i];
    }
    float v[8];
    for (int i = 0; i < 8; i++)
        v[i] = (acc[0][i] + acc[1][i]) + (acc[0][8 + i] + acc[1][8 + i]);
    const float dots = hsum8(v);
    const float offsets = (off[1] + off[5]) + (off[3] + off[7]);
    y[(size_t)r * n + j] = dots + offsets;
}

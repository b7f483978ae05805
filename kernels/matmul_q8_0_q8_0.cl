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
 * One work-item per weight row j and ROWS activation rows: each weight block's 32 codes are
 * loaded once (two uchar16) and offset once, then multiplied with every row's codes
 * (char16 loads): whole-vector loads let a CPU device (PoCL) vectorise the block.
 *
 * w:      n rows of k/32 blocks of 34 bytes (GGUF layout, read in place)
 * qs, scales: the quantised activations, m rows (see quantize_q8_f32.cl); sums unused
 * y:      m * n floats, row-major
 * Global size: (n, ceil(m / ROWS)), any local size; -DROWS=<r> (default 4).
 */
#include "common.h"

#ifndef ROWS
#define ROWS 4
#endif

/* acc[8 * side + i] for the four-code groups of 16 products (the CPU's lanes of one block). */
#define Q8_0_LANES(acc, base, prod, scale)                                                         \
    acc[base + 0] = fma((float)(prod.s0 + prod.s1 + prod.s2 + prod.s3), scale, acc[base + 0]);     \
    acc[base + 1] = fma((float)(prod.s4 + prod.s5 + prod.s6 + prod.s7), scale, acc[base + 1]);     \
    acc[base + 2] = fma((float)(prod.s8 + prod.s9 + prod.sa + prod.sb), scale, acc[base + 2]);     \
    acc[base + 3] = fma((float)(prod.sc + prod.sd + prod.se + prod.sf), scale, acc[base + 3])

__kernel void matmul_q8_0_q8_0(const __global uchar *w, const __global char *qs,
                               const __global float *scales, __global float *y, const uint n,
                               const uint k, const uint m) {
    const uint j = get_global_id(0);
    const uint r0 = get_global_id(1) * ROWS;
    if (j >= n || r0 >= m)
        return;
    const uint rows = min((uint)ROWS, m - r0);
    const uint nb = k / QK;
    const __global uchar *wrow = w + (size_t)j * nb * Q8_0_BLOCK_BYTES;

    float acc[ROWS][2][16];
    float off[ROWS][8];
    for (uint t = 0; t < ROWS; t++) {
        for (int l = 0; l < 16; l++) {
            acc[t][0][l] = 0.0f;
            acc[t][1][l] = 0.0f;
        }
        for (int i = 0; i < 8; i++)
            off[t][i] = 0.0f;
    }

    for (uint b0 = 0; b0 < nb; b0 += 4) {
        const uint n_in = min(4u, nb - b0);
        const int regs = (n_in > 2) ? 2 : 1;
        float d[4];
        int16 u_lo[4], u_hi[4]; /* u = q + 128 of codes 0..15 and 16..31 */
        for (uint i = 0; i < 4; i++) {
            if (i < n_in) {
                const __global uchar *blk = wrow + (size_t)(b0 + i) * Q8_0_BLOCK_BYTES;
                d[i] = load_f16(blk);
                u_lo[i] = convert_int16(vload16(0, blk + 2) ^ (uchar16)(0x80));
                u_hi[i] = convert_int16(vload16(1, blk + 2) ^ (uchar16)(0x80));
            } else {
                d[i] = 0.0f;
                u_lo[i] = (int16)(0);
                u_hi[i] = (int16)(0);
            }
        }
        for (uint t = 0; t < rows; t++) {
            const size_t r = r0 + t;
            const __global float *srow = scales + r * nb * 2;
            float p[8];
            for (uint i = 0; i < 4; i++) {
                if (i < n_in) {
                    p[2 * i] = d[i] * srow[2 * (b0 + i)];
                    p[2 * i + 1] = (d[i] * -128.0f) * srow[2 * (b0 + i) + 1];
                } else {
                    /* A missing block's [d, -128 d] = [0, -0] times masked-out scales [0, 0]. */
                    p[2 * i] = 0.0f;
                    p[2 * i + 1] = -0.0f;
                }
            }
            for (int reg = 0; reg < regs; reg++) {
                for (int side = 0; side < 2; side++) {
                    const uint blk = 2 * reg + side; /* block within the group */
                    int16 lo = (int16)(0), hi = (int16)(0);
                    if (blk < n_in) {
                        const __global char *a = qs + r * k + (size_t)(b0 + blk) * QK;
                        lo = u_lo[blk] * convert_int16(vload16(0, a));
                        hi = u_hi[blk] * convert_int16(vload16(1, a));
                    }
                    Q8_0_LANES(acc[t][reg], 8 * side, lo, p[2 * blk]);
                    Q8_0_LANES(acc[t][reg], 8 * side + 4, hi, p[2 * blk]);
                }
            }
            for (int i = 0; i < 8; i++)
                off[t][i] = off[t][i] + p[i];
        }
    }
    for (uint t = 0; t < rows; t++) {
        float v[8];
        for (int i = 0; i < 8; i++)
            v[i] = (acc[t][0][i] + acc[t][1][i]) + (acc[t][0][8 + i] + acc[t][1][8 + i]);
        const float dots = hsum8(v);
        const float offsets = (off[t][1] + off[t][5]) + (off[t][3] + off[t][7]);
        y[(size_t)(r0 + t) * n + j] = dots + offsets;
    }
}

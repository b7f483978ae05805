/* y[r, j] = sum_k w[j, k] * x[r, k] with W in GGUF Q4_1 blocks and x quantised by
 * quantize_q8_f32.cl: the CPU's Q4_1 kernel (crates/ferroserve-kernels/src/quant/q4_1.rs,
 * `dot_portable`, whose bits every CPU ISA level reproduces), i.e. llama.cpp's
 * ggml_vec_dot_q4_1_q8_1 order:
 *   per block b, in block order: dd = d_w * d_x;
 *     for g in 0..8: lane[g] = fma(dd, (float)(sum of the 4 code*act products of group g), lane[g])
 *       (groups 0-3 are the low nibbles = weights 0..15, 4-7 the high nibbles = 16..31);
 *     mins = fma(m_w, s_x, mins)   (s_x the f16-rounded q8_1 sum)
 *   y = hsum8(lane) + mins.
 * Integer group sums are exact (in any order), so the result is bitwise the CPU's.
 *
 * One work-item per weight row j and ROWS activation rows: each weight block is loaded
 * once (16 nibble bytes as one uchar16), unpacked once, and multiplied with every row's
 * codes (two char16 loads), so the matrix is streamed once per ROWS rows. Whole-vector
 * loads and integer vectors are what let a CPU device (PoCL) vectorise the block; reading
 * one nibble at a time behind an index test was 5-7x slower there (bench/NOTES.md).
 *
 * Two forms of the block's products, the same integers: where 16-wide vectors may cross a
 * function call (x86 with AVX-512, and targets without x86's vector calling convention),
 * int16 products; elsewhere on x86 (a vector wider than 128 bits passed to or returned from
 * any function, builtins such as convert_int16 included, changes the calling convention
 * without AVX / AVX-512, which PoCL reports as a warning, an error with -Werror) short8
 * products summed in pairs, then fours (|code * act| <= 15 * 128, a sum of four <= 7680:
 * shorts). On PoCL the short8 form is 1.2-1.7x slower than int16 with AVX-512 and 1.1-1.6x
 * faster with AVX2 (m >= 16; bench/opencl_vector_widths.py).
 *
 * w:      n rows of k/32 blocks of 20 bytes (GGUF layout, read in place)
 * qs, scales, sums: the quantised activations, m rows (see quantize_q8_f32.cl)
 * y:      m * n floats, row-major ([m, n])
 * Global size: (n, ceil(m / ROWS)), any local size; -DROWS=<r> (default 4).
 */
#include "common.h"

#ifndef ROWS
#define ROWS 4
#endif

/* The int16 form where 512-bit vectors may cross calls (see the top); -DQ4_1_INT16=0 or 1
 * picks a form (e.g. to test the short8 form on an AVX-512 host). */
#ifndef Q4_1_INT16
#if defined(__AVX512F__) || !(defined(__x86_64__) || defined(__i386__))
#define Q4_1_INT16 1
#else
#define Q4_1_INT16 0
#endif
#endif

/* The eight lane updates of one block for one activation row. */
#define Q4_1_LANES(lane, dd, lo, hi)                                                               \
    lane[0] = fma(dd, (float)(lo.s0 + lo.s1 + lo.s2 + lo.s3), lane[0]);                            \
    lane[1] = fma(dd, (float)(lo.s4 + lo.s5 + lo.s6 + lo.s7), lane[1]);                            \
    lane[2] = fma(dd, (float)(lo.s8 + lo.s9 + lo.sa + lo.sb), lane[2]);                            \
    lane[3] = fma(dd, (float)(lo.sc + lo.sd + lo.se + lo.sf), lane[3]);                            \
    lane[4] = fma(dd, (float)(hi.s0 + hi.s1 + hi.s2 + hi.s3), lane[4]);                            \
    lane[5] = fma(dd, (float)(hi.s4 + hi.s5 + hi.s6 + hi.s7), lane[5]);                            \
    lane[6] = fma(dd, (float)(hi.s8 + hi.s9 + hi.sa + hi.sb), lane[6]);                            \
    lane[7] = fma(dd, (float)(hi.sc + hi.sd + hi.se + hi.sf), lane[7])

/* The same from the eight group sums (as floats, exact). */
#define Q4_1_LANES4(lane, dd, g_lo, g_hi)                                                          \
    lane[0] = fma(dd, g_lo.s0, lane[0]);                                                           \
    lane[1] = fma(dd, g_lo.s1, lane[1]);                                                           \
    lane[2] = fma(dd, g_lo.s2, lane[2]);                                                           \
    lane[3] = fma(dd, g_lo.s3, lane[3]);                                                           \
    lane[4] = fma(dd, g_hi.s0, lane[4]);                                                           \
    lane[5] = fma(dd, g_hi.s1, lane[5]);                                                           \
    lane[6] = fma(dd, g_hi.s2, lane[6]);                                                           \
    lane[7] = fma(dd, g_hi.s3, lane[7])

__kernel void matmul_q4_1_q8_1(const __global uchar *w, const __global char *qs,
                               const __global float *scales, const __global float *sums,
                               __global float *y, const uint n, const uint k, const uint m) {
    const uint j = get_global_id(0);
    const uint r0 = get_global_id(1) * ROWS;
    if (j >= n || r0 >= m)
        return;
    const uint rows = min((uint)ROWS, m - r0);
    const uint nb = k / QK;
    const __global uchar *wrow = w + (size_t)j * nb * Q4_1_BLOCK_BYTES;

    float lane[ROWS][8];
    float mins[ROWS];
    for (uint t = 0; t < ROWS; t++) {
        mins[t] = 0.0f;
        for (uint g = 0; g < 8; g++)
            lane[t][g] = 0.0f;
    }
    for (uint b = 0; b < nb; b++) {
        const __global uchar *blk = wrow + (size_t)b * Q4_1_BLOCK_BYTES;
        const float d = load_f16(blk);
        const float mw = load_f16(blk + 2);
        const uchar16 nib = vload16(0, blk + 4);
#if Q4_1_INT16
        const int16 w_lo = convert_int16(nib & (uchar16)(0x0f)); /* weights 0..15 */
        const int16 w_hi = convert_int16(nib >> (uchar16)(4));   /* weights 16..31 */
#else
        const uchar16 n_lo = nib & (uchar16)(0x0f), n_hi = nib >> (uchar16)(4);
        const short8 w0 = convert_short8(n_lo.lo), w1 = convert_short8(n_lo.hi); /* weights 0-7, 8-15 */
        const short8 w2 = convert_short8(n_hi.lo), w3 = convert_short8(n_hi.hi); /* 16-23, 24-31 */
#endif
        for (uint t = 0; t < rows; t++) {
            const size_t r = r0 + t;
            const __global char *a = qs + r * k + (size_t)b * QK;
            const float dd = d * scales[(r * nb + b) * 2];
#if Q4_1_INT16
            const int16 lo = w_lo * convert_int16(vload16(0, a));
            const int16 hi = w_hi * convert_int16(vload16(1, a));
            Q4_1_LANES(lane[t], dd, lo, hi);
#else
            const char16 a_lo = vload16(0, a), a_hi = vload16(1, a);
            const short8 p0 = w0 * convert_short8(a_lo.lo), p1 = w1 * convert_short8(a_lo.hi);
            const short8 p2 = w2 * convert_short8(a_hi.lo), p3 = w3 * convert_short8(a_hi.hi);
            const short8 q_lo = (short8)(p0.even, p1.even) + (short8)(p0.odd, p1.odd); /* pairs */
            const short8 q_hi = (short8)(p2.even, p3.even) + (short8)(p2.odd, p3.odd);
            const float4 g_lo = convert_float4(q_lo.even + q_lo.odd); /* groups 0-3 */
            const float4 g_hi = convert_float4(q_hi.even + q_hi.odd); /* groups 4-7 */
            Q4_1_LANES4(lane[t], dd, g_lo, g_hi);
#endif
            mins[t] = fma(mw, sums[r * nb + b], mins[t]);
        }
    }
    for (uint t = 0; t < rows; t++)
        y[(size_t)(r0 + t) * n + j] = hsum8(lane[t]) + mins[t];
}

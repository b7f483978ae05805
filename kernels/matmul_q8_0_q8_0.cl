/* y[r, j] = sum_k w[j, k] * x[r, k] with W in GGUF Q8_0 blocks and x quantised by
 * quantize_q8_f32.cl, in the operation order of one of the CPU's Q8_0 kernels
 * (crates/ferroserve-kernels/src/quant/{q8_0.rs,matmul.rs}). The CPU's Q8_0 bits depend on
 * its ISA level (`QuantIsa::selected()`), so the order is chosen at compile time with
 * -DQ8_0_ORDER=<o> (default 2, the AVX-512 order). Per (activation row, weight row), with
 * d the weight block's scale, dx the activation block's (scales[2b]) and dxs its d*sum(q)
 * (scales[2b + 1]):
 *
 *   0  portable (`q8_0::dot_portable`): per block in order, isum = the 32 code products
 *      summed; acc = acc + ((d * dx) * (float)isum), three roundings, no fma.
 *   1  AVX2 (`q8_0::avx2::dot`/`block`): two 8-lane f32 chains, even blocks into one and odd
 *      blocks into the other (an odd count's last block is even); lane L (0..7) of a block
 *      is the sum of codes 4L..4L+3's products, and lane = fma((float)sum, d * dx, lane)
 *      (the scale rounded to f32 first); y = hsum8(even + odd) (common.h; `x86::hsum`).
 *   2  AVX-512 VNNI (`matmul::x86::avx512::group_step`, `finish`): a weight is d*u + m with
 *      u = q + 128 (unsigned) and m = -128 d. The CPU works on groups of four blocks: two
 *      16-lane registers acc0 = [block 0 | block 1] and acc1 = [block 2 | block 3], lane L
 *      of a block being the sum of 4 u*a for codes 4L..4L+3, lane = fma((float)sum,
 *      d * dx, lane), and 8 lanes off[2i + 1] += (-128 d) * dxs of block i (off[2i] gets
 *      d * dx, unused). Finally v = acc0 + acc1, dots = hsum8(v[0..8] + v[8..16]),
 *      offsets = (off1 + off5) + (off3 + off7), y = dots + offsets. So block b's lanes are
 *      chain A[b % 4] and its offset sum O[b % 4]:
 *        y = hsum8((A0 + A2) + (A1 + A3)) + ((O0 + O2) + (O1 + O3)).
 *      A short last group's missing blocks (zero codes, activations and scales) only add
 *      fma(0, 0, lane) and -0 to the offsets, which change no value (no chain is ever -0:
 *      each starts at +0), so they are skipped here.
 *
 * The CPU device runs level 2 on AVX-512 VNNI machines, 1 on AVX2+FMA+F16C ones, 0
 * elsewhere or under FERROSERVE_ISA=portable; LlamaKernels::build passes its level.
 * Integer sums are exact in any order (|sum of 4 u*a| <= 4*255*127, |isum| <= 32*128*127,
 * both < 2^24), so each order's result is bitwise its CPU kernel's.
 *
 * One work-item per weight row j and ROWS activation rows: each weight block's 32 codes are
 * loaded once (two 16-byte loads, bit cast to 8 lanes of 4 bytes) and split with shifts into
 * four int8 "planes" (plane i = byte i of each lane, i.e. codes 4L + i of lanes L = 0..7),
 * then multiplied with every row's codes split the same way, so a lane's four products add
 * up vertically and the block's work is a few whole-vector operations (no conversions).
 * No vector wider than 128 bits crosses a call, builtins included (wider ones only live in
 * expressions and variables, hence macros): PoCL on a host without AVX-512 (without AVX)
 * rejects 512-bit (256-bit) vector arguments and results under -Werror.
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

#ifndef Q8_0_ORDER
#define Q8_0_ORDER 2
#endif
#if Q8_0_ORDER == 0
#define CHAINS 1
#elif Q8_0_ORDER == 1
#define CHAINS 2
#elif Q8_0_ORDER == 2
#define CHAINS 4
#else
#error "Q8_0_ORDER must be 0 (portable), 1 (AVX2) or 2 (AVX-512)"
#endif

/* Byte i's bit offset within a 32-bit lane (device byte order). */
#ifdef __ENDIAN_LITTLE__
#define BYTE_SHIFT(i) (8 * (i))
#else
#define BYTE_SHIFT(i) (24 - 8 * (i))
#endif
/* Plane i of a block's 32 code bytes x (uint8, 8 lanes of 4 bytes): byte i of each lane,
 * sign-extended (q, a) or zero-extended (u). Lane L of plane i is code 4L + i. */
#define SPLANE(x, i) (as_int8((x) << (uint8)(24 - BYTE_SHIFT(i))) >> (int8)(24))
#define UPLANE(x, i) as_int8(((x) >> (uint8)(BYTE_SHIFT(i))) & (uint8)(0xff))

/* The 32 code bytes of a block at p as uint8: two 16-byte loads joined by a vector literal
 * (bit casts; p needs no alignment). */
#define LOAD32(p) ((uint8)(as_uint4(vload16(0, (p))), as_uint4(vload16(1, (p)))))

/* The CPU's eight four-product lanes of one block: lane L = sum over i of weight plane i
 * times activation plane i of the 32 activation bytes x (exact). A macro: an int8
 * argument or result would be a 256-bit vector crossing a call. */
#define LANE_SUMS(w, x)                                                                            \
    ((w[0] * SPLANE(x, 0) + w[1] * SPLANE(x, 1)) + (w[2] * SPLANE(x, 2) + w[3] * SPLANE(x, 3)))

/* The weight planes of the block whose codes start at p: q (orders 0, 1) or u = q + 128
 * (order 2). */
#if Q8_0_ORDER == 2
#define WEIGHT_PLANES(p, planes)                                                                   \
    do {                                                                                           \
        const uint8 x_ = LOAD32(p) ^ (uint8)(0x80808080u);                                         \
        for (int i_ = 0; i_ < 4; i_++)                                                             \
            planes[i_] = UPLANE(x_, i_);                                                           \
    } while (0)
#else
#define WEIGHT_PLANES(p, planes)                                                                   \
    do {                                                                                           \
        const uint8 x_ = LOAD32(p);                                                                \
        for (int i_ = 0; i_ < 4; i_++)                                                             \
            planes[i_] = SPLANE(x_, i_);                                                           \
    } while (0)
#endif

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

    /* Order 0: one scalar chain dot[t]. Orders 1, 2: acc[t][c][h] holds lanes 4h..4h+3 of
     * chain c (block b goes to chain b % CHAINS), and order 2 its offset sums off[t][c]. */
#if Q8_0_ORDER == 0
    float dot[ROWS];
    for (uint t = 0; t < ROWS; t++)
        dot[t] = 0.0f;
#else
    float4 acc[ROWS][CHAINS][2];
    for (uint t = 0; t < ROWS; t++) {
        for (int c = 0; c < CHAINS; c++) {
            acc[t][c][0] = (float4)(0.0f);
            acc[t][c][1] = (float4)(0.0f);
        }
    }
#endif
#if Q8_0_ORDER == 2
    float off[ROWS][CHAINS];
    for (uint t = 0; t < ROWS; t++)
        for (int c = 0; c < CHAINS; c++)
            off[t][c] = 0.0f;
#endif
    for (uint b0 = 0; b0 < nb; b0 += CHAINS) {
#pragma unroll
        for (uint c = 0; c < CHAINS; c++) {
            const uint b = b0 + c;
            if (b < nb) {
                const __global uchar *blk = wrow + (size_t)b * Q8_0_BLOCK_BYTES;
                const float d = load_f16(blk);
                int8 wp[4];
                WEIGHT_PLANES(blk + 2, wp);
                for (uint t = 0; t < rows; t++) {
                    const size_t r = r0 + t;
                    const uint8 x = LOAD32(qs + r * k + (size_t)b * QK);
                    const int8 l = LANE_SUMS(wp, x);
                    const __global float *s = scales + (r * nb + b) * 2;
#if Q8_0_ORDER == 0
                    const int4 l4 = l.lo + l.hi;
                    const int isum = (l4.x + l4.y) + (l4.z + l4.w);
                    dot[t] = dot[t] + (d * s[0]) * (float)isum;
#else
                    const float4 scale = (float4)(d * s[0]);
                    acc[t][c][0] = fma(convert_float4(l.lo), scale, acc[t][c][0]);
                    acc[t][c][1] = fma(convert_float4(l.hi), scale, acc[t][c][1]);
#endif
#if Q8_0_ORDER == 2
                    off[t][c] = off[t][c] + (d * -128.0f) * s[1];
#endif
                }
            }
        }
    }
    for (uint t = 0; t < rows; t++) {
#if Q8_0_ORDER == 0
        const float v = dot[t];
#else
        /* The 8 lanes v summed by hsum8: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)). */
#if Q8_0_ORDER == 1
        const float4 lo = acc[t][0][0] + acc[t][1][0]; /* v = even + odd */
        const float4 hi = acc[t][0][1] + acc[t][1][1];
#else
        const float4 lo = (acc[t][0][0] + acc[t][2][0]) + (acc[t][1][0] + acc[t][3][0]);
        const float4 hi = (acc[t][0][1] + acc[t][2][1]) + (acc[t][1][1] + acc[t][3][1]);
#endif
        const float4 h = lo + hi;
        float v = (h.x + h.z) + (h.y + h.w);
#endif
#if Q8_0_ORDER == 2
        v = v + ((off[t][0] + off[t][2]) + (off[t][1] + off[t][3]));
#endif
        y[(size_t)(r0 + t) * n + j] = v;
    }
}

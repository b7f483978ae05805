/* matmul_f32_f32 for many rows: y[r, j] = act(sum_k x[r, k] * w[j, k] + bias[j]), a
 * register-blocked tiled GEMM. A work-group computes a TILE_M x TILE_N block of y and walks
 * k in chunks of TILE_K: each chunk of the block's x rows and w rows is staged in local
 * memory, x as it is and w transposed to k-major, read from global memory as float4s along
 * k with consecutive work-items reading consecutive float4s of a row (coalesced). Each
 * work-item then keeps WORK_M rows (strided by the group's height) x WORK_N consecutive
 * columns of outputs in vector registers, WORK_N / VW of VW floats per row (VW below: 16 with
 * AVX-512, 8 with AVX, 4 on other x86 CPUs); for each of those column vectors in turn, per
 * k: one vector of VW weights from local memory and one broadcast x value per row.
 *
 * Every output is one f32 fma chain in k order starting from 0 (k past the end reads as
 * zeros, and fma(0, 0, acc) = acc, up to the sign of a zero), then + bias, then GELU: the
 * untiled kernel's operations, so its bits for act 0. GELU's erf is evaluated on vectors here; an
 * implementation's vector erf may round differently from its scalar one (both within erf's
 * 16 ulp). Within tolerance of the CPU, like the untiled kernel.
 *
 * x: m * k floats; w: n * k floats ([n, k] row-major, PyTorch's layout); bias: n floats or
 * NULL; y: m * n floats. act: 0 none, 1 exact GELU (gelu_erf). Any m, n, k >= 1.
 * Global size: (ceil(n / TILE_N) * TILE_N / WORK_N, ceil(m / TILE_M) * TILE_M / WORK_M),
 * local size exactly (TILE_N / WORK_N, TILE_M / WORK_M): the group is the tile (required,
 * reqd_work_group_size).
 *
 * Defaults below (-DTILE_M=... etc. override them): the fastest of the shapes tried on PoCL
 * (kernels/README.md), 32 work-items of 8 x 16 outputs, and 32 KB of local memory (OpenCL's
 * minimum CL_DEVICE_LOCAL_MEM_SIZE): TILE_M * (TILE_K + PAD_X) + TILE_K * (TILE_N + PAD_W)
 * floats. On a GPU, fewer outputs per work-item and padded local rows (fewer bank
 * conflicts) should suit better, e.g. -DWORK_M=4 -DWORK_N=4 -DTILE_K=16 -DPAD_X=1 -DPAD_W=4
 * (16 x 16 work-items). WORK_M is 1, 2, 4 or 8; WORK_N 2, 4, 8 or 16; TILE_K a multiple of
 * 4; TILE_M a multiple of WORK_M and TILE_N of WORK_N.
 *
 * Written for PoCL's CPU compiler too, which runs a group as loops over its work-items
 * between barriers: the accumulators are explicit vectors in named registers (PoCL keeps a
 * private array in memory, and packs scalar accumulators into one vector it gathers into),
 * and the staging loops have constant trip counts and only group-uniform branches (else it
 * runs the compute loop one k at a time across the work-items, the accumulators going
 * through memory each time).
 */
#include "common.h"

#ifndef TILE_M
#define TILE_M 64
#endif
#ifndef TILE_N
#define TILE_N 64
#endif
#ifndef TILE_K
#define TILE_K 64
#endif
#ifndef WORK_M
#define WORK_M 8
#endif
#ifndef WORK_N
#define WORK_N 16
#endif
#ifndef PAD_X
#define PAD_X 0
#endif
#ifndef PAD_W
#define PAD_W 0
#endif

#define GROUP_N (TILE_N / WORK_N) /* local size 0: work-items across the tile's columns */
#define GROUP_M (TILE_M / WORK_M) /* local size 1: work-items across the tile's rows */
#define GROUP_SIZE (GROUP_N * GROUP_M)

#if TILE_M % WORK_M != 0 || TILE_N % WORK_N != 0 || TILE_K % 4 != 0
#error "TILE_M must be a multiple of WORK_M, TILE_N of WORK_N, TILE_K of 4"
#endif
#if WORK_M != 1 && WORK_M != 2 && WORK_M != 4 && WORK_M != 8
#error "WORK_M must be 1, 2, 4 or 8"
#endif
#if WORK_N != 2 && WORK_N != 4 && WORK_N != 8 && WORK_N != 16
#error "WORK_N must be 2, 4, 8 or 16 (a vector width)"
#endif

/* float4 loads per work-item per chunk, for x and for w (rounded up). */
#define X_UNITS ((TILE_M * TILE_K / 4 + GROUP_SIZE - 1) / GROUP_SIZE)
#define W_UNITS ((TILE_N * TILE_K / 4 + GROUP_SIZE - 1) / GROUP_SIZE)

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

/* A work-item's WORK_N columns of a row are PARTS vectors of VW floats. On x86, a vector
 * wider than the target's registers passed to or returned from any function (builtins such
 * as fma, vload or erf included) changes the calling convention: 8 floats need AVX, 16
 * AVX-512, and PoCL's compiler warns (an error with -Werror) when it compiles for a host
 * without them. So VW is the widest vector the target's ABI passes as is (its clang defines
 * __AVX__ / __AVX512F__ accordingly; 4 floats = 128 bits on any x86-64), up to WORK_N;
 * other targets have no such rule and take WORK_N. The bits do not depend on VW (each
 * output is the same fma chain); -DMAX_VW=4 or 8 narrows the vectors further (the tests use
 * it to cover the split on an AVX-512 host). */
#if defined(__x86_64__) || defined(__i386__)
#if defined(__AVX512F__)
#define TARGET_VW 16
#elif defined(__AVX__)
#define TARGET_VW 8
#else
#define TARGET_VW 4
#endif
#else
#define TARGET_VW 16
#endif
#ifndef MAX_VW
#define MAX_VW TARGET_VW
#endif
#if WORK_N <= MAX_VW && WORK_N <= TARGET_VW
#define VW WORK_N
#elif MAX_VW < TARGET_VW
#define VW MAX_VW
#else
#define VW TARGET_VW
#endif
#define PARTS (WORK_N / VW)
#if (VW != 2 && VW != 4 && VW != 8 && VW != 16) || PARTS > 4
#error "MAX_VW must be a power of two, at least WORK_N / 4"
#endif
#define VEC CAT(float, VW)
#define VLOAD CAT(vload, VW)
#define VSTORE CAT(vstore, VW)

/* X(i, q) for each of the work-item's rows i = 0 .. WORK_M-1 (named registers, not an
 * array), and for each of a row's vectors q = 0 .. PARTS-1. */
#if WORK_M == 1
#define FOR_ROWS(X, q) X(0, q)
#elif WORK_M == 2
#define FOR_ROWS(X, q) X(0, q) X(1, q)
#elif WORK_M == 4
#define FOR_ROWS(X, q) X(0, q) X(1, q) X(2, q) X(3, q)
#else
#define FOR_ROWS(X, q) X(0, q) X(1, q) X(2, q) X(3, q) X(4, q) X(5, q) X(6, q) X(7, q)
#endif

#if PARTS == 1
#define FOR_PARTS(X, i) X(i, 0)
#elif PARTS == 2
#define FOR_PARTS(X, i) X(i, 0) X(i, 1)
#else
#define FOR_PARTS(X, i) X(i, 0) X(i, 1) X(i, 2) X(i, 3)
#endif

/* Local row lengths: xs[r][kk] and ws[kk][c]. */
#define XS_STRIDE (TILE_K + PAD_X)
#define WS_STRIDE (TILE_N + PAD_W)

/* gelu_erf (common.h) on a vector, operation for operation. */
#define GELU_VEC(v) (0.5f * (v) * (1.0f + erf((v) * M_SQRT1_2_F)))

/* acc<i>_<q>: row i's columns q*VW .. q*VW+VW-1. The chunk is walked once per q (a k loop
 * over the columns of vector q for every row, b their weights at k): the live accumulators
 * are then WORK_M vectors, which fit x86's 16 AVX registers (WORK_M * PARTS vectors at once
 * did not: the compiler kept some in memory, 1.3-1.5x slower on AVX2). */
#define DECLARE_ACC(i, q) VEC acc##i##_##q = (VEC)(0.0f);
#define DECLARE_PART(_, q) FOR_ROWS(DECLARE_ACC, q)
#define FMA_ACC(i, q) acc##i##_##q = fma((VEC)(xp[(i) * GROUP_M * XS_STRIDE + kk]), b, acc##i##_##q);
#define K_LOOP(_, q)                                                                               \
    for (int kk = 0; kk < TILE_K; kk++) {                                                          \
        const VEC b = VLOAD(q, wp + kk * WS_STRIDE);                                               \
        FOR_ROWS(FMA_ACC, q)                                                                       \
    }
#define STORE_ACC(i, q) store_part(acc##i##_##q, r0 + ty + (i) * GROUP_M, j0 + (q) * VW, m, n, bias, act, y);
#define STORE_PART(_, q) FOR_ROWS(STORE_ACC, q)

/* a[row, col .. col+4] of a rows x cols row-major matrix, zeros outside it (selects, not
 * branches: see the top). */
inline float4 load4_edge(const __global float *a, const uint row, const uint col, const uint rows, const uint cols) {
    const int ok = row < rows;
    const __global float *p = a + (size_t)(ok ? row : 0) * cols;
    float4 v;
    v.s0 = ok && col < cols ? p[col] : 0.0f;
    v.s1 = ok && col + 1 < cols ? p[col + 1] : 0.0f;
    v.s2 = ok && col + 2 < cols ? p[col + 2] : 0.0f;
    v.s3 = ok && col + 3 < cols ? p[col + 3] : 0.0f;
    return v;
}

/* y[row, j0 .. j0+VW] = act(v + bias), the columns < n. */
inline void store_part(VEC v, const uint row, const uint j0, const uint m, const uint n,
                       const __global float *bias, const uint act, __global float *y) {
    if (row >= m)
        return;
    if (j0 + VW <= n) {
        if (bias)
            v += VLOAD(0, bias + j0);
        if (act == 1)
            v = GELU_VEC(v);
        VSTORE(v, 0, y + (size_t)row * n + j0);
    } else {
        float out[VW];
        VSTORE(v, 0, out);
        for (uint c = 0; c < VW && j0 + c < n; c++) {
            float s = out[c];
            if (bias)
                s += bias[j0 + c];
            if (act == 1)
                s = gelu_erf(s);
            y[(size_t)row * n + j0 + c] = s;
        }
    }
}

/* The work-group must be the tile: launching another local size is an error. */
__attribute__((reqd_work_group_size(GROUP_N, GROUP_M, 1)))
__kernel void matmul_f32_f32_tiled(const __global float *x, const __global float *w, const __global float *bias,
                                   __global float *y, const uint n, const uint k, const uint act, const uint m) {
    const uint tx = get_local_id(0);
    const uint ty = get_local_id(1);
    const uint lid = ty * GROUP_N + tx;
    const uint c0 = get_group_id(0) * TILE_N; /* first output column (weight row) of the tile */
    const uint r0 = get_group_id(1) * TILE_M; /* first output row */

    __local float xs[TILE_M * XS_STRIDE];  /* xs[r][kk] = x[r0 + r, k0 + kk] */
    __local float ws[TILE_K * WS_STRIDE];  /* ws[kk][c] = w[c0 + c, k0 + kk] */

    FOR_PARTS(DECLARE_PART, _)

    for (uint k0 = 0; k0 < k; k0 += TILE_K) {
        /* Stage the chunk, zeros outside the matrices (uniform branches only: see the top). */
        const int full_k = k0 + TILE_K <= k;
        const int x_inside = full_k && r0 + TILE_M <= m;
        const int w_inside = full_k && c0 + TILE_N <= n;
        for (uint t = 0; t < X_UNITS; t++) {
            const uint u = lid + t * GROUP_SIZE;
            const uint rr = u / (TILE_K / 4), kk = u % (TILE_K / 4) * 4;
            if (X_UNITS * GROUP_SIZE == TILE_M * TILE_K / 4 || rr < TILE_M) {
                const float4 v = x_inside ? vload4(0, x + (size_t)(r0 + rr) * k + k0 + kk) : load4_edge(x, r0 + rr, k0 + kk, m, k);
                vstore4(v, 0, xs + rr * XS_STRIDE + kk);
            }
        }
        for (uint t = 0; t < W_UNITS; t++) {
            const uint u = lid + t * GROUP_SIZE;
            const uint cc = u / (TILE_K / 4), kk = u % (TILE_K / 4) * 4;
            if (W_UNITS * GROUP_SIZE == TILE_N * TILE_K / 4 || cc < TILE_N) {
                const float4 v = w_inside ? vload4(0, w + (size_t)(c0 + cc) * k + k0 + kk) : load4_edge(w, c0 + cc, k0 + kk, n, k);
                __local float *d = ws + kk * WS_STRIDE + cc;
                d[0] = v.s0;
                d[WS_STRIDE] = v.s1;
                d[2 * WS_STRIDE] = v.s2;
                d[3 * WS_STRIDE] = v.s3;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        {
            const __local float *xp = xs + ty * XS_STRIDE;
            const __local float *wp = ws + tx * WORK_N;
            FOR_PARTS(K_LOOP, _)
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    const uint j0 = c0 + tx * WORK_N;
    FOR_PARTS(STORE_PART, _)
}

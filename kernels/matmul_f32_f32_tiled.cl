/* matmul_f32_f32 for many rows: y[r, j] = act(sum_k x[r, k] * w[j, k] + bias[j]), a
 * register-blocked tiled GEMM. A work-group computes a TILE_M x TILE_N block of y and walks
 * k in chunks of TILE_K: each chunk of the block's x rows and w rows is staged in local
 * memory, x as it is and w transposed to k-major, read from global memory as float4s along
 * k with consecutive work-items reading consecutive float4s of a row (coalesced). Each
 * work-item then keeps WORK_M rows (strided by the group's height) x WORK_N consecutive
 * columns of outputs in WORK_M registers of type floatWORK_N: per k, one vector of WORK_N
 * weights from local memory and one broadcast x value per row.
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
#define VEC CAT(float, WORK_N)
#define VLOAD CAT(vload, WORK_N)
#define VSTORE CAT(vstore, WORK_N)

/* X(i) for each of the work-item's rows i = 0 .. WORK_M-1 (named registers, not an array). */
#if WORK_M == 1
#define FOR_ROWS(X) X(0)
#elif WORK_M == 2
#define FOR_ROWS(X) X(0) X(1)
#elif WORK_M == 4
#define FOR_ROWS(X) X(0) X(1) X(2) X(3)
#else
#define FOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#endif

/* Local row lengths: xs[r][kk] and ws[kk][c]. */
#define XS_STRIDE (TILE_K + PAD_X)
#define WS_STRIDE (TILE_N + PAD_W)

/* gelu_erf (common.h) on a vector, operation for operation. */
#define GELU_VEC(v) (0.5f * (v) * (1.0f + erf((v) * M_SQRT1_2_F)))

#define DECLARE_ACC(i) VEC acc##i = (VEC)(0.0f);
#define FMA_ROW(i) acc##i = fma((VEC)(xp[(i) * GROUP_M * XS_STRIDE + kk]), b, acc##i);
#define STORE_ROW(i) store_row(acc##i, r0 + ty + (i) * GROUP_M, j0, m, n, bias, act, y);

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

inline void store_row(VEC v, const uint row, const uint j0, const uint m, const uint n,
                      const __global float *bias, const uint act, __global float *y) {
    if (row >= m)
        return;
    if (j0 + WORK_N <= n) {
        if (bias)
            v += VLOAD(0, bias + j0);
        if (act == 1)
            v = GELU_VEC(v);
        VSTORE(v, 0, y + (size_t)row * n + j0);
    } else {
        float out[WORK_N];
        VSTORE(v, 0, out);
        for (uint c = 0; c < WORK_N && j0 + c < n; c++) {
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

    FOR_ROWS(DECLARE_ACC)

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
            for (int kk = 0; kk < TILE_K; kk++) {
                const VEC b = VLOAD(0, wp + kk * WS_STRIDE);
                FOR_ROWS(FMA_ROW)
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    const uint j0 = c0 + tx * WORK_N;
    FOR_ROWS(STORE_ROW)
}

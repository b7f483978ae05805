/* matmul_q4_1_q8_1 for many activation rows (prefill, batched decode): the same result bit
 * for bit (every (row, column) pair keeps its own eight lanes and `mins`, updated in block
 * order, then hsum8), with the weight reads shared. A work-group of TILE_COLS work-items
 * covers TILE_COLS consecutive weight rows (output columns) and TILE_ROWS activation rows:
 * the activation blocks of those rows are staged in local memory, CHUNK_BLOCKS blocks at a
 * time, and each work-item unpacks a weight block once for its TILE_ROWS rows.
 *
 * Arguments as matmul_q4_1_q8_1, plus m (activation rows).
 * Global size: (n rounded up to TILE_COLS, ceil(m / TILE_ROWS) * 1) with local size
 * (TILE_COLS, 1). Defaults below; override with -DTILE_COLS=... etc.
 */
#include "common.h"

#ifndef TILE_COLS
#define TILE_COLS 64
#endif
#ifndef TILE_ROWS
#define TILE_ROWS 4
#endif
#ifndef CHUNK_BLOCKS
#define CHUNK_BLOCKS 8
#endif

__kernel void matmul_q4_1_q8_1_tiled(const __global uchar *w, const __global char *qs,
                                     const __global float *scales, const __global float *sums,
                                     __global float *y, const uint n, const uint k, const uint m) {
    const uint j = get_global_id(0);
    const uint lid = get_local_id(0);
    const uint r0 = get_group_id(1) * TILE_ROWS;
    const uint nb = k / QK;
    const int live_col = j < n;

    __local char a_tile[TILE_ROWS][CHUNK_BLOCKS * QK];
    __local float d_tile[TILE_ROWS][CHUNK_BLOCKS];
    __local float s_tile[TILE_ROWS][CHUNK_BLOCKS];

    float lane[TILE_ROWS][8];
    float mins[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; r++) {
        for (int g = 0; g < 8; g++)
            lane[r][g] = 0.0f;
        mins[r] = 0.0f;
    }
    const __global uchar *wrow = w + (size_t)(live_col ? j : 0) * nb * Q4_1_BLOCK_BYTES;

    for (uint b0 = 0; b0 < nb; b0 += CHUNK_BLOCKS) {
        const uint chunk = min((uint)CHUNK_BLOCKS, nb - b0);
        /* Stage the tile's activation blocks b0..b0+chunk (rows past m read as zeros and are
         * never written out). */
        for (uint i = lid; i < TILE_ROWS * CHUNK_BLOCKS * QK; i += TILE_COLS) {
            const uint r = i / (CHUNK_BLOCKS * QK), at = i % (CHUNK_BLOCKS * QK);
            const uint row = r0 + r;
            a_tile[r][at] = (row < m && at < chunk * QK) ? qs[(size_t)row * k + (size_t)b0 * QK + at] : 0;
        }
        for (uint i = lid; i < TILE_ROWS * CHUNK_BLOCKS; i += TILE_COLS) {
            const uint r = i / CHUNK_BLOCKS, b = i % CHUNK_BLOCKS;
            const uint row = r0 + r;
            const int ok = row < m && b < chunk;
            d_tile[r][b] = ok ? scales[((size_t)row * nb + b0 + b) * 2] : 0.0f;
            s_tile[r][b] = ok ? sums[(size_t)row * nb + b0 + b] : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (live_col) {
            for (uint b = 0; b < chunk; b++) {
                const __global uchar *blk = wrow + (size_t)(b0 + b) * Q4_1_BLOCK_BYTES;
                const float d = load_f16(blk);
                const float mw = load_f16(blk + 2);
                uchar codes[QK];
                for (int i = 0; i < 16; i++) {
                    const uchar byte = blk[4 + i];
                    codes[i] = byte & 0x0f;
                    codes[i + 16] = byte >> 4;
                }
                for (int r = 0; r < TILE_ROWS; r++) {
                    const float dd = d * d_tile[r][b];
                    for (int g = 0; g < 8; g++) {
                        int isum = 0;
                        for (int t = 0; t < 4; t++)
                            isum += (int)codes[4 * g + t] * (int)a_tile[r][b * QK + 4 * g + t];
                        lane[r][g] = fma(dd, (float)isum, lane[r][g]);
                    }
                    mins[r] = fma(mw, s_tile[r][b], mins[r]);
                }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (!live_col)
        return;
    for (int r = 0; r < TILE_ROWS; r++) {
        const uint row = r0 + r;
        if (row < m)
            y[(size_t)row * n + j] = hsum8(lane[r]) + mins[r];
    }
}

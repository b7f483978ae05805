/* x[r, :] = dequantised row tokens[r] of a GGUF Q8_0 embedding table (weight = q * d),
 * as the CPU's quant::dequantize_row (one f32 product per weight: bitwise equal).
 *
 * table:  vocab rows of dim/32 blocks of 34 bytes (token_embd.weight in place)
 * tokens: rows uints (the caller checks them against the vocabulary)
 * x:      rows * dim floats
 * Global size: (dim, rows).
 */
#include "common.h"

__kernel void embedding_lookup_q8_0(const __global uchar *table, const __global uint *tokens,
                                    __global float *x, const uint dim) {
    const uint c = get_global_id(0);
    const uint r = get_global_id(1);
    if (c >= dim)
        return;
    const size_t row_bytes = (size_t)(dim / QK) * Q8_0_BLOCK_BYTES;
    const __global uchar *blk = table + (size_t)tokens[r] * row_bytes + (size_t)(c / QK) * Q8_0_BLOCK_BYTES;
    const float d = load_f16(blk);
    x[(size_t)r * dim + c] = (float)((const __global char *)blk)[2 + c % QK] * d;
}

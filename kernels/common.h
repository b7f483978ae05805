/* Shared definitions for ferroserve's OpenCL C kernels (OpenCL C 1.2, no extensions).
 *
 * Why hand-written kernels: the weights stay in GGUF's packed blocks and the chat model's
 * kernels must reproduce the CPU kernels' rounding order (crates/ferroserve-kernels), so
 * that a greedy continuation is the same on either device. No OpenCL library (CLBlast,
 * clBLAS) multiplies GGUF blocks, and none fixes its reduction order per output element.
 *
 * Build every kernel with `-cl-std=CL1.2 -cl-fp32-correctly-rounded-divide-sqrt -I kernels`
 * and never with -cl-fast-relaxed-math / -cl-mad-enable / -cl-unsafe-math-optimizations:
 * the bitwise kernels need IEEE division and sqrt (OpenCL otherwise allows 2.5 and 3 ulp)
 * and no contraction of a*b+c into fma (the pragma below; fma is written out where the
 * CPU kernel fuses). See README.md for which kernels are bitwise and on which devices.
 */
#ifndef FERROSERVE_COMMON_H
#define FERROSERVE_COMMON_H

/* OpenCL C lets the compiler contract a*b+c into one fma by default; the CPU kernels
 * (Rust) never contract, and their fmas are explicit. This is a core pragma, not an
 * extension. */
#pragma OPENCL FP_CONTRACT OFF

/* GGUF block formats: 32 weights per block. */
#define QK 32
/* Q4_1: f16 d, f16 m, 16 bytes of nibbles (low nibbles = weights 0..15, high = 16..31). */
#define Q4_1_BLOCK_BYTES 20
/* Q8_0: f16 d, 32 signed bytes. */
#define Q8_0_BLOCK_BYTES 34

/* The little-endian IEEE half at p as float (exact). p must be 2-byte aligned: every f16
 * field of the GGUF blocks sits at an even offset (blocks of 20 and 34 bytes). */
inline float load_f16(const __global uchar *p) {
    return vload_half(0, (const __global half *)p);
}

/* x rounded to the nearest IEEE half (ties to even) and widened back: what the CPU
 * kernels' f32_to_f16 / f16_to_f32 pair does. `half` variables need cl_khr_fp16, so the
 * half goes through a private ushort. */
inline float round_f16(float x) {
    ushort h;
    vstore_half_rte(x, 0, (__private half *)&h);
    return vload_half(0, (const __private half *)&h);
}

/* Sum of eight lanes in the CPU's fixed tree (llama.cpp's hsum_float_8 / `_mm256` hsum):
 * upper half onto lower, then (l0 + l2) + (l1 + l3). */
inline float hsum8(const float l[8]) {
    float h0 = l[4] + l[0], h1 = l[5] + l[1], h2 = l[6] + l[2], h3 = l[7] + l[3];
    return (h0 + h2) + (h1 + h3);
}

/* ---------------------------------------------------------------------------------------
 * Exact emulation of a sequential f64 sum of non-negative f32 values, for RMSNorm: the
 * CPU kernel (llama.cpp's order) sums the f32 squares in f64, and fp64 is an extension.
 * A positive double is kept as mant * 2^exp with a 53-bit mantissa (bit 52 set); every
 * addition rounds to nearest even exactly as an IEEE double addition does.
 * ------------------------------------------------------------------------------------- */

typedef struct {
    ulong mant; /* 0 for zero, else in [2^52, 2^53) */
    int exp;
    float special; /* sum of the non-finite terms (inf or NaN), 0 if none */
} soft_f64_sum;

inline soft_f64_sum soft_f64_zero(void) {
    soft_f64_sum s;
    s.mant = 0;
    s.exp = 0;
    s.special = 0.0f;
    return s;
}

/* Drops the low `drop` bits (1 <= drop <= 63) of m, rounding to nearest even; `sticky`
 * says whether nonzero bits lie below m. */
inline ulong round_shift_right(ulong m, int drop, int sticky) {
    ulong kept = m >> drop;
    ulong rest = m & ((1UL << drop) - 1UL);
    ulong halfway = 1UL << (drop - 1);
    if (rest > halfway || (rest == halfway && (sticky || (kept & 1UL))))
        kept += 1UL;
    return kept;
}

/* s + t in IEEE double arithmetic, t a non-negative float (its f64 value is exact). */
inline soft_f64_sum soft_f64_add(soft_f64_sum s, float t) {
    if (!isfinite(t)) {
        s.special += t;
        return s;
    }
    if (t == 0.0f)
        return s;
    uint bits = as_uint(t);
    uint biased = bits >> 23;
    ulong m;
    int e;
    if (biased != 0) {
        m = (ulong)((bits & 0x7fffffu) | 0x800000u) << 29;
        e = (int)biased - 150 - 29;
    } else { /* subnormal float: normal as a double */
        ulong f = (ulong)(bits & 0x7fffffu);
        int shift = (int)clz(f) - 11;
        m = f << shift;
        e = -149 - shift;
    }
    if (s.mant == 0) {
        s.mant = m;
        s.exp = e;
        return s;
    }
    ulong big = s.mant, small = m;
    int eb = s.exp, es = e;
    if (es > eb) {
        big = m;
        small = s.mant;
        eb = e;
        es = s.exp;
    }
    int shift = eb - es;
    if (shift >= 54) /* small < half an ulp of big: big is the rounded sum */
    {
        s.mant = big;
        s.exp = eb;
        return s;
    }
    /* Ten guard bits: both operands < 2^63, their sum < 2^64. */
    ulong a = big << 10;
    ulong b = small << 10;
    int sticky = 0;
    if (shift > 0) {
        sticky = (b & ((1UL << shift) - 1UL)) != 0UL;
        b >>= shift;
    }
    ulong sum = a + b;
    int drop = (sum >> 63) ? 11 : 10;
    ulong r = round_shift_right(sum, drop, sticky);
    int re = eb - 10 + drop;
    if (r >> 53) { /* rounding carried out: 2^53 */
        r >>= 1;
        re += 1;
    }
    s.mant = r;
    s.exp = re;
    return s;
}

/* (float)(s / n) as Rust computes `(sum / n as f64) as f32`: the quotient rounded to a
 * double, then that double rounded to a float (both to nearest even), 1 <= n < 2^31. */
inline float soft_f64_div_to_f32(soft_f64_sum s, uint n) {
    if (s.special != 0.0f || isnan(s.special))
        return s.special; /* inf / n = inf, NaN stays NaN */
    if (s.mant == 0)
        return 0.0f;
    /* Long division of mant * 2^11 (bit 63 set) by n: q1 (>= 2^32 since n < 2^31), then
     * 32 more quotient bits q2, the remainder as sticky. */
    ulong num = s.mant << 11;
    ulong q1 = num / n, r1 = num % n;
    ulong t = r1 << 32;
    ulong q2 = t / n, r2 = t % n;
    int top = 63 - (int)clz(q1); /* >= 32 */
    int lift = 63 - top; /* <= 31 */
    ulong window = (q1 << lift) | (lift ? (q2 >> (32 - lift)) : 0UL);
    ulong below = lift ? (q2 & ((1UL << (32 - lift)) - 1UL)) : q2;
    int sticky = (below != 0UL) || (r2 != 0UL);
    /* (q1:q2) is the quotient in units of 2^(exp - 11 - 32); window = (q1:q2) >> (32 - lift)
     * (bit 63 set), so its unit is 2^(exp - 11 - lift). */
    int unit = s.exp - 11 - lift;
    ulong d53 = round_shift_right(window, 11, sticky);
    int de = unit + 11;
    if (d53 >> 53) {
        d53 >>= 1;
        de += 1;
    }
    /* The double d53 * 2^de rounded to float: keep 24 bits, or fewer below 2^-126 where
     * the float quantum is 2^-149. */
    int qe = max(de + 29, -149);
    int drop = qe - de;
    ulong f24;
    if (drop >= 64) {
        f24 = 0UL;
    } else if (drop == 0) {
        f24 = d53;
    } else {
        f24 = round_shift_right(d53, drop, 0);
    }
    return ldexp((float)f24, qe); /* exact: f24 <= 2^24 */
}

/* e^x as llama.cpp's ggml_v_expf and the CPU's llama_ops::ggml_expf compute it: x = n ln2 + b
 * with n rounded by the 1.5*2^23 shift, a degree-5 polynomial in b with fused multiply-adds,
 * times 2^n in one rounding; |n| > 192 saturates to 0 or inf. Same constants and order as
 * the CPU, so the same bits (max error about 1.5 ulp). */
inline float ggml_expf(float x) {
    const float shift = 0x1.8p23f;
    const float log2e = as_float(0x3fb8aa3bu);
    const float ln2_hi = as_float(0x3f317200u);
    const float ln2_lo = as_float(0x35bfbe8eu);
    const float c0 = as_float(0x3f7ffff6u);
    const float c1 = as_float(0x3efffedbu);
    const float c2 = as_float(0x3e2aaf33u);
    const float c3 = as_float(0x3d2b9f17u);
    const float c4 = as_float(0x3c072010u);
    const float z = fma(x, log2e, shift);
    const float n = z - shift;
    const float b = fma(-n, ln2_lo, fma(-n, ln2_hi, x));
    const float u = b * b;
    const float j = fma(fma(fma(c4, b, c3), u, fma(c2, b, c1)), u, fma(c0, b, 1.0f));
    if (fabs(n) > 192.0f)
        return n <= 0.0f ? 0.0f : INFINITY;
    /* convert_int_sat maps NaN to 0 (j is NaN then anyway). */
    return ldexp(j, convert_int_sat(n));
}

/* Exact GELU, 0.5 x (1 + erf(x / sqrt 2)). The CPU uses an Abramowitz-Stegun erf
 * (|error| <= 1.5e-7) and OpenCL's erf is allowed 16 ulp: within tolerance, not bitwise. */
inline float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erf(x * M_SQRT1_2_F));
}

/* Sum over the work-group of one value per work-item, in a fixed tree (so a given local
 * size always gives the same bits). The local size must be a power of two; `scratch` holds
 * one float per work-item. Every work-item gets the sum. */
inline float group_sum(float v, __local float *scratch) {
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint half_size = lsize / 2; half_size > 0; half_size /= 2) {
        if (lid < half_size)
            scratch[lid] = scratch[lid] + scratch[lid + half_size];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE); /* scratch may be reused right after */
    return total;
}

/* The same for the maximum (NaN-ignoring, as fmax). */
inline float group_max(float v, __local float *scratch) {
    const uint lid = get_local_id(0);
    const uint lsize = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint half_size = lsize / 2; half_size > 0; half_size /= 2) {
        if (lid < half_size)
            scratch[lid] = fmax(scratch[lid], scratch[lid + half_size]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float m = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return m;
}

/* ---------------------------------------------------------------------------------------
 * Paged KV cache (the CPU's PagedKvLayout, crates/ferroserve-kernels/src/cpu/llama_ops.rs):
 * IEEE halves in blocks of block_tokens token slots; a block of one layer's K (or V) cache
 * is kv_heads * head_dim * block_tokens halves, the KV head outermost, with
 *   K transposed: [kv_head][head_dim][block_tokens]  -> kv_k_index
 *   V as rows:    [kv_head][block_tokens][head_dim]  -> kv_v_index
 * ------------------------------------------------------------------------------------- */

inline size_t kv_k_index(uint block, uint kv_head, uint c, uint slot, uint kv_heads,
                         uint head_dim, uint block_tokens) {
    return (size_t)block * kv_heads * head_dim * block_tokens +
           ((size_t)kv_head * head_dim + c) * block_tokens + slot;
}

inline size_t kv_v_index(uint block, uint kv_head, uint c, uint slot, uint kv_heads,
                         uint head_dim, uint block_tokens) {
    return (size_t)block * kv_heads * head_dim * block_tokens +
           ((size_t)kv_head * block_tokens + slot) * head_dim + c;
}

/* The exponential of the paged attention's softmax. The CPU calls libm's expf, which
 * OpenCL C cannot reproduce (its exp is allowed 3 ulp, and glibc's expf computes in double);
 * the tests build with -DATTENTION_EXP=ggml_expf to check every other rounding of the
 * attention kernels bit for bit against the CPU's order, with the same exp on both sides. */
#ifndef ATTENTION_EXP
#define ATTENTION_EXP exp
#endif

#ifdef HEAD_DIM
/* One attention score, q (already rounded to f16) against the cached key at (block, slot),
 * in the CPU kernel's tree (llama_ops::attend_one, after llama.cpp's f16 flash attention):
 * f16 x f16 products (exact in f32); element c of each 64-wide step summed over the steps
 * in order; then x0[i] = (e[i] + e[32+i]) + (e[16+i] + e[48+i]) for i < 16, the sixteen
 * summed as _mm512_reduce_add_ps does (halves of 8, 4, then pairs); times scale.
 * A head width not a multiple of 64 adds its leftover elements in f64 on the CPU; here a
 * compensated (two-sum) f32 accumulation, which matches except near rounding ties. */
inline float attention_score_f16(const float *qh, const __global half *k_cache, uint block,
                                 uint slot, uint kv_head, uint kv_heads, uint block_tokens,
                                 float scale) {
    const uint full = HEAD_DIM / 64 * 64;
    const size_t base = kv_k_index(block, kv_head, 0, slot, kv_heads, HEAD_DIM, block_tokens);
    float x0[16];
    for (uint i = 0; i < 16; i++) {
        float e[4];
        for (uint quarter = 0; quarter < 4; quarter++) {
            const uint c = 16 * quarter + i;
            float acc = 0.0f;
            for (uint step = 0; step < full; step += 64)
                acc += qh[step + c] * vload_half(base + (size_t)(step + c) * block_tokens, k_cache);
            e[quarter] = acc;
        }
        x0[i] = (e[0] + e[2]) + (e[1] + e[3]);
    }
    float t[8];
    for (uint i = 0; i < 8; i++)
        t[i] = x0[8 + i] + x0[i];
    const float u0 = t[4] + t[0], u1 = t[5] + t[1], u2 = t[6] + t[2], u3 = t[7] + t[3];
    float sum = (u0 + u2) + (u1 + u3);
    if (full < HEAD_DIM) {
        float hi = sum, lo = 0.0f;
        for (uint c = full; c < HEAD_DIM; c++) {
            const float p = qh[c] * vload_half(base + (size_t)c * block_tokens, k_cache);
            const float s = hi + p;
            const float bp = s - hi;
            lo += (hi - (s - bp)) + (p - bp);
            hi = s;
        }
        sum = hi + lo;
    }
    return sum * scale;
}

/* One key's step of the online softmax, per value channel, in the CPU kernel's order:
 * a new maximum rescales the f16 accumulator (acc = f16(acc * e^(m - s))), otherwise the
 * key's weight is e^(s - m); then acc = f16(fma(v, weight, acc)) and
 * total = fma(total, rescale, weight). The CPU calls libm's expf; OpenCL's exp is allowed
 * 3 ulp, so this step is within tolerance of the CPU, not bitwise (README.md). */
typedef struct {
    float m;
    float total;
} softmax_state;

inline float online_softmax_step(softmax_state *st, float s, float *rescale) {
    float ms, vs;
    if (s > st->m) {
        ms = ATTENTION_EXP(st->m - s);
        st->m = s;
        vs = 1.0f;
    } else {
        ms = 1.0f;
        vs = ATTENTION_EXP(s - st->m);
    }
    st->total = fma(st->total, ms, vs);
    *rescale = ms;
    return vs;
}
#endif

#endif

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

/* ---------------------------------------------------------------------------------------
 * glibc's expf, bit for bit, without fp64: what the CPU's paged attention calls (Rust's
 * f32::exp is libm's expf; on x86-64 with FMA glibc runs its FMA build of the algorithm
 * of Szabolcs Nagy / Arm optimized-routines). OpenCL's exp() is only promised within
 * 3 ulp, and glibc's algorithm computes in double, so the double operations are emulated
 * exactly in integer arithmetic: a double is (sign, mant * 2^exp) with a 53-bit mantissa,
 * and every operation is one correctly rounded fma (a multiplication is an fma with 0).
 * Only normal doubles occur on this path.
 * ------------------------------------------------------------------------------------- */

typedef struct {
    ulong hi, lo;
} u128;

typedef struct {
    int neg;
    int exp;
    ulong mant; /* 0, or in [2^52, 2^53) */
} sdouble;

inline int u128_clz(u128 a) {
    return a.hi ? (int)clz(a.hi) : 64 + (int)clz(a.lo);
}

inline u128 u128_shl(u128 a, int s) { /* 0 <= s < 128 */
    u128 r;
    if (s == 0)
        return a;
    if (s >= 64) {
        r.hi = a.lo << (s - 64);
        r.lo = 0;
    } else {
        r.hi = (a.hi << s) | (a.lo >> (64 - s));
        r.lo = a.lo << s;
    }
    return r;
}

/* a >> s; nonzero bits shifted out set *sticky. */
inline u128 u128_shr_sticky(u128 a, int s, int *sticky) {
    u128 r;
    if (s == 0)
        return a;
    if (s >= 128) {
        *sticky |= (a.hi | a.lo) != 0UL;
        r.hi = 0;
        r.lo = 0;
    } else if (s >= 64) {
        *sticky |= (a.lo != 0UL) || (s > 64 && (a.hi & ((1UL << (s - 64)) - 1UL)) != 0UL);
        r.lo = a.hi >> (s - 64);
        r.hi = 0;
    } else {
        *sticky |= (a.lo & ((1UL << s) - 1UL)) != 0UL;
        r.lo = (a.lo >> s) | (a.hi << (64 - s));
        r.hi = a.hi >> s;
    }
    return r;
}

inline u128 u128_add(u128 a, u128 b) {
    u128 r;
    r.lo = a.lo + b.lo;
    r.hi = a.hi + b.hi + (r.lo < a.lo ? 1UL : 0UL);
    return r;
}

inline u128 u128_sub(u128 a, u128 b) { /* a >= b */
    u128 r;
    r.lo = a.lo - b.lo;
    r.hi = a.hi - b.hi - (a.lo < b.lo ? 1UL : 0UL);
    return r;
}

inline int u128_lt(u128 a, u128 b) {
    return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo);
}

inline sdouble sd_zero(void) {
    sdouble d;
    d.neg = 0;
    d.exp = 0;
    d.mant = 0;
    return d;
}

inline sdouble sd_from_bits(ulong b) {
    sdouble d;
    d.neg = (int)(b >> 63);
    d.exp = (int)((b >> 52) & 0x7ffUL) - 1075;
    d.mant = (b & 0xfffffffffffffUL) | (1UL << 52);
    return d;
}

inline sdouble sd_from_float(float x) {
    const uint bits = as_uint(x);
    const uint biased = (bits >> 23) & 0xffu;
    sdouble d;
    d.neg = (int)(bits >> 31);
    if (biased != 0) {
        d.mant = (ulong)((bits & 0x7fffffu) | 0x800000u) << 29;
        d.exp = (int)biased - 150 - 29;
    } else if ((bits & 0x7fffffu) == 0) {
        d.mant = 0;
        d.exp = 0;
    } else {
        const ulong f = (ulong)(bits & 0x7fffffu);
        const int shift = (int)clz(f) - 11;
        d.mant = f << shift;
        d.exp = -149 - shift;
    }
    return d;
}

/* (-1)^neg * s * 2^e (s != 0, plus `sticky` below its last bit) rounded to a double. */
inline sdouble sd_round(int neg, u128 s, int e, int sticky) {
    const int top = 127 - u128_clz(s);
    sdouble d;
    d.neg = neg;
    if (top <= 52) { /* exact (sticky is never set with so few bits) */
        d.mant = s.lo << (52 - top);
        d.exp = e - (52 - top);
        return d;
    }
    const int drop = top - 52;
    int below = sticky;
    const u128 kept = u128_shr_sticky(s, drop - 1, &below); /* keeps the rounding bit */
    ulong m = kept.lo >> 1;
    if ((kept.lo & 1UL) && (below || (m & 1UL)))
        m += 1UL;
    int re = e + drop;
    if (m >> 53) {
        m >>= 1;
        re += 1;
    }
    d.mant = m;
    d.exp = re;
    return d;
}

/* a * b + c with one rounding to nearest even (a * b + 0 is the rounded product). */
inline sdouble sd_fma(sdouble a, sdouble b, sdouble c) {
    const int pneg = a.neg ^ b.neg;
    if (a.mant == 0 || b.mant == 0)
        return c.mant == 0 ? sd_zero() : c;
    u128 p;
    p.hi = mul_hi(a.mant, b.mant);
    p.lo = a.mant * b.mant;
    int pe = a.exp + b.exp;
    if (c.mant == 0)
        return sd_round(pneg, p, pe, 0);
    /* Both operands with their top bit at 125 (two bits of headroom for the carry). */
    const int lift = 125 - (127 - u128_clz(p));
    p = u128_shl(p, lift);
    pe -= lift;
    u128 cm;
    cm.hi = c.mant << 9; /* c.mant << 73 */
    cm.lo = 0;
    const int ce = c.exp - 73;
    u128 big = p, small = cm;
    int bneg = pneg, sneg = c.neg, be = pe, d = pe - ce;
    if (ce > pe) {
        big = cm;
        small = p;
        bneg = c.neg;
        sneg = pneg;
        be = ce;
        d = ce - pe;
    }
    int sticky = 0;
    small = u128_shr_sticky(small, d, &sticky);
    u128 s;
    int neg;
    if (bneg == sneg) {
        s = u128_add(big, small);
        neg = bneg;
    } else if (u128_lt(big, small)) { /* only when d = 0: nothing was shifted out */
        s = u128_sub(small, big);
        neg = sneg;
    } else {
        s = u128_sub(big, small);
        neg = bneg;
        if (sticky) { /* the true small operand was a little larger */
            u128 one;
            one.hi = 0;
            one.lo = 1;
            s = u128_sub(s, one);
        }
    }
    if ((s.hi | s.lo) == 0UL && !sticky)
        return sd_zero();
    return sd_round(neg, s, be, sticky);
}

inline sdouble sd_mul(sdouble a, sdouble b) {
    return sd_fma(a, b, sd_zero());
}

inline sdouble sd_add(sdouble a, sdouble b) {
    return sd_fma(a, sd_from_bits(0x3ff0000000000000UL), b);
}

/* The double rounded to a float (to nearest even; float subnormals and overflow too). */
inline float sd_to_float(sdouble d) {
    if (d.mant == 0)
        return d.neg ? -0.0f : 0.0f;
    const int qe = max(d.exp + 52 - 23, -149); /* the float quantum's exponent */
    const int drop = qe - d.exp;
    const ulong f = drop >= 64 ? 0UL : round_shift_right(d.mant, drop, 0);
    const float v = ldexp((float)f, qe);
    return d.neg ? -v : v;
}

/* round-half-even(d) as an integer, |d| < 2^62. */
inline long sd_rint(sdouble d) {
    if (d.mant == 0)
        return 0;
    ulong m;
    if (d.exp >= 0)
        m = d.mant << d.exp;
    else if (-d.exp >= 64)
        m = 0;
    else
        m = round_shift_right(d.mant, -d.exp, 0);
    return d.neg ? -(long)m : (long)m;
}

inline sdouble sd_from_long(long k) {
    if (k == 0)
        return sd_zero();
    sdouble d;
    d.neg = k < 0;
    const ulong mag = k < 0 ? (ulong)(-k) : (ulong)k;
    const int top = 63 - (int)clz(mag);
    d.mant = top <= 52 ? mag << (52 - top) : mag >> (top - 52); /* exact for |k| < 2^53 */
    d.exp = top - 52;
    return d;
}

/* 2^(i/32) as doubles (correctly rounded), minus i << 47 in the bits: the table of glibc's
 * exp2f/expf, so that table[k % 32] + (k << 47) is 2^(k/32) for any integer k. */
__constant ulong EXP2F_TABLE[32] = {
    0x3ff0000000000000UL, 0x3fefd9b0d3158574UL, 0x3fefb5586cf9890fUL, 0x3fef9301d0125b51UL,
    0x3fef72b83c7d517bUL, 0x3fef54873168b9aaUL, 0x3fef387a6e756238UL, 0x3fef1e9df51fdee1UL,
    0x3fef06fe0a31b715UL, 0x3feef1a7373aa9cbUL, 0x3feedea64c123422UL, 0x3feece086061892dUL,
    0x3feebfdad5362a27UL, 0x3feeb42b569d4f82UL, 0x3feeab07dd485429UL, 0x3feea47eb03a5585UL,
    0x3feea09e667f3bcdUL, 0x3fee9f75e8ec5f74UL, 0x3feea11473eb0187UL, 0x3feea589994cce13UL,
    0x3feeace5422aa0dbUL, 0x3feeb737b0cdc5e5UL, 0x3feec49182a3f090UL, 0x3feed503b23e255dUL,
    0x3feee89f995ad3adUL, 0x3feeff76f2fb5e47UL, 0x3fef199bdd85529cUL, 0x3fef3720dcef9069UL,
    0x3fef5818dcfba487UL, 0x3fef7c97337b9b5fUL, 0x3fefa4afa2a490daUL, 0x3fefd0765b6e4540UL,
};

/* glibc's FMA build contracts the polynomial into fmas; -DLIBM_EXPF_FMA=0 gives the plain
 * build's roundings (x86-64 CPUs without FMA, other libms using the same algorithm). */
#ifndef LIBM_EXPF_FMA
#define LIBM_EXPF_FMA 1
#endif

/* e^x with glibc's expf algorithm: k = round(x * 32 / ln 2), r = x * 32 / ln 2 - k,
 * e^x = 2^(k/32) * (1 + c2 r + c1 r^2 + c0 r^3), all in double, then rounded to float. */
inline float libm_expf(float x) {
    const uint ux = as_uint(x);
    const uint abstop = (ux >> 20) & 0x7ffu;
    if (abstop >= (as_uint(88.0f) >> 20)) { /* |x| >= 88, or NaN */
        if (ux == as_uint(-INFINITY))
            return 0.0f;
        if (abstop >= (as_uint(INFINITY) >> 20))
            return x + x;
        if (x > 0x1.62e42ep6f) /* beyond log(2^128) */
            return INFINITY;
        if (x < -0x1.9fe368p6f) /* below log(2^-150) */
            return 0.0f;
    }
    const sdouble inv_ln2_n = sd_from_bits(0x40471547652b82feUL); /* 32 / ln 2 */
    const sdouble c0 = sd_from_bits(0x3ebc6af84b912394UL);
    const sdouble c1 = sd_from_bits(0x3f2ebfce50fac4f3UL);
    const sdouble c2 = sd_from_bits(0x3f962e42ff0c52d6UL);
    const sdouble one = sd_from_bits(0x3ff0000000000000UL);
    const sdouble z = sd_mul(inv_ln2_n, sd_from_float(x));
    const long k = sd_rint(z); /* glibc: (z + 0x1.8p52) - 0x1.8p52 */
    const sdouble s = sd_from_bits(EXP2F_TABLE[k & 31] + ((ulong)k << 47));
#if LIBM_EXPF_FMA
    /* The FMA build contracts r = z - k with z's product too: r = fma(32/ln2, x, -k), one
     * rounding (the unfused z - k is exact, but z itself was rounded). Near a rounding
     * boundary of the result this decides the last bit (expf(-63.09946f) is one case). */
    const sdouble r = sd_fma(inv_ln2_n, sd_from_float(x), sd_from_long(-k));
    const sdouble zz = sd_fma(c0, r, c1);
    const sdouble r2 = sd_mul(r, r);
    sdouble y = sd_fma(c2, r, one);
    y = sd_fma(zz, r2, y);
#else
    const sdouble r = sd_add(z, sd_from_long(-k)); /* exact */
    const sdouble zz = sd_add(sd_mul(c0, r), c1);
    const sdouble r2 = sd_mul(r, r);
    sdouble y = sd_add(sd_mul(c2, r), one);
    y = sd_add(sd_mul(zz, r2), y);
#endif
    y = sd_mul(y, s);
    return sd_to_float(y);
}

/* The exponential of the paged attention's softmax: by default libm_expf, the CPU's own
 * (glibc's expf) bit for bit. -DATTENTION_EXP=exp trades that for OpenCL's native exp
 * (within 3 ulp; several times cheaper than the integer-emulated double arithmetic), e.g.
 * on a device where throughput matters more than matching the CPU device's tokens. */
#ifndef ATTENTION_EXP
#define ATTENTION_EXP libm_expf
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
 * total = fma(total, rescale, weight), with ATTENTION_EXP for e^x (see above). */
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

//! Vectorisable scalar math. libm's `expf` is an opaque call the compiler cannot
//! vectorise; GELU and softmax call exp millions of times per batch, so we use a
//! polynomial the compiler turns into SIMD inside the ISA-specific instantiations.

/// `e^x` with relative error ≲ 2e-7 over the f32 range; saturates to 0 / +inf.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    // Range reduction: x = n·ln2 + r, |r| ≤ ln2/2; e^x = 2^n · e^r.
    let x = x.clamp(-87.3, 88.0);
    // Round to nearest by the 1.5·2^23 trick: `f32::round` (half away from zero) has no
    // single SIMD instruction and would become a libm call per element.
    const SHIFT: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Degree-6 Taylor/minimax-like polynomial for e^r on [-0.35, 0.35].
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^n from the shifted value's bits (SHIFT + n has bits 0x4B40_0000 + n): `n as i32`
    // is a saturating cast with NaN handling that the compiler does not vectorise (it
    // became a scalar convert per lane, the hottest part of GELU). Same value as before.
    let bits = ((shifted.to_bits() as i32 - 0x4B40_0000 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// 1/d for d ≥ 1: a bit-trick seed and three Newton steps (≈ 1e-8 relative error).
/// A true division is a slow, poorly pipelined instruction; this is mul/FMA only.
#[inline(always)]
fn recip(d: f32) -> f32 {
    let mut r = f32::from_bits(0x7EF3_11C3u32.wrapping_sub(d.to_bits()));
    r = r * (2.0 - d * r);
    r = r * (2.0 - d * r);
    r = r * (2.0 - d * r);
    r
}

/// erf(x), Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, plus f32 rounding near 0).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = recip(1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6)
            * t
            * fast_exp(-a * a);
    y.copysign(x)
}

/// The AVX2 forms of the functions above, with the same bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::fast_exp`] on `N` vectors of 8 lanes, operation by operation in its order
    /// (Rust never contracts `a·b + c` into an FMA, so neither does this): the same bits.
    /// The `N` vectors go through each step together, so `N` of its dependent chains (≈ 14
    /// multiplies and adds deep) are interleaved in the instruction stream: one chain at a
    /// time ran at a third of the arithmetic's rate on Zen 1 (bench/NOTES.md, session 18).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::cpu) unsafe fn exp8x<const N: usize>(x: [__m256; N]) -> [__m256; N] {
        let c = |v: f32| _mm256_set1_ps(v);
        // `clamp`: a NaN passes through (vmaxps/vminps return their second operand then).
        let x = x.map(|v| _mm256_min_ps(c(88.0), _mm256_max_ps(c(-87.3), v)));
        let shift = c(12_582_912.0);
        let shifted = x.map(|v| _mm256_add_ps(_mm256_mul_ps(v, c(std::f32::consts::LOG2_E)), shift));
        let n = shifted.map(|v| _mm256_sub_ps(v, shift));
        let mut r = x;
        for i in 0..N {
            r[i] = _mm256_sub_ps(_mm256_sub_ps(x[i], _mm256_mul_ps(n[i], c(0.693_145_75))), _mm256_mul_ps(n[i], c(1.428_606_8e-6)));
        }
        let mut p = r.map(|r| _mm256_add_ps(c(0.008_333_334), _mm256_mul_ps(r, c(0.001_388_889))));
        for k in [0.041_666_668, 0.166_666_67, 0.5, 1.0, 1.0] {
            for i in 0..N {
                p[i] = _mm256_add_ps(c(k), _mm256_mul_ps(r[i], p[i]));
            }
        }
        for i in 0..N {
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(shifted[i]), _mm256_set1_epi32(0x4B40_0000)), _mm256_set1_epi32(127)));
            p[i] = _mm256_mul_ps(p[i], _mm256_castsi256_ps(bits));
        }
        p
    }

    /// `row[j] = fast_exp(row[j] − m)` for every j, 4 × 8 lanes at a time, the same bits.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::cpu) unsafe fn exp_shifted_avx2(row: &mut [f32], m: f32) {
        const GROUP: usize = 4 * 8;
        let mv = _mm256_set1_ps(m);
        let mut groups = row.chunks_exact_mut(GROUP);
        for g in &mut groups {
            let p = g.as_mut_ptr();
            let x = [0, 8, 16, 24].map(|o| _mm256_sub_ps(_mm256_loadu_ps(p.add(o)), mv));
            for (o, e) in [0, 8, 16, 24].into_iter().zip(exp8x(x)) {
                _mm256_storeu_ps(p.add(o), e);
            }
        }
        for v in groups.into_remainder() {
            *v = super::fast_exp(*v - m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let got = fast_exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(-200.0), 0.0_f32.max(fast_exp(-200.0)));
        assert!(fast_exp(-200.0) < 1e-37);
    }

    /// 2^n taken from the shifted float's bits equals the old `n as i32` cast, bit for bit.
    #[test]
    fn exp_scale_from_bits_matches_cast() {
        let mut x = -100.0f32;
        while x < 100.0 {
            let c = x.clamp(-87.3, 88.0);
            let shifted = c * std::f32::consts::LOG2_E + 12_582_912.0;
            let n = shifted - 12_582_912.0;
            assert_eq!((shifted.to_bits() as i32 - 0x4B40_0000 + 127) as u32, (n as i32 + 127) as u32, "x={x}");
            x += 0.003;
        }
    }

    #[test]
    fn erf_matches_reference() {
        // Reference: erf via its Taylor series in f64 (converges fast for |x| ≤ 3).
        fn erf64(x: f64) -> f64 {
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-18 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let mut x = -3.0f32;
        while x <= 3.0 {
            let err = (erf(x) as f64 - erf64(x as f64)).abs();
            assert!(err < 1e-6, "erf({x}) off by {err}");
            x += 0.01;
        }
    }
}

//! Scalar number formats every quant file uses: IEEE half and bfloat16 conversions, the
//! little-endian f16 fields of GGML blocks, and the rounding the quantisers share. A leaf:
//! it imports nothing of `quant/`.

/// Exact IEEE half → single conversion (subnormals, infinities and NaN included).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        // Subnormal: man · 2⁻²⁴ is exact in f32.
        0 => {
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Single → half, rounding to nearest even; overflow gives ±inf, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        let nan = if man != 0 {
            0x200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Becomes a half subnormal: units of 2⁻²⁴, so shift the full significand.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1; // may carry into the smallest normal, which is the right encoding
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // a carry into the exponent is correct, up to and including inf
    }
    sign | r as u16
}

#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Single → bfloat16, rounding to nearest even; NaN stays NaN (quieted).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Reads the little-endian f16 at `bytes[at..at + 2]` as f32.
#[inline]
pub(crate) fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

#[inline]
pub(crate) fn write_f16(bytes: &mut [u8], at: usize, v: f32) {
    bytes[at..at + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
}

/// Round half to even, exactly, for |v| < 2²²: adding 1.5·2²³ pushes the fraction out of
/// the mantissa under the default rounding mode. Unlike `f32::round` it vectorises without
/// SSE4.1, and the quantisers run on the baseline target.
#[inline]
pub(crate) fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_every_value_round_trips() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
            } else {
                assert_eq!(f32_to_f16(f), h, "half {h:#06x} = {f}");
            }
        }
    }

    #[test]
    fn f16_rounds_to_nearest() {
        let mut s = 0x1234_5678_9abc_def1u64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Finite f32 spanning the half range and beyond (exponents -30..+20).
            let x = f32::from_bits((s as u32 & 0x807f_ffff) | ((97 + (s >> 40) as u32 % 50) << 23));
            let h = f32_to_f16(x);
            if h & 0x7fff == 0x7c00 {
                assert!(x.abs() >= 65520.0, "{x} overflowed");
                continue;
            }
            let err = (f16_to_f32(h) as f64 - x as f64).abs();
            for nb in [h.wrapping_add(1), h.wrapping_sub(1)] {
                let v = f16_to_f32(nb) as f64;
                if v.is_finite() && (nb & 0x7c00) != 0x7c00 {
                    assert!(
                        err <= (v - x as f64).abs(),
                        "{x} -> {h:#06x}, neighbour {nb:#06x} closer"
                    );
                }
            }
        }
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds up to inf
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(2.0f32.powi(-25)), 0); // tie to even (zero)
        assert_eq!(f32_to_f16(1.5 * 2.0f32.powi(-25)), 1);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie → even
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie → even
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        for h in (0..=u16::MAX).step_by(7) {
            let f = bf16_to_f32(h);
            if !f.is_nan() {
                assert_eq!(f32_to_bf16(f), h);
            }
        }
    }
}

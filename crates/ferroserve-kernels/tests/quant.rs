//! GGUF formats and quantised matmul: layouts against ggml-shaped reference loops, round
//! trips, every kernel on every ISA level against an f64 reference, batch invariance.
//!
//! Inputs are fresh each run (seeded from the clock, printed on failure); set
//! `QUANT_TEST_SEED` to replay one.

use ferroserve_kernels::quant::f16::{f16_to_f32, f32_to_f16};
use ferroserve_kernels::testing::Rng;
use ferroserve_kernels::quant::{
    dequantize_row, panel_matmul, panel_matmuls, quant_matmul, quant_matmul_prepared, quant_matmul_with_isa,
    quantize_row, Panels, Q8Activations, QuantLevel, QuantType,
};

/// The crate's test generator, seeded from `QUANT_TEST_SEED` or the clock.
fn rng(salt: u64) -> (Rng, u64) {
    Rng::from_env_or_clock("QUANT_TEST_SEED", salt)
}

trait Weights {
    fn weights(&mut self, len: usize) -> Vec<f32>;
}

impl Weights for Rng {
    /// Weights with per-16 magnitude and offset changes, so block scales and minimums vary.
    fn weights(&mut self, len: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let mag = 0.05 + 2.0 * self.f32().abs();
            let offset = 0.5 * self.f32();
            for _ in 0..16.min(len - v.len()) {
                v.push((self.f32() + offset) * mag);
            }
        }
        v
    }
}

const BLOCK_TYPES: [QuantType; 9] = [
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q4_K,
    QuantType::Q6_K,
    QuantType::Q5_0,
    QuantType::Q5_1,
    QuantType::Q5_K,
    QuantType::IQ4_NL,
];

/// ggml's `kvalues_iq4nl` (ggml-common.h).
const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

fn f16_bytes(v: f32) -> [u8; 2] {
    f32_to_f16(v).to_le_bytes()
}

// ---------------------------------------------------------------------------------------
// Layouts: our dequantisers against loops written in the shape of ggml's reference code
// (ggml/src/ggml-quants.c, dequantize_row_*), on random bytes with finite scales.

#[allow(clippy::needless_range_loop)] // kept in the shape of the C loops it mirrors
fn ggml_shaped_dequantize(t: QuantType, bytes: &[u8], y: &mut [f32]) {
    let h = |b: &[u8], at: usize| f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]));
    match t {
        QuantType::Q8_0 => {
            for (i, x) in bytes.chunks_exact(34).enumerate() {
                let d = h(x, 0);
                for j in 0..32 {
                    y[i * 32 + j] = x[2 + j] as i8 as f32 * d;
                }
            }
        }
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let bb = if t == QuantType::Q4_0 { 18 } else { 20 };
            for (i, x) in bytes.chunks_exact(bb).enumerate() {
                let d = h(x, 0);
                let qs = &x[bb - 16..];
                for j in 0..16 {
                    let (x0, x1) = ((qs[j] & 0x0f) as i32, (qs[j] >> 4) as i32);
                    if t == QuantType::Q4_0 {
                        y[i * 32 + j] = (x0 - 8) as f32 * d;
                        y[i * 32 + j + 16] = (x1 - 8) as f32 * d;
                    } else {
                        let m = h(x, 2);
                        y[i * 32 + j] = x0 as f32 * d + m;
                        y[i * 32 + j + 16] = x1 as f32 * d + m;
                    }
                }
            }
        }
        QuantType::Q4_K => {
            let get_scale_min_k4 = |j: usize, q: &[u8]| -> (u8, u8) {
                if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    (
                        (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                        (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                    )
                }
            };
            let mut out = 0;
            for x in bytes.chunks_exact(144) {
                let (d, min) = (h(x, 0), h(x, 2));
                let scales = &x[4..16];
                let mut q = &x[16..];
                let mut is = 0;
                for _ in (0..256).step_by(64) {
                    let (sc, m) = get_scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, min * m as f32);
                    let (sc, m) = get_scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, min * m as f32);
                    for l in 0..32 {
                        y[out] = d1 * (q[l] & 0xF) as f32 - m1;
                        out += 1;
                    }
                    for l in 0..32 {
                        y[out] = d2 * (q[l] >> 4) as f32 - m2;
                        out += 1;
                    }
                    q = &q[32..];
                    is += 2;
                }
            }
        }
        QuantType::Q6_K => {
            for (i, x) in bytes.chunks_exact(210).enumerate() {
                let d = h(x, 208);
                let (mut ql, mut qh, mut sc) = (&x[0..128], &x[128..192], &x[192..208]);
                let mut yo = i * 256;
                for _ in (0..256).step_by(128) {
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[yo + l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[yo + l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[yo + l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[yo + l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    yo += 128;
                    ql = &ql[64..];
                    qh = &qh[32..];
                    sc = &sc[8..];
                }
            }
        }
        QuantType::Q5_0 | QuantType::Q5_1 => {
            let bb = if t == QuantType::Q5_0 { 22 } else { 24 };
            for (i, x) in bytes.chunks_exact(bb).enumerate() {
                let d = h(x, 0);
                let qh = u32::from_le_bytes(x[bb - 20..bb - 16].try_into().unwrap());
                let qs = &x[bb - 16..];
                for j in 0..16 {
                    let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
                    let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let (x0, x1) = (((qs[j] & 0x0f) | xh_0) as i32, ((qs[j] >> 4) | xh_1) as i32);
                    if t == QuantType::Q5_0 {
                        y[i * 32 + j] = (x0 - 16) as f32 * d;
                        y[i * 32 + j + 16] = (x1 - 16) as f32 * d;
                    } else {
                        let m = h(x, 2);
                        y[i * 32 + j] = x0 as f32 * d + m;
                        y[i * 32 + j + 16] = x1 as f32 * d + m;
                    }
                }
            }
        }
        QuantType::Q5_K => {
            let mut out = 0;
            for x in bytes.chunks_exact(176) {
                let (d, min) = (h(x, 0), h(x, 2));
                let scales = &x[4..16];
                let qh = &x[16..48];
                let mut ql = &x[48..];
                let (mut is, mut u1, mut u2) = (0, 1u8, 2u8);
                for _ in (0..256).step_by(64) {
                    let (sc, m) = get_scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, min * m as f32);
                    let (sc, m) = get_scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, min * m as f32);
                    for l in 0..32 {
                        y[out] = d1 * ((ql[l] & 0xF) + if qh[l] & u1 != 0 { 16 } else { 0 }) as f32 - m1;
                        out += 1;
                    }
                    for l in 0..32 {
                        y[out] = d2 * ((ql[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 }) as f32 - m2;
                        out += 1;
                    }
                    ql = &ql[32..];
                    is += 2;
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
        }
        QuantType::IQ4_NL => {
            for (i, x) in bytes.chunks_exact(18).enumerate() {
                let d = h(x, 0);
                for j in 0..16 {
                    y[i * 32 + j] = d * KVALUES_IQ4NL[(x[2 + j] & 0xf) as usize] as f32;
                    y[i * 32 + j + 16] = d * KVALUES_IQ4NL[(x[2 + j] >> 4) as usize] as f32;
                }
            }
        }
        _ => unreachable!(),
    }
}

fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Random bytes with the f16 scale fields overwritten by finite values.
fn random_blocks(t: QuantType, rng: &mut Rng, k: usize) -> Vec<u8> {
    let mut bytes = rng.bytes(t.row_bytes(k));
    let bb = t.block_bytes();
    let scale_offsets: &[usize] = match t {
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 | QuantType::IQ4_NL => &[0],
        QuantType::Q4_1 | QuantType::Q4_K | QuantType::Q5_1 | QuantType::Q5_K => &[0, 2],
        QuantType::Q6_K => &[208],
        _ => &[],
    };
    for blk in bytes.chunks_exact_mut(bb) {
        for &at in scale_offsets {
            blk[at..at + 2].copy_from_slice(&f16_bytes(rng.f32() * 0.1));
        }
    }
    bytes
}

#[test]
fn block_sizes_match_ggml() {
    let sizes = [
        (QuantType::Q8_0, 32, 34),
        (QuantType::Q4_0, 32, 18),
        (QuantType::Q4_1, 32, 20),
        (QuantType::Q4_K, 256, 144),
        (QuantType::Q6_K, 256, 210),
        (QuantType::Q5_0, 32, 22),
        (QuantType::Q5_1, 32, 24),
        (QuantType::Q5_K, 256, 176),
        (QuantType::IQ4_NL, 32, 18),
    ];
    for (t, elems, bytes) in sizes {
        assert_eq!(
            (t.block_elems(), t.block_bytes()),
            (elems, bytes),
            "{}",
            t.name()
        );
        assert_eq!(t.row_bytes(3 * elems), 3 * bytes);
    }
    assert_eq!(QuantType::F16.row_bytes(7), 14);
    assert_eq!(QuantType::BF16.row_bytes(7), 14);
    assert_eq!(QuantType::F32.row_bytes(7), 28);
    for t in QuantType::ALL {
        assert_eq!(QuantType::from_ggml_type(t.ggml_type()), Some(t));
    }
    assert_eq!(QuantType::from_ggml_type(3), Some(QuantType::Q4_1));
}

#[test]
fn dequantize_matches_ggml_reference_loops() {
    let (mut rng, seed) = rng(1);
    for t in BLOCK_TYPES {
        let k = 3 * t.block_elems();
        for _ in 0..20 {
            let bytes = random_blocks(t, &mut rng, k);
            let mut ours = vec![f32::NAN; k];
            let mut theirs = vec![f32::NAN; k];
            dequantize_row(t, &bytes, &mut ours);
            ggml_shaped_dequantize(t, &bytes, &mut theirs);
            for i in 0..k {
                assert!(
                    ours[i].to_bits() == theirs[i].to_bits(),
                    "{} weight {i}: {} vs {} (seed {seed})",
                    t.name(),
                    ours[i],
                    theirs[i]
                );
            }
        }
    }
}

#[test]
fn hand_made_blocks_decode_as_documented() {
    // Q4_0, d = 2: byte i holds code i (weight i) and 15 − i (weight 16 + i).
    let mut b = f16_bytes(2.0).to_vec();
    b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
    let mut y = [0f32; 32];
    dequantize_row(QuantType::Q4_0, &b, &mut y);
    for i in 0..16 {
        assert_eq!(y[i], (i as f32 - 8.0) * 2.0);
        assert_eq!(y[16 + i], (7.0 - i as f32) * 2.0);
    }
    // Q4_1, d = 0.5, m = −1.
    let mut b = [f16_bytes(0.5), f16_bytes(-1.0)].concat();
    b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
    dequantize_row(QuantType::Q4_1, &b, &mut y);
    assert_eq!((y[0], y[15], y[16], y[31]), (-1.0, 6.5, 6.5, -1.0));
    // Q8_0, d = 0.25.
    let mut b = f16_bytes(0.25).to_vec();
    b.extend((0..32).map(|i: i32| (i * 8 - 128) as i8 as u8));
    dequantize_row(QuantType::Q8_0, &b, &mut y);
    assert_eq!((y[0], y[16], y[31]), (-32.0, 0.0, 30.0));
    // BF16 and F16 of 1.5.
    let mut one = [0f32; 1];
    dequantize_row(QuantType::BF16, &[0xc0, 0x3f], &mut one);
    assert_eq!(one[0], 1.5);
    dequantize_row(QuantType::F16, &[0x00, 0x3e], &mut one);
    assert_eq!(one[0], 1.5);
}

#[test]
fn quantize_round_trips_within_half_a_step() {
    let (mut rng, seed) = rng(2);
    // Error bound per block as a fraction of the block's max |x| (the code step is
    // max/127, range/15, … and K formats add the rounding of their 6/8-bit scales).
    let tolerance = |t: QuantType| match t {
        QuantType::Q8_0 => 0.5 / 127.0 + 2e-3,
        // The code range is −8..=7: a value near −max rounds to 8 and clamps to 7.
        QuantType::Q4_0 => 1.0 / 8.0 + 2e-3,
        QuantType::Q4_1 => 1.0 / 15.0 + 2e-3,
        QuantType::Q4_K => 0.1,
        QuantType::Q6_K => 0.5 / 31.0 + 0.02,
        // −16..=15, as Q4_0.
        QuantType::Q5_0 => 1.0 / 16.0 + 2e-3,
        QuantType::Q5_1 => 1.0 / 31.0 + 2e-3,
        QuantType::Q5_K => 0.05,
        // The table's widest gap is 24/127 and its top end 113 of 127.
        QuantType::IQ4_NL => 14.0 / 127.0 + 2e-3,
        QuantType::F16 => 1e-3,
        QuantType::BF16 => 4e-3,
        QuantType::F32 => 0.0,
    };
    for t in QuantType::ALL {
        let k = 4 * 256;
        for _ in 0..10 {
            let x = rng.weights(k);
            let mut bytes = vec![0u8; t.row_bytes(k)];
            quantize_row(t, &x, &mut bytes);
            let mut y = vec![f32::NAN; k];
            dequantize_row(t, &bytes, &mut y);
            let be = t.block_elems().max(32);
            for (xb, yb) in x.chunks(be).zip(y.chunks(be)) {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (a, b) in xb.iter().zip(yb) {
                    let err = (a - b).abs();
                    let bound = if t == QuantType::F32 {
                        0.0
                    } else {
                        tolerance(t) * amax
                    };
                    assert!(
                        err <= bound,
                        "{}: {a} → {b}, err {err} > {bound} (seed {seed})",
                        t.name()
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Matmul against f64 references.

struct Case {
    t: QuantType,
    m: usize,
    n: usize,
    k: usize,
}

fn random_case(rng: &mut Rng, c: &Case) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let w_f32 = rng.weights(c.n * c.k);
    let mut w = vec![0u8; c.n * c.t.row_bytes(c.k)];
    for (row, bytes) in w_f32
        .chunks_exact(c.k.max(1))
        .zip(w.chunks_exact_mut(c.t.row_bytes(c.k).max(1)))
    {
        quantize_row(c.t, row, bytes);
    }
    let mut w_deq = vec![0f32; c.n * c.k];
    for (bytes, row) in w
        .chunks_exact(c.t.row_bytes(c.k).max(1))
        .zip(w_deq.chunks_exact_mut(c.k.max(1)))
    {
        dequantize_row(c.t, bytes, row);
    }
    // Rows of different magnitudes, one with a large outlier.
    let mut x: Vec<f32> = (0..c.m * c.k).map(|_| rng.f32()).collect();
    for (r, row) in x.chunks_exact_mut(c.k.max(1)).enumerate() {
        let mag = [1.0, 0.01, 30.0][r % 3];
        row.iter_mut().for_each(|v| *v *= mag);
        if r % 4 == 1 && !row.is_empty() {
            row[c.k / 2] = 50.0;
        }
    }
    (w, w_deq, x)
}

fn dot64(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, abs), (&p, &q)| {
        (s + p as f64 * q as f64, abs + (p as f64 * q as f64).abs())
    })
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

/// Checks `quant_matmul_with_isa` on one case against:
/// (a) the f64 product of the dequantised weights and the *original* activations, within
///     ‖w‖·‖x − x̂‖ (Cauchy–Schwarz on the activation rounding) plus f32 accumulation;
/// (b) the f64 product with the activations the kernel actually saw (x̂), within f32
///     accumulation error only — this catches layout slips the loose bound would not.
fn check_case(isa: QuantLevel, c: &Case, rng: &mut Rng, seed: u64) {
    let (w, w_deq, x) = random_case(rng, c);
    let mut y = vec![f32::NAN; c.m * c.n];
    quant_matmul_with_isa(isa, c.t, &w, c.n, c.k, &x, c.m, &mut y);
    let mut x_hat = x.clone();
    if c.t.is_block_quantised() {
        let mut acts = Q8Activations::new();
        acts.quantize(&x, c.m, c.k);
        for r in 0..c.m {
            acts.dequantize_row(r, &mut x_hat[r * c.k..(r + 1) * c.k]);
        }
    }
    let ctx = |r: usize, j: usize| {
        format!(
            "{} {:?} m={} n={} k={} at [{r}, {j}] (seed {seed})",
            c.t.name(),
            isa,
            c.m,
            c.n,
            c.k
        )
    };
    for r in 0..c.m {
        let xr = &x[r * c.k..(r + 1) * c.k];
        let xhr = &x_hat[r * c.k..(r + 1) * c.k];
        let x_err: Vec<f32> = xr.iter().zip(xhr).map(|(a, b)| a - b).collect();
        for j in 0..c.n {
            let got = y[r * c.n + j];
            assert!(got.is_finite(), "{}: got {got}", ctx(r, j));
            let wj = &w_deq[j * c.k..(j + 1) * c.k];
            let (exact, _) = dot64(wj, xr);
            let (seen, seen_abs) = dot64(wj, xhr);
            // The 32-block kernels may split a weight into d·u + m (Q4_1 and Q4_K are stored
            // so; the AVX-512 kernels treat Q8_0 and Q4_0 so too) and sum d·u·x̂ and m·Σx̂
            // apart; those terms can exceed the result and cancel, so their rounding counts.
            let affine = matches!(
                c.t,
                QuantType::Q8_0
                    | QuantType::Q4_0
                    | QuantType::Q4_1
                    | QuantType::Q4_K
                    | QuantType::Q5_1
                    | QuantType::Q5_K
            );
            let w_max = wj.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
            let x_abs: f64 = xhr.iter().map(|&v| v.abs() as f64).sum();
            // Q4_1 takes its `m` term as m·s with ggml's q8_1 `s = f16(d·Σq)` (unrounded d,
            // then f16): ≤ 2⁻¹⁰ of |Σx̂| per block off the x̂ sum, and |m| ≤ max |w|.
            let q81 = if matches!(c.t, QuantType::Q4_1 | QuantType::Q5_1) { 2f64.powi(-10) * w_max * x_abs } else { 0.0 };
            let fp = 4e-5 * (seen_abs + if affine { 2.0 * w_max * x_abs } else { 0.0 }) + q81 + 1e-30;
            let bound_a = norm(wj) * norm(&x_err) * 1.0001 + fp;
            let err_a = (got as f64 - exact).abs();
            assert!(
                err_a <= bound_a,
                "{}: got {got}, exact {exact}, err {err_a:e} > {bound_a:e}",
                ctx(r, j)
            );
            let err_b = (got as f64 - seen).abs();
            assert!(
                err_b <= fp,
                "{}: got {got}, with x̂ {seen}, err {err_b:e} > {fp:e}",
                ctx(r, j)
            );
        }
    }
}

#[test]
fn matmul_matches_f64_reference_on_every_isa() {
    let (mut rng, seed) = rng(3);
    for isa in QuantLevel::available() {
        for t in QuantType::ALL {
            let be = t.block_elems().max(32);
            // One block, an odd number of blocks (pairing tail), and a longer row.
            for k in [be, 3 * be, if be == 256 { 1536 } else { 576 }] {
                for m in [1, 3, 17] {
                    for n in [1, 7, 64, 129] {
                        check_case(isa, &Case { t, m, n, k }, &mut rng, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn float_weights_take_unaligned_k() {
    let (mut rng, seed) = rng(4);
    for isa in QuantLevel::available() {
        for t in [QuantType::F32, QuantType::F16, QuantType::BF16] {
            for k in [1, 15, 17, 33, 100] {
                check_case(isa, &Case { t, m: 5, n: 9, k }, &mut rng, seed);
            }
        }
    }
}

#[test]
fn empty_shapes() {
    for t in QuantType::ALL {
        let mut y = vec![f32::NAN; 6];
        quant_matmul(t, &[], 3, 0, &[], 2, &mut y);
        assert!(
            y.iter().all(|&v| v == 0.0),
            "{}: k = 0 gives zeros",
            t.name()
        );
        let mut none: [f32; 0] = [];
        quant_matmul(
            t,
            &vec![0u8; 3 * t.row_bytes(256)],
            3,
            256,
            &[],
            0,
            &mut none,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Batch invariance: a row's output bits do not depend on the batch or the thread split.

fn run(isa: QuantLevel, t: QuantType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * n];
    quant_matmul_with_isa(isa, t, w, n, k, x, m, &mut y);
    y
}

#[test]
fn rows_are_bitwise_identical_alone_or_in_any_batch() {
    let (mut rng, seed) = rng(5);
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let three_threads = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for isa in QuantLevel::available() {
        for t in QuantType::ALL {
            let (n, k) = (129, if t.block_elems() == 256 { 768 } else { 544 });
            let c = Case { t, m: 16, n, k };
            let (w, _, pool) = random_case(&mut rng, &c);
            let row = |i: usize| &pool[i * k..(i + 1) * k];
            for r in [0, 5, 15] {
                let alone = run(isa, t, &w, n, k, row(r), 1);
                let alone_1t = one_thread.install(|| run(isa, t, &w, n, k, row(r), 1));
                let alone_3t = three_threads.install(|| run(isa, t, &w, n, k, row(r), 1));
                let same = |other: &[f32], what: &str| {
                    for j in 0..n {
                        assert!(
                            alone[j].to_bits() == other[j].to_bits(),
                            "{} {isa:?}: row {r} col {j}: alone {} vs {what} {} (seed {seed})",
                            t.name(),
                            alone[j],
                            other[j]
                        );
                    }
                };
                same(&alone_1t, "one thread");
                same(&alone_3t, "three threads");
                for m in [2, 5, 16] {
                    for pos in [0, m / 2, m - 1] {
                        // Batch of m rows with row r at `pos`, other rows from elsewhere.
                        let mut x = Vec::with_capacity(m * k);
                        for i in 0..m {
                            x.extend_from_slice(if i == pos {
                                row(r)
                            } else {
                                row((r + 3 * i + 1) % 16)
                            });
                        }
                        let y = run(isa, t, &w, n, k, &x, m);
                        same(
                            &y[pos * n..(pos + 1) * n],
                            &format!("batch of {m} at {pos}"),
                        );
                        let y1 = one_thread.install(|| run(isa, t, &w, n, k, &x, m));
                        same(
                            &y1[pos * n..(pos + 1) * n],
                            &format!("batch of {m} at {pos}, one thread"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn prepared_activations_give_the_same_bits() {
    let (mut rng, _) = rng(6);
    let isa = QuantLevel::selected();
    for t in BLOCK_TYPES {
        let c = Case {
            t,
            m: 6,
            n: 33,
            k: 512,
        };
        let (w, _, x) = random_case(&mut rng, &c);
        let direct = run(isa, t, &w, c.n, c.k, &x, c.m);
        let mut acts = Q8Activations::new();
        acts.quantize(&x, c.m, c.k);
        let mut y = vec![f32::NAN; c.m * c.n];
        quant_matmul_prepared(isa, t, &w, c.n, &acts, &mut y);
        assert!(
            direct
                .iter()
                .zip(&y)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}",
            t.name()
        );
    }
}

// ---------------------------------------------------------------------------------------
// NaN never passes.

#[test]
fn nan_and_inf_propagate() {
    let (mut rng, _) = rng(7);
    for isa in QuantLevel::available() {
        for t in QuantType::ALL {
            let (m, n, k) = (3, 5, 256);
            let c = Case { t, m, n, k };
            let (w, _, mut x) = random_case(&mut rng, &c);
            x[k + 7] = f32::NAN; // row 1
            x[2 * k + 100] = f32::INFINITY; // row 2
            let y = run(isa, t, &w, n, k, &x, m);
            for j in 0..n {
                assert!(
                    y[j].is_finite(),
                    "{} {isa:?}: clean row 0 col {j}",
                    t.name()
                );
                assert!(
                    y[n + j].is_nan(),
                    "{} {isa:?}: NaN row col {j} gave {}",
                    t.name(),
                    y[n + j]
                );
                assert!(
                    !y[2 * n + j].is_finite(),
                    "{} {isa:?}: inf row col {j} gave {}",
                    t.name(),
                    y[2 * n + j]
                );
            }
            // A NaN weight scale poisons its column only.
            let mut w = w.clone();
            let row_bytes = t.row_bytes(k);
            let at = match t {
                QuantType::Q6_K => 208,
                _ => 0,
            };
            if t == QuantType::F32 {
                w[2 * row_bytes..2 * row_bytes + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            } else if t == QuantType::BF16 {
                w[2 * row_bytes..2 * row_bytes + 2].copy_from_slice(&[0xc0, 0x7f]);
            } else {
                w[2 * row_bytes + at..2 * row_bytes + at + 2].copy_from_slice(&f16_bytes(f32::NAN));
            }
            let y = run(isa, t, &w, n, k, &x[..k], 1);
            for (j, v) in y.iter().enumerate() {
                assert_eq!(
                    v.is_nan(),
                    j == 2,
                    "{} {isa:?}: NaN weight, col {j} gave {v}",
                    t.name()
                );
            }
        }
    }
}

#[test]
fn calls_from_inside_rayon_tasks_agree_with_direct_calls() {
    // The per-thread activation scratch must cope with a thread re-entering while it waits.
    use rayon::prelude::*;
    let (mut rng, _) = rng(8);
    let t = QuantType::Q4_1;
    let c = Case {
        t,
        m: 3,
        n: 300,
        k: 576,
    };
    let (w, _, x) = random_case(&mut rng, &c);
    let direct = run(QuantLevel::selected(), t, &w, c.n, c.k, &x, c.m);
    let nested: Vec<Vec<f32>> = (0..16)
        .into_par_iter()
        .map(|_| run(QuantLevel::selected(), t, &w, c.n, c.k, &x, c.m))
        .collect();
    for y in nested {
        assert!(y
            .iter()
            .zip(&direct)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// Q4_1 follows llama.cpp's `ggml_vec_dot_q4_1_q8_1` order exactly (see `q4_1::dot_portable`):
/// the SIMD levels must give the portable code's bits, for decode (m = 1), tiles of four and
/// ragged batches, and the portable code must be that order — checked here by recomputing
/// it from the public pieces: per block eight f32 lanes `fma(d·d_x, Σ₄ q·a, lane)`, the
/// lanes summed as `(l₀+l₄ + l₂+l₆) + (l₁+l₅ + l₃+l₇)`, plus `fma(m, f16(d_x·Σa), Σ)` in order.
#[test]
fn q4_1_matches_llama_cpp_order_on_every_isa() {
    let (mut rng, seed) = rng(11);
    let t = QuantType::Q4_1;
    let (n, k) = (37, 576);
    for m in [1usize, 4, 7, 19] {
        let c = Case { t, m, n, k };
        let (w, _, x) = random_case(&mut rng, &c);
        let portable = run(QuantLevel::Portable, t, &w, n, k, &x, m);
        // The reference order, from the bytes.
        let row_bytes = k / 32 * 20;
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for j in 0..n {
                let wr = &w[j * row_bytes..(j + 1) * row_bytes];
                let (mut lanes, mut mins) = ([0f32; 8], 0f32);
                for (b, blk) in wr.chunks_exact(20).enumerate() {
                    let xb = &xr[b * 32..(b + 1) * 32];
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    let qa: Vec<i32> = xb.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
                    let dx = f16_to_f32(f32_to_f16(amax / 127.0));
                    let s = f16_to_f32(f32_to_f16(amax / 127.0 * qa.iter().sum::<i32>() as f32));
                    let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                    let mw = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                    let code = |i: usize| if i < 16 { (blk[4 + i] & 15) as i32 } else { (blk[4 + i - 16] >> 4) as i32 };
                    for (g, lane) in lanes.iter_mut().enumerate() {
                        let dot: i32 = (4 * g..4 * g + 4).map(|i| code(i) * qa[i]).sum();
                        *lane = (d * dx).mul_add(dot as f32, *lane);
                    }
                    mins = mw.mul_add(s, mins);
                }
                let h = [lanes[4] + lanes[0], lanes[5] + lanes[1], lanes[6] + lanes[2], lanes[7] + lanes[3]];
                let want = ((h[0] + h[2]) + (h[1] + h[3])) + mins;
                assert_eq!(portable[r * n + j].to_bits(), want.to_bits(), "portable m={m} row {r} col {j} (seed {seed})");
            }
        }
        for isa in QuantLevel::available() {
            let y = run(isa, t, &w, n, k, &x, m);
            for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} m={m} index {i}: {a} vs portable {b} (seed {seed})");
            }
        }
    }
}

/// An activation block as ggml quantises it: codes, `d` rounded to f16, q8_1's
/// `s = f16(d·Σq)` (unrounded d) and the f32 `d·Σq` with the rounded d.
struct ActBlock {
    q: Vec<i32>,
    d: f32,
    s81: f32,
    d_sum: f32,
}

fn act_block(xb: &[f32]) -> ActBlock {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let q: Vec<i32> = xb.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
    let sum = q.iter().sum::<i32>();
    let d = f16_to_f32(f32_to_f16(amax / 127.0));
    let s81 = f16_to_f32(f32_to_f16(amax / 127.0 * sum as f32));
    ActBlock { q, d, s81, d_sum: d * sum as f32 }
}

/// llama.cpp's `hsum_float_8`.
fn hsum_float_8(l: &[f32; 8]) -> f32 {
    let h = [l[4] + l[0], l[5] + l[1], l[6] + l[2], l[7] + l[3]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Eight lanes `fma(scale, Σ₄ w·a, lane)` over groups of four weights.
fn lanes_fma(lanes: &mut [f32; 8], scale: f32, w: &[i32], a: &[i32]) {
    for (g, lane) in lanes.iter_mut().enumerate() {
        let dot: i32 = (4 * g..4 * g + 4).map(|i| w[i] * a[i]).sum();
        *lane = scale.mul_add(dot as f32, *lane);
    }
}

/// One output of the order each of these formats documents, recomputed from the GGUF bytes
/// (`wr`, one weight row) and the f32 activations (`xr`): llama.cpp's x86 loops for Q5_0
/// (`ggml_vec_dot_q5_0_q8_0`), Q5_1 (`…q5_1_q8_1`) and IQ4_NL (`…iq4_nl_q8_0`: even and
/// odd blocks in two sets of lanes, an unpaired last block added alone); for Q5_K, which
/// multiplies 32-activation blocks rather than llama.cpp's Q8_K, Q5_1's order per sub-block.
fn reference_order(t: QuantType, wr: &[u8], xr: &[f32]) -> f32 {
    let h = |b: &[u8], at: usize| f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]));
    let acts: Vec<ActBlock> = xr.chunks_exact(32).map(act_block).collect();
    let five_bit = |qh: u32, qs: &[u8], i: usize| -> i32 {
        let low = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 };
        (low as u32 | ((qh >> i) & 1) << 4) as i32
    };
    let (mut lanes, mut odd, mut mins) = ([0f32; 8], [0f32; 8], 0f32);
    match t {
        QuantType::Q5_0 | QuantType::Q5_1 => {
            let bb = t.block_bytes();
            for (blk, a) in wr.chunks_exact(bb).zip(&acts) {
                let qh = u32::from_le_bytes(blk[bb - 20..bb - 16].try_into().unwrap());
                let offset = if t == QuantType::Q5_0 { 16 } else { 0 };
                let w: Vec<i32> = (0..32).map(|i| five_bit(qh, &blk[bb - 16..], i) - offset).collect();
                lanes_fma(&mut lanes, h(blk, 0) * a.d, &w, &a.q);
                if t == QuantType::Q5_1 {
                    mins = h(blk, 2).mul_add(a.s81, mins);
                }
            }
            hsum_float_8(&lanes) + mins
        }
        QuantType::Q5_K => {
            for (s, blk) in wr.chunks_exact(176).enumerate() {
                for j in 0..8 {
                    let (sc, m) = get_scale_min_k4(j, &blk[4..16]);
                    let a = &acts[8 * s + j];
                    let w: Vec<i32> = (0..32)
                        .map(|l| {
                            let byte = blk[48 + 32 * (j / 2) + l];
                            let low = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                            (low | ((blk[16 + l] >> j) & 1) << 4) as i32
                        })
                        .collect();
                    lanes_fma(&mut lanes, h(blk, 0) * sc as f32 * a.d, &w, &a.q);
                    mins = (h(blk, 2) * m as f32).mul_add(a.d_sum, mins);
                }
            }
            hsum_float_8(&lanes) - mins
        }
        QuantType::IQ4_NL => {
            let nb = wr.len() / 18;
            let values = |blk: &[u8]| -> Vec<i32> {
                (0..32)
                    .map(|i| KVALUES_IQ4NL[if i < 16 { blk[2 + i] & 15 } else { blk[2 + i - 16] >> 4 } as usize] as i32)
                    .collect()
            };
            for (b, (blk, a)) in wr.chunks_exact(18).zip(&acts).enumerate().take(nb - nb % 2) {
                let set = if b % 2 == 0 { &mut lanes } else { &mut odd };
                lanes_fma(set, a.d * h(blk, 0), &values(blk), &a.q);
            }
            let mut sum = hsum_float_8(&std::array::from_fn(|g| lanes[g] + odd[g]));
            if nb % 2 == 1 {
                let (blk, a) = (&wr[(nb - 1) * 18..], &acts[nb - 1]);
                let dot: i32 = values(blk).iter().zip(&a.q).map(|(v, q)| v * q).sum();
                sum = (a.d * h(blk, 0)).mul_add(dot as f32, sum);
            }
            sum
        }
        _ => unreachable!(),
    }
}

/// Q5_0, Q5_1, IQ4_NL and Q5_K follow one documented order on every ISA level: the portable
/// code must be that order (recomputed here from the bytes by `reference_order`), and every
/// level must give its bits, for decode (m = 1), tiles of four and ragged batches, with an
/// odd number of blocks (IQ4_NL's unpaired last block) and an even one.
#[test]
fn exact_order_formats_give_their_reference_bits_on_every_isa() {
    let (mut rng, seed) = rng(14);
    for t in [QuantType::Q5_0, QuantType::Q5_1, QuantType::IQ4_NL, QuantType::Q5_K] {
        let ks: &[usize] = if t == QuantType::Q5_K { &[256, 768] } else { &[32, 576, 608] };
        for &k in ks {
            let n = 37;
            let row_bytes = t.row_bytes(k);
            for m in [1usize, 4, 7] {
                let c = Case { t, m, n, k };
                let (mut w, _, x) = random_case(&mut rng, &c);
                if t == QuantType::Q5_K {
                    // Random codes and scales, not only the round-to-nearest quantiser's.
                    w = (0..n).flat_map(|_| random_blocks(t, &mut rng, k)).collect();
                }
                let portable = run(QuantLevel::Portable, t, &w, n, k, &x, m);
                for r in 0..m {
                    for j in 0..n {
                        let want = reference_order(t, &w[j * row_bytes..(j + 1) * row_bytes], &x[r * k..(r + 1) * k]);
                        let got = portable[r * n + j];
                        assert_eq!(got.to_bits(), want.to_bits(), "{} portable k={k} m={m} [{r}, {j}]: {got} vs {want} (seed {seed})", t.name());
                    }
                }
                for isa in QuantLevel::available() {
                    let y = run(isa, t, &w, n, k, &x, m);
                    for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{} {isa:?} k={k} m={m} index {i}: {a} vs portable {b} (seed {seed})", t.name());
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fast numerics: weights repacked into 16-row panels, one f32 chain per output.

fn run_panels(isa: QuantLevel, t: QuantType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let panels = Panels::pack(t, w, n, k);
    let mut acts = Q8Activations::new();
    acts.quantize_with_isa(isa, x, m, k);
    let mut y = vec![f32::NAN; m * n];
    panel_matmul(isa, &panels, &acts, &mut y);
    y
}

/// The fast order recomputed from the GGUF bytes and public pieces: per output, per block,
/// `acc = fma(d·d_x, Σq·a, acc)` (whole-block integer dot), for Q4_1 also
/// `mins = fma(m, f16(d_x·Σa), mins)`; the result `acc + mins`. Every ISA must give these bits
/// for decode (m = 1), tiles of eight and four and ragged batches, n off the 16-row panel grid; and the
/// result must be the f64 product within the bounds `check_case` derives.
#[test]
fn panels_follow_the_fast_order_on_every_isa() {
    let (mut rng, seed) = rng(12);
    let formats = [QuantType::Q4_1, QuantType::Q8_0, QuantType::Q4_0, QuantType::Q5_0, QuantType::Q5_1, QuantType::IQ4_NL];
    // m = 5, 6, 7 and 19: the AVX2 four-row tiles of the Q4 formats with each remainder
    // (1, 2, 3) after them; 16: four of them.
    let shapes = [(1usize, 37usize, 576usize), (4, 16, 32), (7, 33, 96), (19, 5, 64), (5, 16, 32), (6, 20, 64), (16, 17, 96)];
    // Weights from the round-to-nearest quantiser, then random bytes (every code, and for
    // Q8_0 the −128 the quantiser never writes).
    for (t, (m, n, k), random_bytes) in formats.into_iter().flat_map(|t| shapes.map(|s| (t, s)).into_iter()).flat_map(|(t, s)| [(t, s, false), (t, s, true)]) {
        let bb = t.block_bytes();
        {
            let c = Case { t, m, n, k };
            let (mut w, mut w_deq, x) = random_case(&mut rng, &c);
            if random_bytes {
                w = (0..n).flat_map(|_| random_blocks(t, &mut rng, k)).collect();
                for (bytes, row) in w.chunks_exact(t.row_bytes(k)).zip(w_deq.chunks_exact_mut(k)) {
                    dequantize_row(t, bytes, row);
                }
            }
            let portable = run_panels(QuantLevel::Portable, t, &w, n, k, &x, m);
            let row_bytes = t.row_bytes(k);
            let mut acts = Q8Activations::new();
            acts.quantize(&x, m, k);
            let mut x_hat = vec![0f32; k];
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                acts.dequantize_row(r, &mut x_hat);
                for j in 0..n {
                    let wr = &w[j * row_bytes..(j + 1) * row_bytes];
                    let (mut acc, mut mins) = (0f32, 0f32);
                    for (b, blk) in wr.chunks_exact(bb).enumerate() {
                        let xb = &xr[b * 32..(b + 1) * 32];
                        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                        let qa: Vec<i32> = xb.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
                        let dx = f16_to_f32(f32_to_f16(amax / 127.0));
                        let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                        // ggml's block layouts, read here independently of the crate.
                        let nibble = |qs: &[u8], i: usize| if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 } as i32;
                        let fifth = |qh: &[u8], i: usize| ((u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> i) & 1) as i32;
                        let code = |i: usize| match t {
                            QuantType::Q4_1 => nibble(&blk[4..], i),
                            QuantType::Q4_0 => nibble(&blk[2..], i) - 8,
                            QuantType::Q5_0 => nibble(&blk[6..], i) + 16 * fifth(&blk[2..], i) - 16,
                            QuantType::Q5_1 => nibble(&blk[8..], i) + 16 * fifth(&blk[4..], i),
                            QuantType::IQ4_NL => [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113][nibble(&blk[2..], i) as usize],
                            _ => blk[2 + i] as i8 as i32,
                        };
                        let dot: i32 = (0..32).map(|i| code(i) * qa[i]).sum();
                        acc = (d * dx).mul_add(dot as f32, acc);
                        if matches!(t, QuantType::Q4_1 | QuantType::Q5_1) {
                            let s = f16_to_f32(f32_to_f16(amax / 127.0 * qa.iter().sum::<i32>() as f32));
                            mins = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]])).mul_add(s, mins);
                        }
                    }
                    let want = if matches!(t, QuantType::Q4_1 | QuantType::Q5_1) { acc + mins } else { acc };
                    let got = portable[r * n + j];
                    assert_eq!(got.to_bits(), want.to_bits(), "{} portable m={m} n={n} k={k} random bytes {random_bytes} [{r}, {j}]: {got} vs {want} (seed {seed})", t.name());
                    // Against f64 with the activations the kernel saw: f32 accumulation only
                    // (terms d·u·x̂ and m·Σx̂ may cancel, hence the |w|·|x̂| part).
                    let wj = &w_deq[j * k..(j + 1) * k];
                    let (seen, seen_abs) = dot64(wj, &x_hat);
                    let w_max = wj.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
                    let x_abs: f64 = x_hat.iter().map(|&v| v.abs() as f64).sum();
                    let q81 = if matches!(t, QuantType::Q4_1 | QuantType::Q5_1) { 2f64.powi(-10) * w_max * x_abs } else { 0.0 };
                    let fp = 4e-5 * (seen_abs + 2.0 * w_max * x_abs) + q81 + 1e-30;
                    assert!((got as f64 - seen).abs() <= fp, "{} m={m} random bytes {random_bytes} [{r}, {j}]: {got} vs f64 {seen} (seed {seed})", t.name());
                }
            }
            for isa in QuantLevel::available() {
                let y = run_panels(isa, t, &w, n, k, &x, m);
                for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{} {isa:?} m={m} n={n} index {i}: {a} vs portable {b} (seed {seed})", t.name());
                }
            }
        }
    }
}

/// A row's panel outputs are the same bits alone, in any batch, at any position, on a
/// matrix large enough to be split over the pool.
#[test]
fn panel_rows_are_bitwise_identical_alone_or_in_any_batch() {
    let (mut rng, seed) = rng(13);
    let isa = QuantLevel::selected();
    let formats = [
        QuantType::Q4_1,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::IQ4_NL,
    ];
    for t in formats {
        let (n, k, m) = (1000, if t.block_elems() == 256 { 768 } else { 576 }, 21);
        let c = Case { t, m, n, k };
        let (w, _, x) = random_case(&mut rng, &c);
        let batch = run_panels(isa, t, &w, n, k, &x, m);
        for r in [0, 5, 20] {
            let alone = run_panels(isa, t, &w, n, k, &x[r * k..(r + 1) * k], 1);
            for j in 0..n {
                assert_eq!(alone[j].to_bits(), batch[r * n + j].to_bits(), "{} row {r} col {j} (seed {seed})", t.name());
            }
        }
    }
}

/// Several matrices in one `panel_matmuls` call (split over the pool together, chunks crossing
/// from one matrix into the next) give each matrix's `panel_matmul` bits, on every level.
#[test]
fn panel_matmuls_give_each_matrix_its_own_bits() {
    let (mut rng, seed) = rng(14);
    // A layer's Q, K, V (K and V small), a mix of formats, and K-quants as in Q4_K_M.
    let sets: [&[(QuantType, usize)]; 5] = [
        &[(QuantType::Q4_1, 576), (QuantType::Q4_1, 192), (QuantType::Q4_1, 197)],
        &[(QuantType::Q8_0, 300), (QuantType::Q4_1, 1536), (QuantType::Q8_0, 17)],
        &[(QuantType::Q4_K, 512), (QuantType::Q6_K, 128), (QuantType::Q4_K, 40)],
        // SmolLM2 in Q4_K_M (rows of 576 fall back to Q5_0 and Q8_0), and the other mixes'
        // fallbacks.
        &[(QuantType::Q5_0, 576), (QuantType::Q5_0, 192), (QuantType::Q8_0, 192)],
        &[(QuantType::Q5_1, 300), (QuantType::Q4_0, 1536), (QuantType::IQ4_NL, 40)],
    ];
    for set in sets {
        let k = if set[0].0.block_elems() == 256 { 768 } else { 576 };
        for m in [1usize, 5, 16] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0).collect();
            let mats: Vec<(Panels, usize)> = set
                .iter()
                .map(|&(t, n)| (Panels::pack(t, &random_case(&mut rng, &Case { t, m: 1, n, k }).0, n, k), n))
                .collect();
            for isa in QuantLevel::available() {
                let mut acts = Q8Activations::new();
                acts.quantize_with_isa(isa, &x, m, k);
                let mut ys: Vec<Vec<f32>> = mats.iter().map(|(_, n)| vec![f32::NAN; m * n]).collect();
                let mut outputs: Vec<(&Panels, &mut [f32])> = mats.iter().zip(ys.iter_mut()).map(|((p, _), y)| (p, y.as_mut_slice())).collect();
                panel_matmuls(isa, &mut outputs, &acts);
                for ((p, n), y) in mats.iter().zip(&ys) {
                    let mut alone = vec![f32::NAN; m * n];
                    panel_matmul(isa, p, &acts, &mut alone);
                    for (i, (a, b)) in y.iter().zip(&alone).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{} n={n} m={m} {isa:?} index {i}: {a} vs {b} (seed {seed})", p.wtype().name());
                    }
                }
            }
        }
    }
}

/// A K-quant super-block decoded to integers, ggml's layout read independently of the crate:
/// per 32-weight sub-block `(scale, min)` in f32 (Q4_K: `d·sc`, `dmin·m`, both exact; Q6_K:
/// `d` and 0), per 16 weights an integer multiplier (Q4_K: 1; Q6_K: the i8 scale) and the codes.
struct KSuper {
    scale: [f32; 8],
    min: [f32; 8],
    group: [i32; 16],
    q: [i32; 256],
}

fn decode_k_super(t: QuantType, x: &[u8]) -> KSuper {
    let h = |at: usize| f16_to_f32(u16::from_le_bytes([x[at], x[at + 1]]));
    let mut k = KSuper { scale: [0.0; 8], min: [0.0; 8], group: [1; 16], q: [0; 256] };
    if t == QuantType::Q4_K {
        let (d, dmin) = (h(0), h(2));
        for j in 0..8 {
            let (sc, m) = if j < 4 {
                (x[4 + j] & 63, x[8 + j] & 63)
            } else {
                ((x[8 + j] & 0xF) | ((x[j] >> 6) << 4), (x[8 + j] >> 4) | ((x[4 + j] >> 6) << 4))
            };
            k.scale[j] = d * sc as f32;
            k.min[j] = dmin * m as f32;
        }
        for i in 0..256 {
            let byte = x[16 + 32 * (i / 64) + i % 32];
            k.q[i] = if i % 64 < 32 { byte & 0xF } else { byte >> 4 } as i32;
        }
    } else {
        k.scale = [h(208); 8];
        for (g, s) in k.group.iter_mut().enumerate() {
            *s = x[192 + g] as i8 as i32;
        }
        for i in 0..256 {
            let (half, l, part) = (i / 128, i % 32, i % 128 / 32);
            let ql = x[64 * half + l + 32 * (part % 2)];
            let low = if part < 2 { ql & 0xF } else { ql >> 4 };
            let high = (x[128 + 32 * half + l] >> (2 * part)) & 3;
            k.q[i] = (low | (high << 4)) as i32 - 32;
        }
    }
    k
}

/// Q4_K and Q6_K panels: the fast order recomputed from the GGUF bytes — per sub-block,
/// Q4_K `acc = fma((d·sc)·d_x, Σq·a, acc)`, `mins = fma(dmin·m, d_x·Σa, mins)`, result
/// `acc − mins`; Q6_K `acc = fma(d·d_x, s₀·Σq·a + s₁·Σq·a, acc)` over its two groups of 16 —
/// bit for bit on the portable level, every other ISA level the portable bits, and the f64
/// product within f32 accumulation error. Weights both from the round-to-nearest quantiser
/// and random bytes (extreme codes and scales: Q6_K's −32 codes, −128 scales).
#[test]
fn k_quant_panels_follow_the_fast_order_on_every_isa() {
    let (mut rng, seed) = rng(14);
    for t in [QuantType::Q4_K, QuantType::Q6_K] {
        let bb = t.block_bytes();
        // m = 2, 3, 5, 7, 19: the AVX2 four-row tiles with each remainder; 16: four of them.
        for (m, n, k) in [(1usize, 37usize, 512usize), (4, 16, 256), (7, 33, 768), (19, 5, 256), (2, 70, 1024), (3, 16, 256), (5, 18, 512), (16, 17, 256)] {
            for random_bytes in [false, true] {
                let c = Case { t, m, n, k };
                let (mut w, mut w_deq, x) = random_case(&mut rng, &c);
                if random_bytes {
                    w = (0..n).flat_map(|_| random_blocks(t, &mut rng, k)).collect();
                    for (bytes, row) in w.chunks_exact(t.row_bytes(k)).zip(w_deq.chunks_exact_mut(k)) {
                        dequantize_row(t, bytes, row);
                    }
                }
                let portable = run_panels(QuantLevel::Portable, t, &w, n, k, &x, m);
                let row_bytes = t.row_bytes(k);
                let mut acts = Q8Activations::new();
                acts.quantize(&x, m, k);
                let mut x_hat = vec![0f32; k];
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    acts.dequantize_row(r, &mut x_hat);
                    for j in 0..n {
                        let wr = &w[j * row_bytes..(j + 1) * row_bytes];
                        let (mut acc, mut mins, mut mass) = (0f32, 0f32, 0f64);
                        for (s, blk) in wr.chunks_exact(bb).enumerate() {
                            let ks = decode_k_super(t, blk);
                            for sub in 0..8 {
                                let b = 8 * s + sub;
                                let xb = &xr[b * 32..(b + 1) * 32];
                                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                                let qa: Vec<i32> = xb.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
                                let dx = f16_to_f32(f32_to_f16(amax / 127.0));
                                let half_dot = |h: usize| -> i32 {
                                    let dot: i32 = (16 * h..16 * h + 16).map(|i| ks.q[32 * sub + i] * qa[i]).sum();
                                    ks.group[2 * sub + h] * dot
                                };
                                let sumi = half_dot(0) + half_dot(1);
                                acc = (ks.scale[sub] * dx).mul_add(sumi as f32, acc);
                                let qa_sum: i32 = qa.iter().sum();
                                mins = ks.min[sub].mul_add(dx * qa_sum as f32, mins);
                                let abs_dot: f64 =
                                    (0..32).map(|i| (ks.group[2 * sub + i / 16] * ks.q[32 * sub + i] * qa[i]).abs() as f64).sum();
                                let qa_abs: f64 = qa.iter().map(|&v| v.abs() as f64).sum();
                                mass += dx as f64 * (ks.scale[sub].abs() as f64 * abs_dot + ks.min[sub].abs() as f64 * qa_abs);
                            }
                        }
                        let want = acc - mins;
                        let got = portable[r * n + j];
                        let at = format!("{} m={m} n={n} k={k} random bytes {random_bytes} [{r}, {j}] (seed {seed})", t.name());
                        assert_eq!(got.to_bits(), want.to_bits(), "{at}: portable {got} vs {want}");
                        // Against f64 with the activations the kernel saw: f32 rounding of
                        // the chain's terms only, relative to the terms' absolute mass.
                        let (seen, _) = dot64(&w_deq[j * k..(j + 1) * k], &x_hat);
                        let fp = 4e-5 * mass + 1e-30;
                        assert!((got as f64 - seen).abs() <= fp, "{at}: {got} vs f64 {seen}, bound {fp}");
                    }
                }
                for isa in QuantLevel::available() {
                    let y = run_panels(isa, t, &w, n, k, &x, m);
                    for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{} {isa:?} m={m} n={n} index {i}: {a} vs portable {b} (seed {seed})",
                            t.name()
                        );
                    }
                }
            }
        }
    }
}

/// Q6_K panels at the integer extremes: every code 63 (q = 31) or 0 (q = −32), every
/// activation ±127, scales 127 or −128. The AVX2 one-row tile adds the unsigned codes' products
/// in i16 (up to 4·2·63·127 = 64,008: they wrap) before taking off 32·Σa, exact only because the
/// final per-lane sum fits; each level must give the portable bits, and those the closed form
/// `fma(d·d_x, s·32·q·a, acc)` per sub-block.
#[test]
fn q6_k_panels_are_exact_at_the_extreme_codes() {
    let (n, k) = (17usize, 512usize);
    for (byte, q) in [(0xffu8, 31i32), (0x00, -32)] {
        for scale in [127i8, -128] {
            for sign in [1.0f32, -1.0] {
                let mut blk = vec![byte; 192];
                blk.extend(std::iter::repeat_n(scale as u8, 16));
                blk.extend_from_slice(&f32_to_f16(0.5).to_le_bytes());
                let w: Vec<u8> = (0..n * k / 256).flat_map(|_| blk.clone()).collect();
                // One row, and the AVX2 four-row tile alone, with each remainder.
                for m in [1usize, 3, 4, 5, 6, 7] {
                    let x = vec![sign; m * k];
                    let portable = run_panels(QuantLevel::Portable, QuantType::Q6_K, &w, n, k, &x, m);
                    let (dx, a) = (f16_to_f32(f32_to_f16(1.0 / 127.0)), 127 * sign as i32);
                    let sumi = scale as i32 * 32 * q * a;
                    let want = (0..k / 32).fold(0f32, |acc, _| (0.5 * dx).mul_add(sumi as f32, acc));
                    for (i, v) in portable.iter().enumerate() {
                        assert_eq!(v.to_bits(), want.to_bits(), "portable q={q} s={scale} a={a} m={m} index {i}: {v} vs {want}");
                    }
                    for isa in QuantLevel::available() {
                        let y = run_panels(isa, QuantType::Q6_K, &w, n, k, &x, m);
                        for (i, (v, p)) in y.iter().zip(&portable).enumerate() {
                            assert_eq!(v.to_bits(), p.to_bits(), "{isa:?} q={q} s={scale} a={a} m={m} index {i}: {v} vs portable {p}");
                        }
                    }
                }
            }
        }
    }
}

/// An f16 scale drawn from every finite class, as bits: ±0, ±subnormals (whose widening needs
/// the exponent renormalised), and ±normals from 2⁻¹⁴ to 2⁴.
fn f16_scale_bits(rng: &mut Rng) -> u16 {
    let r = rng.next_u64();
    let sign = ((r >> 63) as u16) << 15;
    let mantissa = (r >> 20) as u16 & 0x3ff;
    sign | match r % 4 {
        0 if r & 0x30 == 0 => 0,
        0 | 1 => mantissa.max(1),
        _ => ((1 + (r >> 8) % 19) as u16) << 10 | mantissa,
    }
}

/// The fast order of a block format's output from the GGUF bytes, the scales widened with the
/// crate's scalar `f16_to_f32` (what the panels stored as f32 before they kept the f16 bits).
fn fast_order_from_file(t: QuantType, wr: &[u8], xr: &[f32]) -> f32 {
    let h = |blk: &[u8], at: usize| f16_to_f32(u16::from_le_bytes([blk[at], blk[at + 1]]));
    let (mut acc, mut mins) = (0f32, 0f32);
    if t.block_elems() == 256 {
        for (s, blk) in wr.chunks_exact(t.block_bytes()).enumerate() {
            let ks = decode_k_super(t, blk);
            for sub in 0..8 {
                let xb = &xr[(8 * s + sub) * 32..][..32];
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                let qa: Vec<i32> = xb.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
                let dx = f16_to_f32(f32_to_f16(amax / 127.0));
                let half = |g: usize| ks.group[2 * sub + g] * (16 * g..16 * g + 16).map(|i| ks.q[32 * sub + i] * qa[i]).sum::<i32>();
                acc = (ks.scale[sub] * dx).mul_add((half(0) + half(1)) as f32, acc);
                mins = ks.min[sub].mul_add(dx * qa.iter().sum::<i32>() as f32, mins);
            }
        }
        return acc - mins;
    }
    let affine = matches!(t, QuantType::Q4_1 | QuantType::Q5_1);
    for (b, blk) in wr.chunks_exact(t.block_bytes()).enumerate() {
        let xb = &xr[b * 32..][..32];
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let qa: Vec<i32> = xb.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
        let dx = f16_to_f32(f32_to_f16(amax / 127.0));
        let nibble = |qs: &[u8], i: usize| if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 } as i32;
        let fifth = |qh: &[u8], i: usize| ((u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> i) & 1) as i32;
        let code = |i: usize| match t {
            QuantType::Q4_1 => nibble(&blk[4..], i),
            QuantType::Q4_0 => nibble(&blk[2..], i) - 8,
            QuantType::Q5_0 => nibble(&blk[6..], i) + 16 * fifth(&blk[2..], i) - 16,
            QuantType::Q5_1 => nibble(&blk[8..], i) + 16 * fifth(&blk[4..], i),
            QuantType::IQ4_NL => KVALUES_IQ4NL[nibble(&blk[2..], i) as usize] as i32,
            _ => blk[2 + i] as i8 as i32,
        };
        let dot: i32 = (0..32).map(|i| code(i) * qa[i]).sum();
        acc = (h(blk, 0) * dx).mul_add(dot as f32, acc);
        if affine {
            let s = f16_to_f32(f32_to_f16(amax / 127.0 * qa.iter().sum::<i32>() as f32));
            mins = h(blk, 2).mul_add(s, mins);
        }
    }
    if affine {
        acc + mins
    } else {
        acc
    }
}

/// The panels keep the file's f16 scales and widen them in the kernel (`vcvtph2ps` on AVX2 and
/// AVX-512, `f16_to_f32` in the portable code): with scales from every finite f16 class
/// (zeros, subnormals, negatives, up to 2⁴) every level gives the bits of the f32-scale
/// formula, for every panel format, at m = 1 and in a tile.
#[test]
fn panel_scales_widen_from_f16_exactly_on_every_isa() {
    let (mut rng, seed) = rng(15);
    let formats = [
        QuantType::Q4_1,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::IQ4_NL,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ];
    for t in formats {
        let scale_offsets: &[usize] = match t {
            QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K => &[0, 2],
            QuantType::Q6_K => &[208],
            _ => &[0],
        };
        let (n, k) = (37, if t.block_elems() == 256 { 512 } else { 96 });
        let mut w: Vec<u8> = (0..n).flat_map(|_| random_blocks(t, &mut rng, k)).collect();
        for blk in w.chunks_exact_mut(t.block_bytes()) {
            for &at in scale_offsets {
                blk[at..at + 2].copy_from_slice(&f16_scale_bits(&mut rng).to_le_bytes());
            }
        }
        for m in [1, 5] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f32()).collect();
            let portable = run_panels(QuantLevel::Portable, t, &w, n, k, &x, m);
            let row_bytes = t.row_bytes(k);
            for r in 0..m {
                for j in 0..n {
                    let want = fast_order_from_file(t, &w[j * row_bytes..][..row_bytes], &x[r * k..][..k]);
                    let got = portable[r * n + j];
                    assert_eq!(got.to_bits(), want.to_bits(), "{} portable m={m} [{r}, {j}]: {got} vs {want} (seed {seed})", t.name());
                }
            }
            for isa in QuantLevel::available() {
                let y = run_panels(isa, t, &w, n, k, &x, m);
                for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{} {isa:?} m={m} index {i}: {a} vs portable {b} (seed {seed})", t.name());
                }
            }
        }
    }
}

/// The signed-code panels (Q8_0, IQ4_NL) at their extreme codes, in every tile the AVX2 level
/// runs them in: a four-row tile and each remainder (m = 4..7), two four-row tiles and a
/// one-row tile (m = 9). Q8_0 codes −128 and 127 (every byte, alternating byte by byte, and
/// group of four by group), IQ4_NL's −127 and 113 (every index, one of each per byte, and
/// alternating by group), against activation blocks of +127, of −127, of ±127 alternating
/// element by element and block by block: a `vpmaddubsw` pair |w|·(±a) reaches
/// 2·128·127 = 32,512, a step from i16 saturation. Every ISA level must give the portable bits.
#[test]
fn signed_panel_tiles_hold_at_extreme_codes() {
    let (mut rng, seed) = rng(18);
    let (n, k) = (24usize, 256usize);
    for m in [4usize, 5, 6, 7, 9] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| match (i / k) % 4 {
                0 => 1.0,
                1 => -1.0,
                2 => if i % 2 == 0 { 1.0 } else { -1.0 },
                _ => if (i / 32) % 2 == 0 { 0.5 } else { -2.0 },
            })
            .collect();
        for t in [QuantType::Q8_0, QuantType::IQ4_NL] {
            // Q8_0: a byte is a code; IQ4_NL: a byte holds two indices (0: −127, 15: 113).
            let (low, high) = if t == QuantType::Q8_0 { (0x80u8, 0x7fu8) } else { (0x00, 0xff) };
            for pattern in 0..4 {
                let mut w: Vec<u8> = (0..n).flat_map(|_| random_blocks(t, &mut rng, k)).collect();
                for blk in w.chunks_exact_mut(t.block_bytes()) {
                    // The codes after the f16 scale (the scale `random_blocks` wrote stays).
                    for (j, c) in blk[2..].iter_mut().enumerate() {
                        *c = match pattern {
                            0 => low,
                            1 => high,
                            2 if t == QuantType::IQ4_NL => 0xf0,
                            2 => if j % 2 == 0 { low } else { high },
                            _ => if j / 4 % 2 == 0 { low } else { high },
                        };
                    }
                }
                let portable = run_panels(QuantLevel::Portable, t, &w, n, k, &x, m);
                assert!(portable.iter().all(|v| v.is_finite()), "{} m={m} pattern {pattern}: portable outputs {portable:?}", t.name());
                for isa in QuantLevel::available() {
                    let y = run_panels(isa, t, &w, n, k, &x, m);
                    for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{} {isa:?} m={m} pattern {pattern} index {i}: {a} vs portable {b} (seed {seed})", t.name());
                    }
                }
            }
        }
    }
}

/// The panel kernels' integer sums at their bounds: every code at its largest magnitude
/// (nibbles 15, fifth bits set, Q8_0's −128, Q6_K's −32 with scales −128, IQ4_NL's −127)
/// against activation blocks that all quantise to +127 or all to −127, where the AVX2 kernels'
/// i16 partial sums peak. Every ISA level must give the portable bits.
#[test]
fn panel_integer_sums_hold_at_extreme_codes_and_activations() {
    let (mut rng, seed) = rng(17);
    // Nine rows: the AVX2 four-row tiles (two) and a one-row tile each see every pattern.
    let (m, n, k) = (9usize, 40usize, 512usize);
    let x: Vec<f32> = (0..m * k).map(|i| match i / k % 3 {
        0 => 1.0,
        1 => -1.0,
        _ => if (i / 32) % 2 == 0 { 0.5 } else { -2.0 },
    }).collect();
    for t in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q5_1, QuantType::Q8_0, QuantType::IQ4_NL, QuantType::Q4_K, QuantType::Q6_K] {
        let mut w: Vec<u8> = (0..n).flat_map(|_| random_blocks(t, &mut rng, k)).collect();
        // The code bytes of each block (the scales `random_blocks` wrote stay).
        let codes: &[std::ops::Range<usize>] = match t {
            QuantType::Q4_0 | QuantType::IQ4_NL => &[2..18],
            QuantType::Q4_1 => &[4..20],
            QuantType::Q5_0 => &[2..22],
            QuantType::Q5_1 => &[4..24],
            QuantType::Q8_0 => &[2..34],
            QuantType::Q4_K => &[16..144],
            _ => &[0..192, 192..208],
        };
        let fill = match t {
            QuantType::Q8_0 => 0x80,
            QuantType::IQ4_NL | QuantType::Q6_K => 0x00,
            _ => 0xff,
        };
        for blk in w.chunks_exact_mut(t.block_bytes()) {
            for (i, range) in codes.iter().enumerate() {
                // Q6_K: codes 0 (q = −32), then scales −128.
                blk[range.clone()].fill(if i == 1 { 0x80 } else { fill });
            }
        }
        let portable = run_panels(QuantLevel::Portable, t, &w, n, k, &x, m);
        assert!(portable.iter().all(|v| v.is_finite() && *v != 0.0), "{}: portable outputs {portable:?}", t.name());
        for isa in QuantLevel::available() {
            let y = run_panels(isa, t, &w, n, k, &x, m);
            for (i, (a, b)) in y.iter().zip(&portable).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{} {isa:?} index {i}: {a} vs portable {b} (seed {seed})", t.name());
            }
        }
    }
}

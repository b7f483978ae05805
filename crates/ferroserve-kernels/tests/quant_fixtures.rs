//! GGUF blocks decoded by an independent implementation: the `gguf` package's numpy code
//! (kept beside llama.cpp) made the fixtures in `tests/data` (see `gen_quant_blocks.py`
//! there for the command and versions). Our `dequantize_row` must give its floats bit for
//! bit, and every ISA level's matmul must be the f64 product of those floats within f32
//! accumulation error. A missing fixture fails the test.

use ferroserve_kernels::quant::{
    dequantize_row, panel_matmul, quant_matmul_with_isa, Panels, Q8Activations, QuantLevel, QuantType,
};
use std::path::PathBuf;

/// Each fixture: the format and its file stem.
const FIXTURES: [(QuantType, &str); 6] = [
    (QuantType::Q5_0, "q5_0"),
    (QuantType::Q5_1, "q5_1"),
    (QuantType::IQ4_NL, "iq4_nl"),
    (QuantType::Q4_K, "q4_k"),
    (QuantType::Q5_K, "q5_k"),
    (QuantType::Q6_K, "q6_k"),
];

/// Row length the generator uses: SmolLM2's 576 for 32-weight blocks, 768 for 256.
fn row_len(t: QuantType) -> usize {
    if t.block_elems() == 256 {
        768
    } else {
        576
    }
}

/// The fixture's blocks and gguf's floats; panics (fails the test) when a file is missing.
fn load(t: QuantType, stem: &str) -> (Vec<u8>, Vec<f32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let read = |ext: &str| {
        let path = dir.join(format!("{stem}.{ext}"));
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: fixture {} missing ({e}); regenerate with tests/data/gen_quant_blocks.py",
                t.name(),
                path.display()
            )
        })
    };
    let blocks = read("blocks");
    let values: Vec<f32> = read("f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let k = row_len(t);
    assert!(
        !values.is_empty() && values.len() % k == 0,
        "{}: {} floats",
        t.name(),
        values.len()
    );
    assert_eq!(
        blocks.len(),
        values.len() / k * t.row_bytes(k),
        "{}: block bytes",
        t.name()
    );
    (blocks, values)
}

#[test]
fn dequantize_row_gives_ggufs_floats_bit_for_bit() {
    for (t, stem) in FIXTURES {
        let (blocks, theirs) = load(t, stem);
        let k = row_len(t);
        let mut ours = vec![f32::NAN; k];
        for (r, (bytes, want)) in blocks
            .chunks_exact(t.row_bytes(k))
            .zip(theirs.chunks_exact(k))
            .enumerate()
        {
            dequantize_row(t, bytes, &mut ours);
            for (i, (a, b)) in ours.iter().zip(want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{} row {r} weight {i}: ours {a}, gguf {b}",
                    t.name()
                );
            }
        }
    }
}

#[test]
fn matmul_of_fixture_blocks_is_the_f64_product_of_ggufs_floats() {
    // Fixed activations: rows of different magnitudes, one with an outlier.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    for (t, stem) in FIXTURES {
        let (w, w_deq) = load(t, stem);
        let k = row_len(t);
        let n = w_deq.len() / k;
        let m = 3;
        let mut x: Vec<f32> = (0..m * k)
            .map(|i| next() * [1.0, 0.01, 30.0][i / k])
            .collect();
        x[k + 7] = 50.0;
        // What the kernels multiply by: the 8-bit activations, dequantised.
        let mut acts = Q8Activations::new();
        acts.quantize_with_isa(QuantLevel::Portable, &x, m, k);
        let mut x_hat = vec![0f32; m * k];
        for r in 0..m {
            acts.dequantize_row(r, &mut x_hat[r * k..(r + 1) * k]);
        }
        // Every level, in the exact order and (where the format has them) the fast panels.
        let runs = QuantLevel::available().into_iter().flat_map(|isa| {
            let mut exact = vec![f32::NAN; m * n];
            quant_matmul_with_isa(isa, t, &w, n, k, &x, m, &mut exact);
            let mut runs = vec![(format!("{isa:?} exact"), exact)];
            if Panels::supports(t) {
                let mut fast = vec![f32::NAN; m * n];
                let mut acts = Q8Activations::new();
                acts.quantize_with_isa(isa, &x, m, k);
                panel_matmul(isa, &Panels::pack(t, &w, n, k), &acts, &mut fast);
                runs.push((format!("{isa:?} panels"), fast));
            }
            runs
        });
        for (isa, y) in runs {
            for r in 0..m {
                let xr = &x_hat[r * k..(r + 1) * k];
                let x_abs: f64 = xr.iter().map(|&v| v.abs() as f64).sum();
                for j in 0..n {
                    let wj = &w_deq[j * k..(j + 1) * k];
                    let (exact, exact_abs) =
                        wj.iter().zip(xr).fold((0f64, 0f64), |(s, a), (&p, &q)| {
                            let pq = p as f64 * q as f64;
                            (s + pq, a + pq.abs())
                        });
                    let w_max = wj.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
                    // f32 accumulation of terms up to |w|·|x̂| (the `d·q + m` formats sum two
                    // parts that may cancel); Q5_1 takes `m·s` with ggml's f16-rounded
                    // activation sum `s`, off by ≤ 2⁻¹⁰ of |Σx̂| per block.
                    let q81 = if t == QuantType::Q5_1 {
                        2f64.powi(-10) * w_max * x_abs
                    } else {
                        0.0
                    };
                    let bound = 4e-5 * (exact_abs + 2.0 * w_max * x_abs) + q81 + 1e-30;
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "{} {isa} [{r}, {j}]: got {got}, f64 {exact}, bound {bound:e}",
                        t.name()
                    );
                }
            }
        }
    }
}

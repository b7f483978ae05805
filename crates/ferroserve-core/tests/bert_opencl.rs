//! all-MiniLM-L6-v2 on the OpenCL device (PoCL here) against the CPU device and against
//! sentence-transformers' reference vectors. Without an OpenCL platform the tests print why
//! and return (`make test` installs PoCL).

mod common;

use std::path::PathBuf;

use ferroserve_core::embed::DeviceChoice;
use ferroserve_core::models::bert::BertModel;
use ferroserve_core::tokenize::bert::EncoderTokenizer;
use ferroserve_core::{EmbeddingEngine, EmbeddingEngineConfig, ErrorKind};
use ferroserve_kernels::opencl::{list_devices, KernelSource};
use ferroserve_kernels::{CpuBackend, OpenClBackend};

struct Fixture {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    reference: Vec<Vec<f64>>,
}

fn fixture(dir: &std::path::Path, max_len: usize) -> Fixture {
    let items = common::minilm_reference_items();
    let tok = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), max_len).unwrap();
    let texts: Vec<String> = items.iter().map(|it| it["text"].as_str().unwrap().to_string()).collect();
    let ids = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let reference = items.iter().map(|it| it["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()).collect();
    Fixture { texts, ids, reference }
}

#[test]
fn opencl_embeddings_match_cpu_and_reference_and_are_batch_invariant() {
    let _serial = common::opencl_serial();
    let Some(index) = common::opencl_device().map(|d| d.index) else { return };
    let dir = common::minilm_dir();
    let cl = BertModel::load(&dir, OpenClBackend::open(index, &KernelSource::Embedded).unwrap()).unwrap();
    let cpu = BertModel::load(&dir, CpuBackend::default()).unwrap();
    let fx = fixture(&dir, cl.sentence.max_seq_length);
    let refs: Vec<&[u32]> = fx.ids.iter().map(Vec::as_slice).collect();
    let h = cl.hidden_size();

    let batched = cl.embed(&refs).unwrap();
    let cpu_batched = cpu.embed(&refs).unwrap();
    assert_eq!(batched.len(), refs.len() * h);
    let (mut worst_cpu, mut worst_ref) = (1.0f64, 1.0f64);
    for (i, text) in fx.texts.iter().enumerate() {
        let row = &batched[i * h..(i + 1) * h];
        assert!(row.iter().all(|v| v.is_finite()), "non-finite output for {text:?}");
        let cpu_row: Vec<f64> = cpu_batched[i * h..(i + 1) * h].iter().map(|&v| v as f64).collect();
        let (c_cpu, c_ref) = (common::cosine(row, &cpu_row), common::cosine(row, &fx.reference[i]));
        assert!(c_cpu >= 0.9999, "cosine to the CPU {c_cpu} for {text:?}");
        assert!(c_ref >= 0.9999, "cosine to sentence-transformers {c_ref} for {text:?}");
        (worst_cpu, worst_ref) = (worst_cpu.min(c_cpu), worst_ref.min(c_ref));
        // Every kernel works per row (or per sequence), so a sentence's vector does not
        // depend on the batch it shares: the same bits alone as in the batch.
        let single = cl.embed(&[refs[i]]).unwrap();
        assert_eq!(single, row, "batch invariance for {text:?}");
    }
    eprintln!("{} sentences on {}: worst cosine to the CPU {worst_cpu:.7}, to the reference {worst_ref:.7}", refs.len(), cl.device_name());

    // The reversed batch after single sentences: the scratch buffers are reused and regrown.
    let reversed: Vec<&[u32]> = refs.iter().rev().copied().collect();
    let rev = cl.embed(&reversed).unwrap();
    for i in 0..refs.len() {
        assert_eq!(&rev[(refs.len() - 1 - i) * h..(refs.len() - i) * h], &batched[i * h..(i + 1) * h]);
    }
}

#[test]
fn precompiled_binaries_give_the_same_bits_and_missing_ones_are_a_clear_error() {
    let _serial = common::opencl_serial();
    let Some(index) = common::opencl_device().map(|d| d.index) else { return };
    let dir = common::minilm_dir();
    let from_source = BertModel::load(&dir, OpenClBackend::open(index, &KernelSource::Embedded).unwrap()).unwrap();
    let bin_dir = std::env::temp_dir().join(format!("ferroserve-kernel-binaries-{}", std::process::id()));
    std::fs::create_dir_all(&bin_dir).unwrap();
    let written = from_source.save_kernel_binaries(&bin_dir).unwrap();
    assert_eq!(written.len(), 5, "{written:?}");
    let from_binaries = BertModel::load(&dir, OpenClBackend::open(index, &KernelSource::Binaries(bin_dir.clone())).unwrap()).unwrap();
    let fx = fixture(&dir, from_source.sentence.max_seq_length);
    let refs: Vec<&[u32]> = fx.ids.iter().map(Vec::as_slice).collect();
    assert_eq!(from_source.embed(&refs).unwrap(), from_binaries.embed(&refs).unwrap());

    // One binary missing: refused with the file it looked for, not a panic.
    std::fs::remove_file(bin_dir.join("pool_f32.bin")).unwrap();
    let err = BertModel::load(&dir, OpenClBackend::open(index, &KernelSource::Binaries(bin_dir.clone())).unwrap()).err().expect("a missing binary must fail");
    assert_eq!(err.kind(), ErrorKind::Device);
    assert!(err.to_string().contains("pool_f32.bin"), "{err}");
    // A file that is not a program binary: the driver's refusal, as an error.
    std::fs::write(bin_dir.join("pool_f32.bin"), b"not a program binary").unwrap();
    let err = BertModel::load(&dir, OpenClBackend::open(index, &KernelSource::Binaries(bin_dir.clone())).unwrap()).err().expect("a corrupt binary must fail");
    assert_eq!(err.kind(), ErrorKind::Device, "{err}");
    std::fs::remove_dir_all(&bin_dir).unwrap();
}

#[test]
fn engine_on_opencl_serves_and_a_missing_device_is_a_device_error() {
    let _serial = common::opencl_serial();
    let Some(index) = common::opencl_device().map(|d| d.index) else { return };
    let dir = common::minilm_dir();
    let count = list_devices().unwrap().len();
    let cfg = EmbeddingEngineConfig { device: DeviceChoice::OpenCl { index: count, kernels: KernelSource::Embedded }, ..Default::default() };
    let err = EmbeddingEngine::load(&dir, cfg).err().expect("a device index past the last must fail");
    assert_eq!(err.kind(), ErrorKind::Device);
    assert!(err.to_string().contains(&format!("OpenCL device {count} does not exist")), "{err}");

    let cfg = EmbeddingEngineConfig { device: DeviceChoice::OpenCl { index, kernels: KernelSource::Embedded }, ..Default::default() };
    let engine = EmbeddingEngine::load(&dir, cfg).unwrap();
    assert!(engine.device_name().starts_with(&format!("opencl:{index}(")), "{}", engine.device_name());
    assert_eq!(engine.dim(), 384);
}

#[test]
fn device_choice_parses_and_rejects() {
    assert!(matches!(DeviceChoice::parse("cpu", None).unwrap(), DeviceChoice::Cpu));
    assert!(matches!(DeviceChoice::parse("opencl", None).unwrap(), DeviceChoice::OpenCl { index: 0, kernels: KernelSource::Embedded }));
    let bins = PathBuf::from("/some/dir");
    match DeviceChoice::parse("opencl:3", Some(&bins)).unwrap() {
        DeviceChoice::OpenCl { index: 3, kernels: KernelSource::Binaries(d) } => assert_eq!(d, bins),
        other => panic!("{other:?}"),
    }
    for bad in ["gpu", "opencl:", "opencl:x", "opencl:-1", ""] {
        assert_eq!(DeviceChoice::parse(bad, None).unwrap_err().kind(), ErrorKind::InvalidRequest, "{bad:?}");
    }
}

/// Every pooling mode sentence-transformers offers, on the device against the CPU backend's
/// op over random hidden states: the same bits before normalising (each mode sums, compares
/// or copies in the same order), within f32 rounding after.
#[test]
fn every_pooling_mode_matches_the_cpu() {
    use ferroserve_kernels::backend::{Packing, Pooling};
    use ferroserve_kernels::testing::Rng;
    use ferroserve_kernels::Backend;

    fn pooled<B: Backend>(b: &B, hidden: &[f32], offsets: &[u32], dim: usize, mode: Pooling, normalize: bool) -> Vec<f32> {
        let (rows, seqs) = (*offsets.last().unwrap() as usize, offsets.len() - 1);
        let row_seq: Vec<u32> = (0..seqs).flat_map(|s| (offsets[s]..offsets[s + 1]).map(move |_| s as u32)).collect();
        let positions: Vec<u32> = (0..seqs).flat_map(|s| 0..offsets[s + 1] - offsets[s]).collect();
        let (tokens, positions) = (b.upload(vec![0u32; rows]).unwrap(), b.upload(positions).unwrap());
        let (row_seq, seq_offsets) = (b.upload(row_seq).unwrap(), b.upload(offsets.to_vec()).unwrap());
        let pack = Packing { tokens: &tokens, positions: &positions, row_seq: &row_seq, seq_offsets: &seq_offsets, rows, seqs };
        let hidden = b.upload(hidden.to_vec()).unwrap();
        let mut out = b.alloc::<f32>(seqs * dim).unwrap();
        b.pool(&hidden, &pack, mode, normalize, &mut out, dim).unwrap();
        let mut host = vec![0f32; seqs * dim];
        b.read(&out, &mut host).unwrap();
        host
    }

    let _serial = common::opencl_serial();
    let Some(index) = common::opencl_device().map(|d| d.index) else { return };
    let mut cl = OpenClBackend::open(index, &KernelSource::Embedded).unwrap();
    cl.prepare_encoder(32).unwrap();
    let mut cpu = CpuBackend::default();
    cpu.prepare_encoder(32).unwrap();
    let (mut rng, seed) = Rng::from_env_or_clock("FERROSERVE_TEST_SEED", 7);
    // Sequences of 1, 2, 7 and 40 rows; a width that is not a multiple of the work-group.
    let (offsets, dim) = (vec![0u32, 1, 3, 10, 50], 389);
    let hidden = rng.vec_scaled(50 * dim, 4.0);
    for mode in [Pooling::Mean, Pooling::Cls, Pooling::Max, Pooling::MeanSqrtLen] {
        let (want, got) = (pooled(&cpu, &hidden, &offsets, dim, mode, false), pooled(&cl, &hidden, &offsets, dim, mode, false));
        assert!(want == got, "{mode:?} pooling differs from the CPU's bits (FERROSERVE_TEST_SEED={seed})");
        let (want, got) = (pooled(&cpu, &hidden, &offsets, dim, mode, true), pooled(&cl, &hidden, &offsets, dim, mode, true));
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{mode:?} normalised: max |Δ| {worst} (FERROSERVE_TEST_SEED={seed})");
        for (s, w) in offsets.windows(2).enumerate() {
            let v = &got[s * dim..(s + 1) * dim];
            let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{mode:?} sequence {s} ({} rows): norm {norm}", w[1] - w[0]);
        }
    }
    // CLS is the first row, max is no smaller than any row: the modes are what they say.
    let cls = pooled(&cl, &hidden, &offsets, dim, Pooling::Cls, false);
    assert_eq!(&cls[3 * dim..4 * dim], &hidden[10 * dim..11 * dim]);
    let max = pooled(&cl, &hidden, &offsets, dim, Pooling::Max, false);
    assert!((10..50).all(|r| (0..dim).all(|c| max[3 * dim + c] >= hidden[r * dim + c])));
}

//! all-MiniLM-L6-v2 through our tokenizer and encoder against sentence-transformers'
//! reference vectors (../shared/fixtures/minilm_reference.json).

mod common;

use ferroserve_core::models::bert::BertModel;
use ferroserve_core::tokenize::bert::EncoderTokenizer;
use ferroserve_kernels::{CpuBackend, CpuDevice, Isa};

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = common::minilm_dir();
    let items = common::minilm_reference_items();
    for isa in Isa::ALL.into_iter().rev() {
        let Some(cpu) = CpuDevice::with_isa(isa) else {
            eprintln!("skipping {}: this CPU lacks {}", isa.as_str(), isa.requires());
            continue;
        };
        let model = BertModel::load(&dir, CpuBackend::new(cpu)).unwrap();
        let tok = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), model.sentence.max_seq_length).unwrap();
        assert_eq!(tok.max_len(), 256);
        let ids: Vec<Vec<u32>> = items.iter().map(|it| tok.encode(it["text"].as_str().unwrap()).unwrap()).collect();
        for (it, seq) in items.iter().zip(&ids) {
            assert_eq!(seq.len() as u64, it["prompt_tokens"].as_u64().unwrap(), "token count of {:?}", it["text"]);
        }
        // All at once (one packed batch) and one by one must both match, and each other.
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let batched = model.embed(&refs).unwrap();
        let h = model.hidden_size();
        let mut worst = 1.0f64;
        for (i, it) in items.iter().enumerate() {
            let want: Vec<f64> = it["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let single = model.embed(&[refs[i]]).unwrap();
            let c = common::cosine(&batched[i * h..(i + 1) * h], &want);
            worst = worst.min(c).min(common::cosine(&single, &want));
            assert!(c >= 0.9999, "{isa:?}: cosine {c} for {:?}", it["text"]);
        }
        eprintln!("{isa:?}: worst cosine {worst:.7}");
        assert!(worst >= 0.9999);
    }
}

#[test]
fn a_pass_larger_than_the_kept_scratch_gives_each_sequences_bits_and_the_next_pass_too() {
    // 9 × 256 rows: beyond the 2048 rows of scratch the model keeps between passes, so the
    // pass grows it and drops it after; the passes around it reuse or regrow it.
    let dir = common::minilm_dir();
    let model = BertModel::load(&dir, CpuBackend::new(CpuDevice::new())).unwrap();
    let h = model.hidden_size();
    let seqs: Vec<Vec<u32>> = (0..9u32)
        .map(|s| {
            let mut ids = vec![101u32];
            ids.extend((0..254u32).map(|i| 1000 + (i * 7 + s * 13) % 20000));
            ids.push(102);
            ids
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let before = model.embed(&refs[..2]).unwrap();
    let big = model.embed(&refs).unwrap();
    let after = model.embed(&refs[..2]).unwrap();
    assert_eq!(before, after);
    for (i, seq) in refs.iter().enumerate() {
        let alone = model.embed(&[seq]).unwrap();
        assert_eq!(&big[i * h..(i + 1) * h], &alone[..], "sequence {i}");
    }
}

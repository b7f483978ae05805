//! `--embed-numerics int8` (Q8_0 weights and activations in the quantised panels) on
//! all-MiniLM-L6-v2 against sentence-transformers' reference vectors
//! (../shared/fixtures/minilm_reference.json): ONNX Runtime int8's accuracy (cosine ≥ 0.9992)
//! on every ISA level this CPU has, the same bits on every level, and a batch gives each
//! sentence the bits it gets alone.

mod common;

use ferroserve_core::models::bert::{BertModel, EmbedNumerics, Int8Formats};
use ferroserve_core::tokenize::bert::EncoderTokenizer;
use ferroserve_kernels::{CpuBackend, CpuDevice, Isa};

/// ONNX Runtime int8's own accuracy on these sentences (issue 14): what the opt-in must keep.
const MIN_COSINE: f64 = 0.9992;

#[test]
fn minilm_int8_matches_sentence_transformers_on_every_level() {
    let dir = common::minilm_dir();
    let items = common::minilm_reference_items();
    let wants: Vec<Vec<f64>> =
        items.iter().map(|it| it["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()).collect();
    let mut first: Option<(Isa, Vec<f32>)> = None;
    let mut f32_vectors = None;
    for isa in Isa::ALL.into_iter().rev() {
        let Some(cpu) = CpuDevice::with_isa(isa) else {
            eprintln!("skipping {}: this CPU lacks {}", isa.as_str(), isa.requires());
            continue;
        };
        let model =
            BertModel::load_with_numerics(&dir, CpuBackend::new(cpu.clone()), EmbedNumerics::Int8).unwrap().with_quant_isa(isa.quant_level());
        assert_eq!(model.numerics(), EmbedNumerics::Int8);
        let tok = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), model.sentence.max_seq_length).unwrap();
        let ids: Vec<Vec<u32>> = items.iter().map(|it| tok.encode(it["text"].as_str().unwrap()).unwrap()).collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let batched = model.embed(&refs).unwrap();
        let h = model.hidden_size();
        let mut worst = 1.0f64;
        for (i, it) in items.iter().enumerate() {
            let single = model.embed(&[refs[i]]).unwrap();
            let row = &batched[i * h..(i + 1) * h];
            // Batch invariance: a sentence's vector never depends on its neighbours.
            assert!(
                single.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}: batched and single vectors differ for {:?}",
                it["text"]
            );
            let c = common::cosine(row, &wants[i]);
            worst = worst.min(c);
            // Negated on purpose: a NaN cosine must fail too.
            assert!(c >= MIN_COSINE, "{isa:?}: cosine {c} < {MIN_COSINE} for {:?}", it["text"]);
        }
        eprintln!("{isa:?} (quantised kernels {}): int8 worst cosine {worst:.7}", isa.quant_level().as_str());
        match &first {
            // Every level computes the portable code's bits.
            Some((level, bits)) => assert!(
                bits.iter().zip(&batched).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} gives other int8 vectors than {level:?}"
            ),
            None => first = Some((isa, batched.clone())),
        }
        if f32_vectors.is_none() {
            f32_vectors = Some(BertModel::load(&dir, CpuBackend::new(cpu)).unwrap().embed(&refs).unwrap());
        }
    }
    // The int8 path really ran: its vectors are not the f32 path's.
    let (_, int8) = first.unwrap();
    let f32v = f32_vectors.unwrap();
    assert!(int8.iter().zip(&f32v).any(|(a, b)| a.to_bits() != b.to_bits()), "int8 numerics gave the f32 vectors");
}

#[test]
fn numerics_names_parse() {
    assert_eq!(EmbedNumerics::parse("f32"), Some(EmbedNumerics::F32));
    assert_eq!(EmbedNumerics::parse("int8"), Some(EmbedNumerics::Int8));
    assert_eq!(EmbedNumerics::parse("INT8"), None);
    assert_eq!(EmbedNumerics::parse("fp16"), None);
    assert_eq!(EmbedNumerics::default(), EmbedNumerics::F32);
}

/// The format experiment behind [`Int8Formats::DEFAULT`] (bench/NOTES.md, "Embeddings int8 on
/// AVX2"): worst and mean cosine to the reference per choice of weight formats.
/// `cargo test --release -p ferroserve-core --test bert_int8 -- --ignored --nocapture`;
/// `INT8_FORMATS=q8_0,q5_0/q5_0/q5_0/q5_0` for other choices.
#[test]
#[ignore = "an experiment: prints accuracy per weight format"]
fn int8_format_choices() {
    let dir = common::minilm_dir();
    let items = common::minilm_reference_items();
    let choices = std::env::var("INT8_FORMATS").unwrap_or_else(|_| {
        "f32,q8_0,q5_1,q5_0,q4_1,q4_0,q8_0/q8_0/q5_1/q5_1,q5_1/q5_1/q8_0/q8_0,q8_0/q8_0/q8_0/q5_1,q8_0/q8_0/q5_1/q8_0,f32/f32/q8_0/q8_0,q8_0/q8_0/f32/f32".into()
    });
    for choice in choices.split(',') {
        let formats = match choice {
            "f32" => None,
            c => match Int8Formats::parse(c) {
                Some(f) => Some(f),
                None => {
                    eprintln!("{c}: not a format choice, skipped");
                    continue;
                }
            },
        };
        let model = BertModel::load_with_formats(&dir, CpuBackend::default(), formats).unwrap();
        let tok = EncoderTokenizer::from_file(&dir.join("tokenizer.json"), model.sentence.max_seq_length).unwrap();
        let ids: Vec<Vec<u32>> = items.iter().map(|it| tok.encode(it["text"].as_str().unwrap()).unwrap()).collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let got = model.embed(&refs).unwrap();
        let h = model.hidden_size();
        let cos: Vec<f64> = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let want: Vec<f64> = it["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                common::cosine(&got[i * h..(i + 1) * h], &want)
            })
            .collect();
        let worst = cos.iter().cloned().fold(1.0, f64::min);
        let mean = cos.iter().sum::<f64>() / cos.len() as f64;
        eprintln!("{:<28} worst cosine {worst:.6}  mean {mean:.6}", formats.map_or("f32".into(), |f| f.describe()));
    }
}

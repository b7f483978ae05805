//! SmolLM2-135M-Instruct (GGUF, Q4_1): the GGUF reader on the real file and on corrupted
//! copies, and the GGUF tokenizer + chat template against llama.cpp's token ids
//! (../shared/fixtures/smollm2_reference.json).

mod common;
use common::{smollm2_fixture as fixture, token_ids as ids};

use std::path::{Path, PathBuf};

use ferroserve_core::tokenize::chat_template::ChatTemplate;
use ferroserve_core::tokenize::gguf_vocab::GgufTokenizer;
use ferroserve_core::weights::gguf::{GgufError, GgufFile};
use ferroserve_kernels::quant::QuantType;


fn model_path() -> PathBuf {
    common::smollm2_gguf()
}

/// A scratch file removed on drop, so failed assertions leave no 100 MB copies behind.
struct TempFile(PathBuf);

impl TempFile {
    fn with_bytes(tag: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "ferroserve-gguf-test-{}-{tag}.gguf",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_bytes(tag: &str, bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let file = TempFile::with_bytes(tag, bytes);
    GgufFile::open(&file.0)
}

#[test]
fn real_file_loads_with_expected_tensors_and_hparams() {
    let path = model_path();
    let gguf = GgufFile::open(&path).unwrap();
    assert_eq!(gguf.version(), 3);
    assert_eq!(gguf.alignment(), 32);
    assert_eq!(gguf.architecture().unwrap(), "llama");
    // 30 blocks of 9 tensors, the embedding and the final norm; the output head is tied.
    assert_eq!(gguf.tensor_infos().len(), 30 * 9 + 2);
    assert!(gguf.tensor_info("output.weight").is_none());

    let embd = gguf.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.shape, &[49_152, 576]);
    assert_eq!(embd.dtype, QuantType::Q8_0);
    assert_eq!(embd.bytes.len(), 49_152 * 576 / 32 * 34);

    let k = gguf.tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!((k.shape, k.dtype), (&[192, 576][..], QuantType::Q4_1));
    assert_eq!(k.bytes.len(), 192 * 576 / 32 * 20);
    let down = gguf.tensor("blk.29.ffn_down.weight").unwrap();
    assert_eq!((down.shape, down.dtype), (&[576, 1536][..], QuantType::Q4_1));
    let norm = gguf.tensor("output_norm.weight").unwrap();
    assert_eq!((norm.shape, norm.dtype), (&[576][..], QuantType::F32));
    let gamma: Vec<f32> = norm
        .bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(gamma.iter().all(|g| g.is_finite()) && gamma.iter().any(|&g| g != 0.0));
    assert!(matches!(
        gguf.tensor("nope"),
        Err(GgufError::TensorNotFound(_))
    ));

    let hp = gguf.llama_hparams().unwrap();
    assert_eq!(
        (hp.block_count, hp.embedding_length, hp.feed_forward_length),
        (30, 576, 1536)
    );
    assert_eq!((hp.head_count, hp.head_count_kv, hp.head_dim), (9, 3, 64));
    assert_eq!(
        (hp.context_length, hp.vocab_size, hp.rope_dimension_count),
        (8192, 49_152, 64)
    );
    assert_eq!(hp.rope_freq_base, 100_000.0);
    assert!((hp.rms_norm_eps - 1e-5).abs() < 1e-9);

    assert_eq!(gguf.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(
        gguf.get_str_array("tokenizer.ggml.tokens").unwrap()[1],
        "<|im_start|>"
    );
    assert!(matches!(
        gguf.get_u32("general.name"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        gguf.get_u32("no.such.key"),
        Err(GgufError::MissingKey(_))
    ));
}

#[test]
fn corrupted_copies_of_the_real_file_are_errors() {
    let path = model_path();
    let original = std::fs::read(&path).unwrap();

    // Cut inside the metadata, inside the tensor infos, and inside the data section.
    for cut in [
        100,
        1_000_000,
        1_780_000,
        1_785_700,
        original.len() / 2,
        original.len() - 1,
    ] {
        let err = open_bytes("truncated", &original[..cut]).unwrap_err();
        assert!(
            matches!(err, GgufError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
    }

    let mut bad_magic = original.clone();
    bad_magic[..4].copy_from_slice(b"GGUX");
    let err = open_bytes("magic", &bad_magic).unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");

    // The first tensor info: name (u64 length + bytes), n_dims u32, 2 dims u64, type u32.
    let name = b"token_embd.weight";
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name);
    let at = original
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor info of token_embd.weight");
    let type_at = at + needle.len() + 4 + 2 * 8;
    assert_eq!(original[type_at..type_at + 4], 8u32.to_le_bytes()); // Q8_0

    let mut unknown_type = original.clone();
    unknown_type[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = open_bytes("type", &unknown_type).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownTensorType { type_id: 99, ref tensor } if tensor == "token_embd.weight"),
        "{err}"
    );

    let mut far_offset = original;
    far_offset[type_at + 4..type_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open_bytes("offset", &far_offset).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::Truncated {
                what: "tensor data",
                ..
            }
        ),
        "{err}"
    );
}

/// A minimal GGUF: one metadata string and one F32 tensor of 8 elements.
fn tiny_gguf(tensor_count: u64, kv_count: u64, type_id: u32, n_dims: u32) -> Vec<u8> {
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes());
    f.extend(tensor_count.to_le_bytes());
    f.extend(kv_count.to_le_bytes());
    let string = |f: &mut Vec<u8>, s: &str| {
        f.extend((s.len() as u64).to_le_bytes());
        f.extend(s.as_bytes());
    };
    string(&mut f, "general.architecture");
    f.extend(8u32.to_le_bytes());
    string(&mut f, "llama");
    string(&mut f, "w");
    f.extend(n_dims.to_le_bytes());
    for _ in 0..n_dims {
        f.extend(8u64.to_le_bytes());
    }
    f.extend(type_id.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    while !f.len().is_multiple_of(32) {
        f.push(0);
    }
    f.resize(f.len() + 8usize.pow(n_dims) * 4, 0);
    f
}

#[test]
fn synthetic_files_cover_each_failure_mode() {
    let ok = open_bytes("tiny-ok", &tiny_gguf(1, 1, 0, 1)).unwrap();
    assert_eq!(ok.tensor("w").unwrap().shape, &[8]);
    assert_eq!(ok.tensor("w").unwrap().bytes.len(), 32);
    assert!(matches!(ok.llama_hparams(), Err(GgufError::MissingKey(_))));

    let err = open_bytes("tiny-type", &tiny_gguf(1, 1, 1000, 1)).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownTensorType { type_id: 1000, .. }),
        "{err}"
    );
    // Q4_0 needs rows of 32 elements; this row has 8.
    let err = open_bytes("tiny-block", &tiny_gguf(1, 1, 2, 1)).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt(_)), "{err}");
    let err = open_bytes("tiny-dims", &tiny_gguf(1, 1, 0, 7)).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt(_)), "{err}");
    // Counts that cannot fit in the file: rejected before anything is allocated for them.
    for (tensors, kvs) in [(u64::MAX, 1), (1, u64::MAX), (1 << 40, 1), (1, 1 << 30)] {
        let err = open_bytes("tiny-count", &tiny_gguf(tensors, kvs, 0, 1)).unwrap_err();
        assert!(
            matches!(err, GgufError::Corrupt(_) | GgufError::Truncated { .. }),
            "{tensors}/{kvs}: {err}"
        );
    }
    let mut wrong_version = tiny_gguf(1, 1, 0, 1);
    wrong_version[4..8].copy_from_slice(&0x0300_0000u32.to_le_bytes()); // big-endian v3
    let err = open_bytes("tiny-version", &wrong_version).unwrap_err();
    assert!(matches!(err, GgufError::UnsupportedVersion(_)), "{err}");
    assert!(matches!(
        GgufFile::open(Path::new("/nonexistent/model.gguf")),
        Err(GgufError::Io { .. })
    ));
}

#[test]
fn tokenizer_and_chat_template_match_llama_cpp() {
    let path = model_path();
    let gguf = GgufFile::open(&path).unwrap();
    let tok = GgufTokenizer::from_gguf(&gguf).unwrap();
    let template = ChatTemplate::from_gguf(&gguf, None).unwrap();
    let fixture = fixture();

    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!(tok.pre_tokenizer(), "smollm");
    assert!(!tok.add_bos_token());
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    assert_eq!(tok.eos_token_ids(), &[0, 2]); // <|endoftext|>, <|im_end|>

    let mut failures = Vec::new();
    let mut checked = 0;
    let completions = fixture["completions"].as_array().unwrap();
    let chats = fixture["chats"].as_array().unwrap();
    for case in completions.iter().chain(chats) {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["prompt_tokens"]);
        checked += 1;
        let got = tok.encode_prompt(prompt, true).unwrap();
        if got != expected {
            failures.push(format!(
                "{prompt:?}\n  ours:      {got:?}\n  llama.cpp: {expected:?}"
            ));
        }
        // Decoding is exact, special tokens included.
        assert_eq!(tok.decode(&expected, true).unwrap(), prompt);
        let completion = case["completion"].as_str().unwrap();
        assert_eq!(
            tok.decode(&ids(&case["completion_tokens"]), false).unwrap(),
            completion
        );
        for candidate in case["first_token_top5"].as_array().unwrap() {
            let id = candidate["id"].as_u64().unwrap() as u32;
            assert_eq!(
                tok.token_bytes(id).unwrap(),
                ids(&candidate["bytes"])
                    .iter()
                    .map(|&b| b as u8)
                    .collect::<Vec<_>>()
            );
        }
    }
    for chat in chats {
        let messages = common::fixture_messages(chat);
        let rendered = template.render(&messages, true).unwrap();
        checked += 1;
        if rendered != chat["prompt"].as_str().unwrap() {
            failures.push(format!(
                "template: {rendered:?}\n  expected {:?}",
                chat["prompt"]
            ));
        }
    }
    println!(
        "{} of {checked} fixture checks match llama.cpp ({} completion prompts, {} chat prompts \
         tokenized, {} chats rendered)",
        checked - failures.len(),
        completions.len(),
        chats.len(),
        chats.len()
    );
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn special_tokens_are_parsed_only_when_asked() {
    let path = model_path();
    let tok = GgufTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(tok.encode("<|im_start|>user", true).unwrap()[0], 1);
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(plain.len() > 2 && !plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain, false).unwrap(), "<|im_start|>user");
    // Control tokens are dropped from output unless asked for.
    assert_eq!(tok.decode(&[1, 4093, 2], false).unwrap(), "user");
    assert_eq!(
        tok.decode(&[1, 4093, 2], true).unwrap(),
        "<|im_start|>user<|im_end|>"
    );
    assert!(tok.encode("", true).unwrap().is_empty());
    assert!(tok.decode(&[49_152], true).is_err());
    // Digits are split one by one (the "smollm" pre-tokenizer), and a multi-byte character
    // spread over byte tokens decodes back exactly.
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    for text in ["Café déjà vu 🦀", "  multiple   spaces\n\n\tend  "] {
        assert_eq!(
            tok.decode(&tok.encode(text, false).unwrap(), false)
                .unwrap(),
            text
        );
    }
}

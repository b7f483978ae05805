//! Writes the seed corpus into `corpus/<target>/`: a tiny llama GGUF and tiny safetensors
//! files that load and run, texts and token id streams for the tokenizer and detokenizer
//! (ids from SmolLM2's tokenizer: `$FERROSERVE_SMOLLM2_GGUF`), and byte strings for the
//! chat-template target (decoded by `arbitrary` into conversations).

use std::path::Path;

use ferroserve_core::tokenize::gguf_vocab::GgufTokenizer;
use ferroserve_core::weights::gguf::GgufFile;
use ferroserve_fuzz::seeds;

/// Prompts of the kinds the API tests send: plain text, ChatML control text, digits and
/// contractions (the pre-tokenizer's regex cases), emoji and CJK (multi-byte characters split
/// across byte-level tokens), whitespace runs.
const TEXTS: &[&str] = &[
    "Hello, world!",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "I'll say it's 12345 + 678.9 = 13023.9, isn't it?",
    "Emoji 🎉🚀 and CJK 中文字符 and accents: café naïve",
    "  leading spaces\t\ttabs\n\n\nnewlines   trailing  ",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
];

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
        println!("{target}/{name}: {} bytes", bytes.len());
    };
    write("gguf", "tiny_llama.gguf", &seeds::tiny_llama_gguf());
    write("gguf", "minimal.gguf", &seeds::minimal_gguf());
    write(
        "safetensors",
        "tiny_bert.safetensors",
        &seeds::tiny_bert_safetensors(),
    );
    write(
        "safetensors",
        "small.safetensors",
        &seeds::small_safetensors(),
    );

    let path = std::env::var_os("FERROSERVE_SMOLLM2_GGUF").expect("set FERROSERVE_SMOLLM2_GGUF");
    let tokenizer = GgufTokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    for (i, text) in TEXTS.iter().enumerate() {
        // Tokenizer: mode 0 (plain text) and 2 (special tokens parsed), then the text.
        let mode = if text.contains("<|") { 2 } else { 0 };
        write(
            "tokenizer",
            &format!("text{i}"),
            &[&[mode][..], text.as_bytes()].concat(),
        );
        // Token ids (mode 1: u16 ids) and the detokenizer's stream: no stops for even i, else
        // two stops ("\n" and a word of the text).
        let ids: Vec<u8> = tokenizer
            .encode(text, true)
            .unwrap()
            .iter()
            .flat_map(|&id| (id as u16).to_le_bytes())
            .collect();
        write("tokenizer", &format!("ids{i}"), &[&[1][..], &ids].concat());
        let stops: Vec<u8> = if i % 2 == 0 {
            vec![0]
        } else {
            let word = text.split_whitespace().nth(1).unwrap_or("x").as_bytes();
            [&[2u8, 1, b'\n', word.len() as u8][..], word].concat()
        };
        write("detokenizer", &format!("stream{i}"), &[stops, ids].concat());
        // Chat template: the text as raw bytes (arbitrary's decoding of it is some conversation).
        write("chat_template", &format!("bytes{i}"), text.as_bytes());
    }
    // A longer pseudo-random buffer gives `arbitrary` enough bytes for several messages and
    // tools (xorshift, fixed seed).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..512)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    write("chat_template", "noise512", &noise);
}

//! Fuzz targets for ferroserve-core: what a model file or a request can put in front of the
//! engine. Each target takes the fuzzer's bytes and must return normally: a panic, an abort,
//! an overflow (this crate's release profile checks them) or a hang is a finding.
//!
//! Targets (one binary each in `src/bin/`, a seed corpus in `corpus/<target>/`):
//! - [`gguf`]: a whole GGUF file through `LlamaModel::load`, as `ferroserve serve` opens one,
//!   then one forward step when it loads;
//! - [`safetensors`]: a `model.safetensors` in a tiny BERT folder through `BertModel::load`,
//!   then one embedding pass when it loads;
//! - [`tokenizer`]: SmolLM2's GGUF tokenizer on arbitrary text (encode, then decode must give
//!   the text back) or arbitrary token ids (decode);
//! - [`chat_template`]: arbitrary conversations (roles, content parts, tool calls, tools)
//!   rendered with SmolLM2's template and two tool-calling templates from the tests;
//! - [`detokenizer`]: arbitrary token id streams and stop strings through the incremental
//!   detokenizer, checked against decoding everything at once.
//!
//! The tokenizer, chat-template and detokenizer targets use the bundled chat model's
//! vocabulary: `$FERROSERVE_SMOLLM2_GGUF` (bench/fuzz_native.sh sets it).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use ferroserve_core::kv::KvCache;
use ferroserve_core::models::bert::BertModel;
use ferroserve_core::models::llama::{LlamaModel, Numerics, SeqChunk};
use ferroserve_core::tokenize::chat_template::{
    ChatMessage, ChatTemplate, ContentPart, MessageContent, ToolCall, ToolSpec,
};
use ferroserve_core::tokenize::detok::{Detokenizer, Vocab};
use ferroserve_core::tokenize::gguf_vocab::GgufTokenizer;
use ferroserve_core::weights::gguf::GgufFile;
use ferroserve_core::weights::safetensors::SafetensorsFile;

pub mod seeds;

/// The targets by name, for the replay binary and the run script.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("detokenizer", detokenizer),
];

/// Builds what a target shares across inputs (its scratch directory; SmolLM2's tokenizer and
/// templates) once, before AFL++ starts forking, so each forked child starts warm. No thread
/// pool is started here: rayon's threads would not survive the fork.
pub fn warm_up(target: &str) {
    scratch_dir();
    if matches!(target, "tokenizer" | "detokenizer" | "chat_template") {
        templates();
    }
}

// ---------------------------------------------------------------------------------------------
// Model files

/// A scratch directory of this process (targets write the input where the loaders read files
/// from: the real `open` → mmap → parse path, not a copy of it for byte slices).
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("FERROSERVE_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("ferroserve-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
        dir
    })
}

fn write_scratch(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    let mut file = std::fs::File::create(&path).expect("create a scratch file");
    file.write_all(data).expect("write a scratch file");
    path
}

/// A GGUF file as `ferroserve serve` loads it, then (when it loads) one decode step on one
/// token: the loader promises that a forward pass cannot fail on a model that loaded.
pub fn gguf(data: &[u8]) {
    let path = write_scratch("model.gguf", data);
    // The reader alone, on every file that parses (most fuzzed files are not llama models).
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    for (_, value) in file.metadata() {
        let _ = value.as_str();
    }
    for info in file.tensor_infos() {
        let view = file
            .tensor(&info.name)
            .expect("a listed tensor is readable");
        assert_eq!(view.bytes.len(), info.n_bytes);
    }
    if file.llama_hparams().is_err() {
        // Not a model the loader would get past its hyperparameters with: the tokenizer and
        // template readers on their own. (A loadable one has them built inside `load_with`;
        // building a tokenizer is most of an execution's time.)
        let _ = GgufTokenizer::from_gguf(&file);
        let _ = ChatTemplate::from_gguf(&file, None);
        return;
    }
    drop(file);
    let Ok(model) = LlamaModel::load_with(&path, Numerics::Exact) else {
        return;
    };
    let hp = &model.hparams;
    // A few blocks' worth of cache; a fuzzed file's dimensions are small (they match its tensors).
    let block_bytes = KvCache::block_bytes(16, hp.block_count, hp.head_count_kv, hp.head_dim);
    let Ok(mut kv) = model.new_kv_cache(block_bytes * 2) else { return };
    let Some(block) = kv.allocate() else { return };
    let token = (data.len() % model.vocab_size()) as u32;
    let logits = model.forward(
        &[SeqChunk {
            tokens: &[token],
            start_pos: 0,
            block_table: &[block],
            want_logits: true,
        }],
        &mut kv,
    );
    assert_eq!(logits.len(), model.vocab_size());
}

/// A `model.safetensors` in a BERT folder whose config.json, tokenizer and pooling are fixed
/// (seeds::TINY_BERT_CONFIG): the header, the tensor table and every tensor through
/// `BertModel::load`, then one embedding when it loads.
pub fn safetensors(data: &[u8]) {
    static CONFIG: OnceLock<()> = OnceLock::new();
    CONFIG.get_or_init(|| {
        write_scratch("config.json", seeds::TINY_BERT_CONFIG.as_bytes());
    });
    let path = write_scratch("model.safetensors", data);
    if let Ok(file) = SafetensorsFile::open(&path) {
        for name in file.names() {
            if let Ok((values, shape)) = file.f32(&name) {
                assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
            }
        }
    }
    let device = Arc::new(ferroserve_kernels::cpu::CpuDevice::new());
    let Ok(model) = BertModel::load(scratch_dir(), device) else {
        return;
    };
    let vectors = model.embed(&[&[0, 1, 2]]);
    assert_eq!(vectors.len(), model.hidden_size());
}

// ---------------------------------------------------------------------------------------------
// Tokenizer, detokenizer, chat template (the bundled model's vocabulary and template)

struct Chat {
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    /// Bytes with a token of their own, i.e. that byte-level BPE can spell. SmolLM2's
    /// vocabulary has none for 0x04, 0x06, 0x13, 0x14, 0x16 and 0x1d (among others): encoding
    /// drops them, as llama.cpp's tokenizer does.
    spellable: [bool; 256],
}

fn chat() -> &'static Chat {
    static CHAT: OnceLock<Chat> = OnceLock::new();
    CHAT.get_or_init(|| {
        let path = std::env::var_os("FERROSERVE_SMOLLM2_GGUF")
            .expect("set FERROSERVE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf");
        let file = GgufFile::open(&path).expect("open the SmolLM2 GGUF");
        let tokenizer = GgufTokenizer::from_gguf(&file).expect("SmolLM2's tokenizer");
        let mut spellable = [false; 256];
        for id in 0..tokenizer.vocab_size() as u32 {
            if let (Some(&[byte]), false) = (tokenizer.token_bytes(id), tokenizer.is_special(id)) {
                spellable[usize::from(byte)] = true;
            }
        }
        Chat {
            template: ChatTemplate::from_gguf(&file, None).expect("SmolLM2's chat template"),
            tokenizer,
            spellable,
        }
    })
}

/// First byte even: the rest is text (lossily UTF-8) to encode, with or without special
/// tokens; decoding the ids with special tokens rendered must give the text back, less the
/// bytes the vocabulary cannot spell. First byte
/// odd: the rest is a token id list (little-endian u16 ids, or u32 when bit 1 is set, so ids
/// past the vocabulary occur) to decode.
pub fn tokenizer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Chat {
        tokenizer: tok,
        spellable,
        ..
    } = chat();
    if mode & 1 == 0 {
        let text = String::from_utf8_lossy(rest);
        let parse_special = mode & 2 != 0;
        let ids = tok
            .encode(&text, parse_special)
            .expect("encoding never fails");
        let back = tok
            .decode_bytes(&ids, true)
            .expect("encoded ids are in the vocabulary");
        let spelled: Vec<u8> = text
            .bytes()
            .filter(|&b| spellable[usize::from(b)])
            .collect();
        assert!(
            back == spelled,
            "decode(encode(text)) differs (parse_special {parse_special}, ids {ids:?}):\n {:?}\n {:?}",
            String::from_utf8_lossy(&back),
            String::from_utf8_lossy(&spelled)
        );
        let _ = tok.encode_prompt(&text, parse_special);
    } else {
        let ids = token_ids(rest, mode & 2 != 0);
        let vocab = tok.vocab_size();
        let in_range = ids.iter().all(|&id| (id as usize) < vocab);
        for render_special in [false, true] {
            match tok.decode(&ids, render_special) {
                Ok(_) => assert!(in_range, "ids past the vocabulary decoded"),
                Err(_) => assert!(!in_range, "ids inside the vocabulary failed to decode"),
            }
        }
    }
}

fn token_ids(bytes: &[u8], wide: bool) -> Vec<u32> {
    if wide {
        bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        bytes
            .chunks_exact(2)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    }
}

/// Stop strings, then token ids streamed through the incremental detokenizer with the engine's
/// rule for each token's bytes; the text it emits must be the all-at-once decoding, cut before
/// the first stop string. Input: a count byte (up to 3 stops), each stop as a length byte and
/// its bytes (lossily UTF-8), then little-endian u16 ids taken modulo the vocabulary size.
pub fn detokenizer(data: &[u8]) {
    let Some((&count, mut rest)) = data.split_first() else {
        return;
    };
    let mut stops = Vec::new();
    for _ in 0..count % 4 {
        let Some((&len, tail)) = rest.split_first() else {
            return;
        };
        let len = usize::from(len).min(tail.len());
        stops.push(String::from_utf8_lossy(&tail[..len]).into_owned());
        rest = &tail[len..];
    }
    let ids = token_ids(rest, false);
    let tok = &chat().tokenizer;
    let vocab = tok.vocab_size() as u32;

    let mut detok = Detokenizer::new(stops.clone());
    let mut fed = Vec::new();
    let mut out = String::new();
    let mut stopped_by = None;
    for id in ids {
        let bytes = Vocab::output_bytes(tok, id % vocab);
        fed.extend_from_slice(bytes);
        let delta = detok.push(bytes);
        out.push_str(&delta.text);
        if delta.stopped_by.is_some() {
            stopped_by = delta.stopped_by;
            break;
        }
    }
    let stops: Vec<&String> = stops.iter().filter(|s| !s.is_empty()).collect();
    let whole = String::from_utf8_lossy(&fed);
    match stopped_by {
        None => {
            out.push_str(&detok.finish());
            if detok.is_stopped() {
                // The replacement character for an unfinished one completed a stop string.
                assert!(
                    stops
                        .iter()
                        .any(|stop| whole.starts_with(&format!("{out}{stop}"))),
                    "output {out:?} cut at finish is not followed by a stop string in {whole:?}"
                );
            } else {
                assert_eq!(out, whole, "streamed text differs from the whole decoding");
            }
            for stop in &stops {
                assert!(
                    !out.contains(stop.as_str()),
                    "stop string {stop:?} was let through"
                );
            }
        }
        Some(which) => {
            assert!(detok.is_stopped());
            let stop = stops[which];
            // The bytes fed may end inside a character; the text before it is final.
            assert!(
                whole.starts_with(&format!("{out}{stop}")),
                "output {out:?} + stop {stop:?} is not a prefix of {whole:?}"
            );
            assert!(detok.finish().is_empty());
        }
    }
}

/// The templates conversations are rendered with: the bundled model's own (no tools: tool
/// conversations are lowered to Hermes text) and the two tool-calling templates of the API
/// tests (tools rendered natively).
fn templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let llama3 = include_str!("../../tests/api/templates/llama3_tools.jinja");
        let mistral = include_str!("../../tests/api/templates/mistral_tools.jinja");
        vec![
            ChatTemplate::new(chat().template.source(), "<|im_start|>", "<|im_end|>").unwrap(),
            ChatTemplate::new(llama3, "<|begin_of_text|>", "<|eot_id|>").unwrap(),
            ChatTemplate::new(mistral, "<s>", "</s>").unwrap(),
        ]
    })
}

#[derive(Debug, Arbitrary)]
struct Conversation {
    template: u8,
    messages: Vec<Message>,
    tools: Vec<Tool>,
    add_generation_prompt: bool,
}

#[derive(Debug, Arbitrary)]
struct Message {
    role: Role,
    content: Content,
    tool_calls: Vec<(String, String, Json)>,
    tool_call_id: Option<String>,
}

#[derive(Debug, Arbitrary)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
    Developer,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Arbitrary)]
enum Part {
    Text(String),
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct Tool {
    name: String,
    description: Option<String>,
    parameters: Json,
}

/// A JSON value or raw text (tool arguments are whatever the client sent).
#[derive(Debug, Arbitrary)]
enum Json {
    Raw(String),
    Value(JsonValue),
}

#[derive(Debug, Arbitrary)]
enum JsonValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Array(Vec<JsonValue>),
    Object(Vec<(String, JsonValue)>),
}

impl JsonValue {
    fn to_serde(&self) -> serde_json::Value {
        match self {
            JsonValue::Null => serde_json::Value::Null,
            JsonValue::Bool(b) => (*b).into(),
            JsonValue::Int(i) => (*i).into(),
            // JSON has no NaN or infinity: they become null, as serde_json writes them.
            JsonValue::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
            }
            JsonValue::String(s) => s.clone().into(),
            JsonValue::Array(items) => items.iter().map(JsonValue::to_serde).collect(),
            JsonValue::Object(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_serde()))
                    .collect(),
            ),
        }
    }
}

impl Json {
    fn text(&self) -> String {
        match self {
            Json::Raw(s) => s.clone(),
            Json::Value(v) => v.to_serde().to_string(),
        }
    }
}

/// An arbitrary conversation rendered as a chat request is; a template's own
/// `raise_exception` or a content part it cannot take is an error, never a panic. The prompt
/// is then tokenized as the engine does.
pub fn chat_template(data: &[u8]) {
    let Ok(conversation) = Conversation::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let templates = templates();
    let template = &templates[usize::from(conversation.template) % templates.len()];
    let messages: Vec<ChatMessage> = conversation
        .messages
        .iter()
        .map(|m| {
            let role = match &m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
                Role::Developer => "developer",
                Role::Other(s) => s.as_str(),
            };
            let content = match &m.content {
                Content::Text(s) => MessageContent::Text(s.clone()),
                Content::Parts(parts) => MessageContent::Parts(
                    parts
                        .iter()
                        .map(|p| match p {
                            Part::Text(s) => ContentPart::Text(s.clone()),
                            Part::Other(kind) => ContentPart::Other { kind: kind.clone() },
                        })
                        .collect(),
                ),
            };
            let mut message = ChatMessage::new(role, content);
            message.tool_calls = m
                .tool_calls
                .iter()
                .map(|(id, name, arguments)| ToolCall {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: arguments.text(),
                })
                .collect();
            message.tool_call_id = m.tool_call_id.clone();
            message
        })
        .collect();
    let tools: Vec<ToolSpec> = conversation
        .tools
        .iter()
        .filter_map(|t| {
            ToolSpec::parse(t.name.clone(), t.description.clone(), &t.parameters.text())
        })
        .collect();
    let Ok(prompt) =
        template.render_with_tools(&messages, &tools, conversation.add_generation_prompt)
    else {
        return;
    };
    // A plain conversation (no tools) keeps every message's text.
    if tools.is_empty()
        && messages
            .iter()
            .all(|m| m.tool_calls.is_empty() && m.role != "tool")
    {
        for m in &messages {
            if let MessageContent::Text(text) = &m.content {
                assert!(
                    prompt.contains(text.as_str()),
                    "message text {text:?} missing from {prompt:?}"
                );
            }
        }
    }
    chat()
        .tokenizer
        .encode(&prompt, true)
        .expect("a rendered prompt tokenizes");
}

/// Runs `target` on each file named in `args` (directories: every file in them), catching
/// panics, and returns how many inputs failed. Used by the binaries when not built by
/// `cargo afl` (reproducing a crash, checking the corpus).
pub fn replay(target: fn(&[u8]), args: &[String]) -> usize {
    let mut files = Vec::new();
    for arg in args {
        let path = PathBuf::from(arg);
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path);
        }
    }
    let mut failed = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        match std::panic::catch_unwind(|| target(&data)) {
            Ok(()) => println!("ok      {}", file.display()),
            Err(_) => {
                println!("FAILED  {}", file.display());
                failed += 1;
            }
        }
    }
    println!("{} inputs, {} failed", files.len(), failed);
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated seeds are valid models: the fuzzer starts past every loader check.
    #[test]
    fn generated_seeds_load_and_run() {
        let path = write_scratch("seed-test.gguf", &seeds::tiny_llama_gguf());
        let model = LlamaModel::load_with(&path, Numerics::Exact).unwrap();
        assert_eq!(model.vocab_size(), 33);
        assert!(model.chat_template.is_some());
        gguf(&seeds::tiny_llama_gguf());

        let dir = scratch_dir().join("seed-test-bert");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), seeds::TINY_BERT_CONFIG).unwrap();
        std::fs::write(
            dir.join("model.safetensors"),
            seeds::tiny_bert_safetensors(),
        )
        .unwrap();
        let model =
            BertModel::load(&dir, Arc::new(ferroserve_kernels::cpu::CpuDevice::new())).unwrap();
        let v = model.embed(&[&[0, 1, 2]]);
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        safetensors(&seeds::tiny_bert_safetensors());
    }
}

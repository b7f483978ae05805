//! A tokenizer built from GGUF metadata (`tokenizer.ggml.*`), matching llama.cpp's token ids.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. The BPE itself is the
//! `tokenizers` crate's; this file only translates llama.cpp's configuration into it:
//! - the pre-tokenizer is the list of regexes llama.cpp's `src/llama-vocab.cpp` applies for the
//!   file's `tokenizer.ggml.pre`, each split isolating its matches, then the byte-level mapping;
//! - control tokens become special added tokens, so `<|im_start|>` in text is one token only
//!   when special tokens are parsed; user-defined tokens become plain added tokens, which
//!   llama.cpp matches whether or not special tokens are parsed.
//!
//! Decoding does not go through `tokenizers`: its decoder returns `String`s, which cannot hold
//! the partial UTF-8 sequences a streaming detokenizer has to carry between tokens. Each token's
//! raw bytes are precomputed instead.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::weights::gguf::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum GgufVocabError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model '{0}': only byte-level BPE ('gpt2') is supported")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer '{0}' (tokenizer.ggml.pre)")]
    UnsupportedPreTokenizer(String),
    #[error("invalid tokenizer metadata: {0}")]
    InvalidMetadata(String),
    #[error("tokenizer error: {0}")]
    Tokenizers(String),
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownTokenId { id: u32, vocab_size: usize },
}

type Result<T, E = GgufVocabError> = std::result::Result<T, E>;

/// GPT-2's pre-tokenizer regex; llama.cpp uses it (with extra splits before it) for many
/// `pre` types.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp applies, in order, for a `tokenizer.ggml.pre` name (its
/// `llm_tokenizer_bpe` constructor). Only names whose tables were checked against llama.cpp
/// are listed; anything else is refused rather than tokenized subtly wrong.
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        // Individual digits first, then GPT-2's rules.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2_REGEX]
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling"
        | "exaone4" => vec![GPT2_REGEX],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => vec![LLAMA3_REGEX],
        "qwen2" | "stablelm2" | "hunyuan" => vec![QWEN2_REGEX],
        _ => return None,
    })
}

/// llama.cpp's `llama_token_type` values (`tokenizer.ggml.token_type`).
mod token_type {
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// Token texts llama.cpp treats as end-of-generation besides the EOS/EOT/EOM ids
/// (`llama_vocab::impl::load`), so a chat model stops at `<|im_end|>` even when its EOS id
/// says `<|endoftext|>`, or the reverse.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// GGUF's byte-level BPE tokenizer. Cheap to share behind an `Arc`; encoding takes `&self`.
pub struct GgufTokenizer {
    /// Splits control tokens out of the text (llama.cpp's `parse_special = true`).
    with_special: Tokenizer,
    /// Treats control-token text as plain text (`parse_special = false`).
    without_special: Tokenizer,
    /// Raw bytes each token stands for, indexed by id.
    token_bytes: Vec<Vec<u8>>,
    /// Control (and unknown-type) tokens: rendered only when asked for.
    is_control: Vec<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    padding_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
    add_eos_token: bool,
    pre: String,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab_size", &self.token_bytes.len())
            .field("pre", &self.pre)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

impl GgufTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(GgufVocabError::UnsupportedModel(model.to_owned()));
        }
        // Files converted before `pre` existed are tokenized by llama.cpp with a generic
        // fallback that it itself warns is wrong; refuse them instead.
        let pre = gguf.get_str("tokenizer.ggml.pre")?.to_owned();
        let regexes = pre_tokenizer_regexes(&pre)
            .ok_or_else(|| GgufVocabError::UnsupportedPreTokenizer(pre.clone()))?;

        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let vocab_size = tokens.len();
        if vocab_size == 0 || u32::try_from(vocab_size).is_err() {
            return Err(GgufVocabError::InvalidMetadata(format!(
                "vocabulary has {vocab_size} tokens"
            )));
        }
        let token_types = match gguf.get("tokenizer.ggml.token_type") {
            Some(_) => gguf.get_i32_array("tokenizer.ggml.token_type")?,
            None => vec![1; vocab_size],
        };
        if token_types.len() != vocab_size {
            return Err(GgufVocabError::InvalidMetadata(format!(
                "{} token types for {vocab_size} tokens",
                token_types.len()
            )));
        }
        let merges = gguf
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| {
                        GgufVocabError::InvalidMetadata(format!("merge '{merge}' has no space"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;

        let token_id = |key: &str| -> Result<Option<u32>> {
            match gguf.get_u32_opt(key)? {
                Some(id) if id as usize >= vocab_size => Err(GgufVocabError::InvalidMetadata(
                    format!("{key} = {id} is outside the vocabulary of {vocab_size}"),
                )),
                other => Ok(other),
            }
        };
        let bos_token_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_token_id = token_id("tokenizer.ggml.eos_token_id")?;
        let padding_token_id = token_id("tokenizer.ggml.padding_token_id")?;
        let eot_token_id = token_id("tokenizer.ggml.eot_token_id")?;
        let eom_token_id = token_id("tokenizer.ggml.eom_token_id")?;
        // llama.cpp's default for BPE vocabularies is no BOS unless the file asks for it.
        let add_bos_token = gguf
            .get_bool_opt("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false);
        let add_eos_token = gguf
            .get_bool_opt("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);

        let mut vocab = Vocab::default();
        for (id, text) in tokens.iter().enumerate() {
            // A duplicate text would leave one id unreachable by encoding; keep the first, as
            // llama.cpp's `token_to_id` map does.
            vocab.entry((*text).to_owned()).or_insert(id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tokenizers_error)?;

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(build_pre_tokenizer(&regexes)?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let is_control: Vec<bool> = token_types
            .iter()
            .map(|&t| t == token_type::CONTROL || t == token_type::UNKNOWN)
            .collect();
        let control_tokens: Vec<AddedToken> = tokens
            .iter()
            .zip(&is_control)
            .filter(|(text, &control)| control && !text.is_empty())
            .map(|(text, _)| AddedToken::from(*text, true))
            .collect();
        let user_defined_tokens: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(text, &t)| t == token_type::USER_DEFINED && !text.is_empty())
            .map(|(text, _)| AddedToken::from(*text, false))
            .collect();
        tokenizer.add_special_tokens(&control_tokens);
        tokenizer.add_tokens(&user_defined_tokens);

        let mut without_special = tokenizer.clone();
        without_special.set_encode_special_tokens(true);

        let byte_of_char = unicode_to_byte();
        let token_bytes = tokens
            .iter()
            .zip(&token_types)
            .map(|(text, &t)| {
                if t == token_type::CONTROL
                    || t == token_type::USER_DEFINED
                    || t == token_type::UNKNOWN
                {
                    // Stored as their literal text, not byte-level encoded.
                    text.as_bytes().to_vec()
                } else {
                    byte_level_decode(text, &byte_of_char)
                }
            })
            .collect();

        let mut eos_token_ids: Vec<u32> = [eos_token_id, eot_token_id, eom_token_id]
            .into_iter()
            .flatten()
            .collect();
        for (id, text) in tokens.iter().enumerate() {
            if END_OF_GENERATION_TEXTS.contains(text) {
                eos_token_ids.push(id as u32);
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();

        Ok(GgufTokenizer {
            with_special: tokenizer,
            without_special,
            token_bytes,
            is_control,
            bos_token_id,
            eos_token_id,
            padding_token_id,
            eos_token_ids,
            add_bos_token,
            add_eos_token,
            pre,
        })
    }

    /// Token ids for `text`, without BOS/EOS. With `parse_special`, control-token text such as
    /// `<|im_start|>` becomes that token (for prompts rendered from a chat template); without,
    /// it is tokenized as plain text (for untrusted user text).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let tokenizer = if parse_special {
            &self.with_special
        } else {
            &self.without_special
        };
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(tokenizers_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`encode`](Self::encode) plus the BOS/EOS the model asks for
    /// (`tokenizer.ggml.add_bos_token` / `add_eos_token`), as llama.cpp's `add_special` does.
    pub fn encode_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos_token {
            ids.extend(self.bos_token_id);
        }
        ids.extend(self.encode(text, parse_special)?);
        if self.add_eos_token {
            ids.extend(self.eos_token_id);
        }
        Ok(ids)
    }

    /// The bytes `ids` stand for. Control tokens are dropped unless `render_special`, as in
    /// llama.cpp's `token_to_piece`. The result may end inside a UTF-8 sequence.
    pub fn decode_bytes(&self, ids: &[u32], render_special: bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            let bytes = self.bytes_of(id)?;
            if render_special || !self.is_control[id as usize] {
                out.extend_from_slice(bytes);
            }
        }
        Ok(out)
    }

    /// [`decode_bytes`](Self::decode_bytes) as text; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids, render_special)?).into_owned())
    }

    /// The raw bytes of one token (a control token's literal text), or `None` if out of range.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(Vec::as_slice)
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<|endoftext|>`, ...).
    pub fn is_special(&self, id: u32) -> bool {
        self.is_control.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of a token given its vocabulary text (byte-level form for ordinary tokens).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.with_special.token_to_id(text)
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    pub fn padding_token_id(&self) -> Option<u32> {
        self.padding_token_id
    }

    /// Every id that ends generation: EOS, EOT, EOM and the end-of-turn tokens llama.cpp
    /// recognises by text (`<|im_end|>`, `<|endoftext|>`, ...). Sorted, no duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// `tokenizer.ggml.pre`, e.g. "smollm".
    pub fn pre_tokenizer(&self) -> &str {
        &self.pre
    }

    /// The underlying `tokenizers` tokenizer (special tokens parsed).
    pub fn inner(&self) -> &Tokenizer {
        &self.with_special
    }

    fn bytes_of(&self, id: u32) -> Result<&[u8]> {
        self.token_bytes(id).ok_or(GgufVocabError::UnknownTokenId {
            id,
            vocab_size: self.token_bytes.len(),
        })
    }
}

fn build_pre_tokenizer(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for regex in regexes {
        // Isolated: llama.cpp keeps both the matches and the text between them as pieces.
        let split = Split::new(
            SplitPattern::Regex((*regex).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizers_error)?;
        steps.push(split.into());
    }
    // The splitting is done above, so the byte-level step must not apply its own regex.
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(Sequence::new(steps).into())
}

fn tokenizers_error(err: tokenizers::Error) -> GgufVocabError {
    GgufVocabError::Tokenizers(err.to_string())
}

/// Inverse of GPT-2's `bytes_to_unicode`: byte-level BPE spells every byte as a printable
/// character; bytes that are printable already stand for themselves, the rest are shifted to
/// U+0100 onwards in byte order.
fn unicode_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for byte in 0..=255u8 {
        let ch = if printable(byte) {
            char::from(byte)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("U+0100..U+0143 are valid chars")
        };
        map.insert(ch, byte);
    }
    map
}

fn byte_level_decode(text: &str, byte_of_char: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for ch in text.chars() {
        match byte_of_char.get(&ch) {
            Some(&b) => out.push(b),
            // Not byte-level encoded (should not occur in a gpt2 vocabulary): keep its UTF-8.
            None => out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_is_gpt2s() {
        let map = unicode_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'!'], b'!');
        assert_eq!(byte_level_decode("ĠHello", &map), b" Hello");
    }

    #[test]
    fn every_listed_regex_compiles() {
        for pre in ["smollm", "gpt-2", "llama-bpe", "qwen2"] {
            build_pre_tokenizer(&pre_tokenizer_regexes(pre).unwrap()).unwrap();
        }
    }
}

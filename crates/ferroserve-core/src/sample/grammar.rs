//! Structured output: a JSON schema compiled by llguidance into a grammar, applied as a token
//! mask to every step's logits of a constrained sequence.
//!
//! Why a library: JSON schema → context-free grammar → the set of vocabulary tokens that keep
//! the output a valid prefix is a lexer/Earley-parser problem over the token trie, which
//! llguidance solves in tens of microseconds per token; a hand-written JSON state machine is
//! where peers fail open. The trie is built from our own vocabulary (the raw bytes of each
//! token, control tokens behind toktrie's 0xFF marker), not from a second `tokenizers`.
//!
//! Each sequence owns its matcher (a deep copy of the compiled grammar's parser, lexer caches
//! included), so its mask depends only on its own tokens: batch invariance holds, and the
//! parallel sampling threads share no lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, InferenceCapabilities, SimpleVob, TokRxInfo, TokTrie, TokenId};
use llguidance::{JsonCompileOptions, Logger, Matcher, ParserFactory, TokenParser};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenize::detok::Vocab;

/// The allowed tokens of one step (a bit per vocabulary entry).
pub type TokenMask = SimpleVob;

/// Compiled grammars kept per engine (least recently used evicted).
pub const GRAMMAR_CACHE_ENTRIES: usize = 256;

/// The request parameter every grammar error is blamed on.
const PARAM: &str = "response_format";
/// The parameter a tool-call grammar's errors are blamed on.
const TOOLS_PARAM: &str = "tools";

/// Our tokenizer as llguidance sees it: the trie of token bytes and text → ids.
struct VocabEnv {
    trie: TokTrie,
    tokenize: Option<Tokenize>,
}

/// Text → token ids (the model's tokenizer, special tokens not parsed).
pub type Tokenize = Box<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

impl toktrie::TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Our byte-level BPE tokenizes text; bytes that are not UTF-8 (a grammar's forced
        // prefix can end mid-character) fall back to the trie's longest matches.
        match (std::str::from_utf8(s), &self.tokenize) {
            (Ok(text), Some(tokenize)) => tokenize(text),
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles JSON schemas against one vocabulary; compiled grammars are cached by their
/// canonical JSON text.
pub struct GrammarCompiler {
    factory: ParserFactory,
    cache: Mutex<LruCache>,
}

impl GrammarCompiler {
    /// `tokenize`: the model's tokenizer, for the bytes a grammar forces (`None`: the
    /// trie's longest matches).
    pub fn new(vocab: &dyn Vocab, tokenize: Option<Tokenize>) -> Result<Self> {
        let vocab_size = vocab.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                let bytes = vocab.token_bytes(id).unwrap_or_default();
                if vocab.is_special(id) && !bytes.is_empty() {
                    let mut marked = Vec::with_capacity(bytes.len() + 1);
                    marked.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    marked.extend_from_slice(bytes);
                    marked
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let eos = vocab.eos_token_ids();
        let Some(&first_eos) = eos.first() else {
            return Err(Error::Internal(
                "structured output needs an end-of-generation token".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: toktrie::TokEnv = Arc::new(VocabEnv { trie, tokenize });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Internal(format!("grammar setup: {e}")))?;
        // Compile errors come back to the client; nothing is printed.
        factory.quiet();
        Ok(Self {
            factory,
            cache: Mutex::new(LruCache::new(GRAMMAR_CACHE_ENTRIES)),
        })
    }

    /// The grammar of a JSON schema (given as JSON text), compiled on first use. A schema
    /// feature llguidance cannot enforce is an `InvalidRequest` on `response_format` naming
    /// it, never a looser grammar.
    pub fn compile(&self, schema_json: &str) -> Result<Arc<CompiledGrammar>> {
        let schema: Value = serde_json::from_str(schema_json).map_err(|e| {
            Error::invalid(
                PARAM,
                format!("response_format: the schema is not JSON: {e}"),
            )
        })?;
        if !schema.is_object() && !schema.is_boolean() {
            return Err(Error::invalid(
                PARAM,
                "response_format: the schema must be a JSON object",
            ));
        }
        self.cache_or(canonical_json(&schema), || self.compile_uncached(schema))
    }

    /// A Lark grammar (llguidance's dialect: JSON schemas embedded with `%json`), compiled
    /// on first use: tool calls. What it cannot enforce is an `InvalidRequest` on `tools`.
    pub fn compile_lark(&self, lark: &str) -> Result<Arc<CompiledGrammar>> {
        // A separate key space: a Lark text never equals a canonical JSON schema, but the
        // prefix makes that obvious.
        self.cache_or(format!("lark:{lark}"), || {
            self.build(
                TopLevelGrammar::from_lark(lark.to_owned()),
                TOOLS_PARAM,
                "the tool-call grammar",
            )
        })
    }

    /// The cached grammar under `key`, or `compile`'s result, cached (the lock is not held
    /// while compiling: two first uses may both compile, the second insert wins).
    fn cache_or(
        &self,
        key: String,
        compile: impl FnOnce() -> Result<CompiledGrammar>,
    ) -> Result<Arc<CompiledGrammar>> {
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(hit);
        }
        let compiled = Arc::new(compile()?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Arc::clone(&compiled));
        Ok(compiled)
    }

    fn compile_uncached(&self, mut schema: Value) -> Result<CompiledGrammar> {
        if let Some(obj) = schema.as_object_mut() {
            // llguidance reads its options from this key; a client must not loosen ours.
            if obj.contains_key("x-guidance") {
                return Err(Error::invalid(
                    PARAM,
                    "response_format: the schema keyword `x-guidance` is not supported",
                ));
            }
            json_options().apply_to(&mut schema);
        }
        self.build(
            TopLevelGrammar::from_json_schema(schema),
            PARAM,
            "the schema",
        )
    }

    /// Compiles a grammar; anything llguidance would reject or only approximate is an
    /// `InvalidRequest` on `param`, never a looser grammar.
    fn build(
        &self,
        grammar: TopLevelGrammar,
        param: &'static str,
        what: &str,
    ) -> Result<CompiledGrammar> {
        let parser = self
            .factory
            .create_parser_from_init_ext(
                llguidance::api::GrammarInit::Serialized(grammar),
                Logger::new(0, 0),
                InferenceCapabilities::default(),
                ParserLimits::default(),
            )
            .map_err(|e| {
                Error::invalid(
                    param,
                    format!("{param}: {what} cannot be enforced: {}", first_line(e)),
                )
            })?;
        let mut matcher = Matcher::new(Ok(parser.deep_clone()));
        let warnings = matcher.grammar_warnings();
        if !warnings.is_empty() {
            return Err(Error::invalid(
                param,
                format!(
                    "{param}: {what} cannot be enforced exactly: {}",
                    warnings.join("; ")
                ),
            ));
        }
        if let Some(e) = matcher.get_error() {
            return Err(Error::invalid(
                param,
                format!("{param}: {what} cannot be enforced: {}", first_line(e)),
            ));
        }
        Ok(CompiledGrammar { parser })
    }

    /// Compiled grammars held by the cache.
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }
}

/// Compact JSON with the separators `json.dumps` writes (`", "`, `": "`): models write
/// these by habit, and no free whitespace means a model cannot stall in endless newlines.
fn json_options() -> JsonCompileOptions {
    JsonCompileOptions {
        item_separator: ", ".into(),
        key_separator: ": ".into(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    }
}

/// One schema's grammar, ready to start sequences.
pub struct CompiledGrammar {
    /// Never advanced: every sequence starts from a deep copy.
    parser: TokenParser,
}

impl CompiledGrammar {
    /// A matcher at the start of the output.
    pub fn start(&self) -> GrammarState {
        GrammarState {
            matcher: Matcher::new(Ok(self.parser.deep_clone())),
        }
    }
}

/// One sequence's position in its grammar.
pub struct GrammarState {
    matcher: Matcher,
}

impl GrammarState {
    /// The tokens allowed next: only end-of-generation tokens once the grammar is complete
    /// and allows nothing more; end-of-generation among others once it accepts. An error
    /// (the parser's limits exceeded) ends the sequence: no token could be trusted.
    pub fn mask(&mut self) -> std::result::Result<TokenMask, String> {
        let mask = self.matcher.compute_mask_or_eos().map_err(first_line)?;
        if mask.is_zero() {
            return Err("the grammar allows no token of this vocabulary here".into());
        }
        Ok(mask)
    }

    /// Advances past a sampled token (which the last mask allowed).
    pub fn commit(&mut self, token: u32) -> std::result::Result<(), String> {
        if self.matcher.is_stopped() {
            return Ok(()); // only end-of-generation was allowed: the sequence ends with it
        }
        self.matcher.consume_token(token).map_err(first_line)
    }

    /// Whether the output so far is a complete document.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}

/// llguidance appends its parser state (the output so far) to errors: that stays out of
/// client messages and logs.
fn first_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or("grammar error")
        .to_owned()
}

/// Sets every disallowed token's logit to -inf.
pub fn apply_mask(mask: &TokenMask, logits: &mut [f32]) {
    mask.iter_unset_entries(|id| {
        if let Some(v) = logits.get_mut(id) {
            *v = f32::NEG_INFINITY;
        }
    });
}

/// JSON text with object keys sorted at every level: equal schemas, one cache entry.
pub fn canonical_json(value: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// A small LRU map: lookups bump an entry's tick; a full cache drops the oldest tick.
struct LruCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (u64, Arc<CompiledGrammar>)>,
}

impl LruCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, key: &str) -> Option<Arc<CompiledGrammar>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(t, g)| {
            *t = tick;
            Arc::clone(g)
        })
    }

    fn insert(&mut self, key: String, grammar: Arc<CompiledGrammar>) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        self.entries.insert(key, (self.tick, grammar));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte as a token, a few multi-byte tokens, and an end token.
    struct ByteVocab {
        tokens: Vec<Vec<u8>>,
        eos: Vec<u32>,
    }

    impl ByteVocab {
        fn new() -> Self {
            let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
            for t in [
                "{\"", "\":", "\": ", "true", "false", "null", "12", "abc", "\"}", "}\n",
            ] {
                tokens.push(t.as_bytes().to_vec());
            }
            tokens.push(b"<|end|>".to_vec());
            let eos = vec![tokens.len() as u32 - 1];
            Self { tokens, eos }
        }
        fn id(&self, s: &str) -> u32 {
            self.tokens.iter().position(|t| t == s.as_bytes()).unwrap() as u32
        }
    }

    impl Vocab for ByteVocab {
        fn vocab_size(&self) -> usize {
            self.tokens.len()
        }
        fn token_bytes(&self, id: u32) -> Option<&[u8]> {
            self.tokens.get(id as usize).map(Vec::as_slice)
        }
        fn is_special(&self, id: u32) -> bool {
            self.eos.contains(&id)
        }
        fn eos_token_ids(&self) -> &[u32] {
            &self.eos
        }
    }

    fn compiler(vocab: &ByteVocab) -> GrammarCompiler {
        GrammarCompiler::new(vocab, None).unwrap()
    }

    /// Greedy decoding from logits that always prefer the worst tokens for JSON (letters,
    /// then the end token): the mask alone must keep the output valid.
    #[test]
    fn mask_keeps_adversarial_greedy_output_valid() {
        let vocab = ByteVocab::new();
        let compiler = compiler(&vocab);
        let schema = r#"{"type":"object","properties":{"flag":{"type":"boolean"},"n":{"type":"integer","minimum":3,"maximum":7}},"required":["flag","n"],"additionalProperties":false}"#;
        let grammar = compiler.compile(schema).unwrap();
        let mut state = grammar.start();
        let eos = vocab.eos[0];
        let mut out = Vec::new();
        for step in 0..200 {
            // Prefer, in order: 'x', the end token, 'z', then anything by id.
            let mut logits: Vec<f32> = (0..vocab.vocab_size())
                .map(|i| -(i as f32) * 1e-3)
                .collect();
            logits[b'x' as usize] = 10.0;
            logits[eos as usize] = 9.0;
            logits[b'z' as usize] = 8.0;
            logits[vocab.id("12") as usize] = 0.5 + step as f32 * 1e-4;
            let mask = state.mask().unwrap();
            apply_mask(&mask, &mut logits);
            let token = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
                .unwrap() as u32;
            assert!(mask.is_allowed(token));
            if token == eos {
                assert!(state.is_accepting(), "EOS only when the grammar accepts");
                break;
            }
            state.commit(token).unwrap();
            out.extend_from_slice(&vocab.tokens[token as usize]);
        }
        let text = String::from_utf8(out).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["flag"].is_boolean(), "{text}");
        let n = v["n"].as_i64().unwrap();
        assert!((3..=7).contains(&n), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
    }

    #[test]
    fn a_mask_forbids_eos_until_the_document_is_complete() {
        let vocab = ByteVocab::new();
        let grammar = compiler(&vocab).compile(r#"{"type":"object"}"#).unwrap();
        let mut state = grammar.start();
        let eos = vocab.eos[0];
        assert!(!state.mask().unwrap().is_allowed(eos));
        state.commit(b'{' as u32).unwrap();
        assert!(!state.mask().unwrap().is_allowed(eos));
        assert!(!state.mask().unwrap().is_allowed(b'x' as u32));
        state.commit(b'}' as u32).unwrap();
        assert!(state.is_accepting());
        assert!(state.mask().unwrap().is_allowed(eos));
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let vocab = ByteVocab::new();
        let compiler = compiler(&vocab);
        for (schema, feature) in [
            (r#"{"type":"array","uniqueItems":true}"#, "uniqueItems"),
            (r#"{"type":"object","not":{"required":["a"]}}"#, "not"),
            (
                r#"{"type":"string","format":"no-such-format"}"#,
                "no-such-format",
            ),
            (
                r#"{"type":"object","x-guidance":{"lenient":true}}"#,
                "x-guidance",
            ),
        ] {
            let e = compiler
                .compile(schema)
                .err()
                .unwrap_or_else(|| panic!("{schema} compiled"));
            assert_eq!(e.param(), Some("response_format"), "{schema}");
            assert!(e.to_string().contains(feature), "{schema}: {e}");
            assert!(e.to_string().starts_with("response_format"), "{e}");
        }
        assert!(compiler.compile("{not json").is_err());
    }

    #[test]
    fn a_lark_grammar_with_embedded_json_constrains_tool_calls() {
        let vocab = ByteVocab::new();
        let compiler = compiler(&vocab);
        let lark = r#"
start: TEXT | call
call: "<t>" %json {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false} "</t>"
TEXT: /(?s:.*)/ & ~/(?s:.*)<t>(?s:.*)/
"#;
        let grammar = compiler.compile_lark(lark).unwrap();
        let accepts = |text: &str| {
            let mut state = grammar.start();
            for b in text.bytes() {
                if !state.mask().unwrap().is_allowed(b as u32) {
                    return false;
                }
                state.commit(b as u32).unwrap();
            }
            state.is_accepting()
        };
        assert!(accepts("hello"));
        assert!(accepts("<t>{\"a\": 12}</t>"));
        assert!(!accepts("<t>{\"b\": 1}</t>"));
        assert!(!accepts("x <t>"));
        let e = compiler
            .compile_lark("start: %json {\"type\": \"array\", \"uniqueItems\": true}")
            .err()
            .unwrap();
        assert_eq!(e.param(), Some("tools"), "{e}");
        assert!(e.to_string().contains("uniqueItems"), "{e}");
    }

    #[test]
    fn equal_schemas_share_one_cache_entry() {
        let vocab = ByteVocab::new();
        let compiler = compiler(&vocab);
        let a = compiler
            .compile(r#"{"type":"object","required":["a"],"properties":{"a":{"type":"integer"}}}"#)
            .unwrap();
        let b = compiler.compile(r#"{ "properties": {"a": {"type": "integer"}}, "required": ["a"], "type": "object" }"#).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(compiler.cached(), 1);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut lru = LruCache::new(2);
        let vocab = ByteVocab::new();
        let g = compiler(&vocab).compile(r#"{"type":"object"}"#).unwrap();
        lru.insert("a".into(), Arc::clone(&g));
        lru.insert("b".into(), Arc::clone(&g));
        assert!(lru.get("a").is_some()); // "b" is now the oldest
        lru.insert("c".into(), g);
        assert!(lru.get("b").is_none());
        assert!(lru.get("a").is_some() && lru.get("c").is_some());
    }
}

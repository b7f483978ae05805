//! Chat-template rendering: the model's Jinja template (`tokenizer.chat_template` in GGUF) run
//! with minijinja, set up the way Hugging Face's `apply_chat_template` runs it with jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! a non-HTML-escaping `tojson`), so the rendered prompt is byte-identical to the reference.
//!
//! The engine never sees OpenAI JSON: the API layer converts requests into [`ChatMessage`]s.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::weights::gguf::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template (tokenizer.chat_template) and none was configured")]
    Missing,
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template itself rejected the conversation via `raise_exception` (e.g. "roles must
    /// alternate"): a client error.
    #[error("chat template rejected the conversation: {0}")]
    Rejected(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// A content part that this text-only engine cannot take (an image, audio): a client error.
    #[error("message {message_index}: content part of type '{kind}' is not supported, only text")]
    UnsupportedContentPart { message_index: usize, kind: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

type Result<T, E = ChatTemplateError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: MessageContent,
}

impl ChatMessage {
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: MessageContent::Text(content.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    /// OpenAI's list form. Text parts are joined with "\n" before rendering, as llama.cpp's
    /// server does for templates that take plain-string content.
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    Text(String),
    /// Any non-text part, by its OpenAI `type` (e.g. "image_url"); rendering refuses it.
    Other {
        kind: String,
    },
}

/// A compiled chat template plus the BOS/EOS texts templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source` now, so a broken template or override fails at load time, not on the
    /// first request.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        // jinja2 as transformers configures it for chat templates.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template from `tokenizer.chat_template`, or `override_source` when given. BOS/EOS
    /// texts come from the token list (empty when the file names no such token).
    pub fn from_gguf(gguf: &GgufFile, override_source: Option<&str>) -> Result<Self> {
        let source = match override_source {
            Some(source) => source.to_owned(),
            None => gguf
                .get_str_opt("tokenizer.chat_template")?
                .ok_or(ChatTemplateError::Missing)?
                .to_owned(),
        };
        let tokens = gguf.get_array("tokenizer.ggml.tokens")?;
        let token_text = |key: &str| -> Result<String> {
            Ok(gguf
                .get_u32_opt(key)?
                .and_then(|id| tokens.get(id as usize))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned())
        };
        let bos = token_text("tokenizer.ggml.bos_token_id")?;
        let eos = token_text("tokenizer.ggml.eos_token_id")?;
        Self::new(source, bos, eos)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation. With `add_generation_prompt` the output ends with the
    /// assistant turn's opening, ready for the model to continue.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(index, message)| message_value(index, message))
            .collect::<Result<Vec<Value>>>()?;
        let context = Value::from(BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        template.render(context).map_err(|e| {
            match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Raised>()) {
                Some(Raised(message)) => ChatTemplateError::Rejected(message.clone()),
                None => ChatTemplateError::Render(describe(&e)),
            }
        })
    }
}

fn message_value(index: usize, message: &ChatMessage) -> Result<Value> {
    let content = match &message.content {
        MessageContent::Text(text) => text.clone(),
        MessageContent::Parts(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    ContentPart::Text(text) => texts.push(text.as_str()),
                    ContentPart::Other { kind } => {
                        return Err(ChatTemplateError::UnsupportedContentPart {
                            message_index: index,
                            kind: kind.clone(),
                        })
                    }
                }
            }
            texts.join("\n")
        }
    };
    Ok(Value::from(BTreeMap::from([
        ("role", Value::from(message.role.as_str())),
        ("content", Value::from(content)),
    ])))
}

/// Marks an error raised by the template's own `raise_exception`, to tell it from a bug.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

/// minijinja's own `tojson` escapes `<`, `>`, `&` and `'` for HTML, which would change the
/// prompt; transformers' is `json.dumps(x, ensure_ascii=False, indent=indent)`. This writes
/// the latter, including its `", "` / `": "` separators.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // `ensure_ascii` and `separators` are accepted for compatibility but only their
    // transformers defaults are implemented.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut writer = JsonWriter {
        out: String::new(),
        indent,
        sort_keys: sort_keys.unwrap_or(false),
    };
    writer.value(value, 0)?;
    Ok(Value::from_safe_string(writer.out))
}

struct JsonWriter {
    out: String,
    indent: Option<usize>,
    sort_keys: bool,
}

/// Deeper than any sane tool schema; stops a self-referencing value from recursing forever.
const MAX_JSON_DEPTH: usize = 64;

impl JsonWriter {
    fn value(&mut self, value: &Value, depth: usize) -> std::result::Result<(), minijinja::Error> {
        if depth > MAX_JSON_DEPTH {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value nested too deeply",
            ));
        }
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let _ = write!(self.out, "{value}");
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let mut items = Vec::with_capacity(keys.len());
                for key in keys {
                    let item = value.get_item(&key)?;
                    items.push((key, item));
                }
                self.container('{', '}', items.len(), depth, |w, i| {
                    let (key, item) = &items[i];
                    w.string(&key.to_string());
                    w.out.push_str(": ");
                    w.value(item, depth + 1)
                })?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container('[', ']', items.len(), depth, |w, i| {
                    w.value(&items[i], depth + 1)
                })?;
            }
            ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a {} value", value.kind()),
                ))
            }
            // ValueKind is non-exhaustive.
            _ => self.string(&value.to_string()),
        }
        Ok(())
    }

    fn container(
        &mut self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        self.out.push(open);
        for i in 0..len {
            match self.indent {
                // json.dumps with indent: "," at line ends, no trailing space.
                Some(indent) => {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.out.push('\n');
                    self.out.push_str(&" ".repeat(indent * (depth + 1)));
                }
                None if i > 0 => self.out.push_str(", "),
                None => {}
            }
            item(self, i)?;
        }
        if let (Some(indent), true) = (self.indent, len > 0) {
            self.out.push('\n');
            self.out.push_str(&" ".repeat(indent * depth));
        }
        self.out.push(close);
        Ok(())
    }

    /// Python's `json.dumps(..., ensure_ascii=False)` string escaping.
    fn string(&mut self, s: &str) {
        self.out.push('"');
        for ch in s.chars() {
            match ch {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{08}' => self.out.push_str("\\b"),
                '\u{0c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// minijinja's error plus its location, for messages that point into the template.
fn describe(err: &minijinja::Error) -> String {
    match (err.line(), err.detail()) {
        (Some(line), Some(detail)) => format!("{} (line {line}): {detail}", err.kind()),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_is_a_rejection() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Rejected(ref m) if m == "roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn content_parts_join_and_images_are_refused() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content }}|{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let parts = ChatMessage {
            role: "user".into(),
            content: MessageContent::Parts(vec![
                ContentPart::Text("a".into()),
                ContentPart::Text("b".into()),
            ]),
        };
        assert_eq!(t.render(&[parts], false).unwrap(), "a\nb|");
        let image = ChatMessage {
            role: "user".into(),
            content: MessageContent::Parts(vec![ContentPart::Other {
                kind: "image_url".into(),
            }]),
        };
        let err = t
            .render(&[ChatMessage::text("user", "x"), image], false)
            .unwrap_err();
        assert!(matches!(
            err,
            ChatTemplateError::UnsupportedContentPart {
                message_index: 1,
                ..
            }
        ));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'a': '<b> & \"c\"\n', 'n': [1, 2.5, true, none]} | tojson }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            r#"{"a": "<b> & \"c\"\n", "n": [1, 2.5, true, null]}"#
        );
        let t =
            ChatTemplate::new("{{ {'a': [1, {'b': []}]} | tojson(indent=2) }}", "", "").unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": []\n    }\n  ]\n}"
        );
    }

    #[test]
    fn python_string_methods_and_whitespace_control() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m.content.strip() }}\n{% endfor %}",
            "",
            "",
        )
        .unwrap();
        // jinja2 gives the same: lstrip_blocks strips before `{%` only, not before `{{`.
        assert_eq!(
            t.render(&[ChatMessage::text("user", "  hi ")], false)
                .unwrap(),
            "  hi\n"
        );
    }

    #[test]
    fn broken_template_fails_to_compile() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }
}

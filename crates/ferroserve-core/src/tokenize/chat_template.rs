//! Chat-template rendering: the model's Jinja template (`tokenizer.chat_template` in GGUF) run
//! with minijinja, set up the way Hugging Face's `apply_chat_template` runs it with jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! a non-HTML-escaping `tojson`), so the rendered prompt is byte-identical to the reference.
//!
//! The engine never sees OpenAI JSON: the API layer converts requests into [`ChatMessage`]s.
//!
//! Tools: a template that renders tools and prompts for a call format we can constrain and
//! parse ([`ToolFormat`]) gets them as Hugging Face passes them (`tools`,
//! `message.tool_calls`, `message.tool_call_id`). Any other template gets the conversation
//! lowered to Hermes-style text first ([`hermes_lowering`]): the tool list in the system
//! message inside `<tools></tools>`, calls as `<tool_call>{"name": ..., "arguments": ...}
//! </tool_call>` in the assistant's text, results as `<tool_response>` blocks in a user turn.
//! Either way the prompt asks for exactly the format the sampler then enforces.

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
    /// An assistant turn's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self::new(role, MessageContent::Text(content.into()))
    }

    pub fn new(role: impl Into<String>, content: MessageContent) -> Self {
        ChatMessage {
            role: role.into(),
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function call the assistant made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text (what the model wrote; an object when it parses).
    pub arguments: String,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema (an object).
    pub parameters: serde_json::Value,
}

impl ToolSpec {
    /// `parameters` as JSON text; `None` unless it is a JSON object.
    pub fn parse(name: String, description: Option<String>, parameters: &str) -> Option<Self> {
        let parameters: serde_json::Value = serde_json::from_str(parameters).ok()?;
        parameters.is_object().then_some(ToolSpec {
            name,
            description,
            parameters,
        })
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
    native_tools: Option<ToolFormat>,
}

/// How a model writes tool calls. The Python layer holds each format's grammar and parser
/// (`backends/toolcalls.py`); the names are the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` per call (Hermes, Qwen 2.5+,
    /// SmolLM3, and our lowering for templates without tools).
    Hermes,
    /// `[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]` (Mistral's v3 templates).
    Mistral,
    /// `{"name": ..., "parameters": ...}` as the whole answer (Llama 3.1 / 3.2's JSON tool use).
    Llama3Json,
}

impl ToolFormat {
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Llama3Json => "llama3_json",
        }
    }

    /// The format a template that renders `tools` prompts for, recognised by the markers its
    /// prompt text names; `None` for a template without tools or with a format we do not know.
    fn of_template(source: &str) -> Option<ToolFormat> {
        if !source.contains("tools") {
            None
        } else if source.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if source.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Mistral)
        } else if source.contains("\"parameters\": dictionary") || source.contains("<|python_tag|>")
        {
            Some(ToolFormat::Llama3Json)
        } else {
            None
        }
    }
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
            native_tools: ToolFormat::of_template(&source),
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

    /// Whether the template renders tools itself, in a [`ToolFormat`] we know; otherwise tool
    /// conversations are lowered to Hermes-style text (a template that renders tools in an
    /// unknown format too: the model would answer in a format the sampler cannot enforce).
    pub fn supports_tools(&self) -> bool {
        self.native_tools.is_some()
    }

    /// The format the prompt asks tool calls in: the template's own, or Hermes when lowered.
    pub fn tool_format(&self) -> ToolFormat {
        self.native_tools.unwrap_or(ToolFormat::Hermes)
    }

    /// Renders the conversation. With `add_generation_prompt` the output ends with the
    /// assistant turn's opening, ready for the model to continue.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`render`](Self::render) with the functions the model may call.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let uses_tools = !tools.is_empty()
            || messages
                .iter()
                .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        let lowered;
        let messages = if uses_tools && !self.supports_tools() {
            lowered = hermes_lowering(messages, tools)?;
            &lowered[..]
        } else {
            messages
        };
        let messages = messages
            .iter()
            .enumerate()
            .map(|(index, message)| message_value(index, message))
            .collect::<Result<Vec<Value>>>()?;
        let mut context = BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]);
        if !tools.is_empty() && self.supports_tools() {
            context.insert(
                "tools",
                Value::from(tools.iter().map(tool_value).collect::<Vec<_>>()),
            );
        }
        let context = Value::from(context);
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
    let content = content_text(index, message)?;
    let mut fields = BTreeMap::from([
        ("role", Value::from(message.role.as_str())),
        ("content", Value::from(content)),
    ]);
    if !message.tool_calls.is_empty() {
        // Hugging Face's shape; `arguments` as an object where it parses (templates write it
        // with `tojson`), else the text.
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                    .map(|v| json_value(&v))
                    .unwrap_or_else(|_| Value::from(call.arguments.as_str()));
                let function = BTreeMap::from([
                    ("name", Value::from(call.name.as_str())),
                    ("arguments", arguments),
                ]);
                Value::from(BTreeMap::from([
                    ("id", Value::from(call.id.as_str())),
                    ("type", Value::from("function")),
                    ("function", Value::from(function)),
                ]))
            })
            .collect();
        fields.insert("tool_calls", Value::from(calls));
    }
    if let Some(id) = &message.tool_call_id {
        fields.insert("tool_call_id", Value::from(id.as_str()));
    }
    Ok(Value::from(fields))
}

/// A JSON value for the template (minijinja is built without serde; maps come out with
/// sorted keys).
fn json_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(json_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(map) => Value::from(
            map.iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect::<BTreeMap<String, Value>>(),
        ),
    }
}

/// `{"type": "function", "function": {name, description, parameters}}`, as HF templates expect.
fn tool_value(tool: &ToolSpec) -> Value {
    json_value(&tool_json(tool))
}

fn tool_json(tool: &ToolSpec) -> serde_json::Value {
    let mut function = serde_json::Map::new();
    function.insert("name".into(), tool.name.clone().into());
    if let Some(d) = &tool.description {
        function.insert("description".into(), d.clone().into());
    }
    function.insert("parameters".into(), tool.parameters.clone());
    serde_json::json!({"type": "function", "function": function})
}

/// The Hermes tool prompt (as Qwen2.5's and NousResearch's Hermes templates write it).
const HERMES_TOOLS_HEADER: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const HERMES_TOOLS_FOOTER: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// A tool conversation as plain text turns, for templates that know nothing of tools: the
/// tool list appended to the system message (one is added if there is none), each call a
/// `<tool_call>` block after the assistant's text, consecutive tool results one user turn
/// of `<tool_response>` blocks.
pub fn hermes_lowering(messages: &[ChatMessage], tools: &[ToolSpec]) -> Result<Vec<ChatMessage>> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let mut prompt = String::from(HERMES_TOOLS_HEADER);
        for tool in tools {
            prompt.push('\n');
            prompt.push_str(&python_json(&tool_json(tool)));
        }
        prompt.push_str(HERMES_TOOLS_FOOTER);
        match messages.first() {
            Some(first) if first.role == "system" => {
                let text = content_text(0, first)?;
                out.push(ChatMessage::text("system", format!("{text}\n\n{prompt}")));
            }
            _ => out.push(ChatMessage::text("system", prompt)),
        }
    }
    for (index, message) in messages.iter().enumerate() {
        if index == 0 && !tools.is_empty() && message.role == "system" {
            continue;
        }
        let text = content_text(index, message)?;
        if message.role == "tool" {
            let block = format!("<tool_response>\n{text}\n</tool_response>");
            match out.last_mut() {
                Some(prev)
                    if prev.role == "user" && index > 0 && messages[index - 1].role == "tool" =>
                {
                    if let MessageContent::Text(t) = &mut prev.content {
                        t.push('\n');
                        t.push_str(&block);
                    }
                }
                _ => out.push(ChatMessage::text("user", block)),
            }
            continue;
        }
        if message.tool_calls.is_empty() {
            out.push(ChatMessage::text(message.role.clone(), text));
            continue;
        }
        let mut lines: Vec<String> = Vec::new();
        if !text.is_empty() {
            lines.push(text);
        }
        for call in &message.tool_calls {
            let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                .map(|v| python_json(&v))
                .unwrap_or_else(|_| call.arguments.clone());
            lines.push(format!(
                "<tool_call>\n{{\"name\": {}, \"arguments\": {arguments}}}\n</tool_call>",
                python_json(&serde_json::Value::String(call.name.clone()))
            ));
        }
        out.push(ChatMessage::text(message.role.clone(), lines.join("\n")));
    }
    Ok(out)
}

/// JSON as Python's `json.dumps` writes it (`", "`, `": "`): the separators the constrained
/// tool calls use, so the prompt and the answers look alike.
/// Object keys keep the client's order.
fn python_json(value: &serde_json::Value) -> String {
    fn write(w: &mut JsonWriter, value: &serde_json::Value) {
        match value {
            serde_json::Value::String(s) => w.string(s),
            serde_json::Value::Array(items) => {
                w.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        w.out.push_str(", ");
                    }
                    write(w, item);
                }
                w.out.push(']');
            }
            serde_json::Value::Object(map) => {
                w.out.push('{');
                for (i, (key, item)) in map.iter().enumerate() {
                    if i > 0 {
                        w.out.push_str(", ");
                    }
                    w.string(key);
                    w.out.push_str(": ");
                    write(w, item);
                }
                w.out.push('}');
            }
            other => w.out.push_str(&other.to_string()),
        }
    }
    let mut writer = JsonWriter {
        out: String::new(),
        indent: None,
        sort_keys: false,
    };
    write(&mut writer, value);
    writer.out
}

fn content_text(index: usize, message: &ChatMessage) -> Result<String> {
    Ok(match &message.content {
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
    })
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
        let parts = ChatMessage::new(
            "user",
            MessageContent::Parts(vec![
                ContentPart::Text("a".into()),
                ContentPart::Text("b".into()),
            ]),
        );
        assert_eq!(t.render(&[parts], false).unwrap(), "a\nb|");
        let image = ChatMessage::new(
            "user",
            MessageContent::Parts(vec![ContentPart::Other {
                kind: "image_url".into(),
            }]),
        );
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

    #[test]
    fn tool_conversations_are_lowered_to_hermes_text_for_templates_without_tools() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(!t.supports_tools());
        let tools = [ToolSpec {
            name: "get_weather".into(),
            description: Some("Weather now".into()),
            parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }];
        let mut call = ChatMessage::text("assistant", "");
        call.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        });
        let mut result = ChatMessage::text("tool", "18C");
        result.tool_call_id = Some("call_1".into());
        let messages = [ChatMessage::text("user", "Weather in Paris?"), call, result];
        let out = t.render_with_tools(&messages, &tools, true).unwrap();
        assert!(out.starts_with("<system># Tools\n"), "{out}");
        assert!(out.contains(r#"<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
</tools>"#), "{out}");
        assert!(out.contains("<user>Weather in Paris?\n<assistant><tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<user><tool_response>\n18C\n</tool_response>\n"), "{out}");
    }

    #[test]
    fn templates_with_tools_get_them_natively() {
        let t = ChatTemplate::new(
            "{# <tool_call> #}{% for tool in tools %}[{{ tool.function.name }}]{% endfor %}{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}{{ m.tool_call_id }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(t.supports_tools());
        let tools = [ToolSpec {
            name: "f".into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
        }];
        let mut call = ChatMessage::text("assistant", "");
        call.tool_calls.push(ToolCall {
            id: "c".into(),
            name: "f".into(),
            arguments: r#"{"x": 1}"#.into(),
        });
        let mut result = ChatMessage::text("tool", "ok");
        result.tool_call_id = Some("c".into());
        let out = t.render_with_tools(&[call, result], &tools, false).unwrap();
        assert_eq!(out, r#"[f]f{"x": 1}c"#);
    }

    #[test]
    fn tool_formats_are_recognised_by_the_markers_the_template_prompts_for() {
        let format = |source: &str| {
            let t = ChatTemplate::new(source, "", "").unwrap();
            (t.supports_tools(), t.tool_format())
        };
        assert_eq!(
            format("{% for m in messages %}{{ m.content }}{% endfor %}"),
            (false, ToolFormat::Hermes)
        );
        assert_eq!(format("{{ tools }}<tool_call>"), (true, ToolFormat::Hermes));
        assert_eq!(
            format("{{ tools }}[TOOL_CALLS]"),
            (true, ToolFormat::Mistral)
        );
        assert_eq!(
            format(
                r#"{{ tools }}{{ 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}"#
            ),
            (true, ToolFormat::Llama3Json)
        );
        // Tools rendered in a format we cannot enforce: lowered to Hermes instead.
        assert_eq!(
            format("{{ tools }}<function_calls>"),
            (false, ToolFormat::Hermes)
        );
    }
}

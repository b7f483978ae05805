//! `ChatEngine`: submit / abort / fd / drain over `ferroserve_core::ChatEngine`,
//! plus the tokenizer helpers the HTTP layer needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferroserve_core::{
    ChatEngine, ChatEvent, ChatMessage, ContentPart, Delivery, DeviceChoice, EngineConfig, InteractiveLoad, MessageContent, Numerics, Priority,
    SamplingParams, TokenLogprob, ToolCall, ToolSpec,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::errors::{detach, kind_name};
use crate::events::{ChatAdmitted, ChatDelta, ChatFinished, EngineFailed};

#[pyclass(name = "ChatEngine", module = "ferroserve._core", frozen)]
pub struct PyChatEngine {
    inner: ChatEngine,
}

/// A message from Python: `(role, text)` or `(role, [(part_type, text), ...])`.
#[derive(FromPyObject)]
pub enum PyContent {
    Text(String),
    Parts(Vec<(String, String)>),
}

/// A message from Python: `(role, content)`, or `(role, content, tool_calls, tool_call_id)`
/// with `tool_calls` a list of `(id, name, arguments_json)`.
#[derive(FromPyObject)]
pub enum PyMessage {
    WithTools(PyToolMessage),
    Plain((String, PyContent)),
}

/// `(role, content, [(id, name, arguments_json)], tool_call_id)`.
type PyToolMessage = (String, PyContent, Vec<(String, String, String)>, Option<String>);

fn to_messages(messages: Vec<PyMessage>) -> Vec<ChatMessage> {
    messages
        .into_iter()
        .map(|message| {
            let (role, content, calls, tool_call_id) = match message {
                PyMessage::Plain((role, content)) => (role, content, Vec::new(), None),
                PyMessage::WithTools(m) => m,
            };
            let content = match content {
                PyContent::Text(t) => MessageContent::Text(t),
                PyContent::Parts(parts) => MessageContent::Parts(
                    parts
                        .into_iter()
                        .map(|(kind, text)| if kind == "text" { ContentPart::Text(text) } else { ContentPart::Other { kind } })
                        .collect(),
                ),
            };
            let mut out = ChatMessage::new(role, content);
            out.tool_calls = calls.into_iter().map(|(id, name, arguments)| ToolCall { id, name, arguments }).collect();
            out.tool_call_id = tool_call_id;
            out
        })
        .collect()
}

/// Tools from Python: `(name, description, parameters_json)`; parameters that are not a
/// JSON object raise `InvalidRequest` on `tools`.
fn to_tools(tools: Vec<(String, Option<String>, String)>) -> PyResult<Vec<ToolSpec>> {
    tools
        .into_iter()
        .map(|(name, description, parameters)| {
            let message = format!("tools: the parameters of {name:?} must be a JSON schema object");
            ToolSpec::parse(name, description, &parameters)
                .ok_or_else(|| crate::errors::to_py(ferroserve_core::Error::invalid("tools", message)))
        })
        .collect()
}

fn logprob_tuple<'py>(py: Python<'py>, lp: &TokenLogprob) -> PyResult<Bound<'py, PyTuple>> {
    let top: Vec<Bound<'py, PyTuple>> = lp
        .top
        .iter()
        .map(|t| (t.token_id, PyBytes::new(py, &t.bytes), t.logprob).into_pyobject(py))
        .collect::<PyResult<_>>()?;
    (lp.token_id, PyBytes::new(py, &lp.bytes), lp.logprob, top).into_pyobject(py)
}

#[pymethods]
impl PyChatEngine {
    /// Loads a GGUF llama-family model and starts its engine thread.
    #[new]
    /// `numerics`: "exact" (llama.cpp's arithmetic, the default) or "fast" (see
    /// `Numerics`); anything else raises `InvalidRequest`. `device`: `cpu`, `opencl` or
    /// `opencl:N` (exact numerics only; kernels from the embedded sources or the program
    /// binaries in `kernel_binaries`); a device that cannot be used, or whose load check
    /// disagrees with the CPU, raises `DeviceError`.
    #[pyo3(signature = (path, kv_budget_bytes = 512 << 20, max_batch_tokens = 512, burst_batch_tokens = 512, max_running = 64, chat_template = None, numerics = "exact", device = "cpu", kernel_binaries = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        kv_budget_bytes: usize,
        max_batch_tokens: usize,
        burst_batch_tokens: usize,
        max_running: usize,
        chat_template: Option<String>,
        numerics: &str,
        device: &str,
        kernel_binaries: Option<PathBuf>,
    ) -> PyResult<Self> {
        let numerics = Numerics::parse(numerics).ok_or_else(|| {
            crate::errors::to_py(ferroserve_core::Error::invalid_request(format!("numerics: {numerics:?} is not one of \"exact\", \"fast\"")))
        })?;
        let device = DeviceChoice::parse(device, kernel_binaries.as_deref()).map_err(crate::errors::to_py)?;
        // The server's engines share one count of interactive work (batch work yields to it).
        let cfg = EngineConfig { kv_budget_bytes, max_batch_tokens, burst_batch_tokens, max_running, numerics, device, interactive: InteractiveLoad::server(), ..EngineConfig::default() };
        let inner = detach(py, move || ChatEngine::load_with_template(&path, cfg, chat_template.as_deref()))?;
        Ok(Self { inner })
    }

    /// Queues a generation; returns `(prompt_tokens, max_tokens)`. Invalid parameters
    /// raise `InvalidRequest` with `param` naming the parameter; events arrive
    /// through `drain()`. `json_schema` (JSON text) constrains every choice to a document
    /// valid under it; what cannot be enforced raises `InvalidRequest` (`response_format`).
    /// `lark_grammar` (llguidance Lark, `%json` schemas embedded) constrains tool calls the
    /// same way (`InvalidRequest` on `tools`). `priority`: "interactive" or "batch" (runs
    /// only on what interactive requests leave of each step); else `InvalidRequest`.
    /// `coalesce`: each choice's output arrives as one `ChatDelta` right before its
    /// `ChatFinished` (nothing between `ChatAdmitted` and then), for answers sent whole.
    #[pyo3(signature = (request_id, prompt_tokens, *, n = 1, max_tokens = None, temperature = 1.0, top_p = 1.0,
        top_k = 0, min_p = 0.0, seed = None, presence_penalty = 0.0, frequency_penalty = 0.0,
        logit_bias = None, stop = None, ignore_eos = false, logprobs = false, top_logprobs = 0,
        json_schema = None, lark_grammar = None, priority = "interactive", coalesce = false))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        request_id: u64,
        prompt_tokens: Vec<u32>,
        n: usize,
        max_tokens: Option<usize>,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        min_p: f32,
        seed: Option<u64>,
        presence_penalty: f32,
        frequency_penalty: f32,
        logit_bias: Option<BTreeMap<u32, f32>>,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
        logprobs: bool,
        top_logprobs: usize,
        json_schema: Option<String>,
        lark_grammar: Option<String>,
        priority: &str,
        coalesce: bool,
    ) -> PyResult<(usize, usize)> {
        let priority = Priority::parse(priority).map_err(crate::errors::to_py)?;
        let delivery = if coalesce { Delivery::Whole } else { Delivery::PerStep };
        let params = SamplingParams {
            n,
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            presence_penalty,
            frequency_penalty,
            logit_bias: logit_bias.unwrap_or_default(),
            stop: stop.unwrap_or_default(),
            ignore_eos,
            logprobs,
            top_logprobs,
            json_schema,
            lark_grammar,
        };
        let info = detach(py, || self.inner.submit_with(request_id, prompt_tokens, params, priority, delivery))?;
        Ok((info.prompt_tokens, info.max_tokens))
    }

    /// Drops the request at the engine's next step (its KV blocks are freed).
    fn abort(&self, request_id: u64) {
        self.inner.abort(request_id);
    }

    fn fd(&self) -> i32 {
        self.inner.notifier().fd()
    }

    /// Every event since the last call, built under one GIL hold:
    /// `("a", id, prompt_tokens, cached_tokens)`,
    /// `("d", id, index, text, token_ids, logprobs | None)` with logprobs a list of
    /// `(token_id, bytes, logprob, [(token_id, bytes, logprob), ...])`,
    /// `("f", id, index, finish_reason, prompt_tokens, completion_tokens, cached_tokens)`,
    /// `("e", id, error_kind, message, param | None)`.
    /// Every event since the last call, oldest first: `ChatAdmitted`, `ChatDelta`,
    /// `ChatFinished` or `EngineFailed` (see `events.rs`).
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for ev in self.inner.notifier().drain() {
            let item = match ev {
                ChatEvent::Admitted { request_id, prompt_tokens, cached_tokens } => {
                    Bound::new(py, ChatAdmitted { request_id, prompt_tokens, cached_tokens })?.into_any()
                }
                ChatEvent::Delta { request_id, index, text, token_ids, logprobs } => {
                    let logprobs = if logprobs.is_empty() {
                        None
                    } else {
                        let items: Vec<Bound<'py, PyTuple>> = logprobs.iter().map(|lp| logprob_tuple(py, lp)).collect::<PyResult<_>>()?;
                        Some(PyList::new(py, items)?.unbind())
                    };
                    Bound::new(py, ChatDelta { request_id, index, text, token_ids, logprobs })?.into_any()
                }
                ChatEvent::Finished { request_id, index, finish_reason, usage } => Bound::new(
                    py,
                    ChatFinished {
                        request_id,
                        index,
                        finish_reason: finish_reason.as_str(),
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        cached_tokens: usage.cached_tokens,
                    },
                )?
                .into_any(),
                ChatEvent::Error { request_id, kind, message, param } => {
                    Bound::new(py, EngineFailed { request_id, kind: kind_name(kind), message, param })?.into_any()
                }
            };
            out.append(item)?;
        }
        Ok(out)
    }

    /// Messages `[(role, text | [(type, text), ...])]` (or `(role, content, tool_calls,
    /// tool_call_id)`) rendered with the chat template and tokenized (BOS added if the model
    /// wants it). `tools`: `[(name, description, parameters_json)]` the model may call.
    #[pyo3(signature = (messages, add_generation_prompt = true, tools = None))]
    fn encode_chat(
        &self,
        py: Python<'_>,
        messages: Vec<PyMessage>,
        add_generation_prompt: bool,
        tools: Option<Vec<(String, Option<String>, String)>>,
    ) -> PyResult<Vec<u32>> {
        let messages = to_messages(messages);
        let tools = to_tools(tools.unwrap_or_default())?;
        detach(py, || self.inner.encode_chat_with_tools(&messages, &tools, add_generation_prompt))
    }

    #[pyo3(signature = (text, add_special = true, parse_special = true))]
    fn encode(&self, py: Python<'_>, text: String, add_special: bool, parse_special: bool) -> PyResult<Vec<u32>> {
        detach(py, || self.inner.encode(&text, add_special, parse_special))
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        detach(py, || self.inner.decode(&ids, skip_special_tokens))
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("running_sequences", s.running_sequences)?;
        d.set_item("waiting_sequences", s.waiting_sequences)?;
        d.set_item("kv_blocks_total", s.kv_blocks_total)?;
        d.set_item("kv_blocks_free", s.kv_blocks_free)?;
        d.set_item("kv_usage", s.kv_usage())?;
        d.set_item("steps", s.steps)?;
        d.set_item("preemptions", s.preemptions)?;
        d.set_item("computed_tokens", s.computed_tokens)?;
        d.set_item("generated_tokens", s.generated_tokens)?;
        d.set_item("cached_prompt_tokens", s.cached_prompt_tokens)?;
        d.set_item("finished_requests", s.finished_requests)?;
        Ok(d)
    }

    /// Where the model computes: `cpu(<isa>)` or `opencl:N(<device name>)`.
    #[getter]
    fn device(&self) -> String {
        self.inner.device_name().to_owned()
    }

    /// On an OpenCL device, what the load check found (bitwise or within how much of the
    /// CPU's logits); `None` on the CPU.
    #[getter]
    fn device_check(&self) -> Option<String> {
        self.inner.device_check().map(str::to_owned)
    }

    #[getter]
    fn alive(&self) -> bool {
        self.inner.is_alive()
    }

    /// Why the engine thread stopped (`None` while it runs).
    #[getter]
    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    #[getter]
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// How the prompt asks for tool calls: "hermes", "mistral" or "llama3_json" (the names
    /// `backends/toolcalls.py` knows); `None` without a chat template.
    #[getter]
    fn tool_format(&self) -> Option<&'static str> {
        self.inner.tool_format().map(|f| f.name())
    }
}

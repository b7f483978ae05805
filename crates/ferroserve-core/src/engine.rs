//! The chat engine: one thread owns the model, the KV cache, the scheduler and every
//! sequence's sampler and detokenizer. Callers reach it through typed commands (submit,
//! abort) and get results back as [`ChatEvent`]s on a [`Notifier`], one batch per step.
//!
//! Validation (parameters, token ids, context length) happens in [`ChatEngine::submit`] on
//! the caller's thread, so bad requests fail before anything is queued; after that a
//! request's first event is `Admitted` (or `Error` if the engine dies first).

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::{Error, ErrorKind, Result};
use crate::embed::DeviceChoice;
use crate::models::llama::{LlamaKv, LlamaModel, Numerics};
use crate::notify::Notifier;
use crate::sample::grammar::{CompiledGrammar, GrammarCompiler, GrammarState};
use crate::sample::{Sampled, SamplingParams, SequenceSampler};
use crate::sched::scheduler::{KvPool, Scheduler, SchedulerConfig, SeqChunk, SeqId, StepPlan};
use crate::sched::interactive::{BatchYield, InteractiveLoad, InteractiveRequest, BATCH_MAX_YIELD, YIELD_POLL};
use crate::sched::Priority;
use crate::tokenize::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError, ToolFormat, ToolSpec};
use crate::tokenize::detok::{Detokenizer, Vocab};
use crate::tokenize::gguf_vocab::{GgufTokenizer, GgufVocabError};

/// What the engine needs from a decoder model. Implemented by `LlamaModel` and by the fake
/// models of the tests.
pub trait StepModel: Send + Sync + 'static {
    type Kv: KvPool + Send + 'static;
    /// Width of a logits row.
    fn vocab_size(&self) -> usize;
    /// Longest sequence (prompt plus output) the model takes.
    fn context_length(&self) -> usize;
    /// Fails when the cache's memory cannot be had (device memory).
    fn new_kv_cache(&self, budget_bytes: usize) -> Result<Self::Kv>;
    /// Runs one pass; returns `[chunks with want_logits, vocab_size]` logits, in batch order.
    fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut Self::Kv) -> Vec<f32>;
    fn vocab(&self) -> &dyn Vocab;
    /// For the text helpers (`encode`, `render_chat`, ...); `None` in tests.
    fn tokenizer(&self) -> Option<&GgufTokenizer> {
        None
    }
    fn chat_template(&self) -> Option<&ChatTemplate> {
        None
    }
    /// Where the model computes, e.g. `cpu(avx512)` or `opencl:0(<device>)`.
    fn device_name(&self) -> String {
        "cpu".into()
    }
    /// What the device's load check found, for the start-up log (`None` on the CPU).
    fn device_check(&self) -> Option<String> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Memory for the KV cache; bounds how many tokens all running sequences hold together.
    pub kv_budget_bytes: usize,
    /// Tokens per forward pass (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Tokens per forward pass when interactive prompts arrive together (see
    /// [`SchedulerConfig::burst_batch_tokens`]).
    pub burst_batch_tokens: usize,
    /// Sequences decoding at once (capped at `max_batch_tokens`).
    pub max_running: usize,
    /// The matmuls' arithmetic (llama.cpp's exact order by default).
    pub numerics: Numerics,
    /// Where the model computes: the CPU, or an OpenCL device (exact numerics only).
    pub device: DeviceChoice,
    /// The interactive requests in flight on this server's engines: steps of batch
    /// sequences alone wait while there are any. A server shares
    /// [`InteractiveLoad::server`] between its engines.
    pub interactive: Arc<InteractiveLoad>,
    /// The longest such steps wait in a row before one runs anyway.
    pub batch_max_yield: Duration,
    /// How long an idle engine waits, after an interactive request arrives, for the next
    /// one before starting its first step; every arrival restarts the wait (at most
    /// [`BURST_GATHER_MAX_GAPS`] times), and it ends early once the waiting prompts fill a
    /// step. A burst of requests reaches the engine one by one (each parsed and tokenized on
    /// the event loop in turn); without the wait the first step holds only the first of them
    /// and the rest queue behind it. Costs a lone request at most this much TTFT. Zero turns
    /// it off. Default [`DEFAULT_BURST_GATHER`], or `FERROSERVE_BURST_GATHER_US`
    /// ([`BURST_GATHER_ENV`]) in microseconds.
    pub burst_gather: Duration,
}

/// See [`EngineConfig::burst_gather`].
pub const DEFAULT_BURST_GATHER: Duration = Duration::from_millis(2);
/// Environment override of [`EngineConfig::burst_gather`], in microseconds (A/B runs).
pub const BURST_GATHER_ENV: &str = "FERROSERVE_BURST_GATHER_US";
/// Arrivals one gathering wait may follow (bounds it at this many gaps).
pub const BURST_GATHER_MAX_GAPS: u32 = 16;

fn burst_gather_from_env() -> Duration {
    std::env::var(BURST_GATHER_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(DEFAULT_BURST_GATHER, Duration::from_micros)
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_budget_bytes: 256 << 20,
            max_batch_tokens: 512,
            burst_batch_tokens: 512, // off (see SchedulerConfig)
            max_running: 64,
            numerics: Numerics::Exact,
            device: DeviceChoice::Cpu,
            interactive: InteractiveLoad::new(),
            batch_max_yield: BATCH_MAX_YIELD,
            burst_gather: burst_gather_from_env(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// `abort` was called.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Tokens this choice generated (end-of-generation tokens included).
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token_id: u32,
    /// The token's raw bytes (possibly part of a UTF-8 character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely first; `top_logprobs` entries.
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// The request got its first KV blocks and began prefill.
    Admitted {
        request_id: u64,
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// New output of choice `index`. `text` may lag `token_ids` (held back for split
    /// characters and possible stop strings) and may be empty.
    Delta {
        request_id: u64,
        index: u32,
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` is over; a request is over when all its `n` choices are.
    Finished {
        request_id: u64,
        index: u32,
        finish_reason: FinishReason,
        usage: Usage,
    },
    /// The request failed as a whole (the engine died, or a grammar could not continue);
    /// no further events follow.
    Error {
        request_id: u64,
        kind: ErrorKind,
        message: String,
        /// The request parameter at fault, by its OpenAI name (as [`Error::param`]).
        param: Option<&'static str>,
    },
}

impl ChatEvent {
    pub fn request_id(&self) -> u64 {
        match self {
            ChatEvent::Admitted { request_id, .. }
            | ChatEvent::Delta { request_id, .. }
            | ChatEvent::Finished { request_id, .. }
            | ChatEvent::Error { request_id, .. } => *request_id,
        }
    }
}

/// When a request's output leaves the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// A `Delta` per choice on every step that produced output (for streams).
    #[default]
    PerStep,
    /// Each choice's whole output in one `Delta` right before its `Finished` (for answers
    /// sent whole): the consumer is not woken, and builds no event, per token. Between
    /// `Admitted` and the end the request produces no events.
    Whole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitInfo {
    pub prompt_tokens: usize,
    /// `max_tokens` as resolved (the rest of the context when the request gave none).
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running_sequences: usize,
    pub waiting_sequences: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    pub steps: u64,
    pub preemptions: u64,
    /// Tokens run through the model: prompts, decodes and recomputation after preemption.
    pub computed_tokens: u64,
    pub generated_tokens: u64,
    /// Prompt tokens served from the prefix cache at admission.
    pub cached_prompt_tokens: u64,
    pub finished_requests: u64,
}

impl EngineStats {
    /// Fraction of KV blocks in use, 0..=1.
    pub fn kv_usage(&self) -> f32 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            (self.kv_blocks_total - self.kv_blocks_free) as f32 / self.kv_blocks_total as f32
        }
    }
}

enum Command {
    Submit(Box<Submission>),
    Abort(u64),
}

struct Submission {
    request_id: u64,
    prompt: Vec<u32>,
    params: Arc<SamplingParams>,
    max_tokens: usize,
    seed: u64,
    grammar: Option<Arc<CompiledGrammar>>,
    priority: Priority,
    delivery: Delivery,
    /// An interactive request's place in the server's count, held until it ends.
    in_flight: Option<InteractiveRequest>,
}

/// State both sides touch; the engine thread owns everything else.
struct Shared {
    /// `None` once the engine thread died or the engine is dropped.
    commands: Mutex<Option<Sender<Command>>>,
    /// Requests submitted and not yet ended by their last event.
    in_flight: Mutex<HashSet<u64>>,
    notifier: Notifier<ChatEvent>,
    stats: Mutex<EngineStats>,
    alive: AtomicBool,
    /// Why the engine thread stopped (set once, with `alive` false).
    failure: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The object-safe part of a [`StepModel`] that the caller's side needs.
trait ModelInfo: Send + Sync {
    fn vocab(&self) -> &dyn Vocab;
    fn tokenizer(&self) -> Option<&GgufTokenizer>;
    fn chat_template(&self) -> Option<&ChatTemplate>;
}

impl<M: StepModel> ModelInfo for M {
    fn vocab(&self) -> &dyn Vocab {
        StepModel::vocab(self)
    }
    fn tokenizer(&self) -> Option<&GgufTokenizer> {
        StepModel::tokenizer(self)
    }
    fn chat_template(&self) -> Option<&ChatTemplate> {
        StepModel::chat_template(self)
    }
}

pub struct ChatEngine {
    shared: Arc<Shared>,
    model: Arc<dyn ModelInfo>,
    vocab_size: usize,
    /// The model's context, capped by what the KV cache can hold for one sequence.
    max_context_tokens: usize,
    device_name: String,
    device_check: Option<String>,
    /// Built on the first structured-output request (the token trie and its slices take
    /// a moment at a 49k vocabulary; engines that never see one never pay).
    grammars: OnceLock<std::result::Result<GrammarCompiler, String>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    interactive: Arc<InteractiveLoad>,
}

impl<B: ferroserve_kernels::Backend> StepModel for LlamaModel<B> {
    type Kv = LlamaKv<B>;
    fn vocab_size(&self) -> usize {
        LlamaModel::vocab_size(self)
    }
    fn context_length(&self) -> usize {
        LlamaModel::context_length(self)
    }
    fn new_kv_cache(&self, budget_bytes: usize) -> Result<LlamaKv<B>> {
        LlamaModel::new_kv_cache(self, budget_bytes)
    }
    fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut LlamaKv<B>) -> Vec<f32> {
        // A device that fails mid-step (lost, out of memory) ends the engine: the panic is
        // caught on the engine thread, which fails every request with this message.
        LlamaModel::forward(self, batch, kv)
    }
    fn vocab(&self) -> &dyn Vocab {
        &self.tokenizer
    }
    fn tokenizer(&self) -> Option<&GgufTokenizer> {
        Some(&self.tokenizer)
    }
    fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }
    fn device_name(&self) -> String {
        LlamaModel::device_name(self)
    }
    fn device_check(&self) -> Option<String> {
        self.load_check().map(|c| c.summary())
    }
}

impl ChatEngine {
    /// Loads a llama-family GGUF model and starts its engine thread.
    pub fn load(path: &std::path::Path, cfg: EngineConfig) -> Result<Self> {
        Self::load_with_template(path, cfg, None)
    }

    /// Like [`load`](Self::load), with a chat template replacing the GGUF's own (compiled
    /// now, so a broken override fails at start-up).
    pub fn load_with_template(path: &std::path::Path, cfg: EngineConfig, chat_template: Option<&str>) -> Result<Self> {
        if cfg.numerics != Numerics::Exact && !matches!(cfg.device, DeviceChoice::Cpu) {
            // Checked before the weights are read: the device kernels have one order.
            return Err(Error::invalid_request(crate::models::llama_opencl::EXACT_ONLY));
        }
        crate::sched::compute_priority::lower_compute_pool();
        // The override is compiled after the model loaded, so a broken one fails at start-up.
        let template = |model_template: &mut Option<ChatTemplate>| -> Result<()> {
            if let Some(source) = chat_template {
                let gguf = crate::weights::gguf::GgufFile::open(path).map_err(|e| Error::model_load(path, e))?;
                let template = ChatTemplate::from_gguf(&gguf, Some(source)).map_err(|e| Error::model_load(path, format!("chat template: {e}")))?;
                *model_template = Some(template);
            }
            Ok(())
        };
        match &cfg.device {
            DeviceChoice::Cpu => {
                let mut model = LlamaModel::load_with(path, cfg.numerics)?;
                template(&mut model.chat_template)?;
                Self::start(model, cfg)
            }
            DeviceChoice::OpenCl { index, kernels } => {
                let mut model = LlamaModel::load_opencl(path, *index, kernels)?;
                template(&mut model.chat_template)?;
                Self::start(model, cfg)
            }
        }
    }

    /// Starts the engine thread around a loaded model.
    pub fn start<M: StepModel>(model: M, cfg: EngineConfig) -> Result<Self> {
        if cfg.max_batch_tokens == 0 || cfg.max_running == 0 {
            return Err(Error::invalid_request(
                "max_batch_tokens and max_running must be at least 1",
            ));
        }
        let model = Arc::new(model);
        let kv = model.new_kv_cache(cfg.kv_budget_bytes)?;
        let (device_name, device_check) = (model.device_name(), model.device_check());
        let kv_tokens = kv.num_blocks() * kv.block_tokens();
        if kv_tokens == 0 {
            return Err(Error::invalid_request(format!(
                "kv_budget_bytes ({}) holds no KV block",
                cfg.kv_budget_bytes
            )));
        }
        let vocab_size = model.vocab_size();
        let max_context_tokens = model.context_length().min(kv_tokens);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            commands: Mutex::new(Some(tx)),
            in_flight: Mutex::new(HashSet::new()),
            notifier: Notifier::new().map_err(|e| Error::Internal(e.to_string()))?,
            stats: Mutex::new(EngineStats {
                kv_blocks_total: kv.num_blocks(),
                kv_blocks_free: kv.num_free_blocks(),
                ..Default::default()
            }),
            alive: AtomicBool::new(true),
            failure: Mutex::new(None),
        });
        let sched = Scheduler::new(SchedulerConfig {
            max_batch_tokens: cfg.max_batch_tokens,
            burst_batch_tokens: cfg.burst_batch_tokens,
            max_running: cfg.max_running,
        });
        let mut core = EngineCore {
            model: Arc::clone(&model),
            kv,
            sched,
            outputs: HashMap::new(),
            requests: HashMap::new(),
            shared: Arc::clone(&shared),
            events: Vec::new(),
            ended_requests: Vec::new(),
            stats: EngineStats::default(),
            test_panic_after_steps: test_panic_after_steps(),
            yielding: BatchYield::new(Arc::clone(&cfg.interactive), cfg.batch_max_yield),
            burst_gather: cfg.burst_gather,
        };
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ferroserve-chat".into())
            .spawn(move || {
                crate::sched::compute_priority::lower_this_thread();
                // One catch around the whole loop, not one per step: after a panic mid-step
                // the scheduler's queues, the block tables and the KV pool may disagree, so
                // the engine is not resumed. Every request in flight gets `EngineDead` (a 503
                // upstairs), later submits fail the same way, and `is_alive()` turns false for
                // `/health`. Restarting the process is the way back.
                let outcome = catch_unwind(AssertUnwindSafe(|| core.run(&rx)));
                if let Err(panic) = outcome {
                    fail_everything(&thread_shared, &rx, &panic_message(&*panic));
                }
            })
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Self {
            shared,
            model,
            vocab_size,
            max_context_tokens,
            device_name,
            device_check,
            grammars: OnceLock::new(),
            thread: Mutex::new(Some(thread)),
            interactive: cfg.interactive,
        })
    }

    /// Validates and queues an interactive request; returns at once. Output arrives as
    /// [`ChatEvent`]s.
    pub fn submit(
        &self,
        request_id: u64,
        prompt_tokens: Vec<u32>,
        params: SamplingParams,
    ) -> Result<SubmitInfo> {
        self.submit_with_priority(request_id, prompt_tokens, params, Priority::Interactive)
    }

    /// [`submit`](Self::submit) at a given priority: batch requests run only on what
    /// interactive ones leave of each step (see [`crate::sched::scheduler`]); their output
    /// is the same, only later.
    pub fn submit_with_priority(
        &self,
        request_id: u64,
        prompt_tokens: Vec<u32>,
        params: SamplingParams,
        priority: Priority,
    ) -> Result<SubmitInfo> {
        self.submit_with(request_id, prompt_tokens, params, priority, Delivery::PerStep)
    }

    /// [`submit_with_priority`](Self::submit_with_priority) with a choice of when the
    /// output is delivered (the same output either way).
    pub fn submit_with(
        &self,
        request_id: u64,
        prompt_tokens: Vec<u32>,
        params: SamplingParams,
        priority: Priority,
        delivery: Delivery,
    ) -> Result<SubmitInfo> {
        if prompt_tokens.is_empty() {
            return Err(Error::invalid(
                "prompt",
                "prompt must contain at least one token",
            ));
        }
        if let Some(bad) = prompt_tokens
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(Error::invalid("prompt", format!(
                "prompt has token id {bad}, outside the vocabulary (size {})",
                self.vocab_size
            )));
        }
        params.validate(self.vocab_size)?;
        let prompt_len = prompt_tokens.len();
        let ctx = self.max_context_tokens;
        let max_tokens = match params.max_tokens {
            Some(max_tokens) if prompt_len + max_tokens > ctx => {
                return Err(Error::context_length_exceeded(format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt_len} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                    prompt_len + max_tokens
                )));
            }
            Some(max_tokens) => max_tokens,
            None if prompt_len >= ctx => {
                return Err(Error::context_length_exceeded(format!(
                    "This model's maximum context length is {ctx} tokens. However, your messages resulted in {prompt_len} tokens, leaving none for the completion. Please reduce the length of the messages."
                )));
            }
            None => ctx - prompt_len,
        };
        let grammar = match (&params.json_schema, &params.lark_grammar) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "response_format",
                    "response_format cannot be combined with a tool-call grammar",
                ))
            }
            (Some(schema), None) => Some(self.grammar_compiler()?.compile(schema)?),
            (None, Some(lark)) => Some(self.grammar_compiler()?.compile_lark(lark)?),
            (None, None) => None,
        };
        let seed = params.seed.unwrap_or_else(|| fresh_seed(request_id));
        let submission = Submission {
            request_id,
            prompt: prompt_tokens,
            params: Arc::new(params),
            max_tokens,
            seed,
            grammar,
            priority,
            delivery,
            in_flight: (priority == Priority::Interactive).then(|| self.interactive.enter()),
        };

        let commands = lock(&self.shared.commands);
        let Some(tx) = commands.as_ref() else {
            return Err(Error::EngineDead);
        };
        if !lock(&self.shared.in_flight).insert(request_id) {
            return Err(Error::invalid_request(format!(
                "request_id {request_id} is already in flight"
            )));
        }
        if tx.send(Command::Submit(Box::new(submission))).is_err() {
            lock(&self.shared.in_flight).remove(&request_id);
            return Err(Error::EngineDead);
        }
        Ok(SubmitInfo {
            prompt_tokens: prompt_len,
            max_tokens,
        })
    }

    /// Ends a request at the next step (its choices finish with `Abort`, blocks are
    /// freed). Unknown or finished ids are ignored.
    pub fn abort(&self, request_id: u64) {
        if let Some(tx) = lock(&self.shared.commands).as_ref() {
            let _ = tx.send(Command::Abort(request_id));
        }
    }

    pub fn notifier(&self) -> &Notifier<ChatEvent> {
        &self.shared.notifier
    }

    /// False once the engine thread panicked (then every call fails with `EngineDead`).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Why the engine thread stopped (`None` while it runs).
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// As of the last step.
    pub fn stats(&self) -> EngineStats {
        lock(&self.shared.stats).clone()
    }

    /// Fraction of KV blocks in use, as of the last step.
    pub fn kv_usage(&self) -> f32 {
        lock(&self.shared.stats).kv_usage()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The longest prompt plus completion one request may have.
    pub fn context_length(&self) -> usize {
        self.max_context_tokens
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.model.vocab().eos_token_ids().to_vec()
    }

    pub fn has_chat_template(&self) -> bool {
        self.model.chat_template().is_some()
    }

    /// The format the rendered prompt asks tool calls in (`None` without a chat template).
    pub fn tool_format(&self) -> Option<ToolFormat> {
        self.model.chat_template().map(ChatTemplate::tool_format)
    }

    /// The conversation rendered with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`render_chat`](Self::render_chat) with the functions the model may call (see
    /// [`ChatTemplate::render_with_tools`]).
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .model
            .chat_template()
            .ok_or_else(|| template_error(ChatTemplateError::Missing))?;
        template
            .render_with_tools(messages, tools, add_generation_prompt)
            .map_err(template_error)
    }

    /// [`render_chat`](Self::render_chat), tokenized with control tokens parsed, plus BOS when
    /// the model asks for it and the template did not write it.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode_chat_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`encode_chat`](Self::encode_chat) with the functions the model may call.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_chat_with_tools(messages, tools, add_generation_prompt)?;
        let tokenizer = self.tokenizer()?;
        let mut ids = tokenizer.encode(&text, true).map_err(vocab_error)?;
        if let (true, Some(bos)) = (tokenizer.add_bos_token(), tokenizer.bos_token_id()) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Token ids of `text`: `add_special` adds the BOS/EOS the model asks for,
    /// `parse_special` turns control-token text (`<|im_start|>`) into those tokens.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let tokenizer = self.tokenizer()?;
        if add_special {
            tokenizer.encode_prompt(text, parse_special)
        } else {
            tokenizer.encode(text, parse_special)
        }
        .map_err(vocab_error)
    }

    /// Text of `ids`; control tokens are dropped with `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer()?
            .decode(ids, !skip_special_tokens)
            .map_err(vocab_error)
    }

    /// A token's raw bytes (for token-level views such as `/v1/tokenize` pieces).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.model.vocab().token_bytes(id).map(<[u8]>::to_vec)
    }

    /// Where the model computes (`cpu(<isa>)` or `opencl:N(<device>)`).
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// On an OpenCL device: how its logits compared with the CPU's at load.
    pub fn device_check(&self) -> Option<&str> {
        self.device_check.as_deref()
    }

    /// The structured-output compiler over this model's vocabulary, built on first use.
    pub fn grammar_compiler(&self) -> Result<&GrammarCompiler> {
        let built = self.grammars.get_or_init(|| {
            let model = Arc::clone(&self.model);
            let tokenize = self.model.tokenizer().is_some().then(|| {
                Box::new(move |text: &str| {
                    model
                        .tokenizer()
                        .and_then(|t| t.encode(text, false).ok())
                        .unwrap_or_default()
                }) as crate::sample::grammar::Tokenize
            });
            GrammarCompiler::new(self.model.vocab(), tokenize).map_err(|e| e.to_string())
        });
        built.as_ref().map_err(|e| Error::Internal(e.clone()))
    }

    fn tokenizer(&self) -> Result<&GgufTokenizer> {
        self.model
            .tokenizer()
            .ok_or_else(|| Error::Internal("this engine was started without a tokenizer".into()))
    }
}

impl Drop for ChatEngine {
    fn drop(&mut self) {
        // Dropping the sender ends the engine thread at its next step.
        lock(&self.shared.commands).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn template_error(e: ChatTemplateError) -> Error {
    match e {
        // The model, not the conversation, lacks something: no parameter to blame.
        ChatTemplateError::Missing => Error::invalid_request(e.to_string()),
        ChatTemplateError::Rejected(_) | ChatTemplateError::UnsupportedContentPart { .. } => {
            Error::invalid("messages", e.to_string())
        }
        other => Error::Internal(other.to_string()),
    }
}

fn vocab_error(e: GgufVocabError) -> Error {
    match e {
        // Only decoding looks ids up: `/detokenize`'s `tokens`.
        GgufVocabError::UnknownTokenId { .. } => Error::invalid("tokens", e.to_string()),
        other => Error::Internal(other.to_string()),
    }
}

/// A seed for requests that gave none: the standard library's per-process random keys,
/// mixed with the request id and the time.
fn fresh_seed(request_id: u64) -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((request_id, nanos))
}

/// Test-only fault injection: with this variable set to N when a chat engine starts, its
/// thread panics inside step N + 1 (with sequences scheduled), as a bug in a kernel or the
/// scheduler would. Read once per engine; inert unless set. The fault tests use it
/// (tests/gateway/test_engine_fault.py); never set it in production.
pub const TEST_PANIC_AFTER_STEPS_ENV: &str = "FERROSERVE_TEST_PANIC_AFTER_STEPS";

fn test_panic_after_steps() -> Option<u64> {
    std::env::var(TEST_PANIC_AFTER_STEPS_ENV).ok()?.trim().parse().ok()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the engine thread stopped: {what}")
}

/// After a panic: refuse new work, then fail every request that was in flight.
fn fail_everything(shared: &Shared, rx: &Receiver<Command>, message: &str) {
    *lock(&shared.failure) = Some(message.to_owned());
    shared.alive.store(false, Ordering::Release);
    // Under the commands lock, so every submit either saw `None` or is in `in_flight`.
    lock(&shared.commands).take();
    while rx.try_recv().is_ok() {}
    let ids: Vec<u64> = lock(&shared.in_flight).drain().collect();
    shared
        .notifier
        .push_all(ids.into_iter().map(|request_id| ChatEvent::Error {
            request_id,
            kind: ErrorKind::EngineDead,
            message: message.to_owned(),
            param: None,
        }));
}

struct RequestState {
    params: Arc<SamplingParams>,
    grammar: Option<Arc<CompiledGrammar>>,
    seed: u64,
    prompt_tokens: usize,
    cached_tokens: usize,
    max_tokens: usize,
    /// Choices not finished yet, by index.
    open: Vec<bool>,
    delivery: Delivery,
    /// Counts an interactive request out of the server's load when the request ends.
    _in_flight: Option<InteractiveRequest>,
}

struct SeqOutput {
    request_id: u64,
    index: u32,
    sampler: SequenceSampler,
    /// Structured output: this choice's own place in the grammar.
    grammar: Option<GrammarState>,
    detok: Detokenizer,
    generated: usize,
    /// `Delivery::Whole`: the output so far, sent with the choice's end.
    held: Option<HeldOutput>,
}

/// A choice's output kept in the engine until the choice ends (`Delivery::Whole`).
#[derive(Default)]
struct HeldOutput {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
}

impl HeldOutput {
    /// The one `Delta` of the whole output, if there is any.
    fn into_event(self, request_id: u64, index: u32) -> Option<ChatEvent> {
        let HeldOutput { text, token_ids, logprobs } = self;
        (!text.is_empty() || !token_ids.is_empty()).then_some(ChatEvent::Delta {
            request_id,
            index,
            text,
            token_ids,
            logprobs,
        })
    }
}

impl SeqOutput {
    fn new(request_id: u64, index: u32, req: &RequestState) -> Self {
        Self {
            request_id,
            index,
            sampler: SequenceSampler::new(Arc::clone(&req.params), req.seed, index as u64),
            grammar: req.grammar.as_ref().map(|g| g.start()),
            detok: Detokenizer::new(req.params.stop.clone()),
            generated: 0,
            held: (req.delivery == Delivery::Whole).then(HeldOutput::default),
        }
    }

    /// The next token: under a grammar, its mask applies to the row and the token is
    /// committed to it. `Err`: the grammar cannot go on (the request fails).
    fn sample(&mut self, logits: &[f32]) -> std::result::Result<Sampled, String> {
        let Some(grammar) = &mut self.grammar else {
            return Ok(self.sampler.sample(logits));
        };
        let mask = grammar.mask()?;
        let sampled = self.sampler.sample_masked(logits, Some(&mask));
        grammar.commit(sampled.token_id)?;
        Ok(sampled)
    }
}

/// Everything the engine thread owns.
struct EngineCore<M: StepModel> {
    model: Arc<M>,
    kv: M::Kv,
    sched: Scheduler,
    outputs: HashMap<SeqId, SeqOutput>,
    requests: HashMap<u64, RequestState>,
    shared: Arc<Shared>,
    /// This step's events, pushed to the notifier together.
    events: Vec<ChatEvent>,
    /// Requests whose last event is among `events`.
    ended_requests: Vec<u64>,
    stats: EngineStats,
    /// Test-only: see [`TEST_PANIC_AFTER_STEPS_ENV`].
    test_panic_after_steps: Option<u64>,
    /// When steps of batch sequences alone give way to interactive work on other engines.
    yielding: BatchYield,
    /// See [`EngineConfig::burst_gather`].
    burst_gather: Duration,
}

impl<M: StepModel> EngineCore<M> {
    fn run(&mut self, rx: &Receiver<Command>) {
        loop {
            if !self.sched.has_work() {
                match rx.recv() {
                    Ok(cmd) => self.apply(cmd),
                    Err(_) => return,
                }
                if !self.gather_burst(rx) {
                    return;
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.apply(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if self.sched.has_work() {
                if self.batch_only() && !self.yielding.may_run(Instant::now()) {
                    // Interactive work runs on another engine: wait for it to end, or for
                    // a command (an interactive request of our own runs at once).
                    match rx.recv_timeout(YIELD_POLL) {
                        Ok(cmd) => self.apply(cmd),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                } else {
                    self.step();
                }
            }
            self.publish();
        }
    }

    /// Right after an idle engine got work: while interactive prompts are waiting and do not
    /// fill a step, waits up to `burst_gather` for each next command (see
    /// [`EngineConfig::burst_gather`]). Returns false when the channel closed.
    fn gather_burst(&mut self, rx: &Receiver<Command>) -> bool {
        if self.burst_gather.is_zero() {
            return true;
        }
        let cfg = self.sched.config();
        let step_tokens = cfg.max_batch_tokens.max(cfg.burst_batch_tokens);
        for _ in 0..BURST_GATHER_MAX_GAPS {
            let waiting = self.sched.waiting_tokens_of(Priority::Interactive);
            if waiting == 0 || waiting >= step_tokens {
                break;
            }
            match rx.recv_timeout(self.burst_gather) {
                Ok(cmd) => self.apply(cmd),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        true
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(s) => {
                let n = s.params.n;
                let req = RequestState {
                    params: s.params,
                    grammar: s.grammar,
                    seed: s.seed,
                    prompt_tokens: s.prompt.len(),
                    cached_tokens: 0,
                    max_tokens: s.max_tokens,
                    open: vec![true; n],
                    delivery: s.delivery,
                    _in_flight: s.in_flight,
                };
                let seq = self.sched.add_request(s.request_id, s.prompt, n, s.priority);
                self.outputs
                    .insert(seq, SeqOutput::new(s.request_id, 0, &req));
                self.requests.insert(s.request_id, req);
            }
            Command::Abort(request_id) => {
                let mut generated = HashMap::new();
                let mut held = HashMap::new();
                for seq in self.sched.abort(request_id, &mut self.kv) {
                    if let Some(out) = self.outputs.remove(&seq) {
                        generated.insert(out.index, out.generated);
                        held.extend(out.held.map(|h| (out.index, h)));
                    }
                }
                let open: Vec<u32> = match self.requests.get(&request_id) {
                    Some(req) => (0..req.open.len() as u32)
                        .filter(|&i| req.open[i as usize])
                        .collect(),
                    None => Vec::new(),
                };
                for index in open {
                    let completion_tokens = generated.get(&index).copied().unwrap_or(0);
                    let delta = held.remove(&index).and_then(|h| h.into_event(request_id, index));
                    self.events.extend(delta);
                    self.finish_choice(request_id, index, FinishReason::Abort, completion_tokens);
                }
            }
        }
    }

    /// Whether the next step would run batch sequences only.
    fn batch_only(&self) -> bool {
        self.sched.num_running_of(Priority::Interactive) == 0 && self.sched.num_waiting_of(Priority::Interactive) == 0
    }

    fn step(&mut self) {
        let plan = self.sched.schedule(&mut self.kv);
        for &(seq, cached_tokens) in &plan.first_admissions {
            let request_id = self.outputs[&seq].request_id;
            let req = self
                .requests
                .get_mut(&request_id)
                .expect("admitted requests are known");
            req.cached_tokens = cached_tokens;
            self.stats.cached_prompt_tokens += cached_tokens as u64;
            self.events.push(ChatEvent::Admitted {
                request_id,
                prompt_tokens: req.prompt_tokens,
                cached_tokens,
            });
        }
        if plan.chunks.is_empty() {
            return;
        }
        if let Some(n) = self.test_panic_after_steps.filter(|&n| self.stats.steps >= n) {
            panic!("test-only panic after {n} engine steps ({TEST_PANIC_AFTER_STEPS_ENV})");
        }
        let mut sampled = Vec::with_capacity(plan.chunks.len());
        for (seq, outcome) in self.run_model(&plan) {
            match outcome {
                Ok(s) => sampled.push((seq, s)),
                Err(message) => {
                    if let Some(request_id) = self.outputs.get(&seq).map(|o| o.request_id) {
                        self.fail_request(request_id, message);
                    }
                }
            }
        }
        // A failed request's other choices drew tokens too: they are gone with it.
        sampled.retain(|(seq, _)| self.outputs.contains_key(seq));
        let sampled_ids: Vec<(SeqId, u32)> =
            sampled.iter().map(|(seq, s)| (*seq, s.token_id)).collect();
        for forked in self.sched.update(&plan, &sampled_ids, &mut self.kv) {
            let req = &self.requests[&forked.request_id];
            self.outputs.insert(
                forked.seq,
                SeqOutput::new(forked.request_id, forked.index, req),
            );
        }
        self.stats.steps += 1;
        self.stats.computed_tokens += plan.num_tokens() as u64;
        self.stats.generated_tokens += sampled.len() as u64;
        for (seq, s) in sampled {
            self.emit_token(seq, s);
        }
    }

    /// One forward pass, then a token for every chunk that produced logits.
    fn run_model(&mut self, plan: &StepPlan) -> Vec<(SeqId, std::result::Result<Sampled, String>)> {
        let logits = {
            let batch = self.sched.batch(plan);
            self.model.forward(&batch, &mut self.kv)
        };
        let vocab = self.model.vocab_size();
        let rows: HashMap<SeqId, (usize, &[f32])> = plan
            .chunks
            .iter()
            .filter(|c| c.want_logits)
            .zip(logits.chunks_exact(vocab))
            .enumerate()
            .map(|(order, (c, row))| (c.seq, (order, row)))
            .collect();
        assert_eq!(
            logits.len(),
            rows.len() * vocab,
            "forward returned {} logits for {} rows of {vocab}",
            logits.len(),
            rows.len()
        );
        // Sequences sample independently (each from its own counter-based generator and its
        // own grammar state, masks included), so they run in parallel and the result does
        // not depend on which thread took which, nor on the rest of the batch.
        let mut work: Vec<(usize, SeqId, &mut SeqOutput, &[f32])> = self
            .outputs
            .iter_mut()
            .filter_map(|(&seq, out)| rows.get(&seq).map(|&(order, row)| (order, seq, out, row)))
            .collect();
        work.sort_unstable_by_key(|w| w.0);
        work.par_iter_mut()
            .map(|(_, seq, out, row)| (*seq, out.sample(row)))
            .collect()
    }

    /// Detokenizes a sampled token and decides whether its choice is over.
    fn emit_token(&mut self, seq: SeqId, sampled: Sampled) {
        let vocab = self.model.vocab();
        let out = self
            .outputs
            .get_mut(&seq)
            .expect("sampled sequences have outputs");
        let req = &self.requests[&out.request_id];
        let token = sampled.token_id;
        out.generated += 1;
        // Under a grammar, end-of-generation is allowed only once the document is complete,
        // and then it ends the choice even with `ignore_eos`.
        let is_eos = (out.grammar.is_some() || !req.params.ignore_eos)
            && vocab.eos_token_ids().contains(&token);
        let (mut text, mut finish) = (String::new(), None);
        if is_eos {
            text.push_str(&out.detok.finish());
            finish = Some(FinishReason::Stop);
        } else {
            let delta = out.detok.push(vocab.output_bytes(token));
            text.push_str(&delta.text);
            if delta.stopped_by.is_some() {
                finish = Some(FinishReason::Stop);
            } else if out.generated >= req.max_tokens {
                text.push_str(&out.detok.finish());
                finish = Some(FinishReason::Length);
            }
        }
        // The end-of-generation token itself is not output (it still counts as generated).
        let emit_token = !is_eos;
        if emit_token || !text.is_empty() {
            let bytes = |id: u32| vocab.token_bytes(id).unwrap_or_default().to_vec();
            let logprobs = match (&sampled.logprobs, emit_token) {
                (Some(lp), true) => vec![TokenLogprob {
                    token_id: token,
                    bytes: bytes(token),
                    logprob: lp.logprob,
                    top: lp
                        .top
                        .iter()
                        .map(|&(token_id, logprob)| TopLogprob {
                            token_id,
                            bytes: bytes(token_id),
                            logprob,
                        })
                        .collect(),
                }],
                _ => Vec::new(),
            };
            let token_ids = if emit_token { vec![token] } else { Vec::new() };
            if let Some(held) = &mut out.held {
                held.text.push_str(&text);
                held.token_ids.extend(token_ids);
                held.logprobs.extend(logprobs);
            } else {
                self.events.push(ChatEvent::Delta {
                    request_id: out.request_id,
                    index: out.index,
                    text,
                    token_ids,
                    logprobs,
                });
            }
        }
        if let Some(reason) = finish {
            let (request_id, index, generated) = (out.request_id, out.index, out.generated);
            self.sched.finish(seq, &mut self.kv);
            let held = self.outputs.remove(&seq).and_then(|o| o.held);
            if let Some(delta) = held.and_then(|h| h.into_event(request_id, index)) {
                self.events.push(delta);
            }
            self.finish_choice(request_id, index, reason, generated);
        }
    }

    /// Ends a whole request with an `Error` event: its sequences and blocks are dropped.
    fn fail_request(&mut self, request_id: u64, message: String) {
        for seq in self.sched.abort(request_id, &mut self.kv) {
            self.outputs.remove(&seq);
        }
        if self.requests.remove(&request_id).is_some() {
            self.ended_requests.push(request_id);
            self.stats.finished_requests += 1;
            self.events.push(ChatEvent::Error {
                request_id,
                kind: ErrorKind::Internal,
                message: format!("structured output: {message}"),
                param: None,
            });
        }
    }

    /// Emits `Finished` for one choice; the request ends with its last choice.
    fn finish_choice(
        &mut self,
        request_id: u64,
        index: u32,
        reason: FinishReason,
        completion_tokens: usize,
    ) {
        let Some(req) = self.requests.get_mut(&request_id) else {
            return;
        };
        if !std::mem::replace(&mut req.open[index as usize], false) {
            return;
        }
        let usage = Usage {
            prompt_tokens: req.prompt_tokens,
            completion_tokens,
            cached_tokens: req.cached_tokens,
        };
        if req.open.iter().all(|&o| !o) {
            self.requests.remove(&request_id);
            self.ended_requests.push(request_id);
            self.stats.finished_requests += 1;
        }
        self.events.push(ChatEvent::Finished {
            request_id,
            index,
            finish_reason: reason,
            usage,
        });
    }

    /// Refreshes the shared stats, then pushes this step's events (so a consumer that sees
    /// an event also sees the stats after it).
    fn publish(&mut self) {
        *lock(&self.shared.stats) = EngineStats {
            running_sequences: self.sched.num_running(),
            waiting_sequences: self.sched.num_waiting(),
            kv_blocks_total: self.kv.num_blocks(),
            kv_blocks_free: self.kv.num_free_blocks(),
            preemptions: self.sched.num_preemptions(),
            ..self.stats.clone()
        };
        if !self.events.is_empty() {
            self.shared.notifier.push_all(self.events.drain(..));
        }
        // Only now: should the thread die before this point, these requests are still in
        // flight and get their `EngineDead` error instead of waiting forever.
        if !self.ended_requests.is_empty() {
            let mut in_flight = lock(&self.shared.in_flight);
            for id in self.ended_requests.drain(..) {
                in_flight.remove(&id);
            }
        }
    }
}

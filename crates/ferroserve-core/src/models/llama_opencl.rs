//! The llama decoder on an OpenCL device: weights, KV cache and activations resident on the
//! device, one in-order queue, no host round trip inside a step.
//!
//! Why a runner of its own (the encoder's moved onto `ferroserve_kernels::Backend`, the
//! decoder's ops are next): the `Device` trait takes host slices, so the
//! ≈ 16 ops of each of the 30 layers would each copy the activations over and back. Here the
//! weights are uploaded once, in their packed GGUF blocks; a step uploads only its index
//! buffers (tokens, positions, KV slots, block tables, the rows that want logits), enqueues
//! every kernel back to back and reads back only the logits.
//!
//! The kernels reproduce the CPU's exact numerics (`Numerics::Exact`, llama.cpp's order) bit
//! for bit on a device with correctly rounded division and sqrt and with denormals
//! (kernels/README.md), so greedy decoding gives the CPU device's tokens; the sequence of
//! operations below is `LlamaModel::forward_in_pool`'s, op for op. The block bookkeeping
//! (pool, prefix cache, block tables) stays on the host in a storage-less [`KvCache`]; only
//! the K and V blocks live on the device.
//!
//! The host `LlamaModel` is kept: it owns the tokenizer and chat template, its memory map is
//! where the weights were uploaded from, and at load it computes the reference logits that
//! the device must reproduce before the model is served ([`OpenClLlama::load`]).

use std::sync::Mutex;

use ferroserve_kernels::cpu::llama_ops;
use ferroserve_kernels::opencl::ops::{AttentionTables, LlamaKernels, Q8Buffers, QuantWeights};
use ferroserve_kernels::opencl::{DeviceBuffer, KernelSource, OpenClDevice, OpenClError};
use ferroserve_kernels::quant::QuantType;

use crate::error::{Error, Result};
use crate::kv::{KvCache, KvCacheConfig};
use crate::models::llama::{LlamaModel, MatrixView, Numerics, DEFAULT_BLOCK_TOKENS};
use crate::sched::SeqChunk;

type ClResult<T> = std::result::Result<T, OpenClError>;

fn cl_err(e: OpenClError) -> Error {
    Error::Device(e.to_string())
}

struct ClMatrix {
    buf: DeviceBuffer<u8>,
    format: QuantWeights,
    rows: usize,
    cols: usize,
}

struct ClLayer {
    attn_norm: DeviceBuffer<f32>,
    ffn_norm: DeviceBuffer<f32>,
    wq: ClMatrix,
    wk: ClMatrix,
    wv: ClMatrix,
    wo: ClMatrix,
    w_gate: ClMatrix,
    w_up: ClMatrix,
    w_down: ClMatrix,
}

/// Per-step buffers, grown (to powers of two) for the largest step seen, never shrunk.
struct Scratch {
    rows: usize,
    seqs: usize,
    table_len: usize,
    logit_rows: usize,
    tokens: DeviceBuffer<u32>,
    positions: DeviceBuffer<u32>,
    slots: DeviceBuffer<u32>,
    row_seq: DeviceBuffer<u32>,
    block_tables: DeviceBuffer<u32>,
    wanted: DeviceBuffer<u32>,
    x: DeviceBuffer<f32>,
    h: DeviceBuffer<f32>,
    q: DeviceBuffer<f32>,
    k: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    proj: DeviceBuffer<f32>,
    gate: DeviceBuffer<f32>,
    up: DeviceBuffer<f32>,
    acts: Q8Buffers,
    last: DeviceBuffer<f32>,
    normed: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
}

/// What one step needs room for.
#[derive(Clone, Copy)]
struct StepSize {
    rows: usize,
    seqs: usize,
    table_len: usize,
    logit_rows: usize,
}

struct Dims {
    dim: usize,
    ffn: usize,
    q_width: usize,
    kv_width: usize,
    vocab: usize,
}

impl Scratch {
    fn new(dev: &OpenClDevice, d: &Dims, s: StepSize) -> ClResult<Self> {
        let (rows, n) = (s.rows, s.logit_rows);
        let widest = d.dim.max(d.q_width).max(d.ffn);
        Ok(Self {
            rows,
            seqs: s.seqs,
            table_len: s.table_len,
            logit_rows: n,
            tokens: dev.alloc(rows)?,
            positions: dev.alloc(rows)?,
            slots: dev.alloc(rows)?,
            row_seq: dev.alloc(rows)?,
            block_tables: dev.alloc(s.seqs * s.table_len)?,
            wanted: dev.alloc(n)?,
            x: dev.alloc(rows * d.dim)?,
            h: dev.alloc(rows * d.dim)?,
            q: dev.alloc(rows * d.q_width)?,
            k: dev.alloc(rows * d.kv_width)?,
            v: dev.alloc(rows * d.kv_width)?,
            attn: dev.alloc(rows * d.q_width)?,
            proj: dev.alloc(rows * d.dim)?,
            gate: dev.alloc(rows * d.ffn)?,
            up: dev.alloc(rows * d.ffn)?,
            acts: Q8Buffers::new(dev, rows, widest)?,
            last: dev.alloc(n * d.dim)?,
            normed: dev.alloc(n * d.dim)?,
            logits: dev.alloc(n * d.vocab)?,
        })
    }

    fn fits(&self, s: StepSize) -> bool {
        self.rows >= s.rows && self.seqs >= s.seqs && self.table_len >= s.table_len && self.logit_rows >= s.logit_rows
    }
}

/// Everything on the device. Behind a mutex in [`OpenClLlama`]: OpenCL kernel objects hold
/// their arguments, so two threads must never launch one at once (the engine runs one step
/// at a time anyway).
struct DeviceState {
    dev: OpenClDevice,
    kernels: LlamaKernels,
    layers: Vec<ClLayer>,
    token_embd: DeviceBuffer<u8>,
    output: ClMatrix,
    output_norm: DeviceBuffer<f32>,
    /// `[context_length][rope_dims]` = `[cos, sin]` pairs per position, from the CPU's
    /// `rope_cos_sin` (libm), uploaded once.
    cos_sin: DeviceBuffer<f32>,
    scratch: Option<Scratch>,
}

/// The KV cache of an [`OpenClLlama`]: block bookkeeping on the host, K and V per layer in
/// device memory (f16, `crate::kv::PagedKvLayout`).
pub struct OpenClKv {
    blocks: KvCache,
    k: Vec<DeviceBuffer<u16>>,
    v: Vec<DeviceBuffer<u16>>,
}

impl OpenClKv {
    pub fn blocks(&self) -> &KvCache {
        &self.blocks
    }
    pub fn blocks_mut(&mut self) -> &mut KvCache {
        &mut self.blocks
    }
}

pub struct OpenClLlama {
    host: LlamaModel,
    device_name: String,
    state: Mutex<DeviceState>,
    /// The load check's outcome.
    check: ProbeReport,
}

impl std::fmt::Debug for OpenClLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClLlama").field("device", &self.device_name).field("host", &self.host).finish()
    }
}

/// Why a model with fast numerics cannot go to an OpenCL device.
pub const EXACT_ONLY: &str = "numerics: OpenCL devices compute llama.cpp's exact order only; use exact numerics or the CPU";

/// How far the device's logits may be from the CPU's at the load check, relative to the
/// largest CPU logit. A device with exact rounding matches bit for bit; one that flushes
/// denormals or rounds division loosely drifts by far less than this, while a kernel that
/// miscompiles is off by whole logits.
const PROBE_TOLERANCE: f32 = 2e-2;

/// The result of the load check: how the device's logits compare with the CPU's.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReport {
    pub bitwise: bool,
    pub max_abs_diff: f32,
}

fn quant_format(m: &MatrixView<'_>) -> ClResult<QuantWeights> {
    match m.wtype {
        QuantType::Q4_1 => Ok(QuantWeights::Q4_1),
        QuantType::Q8_0 => Ok(QuantWeights::Q8_0),
        other => Err(OpenClError::Unsupported(format!(
            "tensor {} is {}: the OpenCL matmul kernels read Q4_1 and Q8_0 weights",
            m.name,
            other.name()
        ))),
    }
}

impl OpenClLlama {
    /// Uploads `host`'s weights to OpenCL device `device_index`, builds the kernels (from the
    /// embedded sources or `kernels`' binaries), and checks the device: a two-sequence
    /// prefill and a decode step must give the CPU's logits (within [`PROBE_TOLERANCE`];
    /// bitwise on a device with IEEE division and denormals), or the load fails.
    pub fn load(host: LlamaModel, device_index: usize, kernels: &KernelSource) -> Result<Self> {
        if host.numerics() != Numerics::Exact {
            return Err(Error::invalid_request(EXACT_ONLY));
        }
        let state = Self::upload(&host, device_index, kernels).map_err(cl_err)?;
        let device_name = state.dev.name();
        let mut model = Self { host, device_name, state: Mutex::new(state), check: ProbeReport { bitwise: false, max_abs_diff: f32::NAN } };
        model.check = model.probe()?;
        Ok(model)
    }

    fn upload(host: &LlamaModel, device_index: usize, kernels: &KernelSource) -> ClResult<DeviceState> {
        let hp = &host.hparams;
        let dev = OpenClDevice::open(device_index)?;
        let kernels = LlamaKernels::build(&dev, hp.head_dim, kernels)?;
        let matrix = |m: MatrixView<'_>| -> ClResult<ClMatrix> {
            let format = quant_format(&m)?;
            Ok(ClMatrix { buf: dev.upload(m.bytes)?, format, rows: m.rows, cols: m.cols })
        };
        let mut layers = Vec::with_capacity(hp.block_count);
        for l in host.layer_views() {
            layers.push(ClLayer {
                attn_norm: dev.upload(l.attn_norm)?,
                ffn_norm: dev.upload(l.ffn_norm)?,
                wq: matrix(l.wq)?,
                wk: matrix(l.wk)?,
                wv: matrix(l.wv)?,
                wo: matrix(l.wo)?,
                w_gate: matrix(l.w_gate)?,
                w_up: matrix(l.w_up)?,
                w_down: matrix(l.w_down)?,
            });
        }
        let embd = host.token_embd_view();
        if embd.wtype != QuantType::Q8_0 {
            return Err(OpenClError::Unsupported(format!(
                "token_embd is {}: the OpenCL embedding lookup reads Q8_0 tables",
                embd.wtype.name()
            )));
        }
        let token_embd = dev.upload(embd.bytes)?;
        let output = matrix(host.output_view())?;
        let output_norm = dev.upload(host.output_norm())?;
        let rope = host.rope();
        let mut table = vec![0f32; hp.context_length.max(1) * rope.dims];
        if rope.dims > 0 {
            for (p, cs) in table.chunks_exact_mut(rope.dims).enumerate() {
                llama_ops::rope_cos_sin(p, rope, cs);
            }
        }
        let cos_sin = dev.upload(&table)?;
        Ok(DeviceState { dev, kernels, layers, token_embd, output, output_norm, cos_sin, scratch: None })
    }

    pub fn host(&self) -> &LlamaModel {
        &self.host
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// How the device's logits compared with the CPU's at load.
    pub fn check(&self) -> ProbeReport {
        self.check
    }

    /// The load check in words, for the start-up log.
    pub fn check_summary(&self) -> String {
        if self.check.bitwise {
            "logits equal the CPU's bit for bit".into()
        } else {
            format!("logits within {} of the CPU's, not bitwise (greedy ties may differ)", self.check.max_abs_diff)
        }
    }

    /// A KV cache of [`DEFAULT_BLOCK_TOKENS`]-token blocks filling `budget_bytes` of device
    /// memory.
    pub fn new_kv_cache(&self, budget_bytes: usize) -> Result<OpenClKv> {
        let hp = &self.host.hparams;
        self.new_kv_cache_with(KvCacheConfig::for_budget(budget_bytes, DEFAULT_BLOCK_TOKENS, hp.block_count, hp.head_count_kv, hp.head_dim))
    }

    /// A KV cache of exactly `cfg`'s blocks in device memory.
    pub fn new_kv_cache_with(&self, cfg: KvCacheConfig) -> Result<OpenClKv> {
        self.kv_with(cfg).map_err(cl_err)
    }

    fn kv_with(&self, cfg: KvCacheConfig) -> ClResult<OpenClKv> {
        let hp = &self.host.hparams;
        let blocks = KvCache::without_storage(cfg, hp.block_count, hp.head_count_kv, hp.head_dim);
        let elems = cfg.num_blocks * blocks.layout().block_elems();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut k = Vec::with_capacity(hp.block_count);
        let mut v = Vec::with_capacity(hp.block_count);
        for _ in 0..hp.block_count {
            k.push(state.dev.alloc(elems)?);
            v.push(state.dev.alloc(elems)?);
        }
        Ok(OpenClKv { blocks, k, v })
    }

    /// One step, with `LlamaModel::forward`'s contract (same batch checks and panics, same
    /// logits layout). A device failure mid-step is reported as an error.
    pub fn try_forward(&self, batch: &[SeqChunk<'_>], kv: &mut OpenClKv) -> Result<Vec<f32>> {
        self.check_batch(batch, &kv.blocks);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.forward_on(&mut state, batch, kv).map_err(cl_err)
    }

    fn check_batch(&self, batch: &[SeqChunk<'_>], blocks: &KvCache) {
        self.host.check_chunks(batch, blocks.block_tokens(), blocks.num_blocks());
        // The RoPE table covers the model's context and no further.
        let context = self.host.hparams.context_length;
        if let Some((i, c)) = batch.iter().enumerate().find(|(_, c)| c.start_pos + c.tokens.len() > context) {
            panic!("chunk {i}: position {} is past the context ({context})", c.start_pos + c.tokens.len());
        }
    }

    fn forward_on(&self, state: &mut DeviceState, batch: &[SeqChunk<'_>], kv: &mut OpenClKv) -> ClResult<Vec<f32>> {
        let hp = &self.host.hparams;
        let d = Dims {
            dim: hp.embedding_length,
            ffn: hp.feed_forward_length,
            q_width: hp.head_count * hp.head_dim,
            kv_width: hp.head_count_kv * hp.head_dim,
            vocab: hp.vocab_size,
        };
        let (heads, kv_heads, eps) = (hp.head_count, hp.head_count_kv, hp.rms_norm_eps);
        let bt = kv.blocks.block_tokens();

        // The step's index buffers, built on the host: chunk after chunk, as on the CPU.
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut row_seq = Vec::new();
        let mut wanted = Vec::new();
        let table_len = batch.iter().map(|c| (c.start_pos + c.tokens.len()).div_ceil(bt)).max().unwrap_or(0).max(1);
        let mut tables = vec![0u32; batch.len() * table_len];
        for (s, c) in batch.iter().enumerate() {
            let used = (c.start_pos + c.tokens.len()).div_ceil(bt);
            tables[s * table_len..s * table_len + used].copy_from_slice(&c.block_table[..used]);
            for (i, &t) in c.tokens.iter().enumerate() {
                let p = c.start_pos + i;
                tokens.push(t);
                positions.push(p as u32);
                slots.push(c.block_table[p / bt] * bt as u32 + (p % bt) as u32);
                row_seq.push(s as u32);
            }
            if c.want_logits {
                wanted.push(tokens.len() as u32 - 1);
            }
        }
        let rows = tokens.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let n = wanted.len();
        let size = StepSize { rows, seqs: batch.len(), table_len, logit_rows: n };
        if !state.scratch.as_ref().is_some_and(|sc| sc.fits(size)) {
            let old = state.scratch.as_ref().map_or(StepSize { rows: 0, seqs: 0, table_len: 0, logit_rows: 0 }, |sc| StepSize {
                rows: sc.rows,
                seqs: sc.seqs,
                table_len: sc.table_len,
                logit_rows: sc.logit_rows,
            });
            let grown = StepSize {
                rows: rows.max(old.rows).next_power_of_two(),
                seqs: size.seqs.max(old.seqs).next_power_of_two(),
                table_len: table_len.max(old.table_len).next_power_of_two(),
                logit_rows: n.max(old.logit_rows).max(1).next_power_of_two(),
            };
            state.scratch = None; // free the old buffers before allocating larger ones
            state.scratch = Some(Scratch::new(&state.dev, &d, grown)?);
        }
        let DeviceState { dev, kernels: kn, layers, token_embd, output, output_norm, cos_sin, scratch } = state;
        let sc = scratch.as_mut().expect("scratch allocated above");
        // Blocking writes: they also wait for the previous step's commands.
        dev.write(&mut sc.tokens, &tokens)?;
        dev.write(&mut sc.positions, &positions)?;
        dev.write(&mut sc.slots, &slots)?;
        dev.write(&mut sc.row_seq, &row_seq)?;
        dev.write(&mut sc.block_tables, &tables)?;
        dev.write(&mut sc.wanted, &wanted)?;
        let attention = AttentionTables {
            block_tables: &sc.block_tables,
            row_seq: &sc.row_seq,
            row_pos: &sc.positions,
            rows,
            heads,
            kv_heads,
            block_tokens: bt,
            max_blocks: table_len,
        };
        // Decode steps (one token per sequence) have few (row, head) pairs: on a GPU the decode
        // kernel gives each pair a work-group. Not on a CPU device, where the group's work-items
        // each repeat the softmax of every key (≈ 7× slower on PoCL than one work-item per pair:
        // bench/NOTES.md); both kernels give the same bits.
        let decode = !dev.info.is_cpu && batch.iter().all(|c| c.tokens.len() <= 1);
        let rope_dims = self.host.rope().dims;
        let matmul = |w: &ClMatrix, y: &DeviceBuffer<f32>, m: usize| kn.matmul(dev, &w.buf, w.format, &sc.acts, y, m, w.rows, w.cols);

        // From here to the read: enqueue only, in LlamaModel::forward_in_pool's order.
        kn.embedding_lookup(dev, token_embd, &sc.tokens, &sc.x, rows, d.dim)?;
        for (li, l) in layers.iter().enumerate() {
            kn.rms_norm(dev, &sc.x, &l.attn_norm, &sc.h, rows, d.dim, eps)?;
            kn.quantize(dev, &sc.h, &sc.acts, rows, d.dim)?;
            matmul(&l.wq, &sc.q, rows)?;
            matmul(&l.wk, &sc.k, rows)?;
            matmul(&l.wv, &sc.v, rows)?;
            if rope_dims > 0 {
                kn.rope(dev, &sc.q, &sc.positions, cos_sin, rows, heads, rope_dims)?;
                kn.rope(dev, &sc.k, &sc.positions, cos_sin, rows, kv_heads, rope_dims)?;
            }
            kn.kv_write(dev, &sc.k, &sc.v, &sc.slots, &kv.k[li], &kv.v[li], rows, kv_heads, bt)?;
            kn.attention(dev, decode, &attention, &sc.q, &kv.k[li], &kv.v[li], &sc.attn)?;
            kn.quantize(dev, &sc.attn, &sc.acts, rows, d.q_width)?;
            matmul(&l.wo, &sc.proj, rows)?;
            kn.add(dev, &sc.x, &sc.proj, rows * d.dim)?;

            kn.rms_norm(dev, &sc.x, &l.ffn_norm, &sc.h, rows, d.dim, eps)?;
            kn.quantize(dev, &sc.h, &sc.acts, rows, d.dim)?;
            matmul(&l.w_gate, &sc.gate, rows)?;
            matmul(&l.w_up, &sc.up, rows)?;
            kn.silu_mul(dev, &sc.gate, &sc.up, rows * d.ffn)?;
            kn.quantize(dev, &sc.gate, &sc.acts, rows, d.ffn)?;
            matmul(&l.w_down, &sc.proj, rows)?;
            kn.add(dev, &sc.x, &sc.proj, rows * d.dim)?;
        }
        if n == 0 {
            dev.finish()?; // the KV writes must land before the next step reads them
            return Ok(Vec::new());
        }
        kn.gather_rows(dev, &sc.x, &sc.wanted, &sc.last, n, d.dim)?;
        kn.rms_norm(dev, &sc.last, output_norm, &sc.normed, n, d.dim, eps)?;
        kn.quantize(dev, &sc.normed, &sc.acts, n, d.dim)?;
        matmul(output, &sc.logits, n)?;
        let mut logits = vec![0f32; n * d.vocab];
        dev.read(&sc.logits, &mut logits)?;
        Ok(logits)
    }

    /// Writes the program binaries of the kernels this model was built with to `dir`.
    pub fn save_kernel_binaries(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.kernels.save_binaries(&state.dev, dir).map_err(cl_err)
    }

    /// Runs the same small batch on the CPU model and on the device: two prompts of
    /// different lengths prefilled together (the second in two chunks), then a decode step,
    /// comparing every logit.
    pub fn probe(&self) -> Result<ProbeReport> {
        let tok = &self.host.tokenizer;
        let a = tok.encode("The OpenCL device must reproduce the CPU's logits for this sentence.", true).map_err(|e| Error::Internal(e.to_string()))?;
        let b = tok.encode("Hello there!", true).map_err(|e| Error::Internal(e.to_string()))?;
        let hp = &self.host.hparams;
        let cfg = KvCacheConfig { block_tokens: DEFAULT_BLOCK_TOKENS, num_blocks: 2 * (a.len() + b.len() + 2).div_ceil(DEFAULT_BLOCK_TOKENS) + 2 };
        let mut cpu_kv = KvCache::new(cfg, hp.block_count, hp.head_count_kv, hp.head_dim);
        let mut dev_kv = self.kv_with(cfg).map_err(cl_err)?;
        let per_seq = cfg.num_blocks / 2;
        let table_a: Vec<u32> = (0..per_seq as u32).collect();
        let table_b: Vec<u32> = (per_seq as u32..2 * per_seq as u32).collect();
        let split = b.len() / 2;
        let steps: Vec<Vec<SeqChunk<'_>>> = vec![
            vec![
                SeqChunk { tokens: &a, start_pos: 0, block_table: &table_a, want_logits: true },
                SeqChunk { tokens: &b[..split], start_pos: 0, block_table: &table_b, want_logits: false },
            ],
            vec![SeqChunk { tokens: &b[split..], start_pos: split, block_table: &table_b, want_logits: true }],
            vec![
                SeqChunk { tokens: &[42], start_pos: a.len(), block_table: &table_a, want_logits: true },
                SeqChunk { tokens: &[7], start_pos: b.len(), block_table: &table_b, want_logits: true },
            ],
        ];
        let mut report = ProbeReport { bitwise: true, max_abs_diff: 0.0 };
        for (i, step) in steps.iter().enumerate() {
            let want = self.host.forward(step, &mut cpu_kv);
            let got = self.try_forward(step, &mut dev_kv)?;
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let mut worst = 0f32;
            for (x, y) in want.iter().zip(&got) {
                report.bitwise &= x.to_bits() == y.to_bits();
                let diff = (x - y).abs();
                // NaN compares false: a NaN logit on either side is a failure.
                worst = if diff <= worst { worst } else if diff.is_nan() { f32::INFINITY } else { diff };
            }
            report.max_abs_diff = report.max_abs_diff.max(worst);
            if got.len() != want.len() || worst > PROBE_TOLERANCE * scale {
                return Err(Error::Device(format!(
                    "{}: step {i} of the load check gives logits up to {worst} away from the CPU's (tolerance {}); refusing this device",
                    self.device_name,
                    PROBE_TOLERANCE * scale
                )));
            }
        }
        Ok(report)
    }
}

/// Builds the decoder's kernels for the GGUF model at `gguf` (its head width, from the
/// metadata; no weights are read) on OpenCL device `device_index`, and writes their program
/// binaries to `out` for `KernelSource::Binaries` (what `ferroserve kernels` does).
pub fn write_kernel_binaries(gguf: &std::path::Path, device_index: usize, out: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let file = crate::weights::gguf::GgufFile::open(gguf).map_err(|e| Error::model_load(gguf, e.to_string()))?;
    let hp = file.llama_hparams().map_err(|e| Error::model_load(gguf, e.to_string()))?;
    let dev = OpenClDevice::open(device_index).map_err(cl_err)?;
    let kernels = LlamaKernels::build(&dev, hp.head_dim, &KernelSource::Embedded).map_err(cl_err)?;
    kernels.save_binaries(&dev, out).map_err(cl_err)
}

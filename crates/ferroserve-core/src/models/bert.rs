//! BERT-family sentence encoders (sentence-transformers folders): config, weights, and one
//! forward pass over packed variable-length sequences, pooling and normalisation, written
//! against the `Backend` trait: `BertModel<CpuBackend>` and `BertModel<OpenClBackend>` run
//! the same code (kernels/README.md, "A forward pass on one command queue").

use std::path::Path;
use std::sync::Mutex;

use ferroserve_kernels::backend::Packing;
use ferroserve_kernels::opencl::ops::BertKernels;
use ferroserve_kernels::opencl::{KernelSource, OpenClDevice};
use ferroserve_kernels::quant::{Panels, QuantLevel, QuantType};
use ferroserve_kernels::{Activation, Backend, BackendError, CpuBackend, OpenClBackend};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::weights::safetensors::SafetensorsFile;

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pos() -> String {
    "absolute".into()
}


/// How token vectors become one sentence vector (sentence-transformers' Pooling module).
pub use ferroserve_kernels::backend::Pooling;
/// L2-normalises in place (a zero vector stays zero).
pub use ferroserve_kernels::backend::normalize;

/// What the sentence-transformers files say about the pipeline around the encoder.
#[derive(Debug, Clone)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::model_load(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model_load(path, format!("invalid JSON: {e}")))
}

impl SentenceConfig {
    /// Reads `modules.json`, the pooling module's `config.json` and
    /// `sentence_bert_config.json`. A plain BERT folder without them gets mean pooling
    /// and normalisation (the common sentence-embedding recipe).
    pub fn load(dir: &Path, cfg: &BertConfig) -> Result<Self> {
        let mut pooling = Pooling::Mean;
        let mut normalize = true;
        let modules_path = dir.join("modules.json");
        if modules_path.exists() {
            let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
            normalize = modules.iter().any(|m| m.kind.ends_with("Normalize"));
            if let Some(p) = modules.iter().find(|m| m.kind.ends_with("Pooling")) {
                let pc: PoolingConfig = read_json(&dir.join(&p.path).join("config.json"))?;
                let modes = [
                    (pc.pooling_mode_mean_tokens, Pooling::Mean),
                    (pc.pooling_mode_cls_token, Pooling::Cls),
                    (pc.pooling_mode_max_tokens, Pooling::Max),
                    (pc.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
                ];
                let chosen: Vec<Pooling> = modes.iter().filter(|m| m.0).map(|m| m.1).collect();
                pooling = match chosen.as_slice() {
                    [one] => *one,
                    [] => return Err(Error::model_load(dir, "pooling config enables no supported mode")),
                    _ => return Err(Error::model_load(dir, "pooling config combines several modes (unsupported)")),
                };
            }
        }
        let mut max_seq_length = cfg.max_position_embeddings;
        let sbert = dir.join("sentence_bert_config.json");
        if sbert.exists() {
            let v: serde_json::Value = read_json(&sbert)?;
            if let Some(n) = v.get("max_seq_length").and_then(|n| n.as_u64()) {
                max_seq_length = (n as usize).min(cfg.max_position_embeddings);
            }
        }
        Ok(Self { pooling, normalize, max_seq_length })
    }
}

/// The arithmetic of the encoder's linear layers (`ferroserve serve --embed-numerics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EmbedNumerics {
    /// f32 weights and activations, the device's f32 (or bf16 on AMX/AVX512-BF16 hosts)
    /// kernels: cosine ≥ 0.9999 to sentence-transformers (tests/bert_reference.rs).
    #[default]
    F32,
    /// Opt-in: the linear weights quantised at load to Q8_0 (8 bits and an f16 scale per 32
    /// weights, round to nearest) and repacked into the quantised panels
    /// (`quant::panels`), the activations quantised per 32-block on the fly, integer dot
    /// products per block. About ONNX Runtime int8's accuracy (cosine ≥ 0.9992 to the
    /// reference, tests/bert_int8.rs) for a matmul a quarter of the bytes. Not faster on a
    /// Zen 1 (AVX2): `vpmaddubsw` + `vpmaddwd` on one pipe give the same 8 multiply-adds per
    /// cycle as f32 FMA on two (bench/NOTES.md, "Embeddings int8 on AVX2"); VNNI hosts are
    /// where it should pay, unmeasured.
    /// CPU only; still batch invariant and the same bits on every ISA level.
    Int8,
}

impl EmbedNumerics {
    pub fn parse(name: &str) -> Option<EmbedNumerics> {
        match name {
            "f32" => Some(EmbedNumerics::F32),
            "int8" => Some(EmbedNumerics::Int8),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EmbedNumerics::F32 => "f32",
            EmbedNumerics::Int8 => "int8",
        }
    }
}

/// The weight format of each of a layer's four linear layers (QKV, attention output, FFN in,
/// FFN out) under [`EmbedNumerics::Int8`]: a block format the quantised panels take
/// ([`Panels::supports`]), or `F32` to keep that layer on the f32 kernels. The activations
/// are always quantised to 8 bits per 32-block. Public for the format experiments
/// (`embed_bench`'s `NUMERICS=int8:…`, tests/bert_int8.rs); `--embed-numerics int8` is
/// [`Int8Formats::DEFAULT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Int8Formats(pub [QuantType; 4]);

impl Int8Formats {
    /// Q8_0 everywhere (bench/NOTES.md, "Embeddings int8 on AVX2": the format choice).
    pub const DEFAULT: Int8Formats = Int8Formats([QuantType::Q8_0; 4]);

    /// `q8_0` (all four) or four names separated by `/` (`q8_0/q8_0/q5_0/q5_0`; `f32` keeps
    /// a layer in f32).
    pub fn parse(spec: &str) -> Option<Int8Formats> {
        let one = |name: &str| {
            QuantType::ALL
                .into_iter()
                .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
                .filter(|&t| t == QuantType::F32 || Panels::supports(t))
        };
        let parts: Vec<&str> = spec.split('/').collect();
        match parts.as_slice() {
            [all] => one(all).map(|t| Int8Formats([t; 4])),
            [a, b, c, d] => Some(Int8Formats([one(a)?, one(b)?, one(c)?, one(d)?])),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        self.0.iter().map(|t| t.name().to_ascii_lowercase()).collect::<Vec<_>>().join("/")
    }
}

struct Layer<B: Backend> {
    qkv: B::Linear,
    attn_out: B::Linear,
    attn_ln: (B::Buffer<f32>, B::Buffer<f32>),
    ffn_in: B::Linear,
    ffn_out: B::Linear,
    out_ln: (B::Buffer<f32>, B::Buffer<f32>),
}

/// Per-pass buffers, sized for the largest pass seen so far (grown, so a steady load
/// allocates nothing per pass; dropped after a pass of more than `KEEP_SCRATCH_ROWS` rows).
/// Ops touch only a pass's leading rows.
/// Rows of scratch kept between passes: MiniLM's ≈ 15 KB a row make this ≈ 31 MB, where
/// keeping a 16k-token batch pass's would hold ≈ 250 MB for the server's life.
const KEEP_SCRATCH_ROWS: usize = 2048;

struct Scratch<B: Backend> {
    rows: usize,
    seqs: usize,
    tokens: B::Buffer<u32>,
    positions: B::Buffer<u32>,
    row_seq: B::Buffer<u32>,
    seq_offsets: B::Buffer<u32>,
    x: B::Buffer<f32>,
    tmp: B::Buffer<f32>,
    qkv: B::Buffer<f32>,
    ctx: B::Buffer<f32>,
    inter: B::Buffer<f32>,
    pooled: B::Buffer<f32>,
}

impl<B: Backend> Scratch<B> {
    fn new(b: &B, c: &BertConfig, rows: usize, seqs: usize) -> std::result::Result<Self, BackendError> {
        let h = c.hidden_size;
        Ok(Self {
            rows,
            seqs,
            tokens: b.alloc(rows)?,
            positions: b.alloc(rows)?,
            row_seq: b.alloc(rows)?,
            seq_offsets: b.alloc(seqs + 1)?,
            x: b.alloc(rows * h)?,
            tmp: b.alloc(rows * h)?,
            qkv: b.alloc(rows * 3 * h)?,
            ctx: b.alloc(rows * h)?,
            inter: b.alloc(rows * c.intermediate_size)?,
            pooled: b.alloc(seqs * h)?,
        })
    }
}

/// The encoder on backend `B`: weights resident on the backend since load, one forward pass.
pub struct BertModel<B: Backend> {
    pub config: BertConfig,
    pub sentence: SentenceConfig,
    backend: B,
    word_emb: B::Buffer<f32>,
    pos_emb: B::Buffer<f32>,
    type0_emb: B::Buffer<f32>,
    emb_ln: (B::Buffer<f32>, B::Buffer<f32>),
    layers: Vec<Layer<B>>,
    numerics: EmbedNumerics,
    /// Locked for a whole pass; a model serves one pass at a time (the batcher's thread).
    scratch: Mutex<Option<Scratch<B>>>,
}

/// One encoder layer's tensors as the checkpoint stores them: linear weights `[out, in]`
/// row-major (PyTorch's layout), before any device packs them.
pub(crate) struct LayerWeights {
    /// Q, K and V fused into one `[3h, h]` matrix: one pass over the activations.
    pub qkv: (Vec<f32>, Vec<f32>),
    pub attn_out: (Vec<f32>, Vec<f32>),
    pub attn_ln: (Vec<f32>, Vec<f32>),
    pub ffn_in: (Vec<f32>, Vec<f32>),
    pub ffn_out: (Vec<f32>, Vec<f32>),
    pub out_ln: (Vec<f32>, Vec<f32>),
}

/// A sentence-transformers BERT folder, read and checked, device-independent: what
/// [`BertModel`] loads onto its backend.
pub(crate) struct BertCheckpoint {
    pub config: BertConfig,
    pub sentence: SentenceConfig,
    pub word_emb: Vec<f32>,
    pub pos_emb: Vec<f32>,
    pub type0_emb: Vec<f32>,
    pub emb_ln: (Vec<f32>, Vec<f32>),
    pub layers: Vec<LayerWeights>,
}

impl BertCheckpoint {
    pub fn load(dir: &Path) -> Result<Self> {
        let config: BertConfig = read_json(&dir.join("config.json"))?;
        if !matches!(config.hidden_act.as_str(), "gelu" | "gelu_python") {
            return Err(Error::model_load(dir, format!("unsupported hidden_act {:?} (only exact gelu)", config.hidden_act)));
        }
        if config.position_embedding_type != "absolute" {
            return Err(Error::model_load(dir, "only absolute position embeddings are supported"));
        }
        // Zero sizes would divide by zero or index empty tables below: a corrupt config.json.
        let sizes = [
            ("hidden_size", config.hidden_size),
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
            ("max_position_embeddings", config.max_position_embeddings),
            ("vocab_size", config.vocab_size),
            ("type_vocab_size", config.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, size)| *size == 0) {
            return Err(Error::model_load(dir, format!("config.json: {name} must be at least 1")));
        }
        if config.hidden_size % config.num_attention_heads != 0 {
            return Err(Error::model_load(dir, "hidden_size is not a multiple of num_attention_heads"));
        }
        let sentence = SentenceConfig::load(dir, &config)?;
        let st = SafetensorsFile::open(&dir.join("model.safetensors"))?;
        // Checkpoints exported from BertModel have no prefix; from BertFor* they have "bert.".
        let prefix = if st.names().iter().any(|n| n.starts_with("bert.")) { "bert." } else { "" };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let get = |name: &str, shape: &[usize]| st.f32_shaped(&format!("{prefix}{name}"), shape);
        let ln = |name: &str| -> Result<(Vec<f32>, Vec<f32>)> { Ok((get(&format!("{name}.weight"), &[h])?, get(&format!("{name}.bias"), &[h])?)) };
        let linear = |name: &str, out: usize, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((get(&format!("{name}.weight"), &[out, inp])?, get(&format!("{name}.bias"), &[out])?))
        };

        let word_emb = get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let pos_emb = get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?;
        let type_emb = get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?;
        let emb_ln = ln("embeddings.LayerNorm")?;
        // Grown as each layer's tensors check out: a corrupt num_hidden_layers must be a
        // missing-tensor error, not a huge allocation (an abort).
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            // Grown as each part passes its shape check: a config.json whose sizes do not match
            // the tensors must not reserve `3 h²` floats first.
            let mut w = Vec::new();
            let mut b = Vec::new();
            for part in ["query", "key", "value"] {
                w.extend(get(&format!("{p}.attention.self.{part}.weight"), &[h, h])?);
                b.extend(get(&format!("{p}.attention.self.{part}.bias"), &[h])?);
            }
            layers.push(LayerWeights {
                qkv: (w, b),
                attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_ln: ln(&format!("{p}.attention.output.LayerNorm"))?,
                ffn_in: linear(&format!("{p}.intermediate.dense"), i, h)?,
                ffn_out: linear(&format!("{p}.output.dense"), h, i)?,
                out_ln: ln(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self { type0_emb: type_emb[..h].to_vec(), config, sentence, word_emb, pos_emb, emb_ln, layers })
    }
}


fn backend_err(e: BackendError) -> Error {
    Error::Device(e.0)
}

impl<B: Backend> BertModel<B> {
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        Self::load_with_numerics(dir, backend, EmbedNumerics::F32)
    }

    /// [`BertModel::load`] with the linear layers in `numerics`. Int8 needs the hidden and
    /// intermediate sizes to be whole 32-blocks (MiniLM's 384 and 1536 are).
    pub fn load_with_numerics(dir: &Path, backend: B, numerics: EmbedNumerics) -> Result<Self> {
        match numerics {
            EmbedNumerics::F32 => Self::load_with_formats(dir, backend, None),
            EmbedNumerics::Int8 => Self::load_with_formats(dir, backend, Some(Int8Formats::DEFAULT)),
        }
    }

    /// [`BertModel::load`] with int8 numerics in the given weight formats (`None`: f32).
    /// The backend is opened before (an OpenCL device that does not exist fails before 90 MB
    /// of weights are read).
    pub fn load_with_formats(dir: &Path, mut backend: B, formats: Option<Int8Formats>) -> Result<Self> {
        let numerics = if formats.is_some() { EmbedNumerics::Int8 } else { EmbedNumerics::F32 };
        let [f_qkv, f_attn_out, f_ffn_in, f_ffn_out] = formats.map_or([QuantType::F32; 4], |f| f.0);
        let ck = BertCheckpoint::load(dir)?;
        let (h, i) = (ck.config.hidden_size, ck.config.intermediate_size);
        // Each quantised layer's rows must be whole blocks of its format (MiniLM's 384 and
        // 1536 are whole 32-blocks).
        for (wtype, inp) in [(f_qkv, h), (f_attn_out, h), (f_ffn_in, h), (f_ffn_out, i)] {
            if !inp.is_multiple_of(wtype.block_elems()) {
                return Err(Error::model_load(
                    dir,
                    format!("{} numerics need rows of whole {}-blocks; this model has rows of {inp}", wtype.name(), wtype.block_elems()),
                ));
            }
        }
        backend.prepare_encoder(h / ck.config.num_attention_heads).map_err(backend_err)?;
        let b = &backend;
        let pack = |(w, bias): &(Vec<f32>, Vec<f32>), wtype: QuantType, out: usize, inp: usize| b.pack_linear(w, bias, out, inp, wtype).map_err(backend_err);
        let up = |v: Vec<f32>| b.upload(v).map_err(backend_err);
        let pair = |(a, c): (Vec<f32>, Vec<f32>)| -> Result<(B::Buffer<f32>, B::Buffer<f32>)> { Ok((up(a)?, up(c)?)) };
        let mut layers = Vec::with_capacity(ck.layers.len());
        for l in ck.layers {
            layers.push(Layer {
                qkv: pack(&l.qkv, f_qkv, 3 * h, h)?,
                attn_out: pack(&l.attn_out, f_attn_out, h, h)?,
                attn_ln: pair(l.attn_ln)?,
                ffn_in: pack(&l.ffn_in, f_ffn_in, i, h)?,
                ffn_out: pack(&l.ffn_out, f_ffn_out, h, i)?,
                out_ln: pair(l.out_ln)?,
            });
        }
        let (word_emb, pos_emb, type0_emb, emb_ln) = (up(ck.word_emb)?, up(ck.pos_emb)?, up(ck.type0_emb)?, pair(ck.emb_ln)?);
        Ok(Self {
            config: ck.config,
            sentence: ck.sentence,
            backend,
            word_emb,
            pos_emb,
            type0_emb,
            emb_ln,
            layers,
            numerics,
            scratch: Mutex::new(None),
        })
    }

    pub fn numerics(&self) -> EmbedNumerics {
        self.numerics
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The backend's name, e.g. `cpu(avx2)` or `opencl:0(...)`.
    pub fn device_name(&self) -> String {
        self.backend.name()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Sentence vectors `[seqs.len(), hidden]` for already-tokenized sequences (with
    /// special tokens, each at most `max_seq_length` long, ids < vocab size).
    ///
    /// The whole pass runs in [`Backend::run_pass`]: on the CPU one job on a rayon worker
    /// (called from a thread outside the pool, the batcher, each of the ≈ 30 parallel
    /// sections of a pass would otherwise be injected from outside and waited for on a
    /// latch, ≈ 500 context switches per short sentence; see bench/NOTES.md).
    pub fn embed(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.run_pass(|| self.embed_pass(seqs)).map_err(backend_err)
    }

    fn embed_pass(&self, seqs: &[&[u32]]) -> std::result::Result<Vec<f32>, BackendError> {
        let (b, c) = (&self.backend, &self.config);
        let h = c.hidden_size;
        let rows: usize = seqs.iter().map(|s| s.len()).sum();
        // The packing indices, built on the host: a pass's only uploads.
        let mut tokens = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let mut row_seq = Vec::with_capacity(rows);
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0u32);
        for (s, seq) in seqs.iter().enumerate() {
            tokens.extend_from_slice(seq);
            positions.extend(0..seq.len() as u32);
            row_seq.extend(std::iter::repeat_n(s as u32, seq.len()));
            offsets.push(tokens.len() as u32);
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|sc| sc.rows < rows || sc.seqs < seqs.len()) {
            let (old_rows, old_seqs) = guard.as_ref().map_or((0, 0), |sc| (sc.rows, sc.seqs));
            *guard = None; // free the old buffers before allocating larger ones
            *guard = Some(Scratch::new(b, c, rows.max(old_rows).next_power_of_two(), seqs.len().max(old_seqs).next_power_of_two())?);
        }
        let sc = guard.as_mut().expect("scratch allocated above");
        b.write(&mut sc.tokens, &tokens)?;
        b.write(&mut sc.positions, &positions)?;
        b.write(&mut sc.row_seq, &row_seq)?;
        b.write(&mut sc.seq_offsets, &offsets)?;
        let Scratch { tokens, positions, row_seq, seq_offsets, x, tmp, qkv, ctx, inter, pooled, .. } = sc;
        let packing = Packing::<B> { tokens, positions, row_seq, seq_offsets, rows, seqs: seqs.len() };
        self.encode(&packing, x, tmp, qkv, ctx, inter)?;
        b.pool(x, &packing, self.sentence.pooling, self.sentence.normalize, pooled, h)?;
        let mut out = vec![0.0f32; seqs.len() * h];
        b.read(pooled, &mut out)?;
        if guard.as_ref().is_some_and(|sc| sc.rows > KEEP_SCRATCH_ROWS) {
            *guard = None; // a batch job's big pass: its ≈ 15 KB a row are not held after it
        }
        Ok(out)
    }

    /// Token vectors `[rows, hidden]` from the last layer, into `x`.
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        seqs: &Packing<'_, B>,
        x: &mut B::Buffer<f32>,
        tmp: &mut B::Buffer<f32>,
        qkv: &mut B::Buffer<f32>,
        ctx: &mut B::Buffer<f32>,
        inter: &mut B::Buffer<f32>,
    ) -> std::result::Result<(), BackendError> {
        let (b, c) = (&self.backend, &self.config);
        let (h, heads, eps, rows) = (c.hidden_size, c.num_attention_heads, c.layer_norm_eps, seqs.rows);
        b.embedding_lookup(&self.word_emb, &self.pos_emb, &self.type0_emb, seqs, x, h)?;
        b.layer_norm(x, None, &self.emb_ln.0, &self.emb_ln.1, rows, h, eps)?;
        for l in &self.layers {
            b.linear(x, &l.qkv, Activation::None, qkv, rows)?;
            b.encoder_attention(qkv, seqs, heads, h / heads, ctx)?;
            b.linear(ctx, &l.attn_out, Activation::None, tmp, rows)?;
            b.layer_norm(tmp, Some(&*x), &l.attn_ln.0, &l.attn_ln.1, rows, h, eps)?;
            std::mem::swap(x, tmp);
            b.linear(x, &l.ffn_in, Activation::Gelu, inter, rows)?;
            b.linear(inter, &l.ffn_out, Activation::None, tmp, rows)?;
            b.layer_norm(tmp, Some(&*x), &l.out_ln.0, &l.out_ln.1, rows, h, eps)?;
            std::mem::swap(x, tmp);
        }
        Ok(())
    }
}

impl BertModel<CpuBackend> {
    /// Runs the int8 matmuls on `isa` instead of the process-wide level (tests compare the
    /// levels; `isa` must be supported by this CPU).
    pub fn with_quant_isa(mut self, isa: QuantLevel) -> Self {
        self.backend.set_quant_level(isa);
        self
    }
}

impl BertModel<OpenClBackend> {
    /// Writes the encoder kernels' program binaries for this device to `dir` (for
    /// `KernelSource::Binaries`).
    pub fn save_kernel_binaries(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        self.backend.save_encoder_binaries(dir).map_err(backend_err)
    }
}

/// Builds the encoder's kernels for the model in `model_dir` (its head width, from
/// config.json; no weights are read) on OpenCL device `device_index`, and writes their
/// program binaries to `out` for `KernelSource::Binaries`.
pub fn write_kernel_binaries(model_dir: &Path, device_index: usize, out: &Path) -> Result<Vec<std::path::PathBuf>> {
    let config: BertConfig = read_json(&model_dir.join("config.json"))?;
    if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        return Err(Error::model_load(model_dir, "hidden_size is not a multiple of num_attention_heads"));
    }
    let cl_err = |e: ferroserve_kernels::opencl::OpenClError| Error::Device(e.to_string());
    let dev = OpenClDevice::open(device_index).map_err(cl_err)?;
    let kernels = BertKernels::build(&dev, config.hidden_size / config.num_attention_heads, &KernelSource::Embedded).map_err(cl_err)?;
    kernels.save_binaries(&dev, out).map_err(cl_err)
}

/// How far two backends' vectors for the same sequences may differ: the worst cosine, and
/// the sequence where it was.
pub struct Agreement {
    pub worst_cosine: f64,
    pub worst_index: usize,
}

/// Embeds `seqs` on two models of the same checkpoint (two backends) and compares them
/// sequence by sequence (a NaN counts as the worst).
pub fn compare_backends<A: Backend, C: Backend>(a: &BertModel<A>, b: &BertModel<C>, seqs: &[&[u32]]) -> Result<Agreement> {
    let (va, vb) = (a.embed(seqs)?, b.embed(seqs)?);
    let h = a.hidden_size();
    let mut agreement = Agreement { worst_cosine: 1.0, worst_index: 0 };
    for i in 0..seqs.len() {
        let c = cosine(&va[i * h..(i + 1) * h], &vb[i * h..(i + 1) * h]);
        // Negated on purpose: a NaN cosine (non-finite output) must count as the worst.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(c >= agreement.worst_cosine) {
            agreement = Agreement { worst_cosine: c, worst_index: i };
            if c.is_nan() {
                break;
            }
        }
    }
    Ok(agreement)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

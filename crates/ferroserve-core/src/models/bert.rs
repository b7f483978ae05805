//! BERT-family sentence encoders (sentence-transformers folders): config, weights,
//! forward pass over packed variable-length sequences, pooling and normalisation.

use std::path::Path;
use std::sync::Arc;

use ferroserve_kernels::quant::{self, panel_matmul, Panels, Q8Activations, QuantLevel, QuantType};
use ferroserve_kernels::{Activation, Device, PackedLinear, SeqLayout};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

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

/// One linear layer `y = act(x · Wᵀ + b)` in the model's numerics.
enum Linear {
    F32(PackedLinear),
    /// Q8_0 panels and the f32 bias (added after the integer matmul).
    Int8 { panels: Panels, bias: Vec<f32> },
}

impl Linear {
    /// Packs `[out, inp]` weights: `F32` for the device's f32 kernels, else quantised to
    /// `wtype` (round to nearest per 32-block) and repacked into panels.
    fn pack(device: &dyn Device, wtype: QuantType, (w, b): &(Vec<f32>, Vec<f32>), out: usize, inp: usize) -> Linear {
        if wtype == QuantType::F32 {
            return Linear::F32(device.pack_linear(w, out, inp, Some(b)));
        }
        let row_bytes = wtype.row_bytes(inp);
        let mut bytes = vec![0u8; out * row_bytes];
        for (src, dst) in w.chunks_exact(inp).zip(bytes.chunks_exact_mut(row_bytes)) {
            quant::quantize_row(wtype, src, dst);
        }
        Linear::Int8 { panels: Panels::pack(wtype, &bytes, out, inp), bias: b.clone() }
    }
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_ln: (Vec<f32>, Vec<f32>),
    ffn_in: Linear,
    ffn_out: Linear,
    out_ln: (Vec<f32>, Vec<f32>),
}

pub struct BertModel {
    pub config: BertConfig,
    pub sentence: SentenceConfig,
    device: Arc<dyn Device>,
    word_emb: Vec<f32>,
    pos_emb: Vec<f32>,
    type0_emb: Vec<f32>,
    emb_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    numerics: EmbedNumerics,
    /// The quantised kernels' level (int8 numerics); every level gives the same bits.
    quant_isa: QuantLevel,
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
/// [`BertModel`] (CPU, packed panels) and the OpenCL runner (device buffers) load from.
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

impl BertModel {
    pub fn load(dir: &Path, device: Arc<dyn Device>) -> Result<Self> {
        Self::load_with_numerics(dir, device, EmbedNumerics::F32)
    }

    /// [`BertModel::load`] with the linear layers in `numerics`. Int8 needs the hidden and
    /// intermediate sizes to be whole 32-blocks (MiniLM's 384 and 1536 are).
    pub fn load_with_numerics(dir: &Path, device: Arc<dyn Device>, numerics: EmbedNumerics) -> Result<Self> {
        match numerics {
            EmbedNumerics::F32 => Self::load_with_formats(dir, device, None),
            EmbedNumerics::Int8 => Self::load_with_formats(dir, device, Some(Int8Formats::DEFAULT)),
        }
    }

    /// [`BertModel::load`] with int8 numerics in the given weight formats (`None`: f32).
    pub fn load_with_formats(dir: &Path, device: Arc<dyn Device>, formats: Option<Int8Formats>) -> Result<Self> {
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
        let pack = |wb: &(Vec<f32>, Vec<f32>), wtype: QuantType, out: usize, inp: usize| Linear::pack(&*device, wtype, wb, out, inp);
        let layers = ck
            .layers
            .into_iter()
            .map(|l| Layer {
                qkv: pack(&l.qkv, f_qkv, 3 * h, h),
                attn_out: pack(&l.attn_out, f_attn_out, h, h),
                attn_ln: l.attn_ln,
                ffn_in: pack(&l.ffn_in, f_ffn_in, i, h),
                ffn_out: pack(&l.ffn_out, f_ffn_out, h, i),
                out_ln: l.out_ln,
            })
            .collect();
        Ok(Self {
            config: ck.config,
            sentence: ck.sentence,
            device,
            word_emb: ck.word_emb,
            pos_emb: ck.pos_emb,
            type0_emb: ck.type0_emb,
            emb_ln: ck.emb_ln,
            layers,
            numerics,
            quant_isa: QuantLevel::selected(),
        })
    }

    /// Runs the int8 matmuls on `isa` instead of the process-wide level (tests compare the
    /// levels; `isa` must be supported by this CPU).
    pub fn with_quant_isa(mut self, isa: QuantLevel) -> Self {
        self.quant_isa = isa;
        self
    }

    pub fn numerics(&self) -> EmbedNumerics {
        self.numerics
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Sentence vectors `[seqs.len(), hidden]` for already-tokenized sequences (with
    /// special tokens, each at most `max_seq_length` long, ids < vocab size).
    ///
    /// The whole pass runs as one job on a rayon worker: called from a thread outside the
    /// pool (the batcher), each of the ≈ 30 parallel sections of a pass would otherwise be
    /// injected from outside and waited for on a latch, a cross-thread wake-up and a sleep
    /// of the caller every time (≈ 500 context switches per short sentence; see
    /// bench/NOTES.md). Inside the pool, sections fork on the worker's own deque.
    pub fn embed(&self, seqs: &[&[u32]]) -> Vec<f32> {
        // `rayon::scope` runs its body on a worker of the global pool (in place if the
        // caller already is one); no tasks are spawned into the scope itself.
        rayon::scope(|_| self.embed_on_worker(seqs))
    }

    fn embed_on_worker(&self, seqs: &[&[u32]]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0usize);
        for s in seqs {
            offsets.push(offsets.last().unwrap() + s.len());
        }
        let layout = SeqLayout { offsets: &offsets };
        let hidden = self.encode(seqs, &layout);
        let mut out = vec![0.0f32; seqs.len() * h];
        for (s, dst) in out.chunks_exact_mut(h).enumerate() {
            let rows = &hidden[offsets[s] * h..offsets[s + 1] * h];
            pool(self.sentence.pooling, rows, h, dst);
            if self.sentence.normalize {
                normalize(dst);
            }
        }
        out
    }

    /// Token vectors `[total_tokens, hidden]` from the last layer.
    fn encode(&self, seqs: &[&[u32]], layout: &SeqLayout<'_>) -> Vec<f32> {
        let c = &self.config;
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let rows = layout.total_rows();
        let dev = &*self.device;

        let mut x = vec![0.0f32; rows * h];
        let mut r = 0;
        for s in seqs {
            for (pos, &id) in s.iter().enumerate() {
                let dst = &mut x[r * h..(r + 1) * h];
                let word = &self.word_emb[id as usize * h..(id as usize + 1) * h];
                let posv = &self.pos_emb[pos * h..(pos + 1) * h];
                for j in 0..h {
                    dst[j] = word[j] + posv[j] + self.type0_emb[j];
                }
                r += 1;
            }
        }
        dev.add_layer_norm(&mut x, None, h, &self.emb_ln.0, &self.emb_ln.1, c.layer_norm_eps);

        let mut qkv = vec![0.0f32; rows * 3 * h];
        let mut ctx = vec![0.0f32; rows * h];
        let mut tmp = vec![0.0f32; rows * h];
        let mut inter = vec![0.0f32; rows * c.intermediate_size];
        let mut acts = Q8Activations::new();
        for layer in &self.layers {
            self.linear(&mut acts, &x, rows, &layer.qkv, Activation::None, &mut qkv);
            dev.encoder_attention(&qkv, layout, heads, h / heads, &mut ctx);
            self.linear(&mut acts, &ctx, rows, &layer.attn_out, Activation::None, &mut tmp);
            dev.add_layer_norm(&mut tmp, Some(&x), h, &layer.attn_ln.0, &layer.attn_ln.1, c.layer_norm_eps);
            std::mem::swap(&mut x, &mut tmp);
            self.linear(&mut acts, &x, rows, &layer.ffn_in, Activation::Gelu, &mut inter);
            self.linear(&mut acts, &inter, rows, &layer.ffn_out, Activation::None, &mut tmp);
            dev.add_layer_norm(&mut tmp, Some(&x), h, &layer.out_ln.0, &layer.out_ln.1, c.layer_norm_eps);
            std::mem::swap(&mut x, &mut tmp);
        }
        x
    }

    /// `y = act(x · Wᵀ + b)` for `rows` rows of `x`.
    fn linear(&self, acts: &mut Q8Activations, x: &[f32], rows: usize, w: &Linear, act: Activation, y: &mut [f32]) {
        match w {
            Linear::F32(w) => self.device.linear(x, rows, w, act, y),
            Linear::Int8 { panels, bias } => {
                if rows == 0 {
                    return;
                }
                // Element-wise after the matmul: each output row still depends on its own
                // input row only (batch invariance).
                acts.quantize_with_isa(self.quant_isa, x, rows, panels.cols());
                panel_matmul(self.quant_isa, panels, acts, y);
                for row in y.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
                match act {
                    Activation::None => {}
                    Activation::Gelu => self.device.gelu(y),
                }
            }
        }
    }
}

fn pool(mode: Pooling, rows: &[f32], h: usize, dst: &mut [f32]) {
    let n = rows.len() / h;
    match mode {
        Pooling::Cls => dst.copy_from_slice(&rows[..h]),
        Pooling::Max => {
            dst.fill(f32::NEG_INFINITY);
            for row in rows.chunks_exact(h) {
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = d.max(v);
                }
            }
        }
        Pooling::Mean | Pooling::MeanSqrtLen => {
            dst.fill(0.0);
            for row in rows.chunks_exact(h) {
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d += v;
                }
            }
            let div = if mode == Pooling::Mean { n as f32 } else { (n as f32).sqrt() };
            dst.iter_mut().for_each(|d| *d /= div);
        }
    }
}

/// L2-normalises in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32;
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

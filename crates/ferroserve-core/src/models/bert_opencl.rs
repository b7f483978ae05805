//! The BERT encoder on an OpenCL device, with every tensor resident on the device.
//!
//! Why a runner of its own rather than `BertModel` over another `Device`: the `Device` trait
//! takes host slices, so each op would copy its inputs to the device and its outputs back
//! (≈ 40 round trips per pass, each moving the whole activation matrix and waiting for the
//! queue). Here the weights are uploaded once at load; a pass uploads only the token ids and
//! the packing indices, enqueues the kernels back to back on the device's one in-order queue
//! (no host wait between them) and reads back only the pooled sentence vectors. The order
//! of operations is `BertModel::encode`'s, op for op (kernels/README.md, "A forward pass on
//! one command queue"), so the two devices agree within the kernels' f32 tolerances; the CPU
//! path is untouched.

use std::path::Path;

use ferroserve_kernels::opencl::ops::BertKernels;
use ferroserve_kernels::opencl::{DeviceBuffer, KernelSource, OpenClDevice, OpenClError};

use crate::error::{Error, Result};
use crate::models::bert::{read_json, BertCheckpoint, BertConfig, Pooling, SentenceConfig};

struct ClLayer {
    qkv: (DeviceBuffer<f32>, DeviceBuffer<f32>),
    attn_out: (DeviceBuffer<f32>, DeviceBuffer<f32>),
    attn_ln: (DeviceBuffer<f32>, DeviceBuffer<f32>),
    ffn_in: (DeviceBuffer<f32>, DeviceBuffer<f32>),
    ffn_out: (DeviceBuffer<f32>, DeviceBuffer<f32>),
    out_ln: (DeviceBuffer<f32>, DeviceBuffer<f32>),
}

/// Per-pass buffers, sized for the largest pass seen so far (grown, never shrunk, so a
/// steady load allocates nothing per pass).
struct Scratch {
    rows: usize,
    seqs: usize,
    tokens: DeviceBuffer<u32>,
    positions: DeviceBuffer<u32>,
    row_seq: DeviceBuffer<u32>,
    seq_offsets: DeviceBuffer<u32>,
    x: DeviceBuffer<f32>,
    tmp: DeviceBuffer<f32>,
    qkv: DeviceBuffer<f32>,
    ctx: DeviceBuffer<f32>,
    inter: DeviceBuffer<f32>,
    pooled: DeviceBuffer<f32>,
}

impl Scratch {
    fn new(dev: &OpenClDevice, c: &BertConfig, rows: usize, seqs: usize) -> std::result::Result<Self, OpenClError> {
        let h = c.hidden_size;
        Ok(Self {
            rows,
            seqs,
            tokens: dev.alloc(rows)?,
            positions: dev.alloc(rows)?,
            row_seq: dev.alloc(rows)?,
            seq_offsets: dev.alloc(seqs + 1)?,
            x: dev.alloc(rows * h)?,
            tmp: dev.alloc(rows * h)?,
            qkv: dev.alloc(rows * 3 * h)?,
            ctx: dev.alloc(rows * h)?,
            inter: dev.alloc(rows * c.intermediate_size)?,
            pooled: dev.alloc(seqs * h)?,
        })
    }
}

pub struct OpenClBert {
    pub config: BertConfig,
    pub sentence: SentenceConfig,
    dev: OpenClDevice,
    kernels: BertKernels,
    word_emb: DeviceBuffer<f32>,
    pos_emb: DeviceBuffer<f32>,
    type0_emb: DeviceBuffer<f32>,
    emb_ln: (DeviceBuffer<f32>, DeviceBuffer<f32>),
    layers: Vec<ClLayer>,
    scratch: Option<Scratch>,
}

fn cl_err(e: OpenClError) -> Error {
    Error::Device(e.to_string())
}

impl OpenClBert {
    /// Loads the folder's weights onto OpenCL device `device_index` and builds the kernels
    /// (from the embedded sources, or from `kernels`' precompiled binaries).
    pub fn load(dir: &Path, device_index: usize, kernels: &KernelSource) -> Result<Self> {
        // The device first: without one, reading 90 MB of weights would be wasted.
        let dev = OpenClDevice::open(device_index).map_err(cl_err)?;
        let ck = BertCheckpoint::load(dir)?;
        if ck.sentence.pooling != Pooling::Mean {
            // mean_pool_f32 is the only pooling kernel so far (all-MiniLM and most
            // sentence-transformers models pool by mean).
            return Err(Error::Device(format!("{:?} pooling is not implemented on OpenCL (only mean pooling)", ck.sentence.pooling)));
        }
        let c = &ck.config;
        let head_dim = c.hidden_size / c.num_attention_heads;
        let kernels = BertKernels::build(&dev, head_dim, kernels).map_err(cl_err)?;
        let up = |v: &[f32]| dev.upload(v).map_err(cl_err);
        let pair = |(a, b): &(Vec<f32>, Vec<f32>)| -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>)> { Ok((up(a)?, up(b)?)) };
        let mut layers = Vec::with_capacity(ck.layers.len());
        for l in &ck.layers {
            layers.push(ClLayer {
                qkv: pair(&l.qkv)?,
                attn_out: pair(&l.attn_out)?,
                attn_ln: pair(&l.attn_ln)?,
                ffn_in: pair(&l.ffn_in)?,
                ffn_out: pair(&l.ffn_out)?,
                out_ln: pair(&l.out_ln)?,
            });
        }
        let (word_emb, pos_emb, type0_emb, emb_ln) = (up(&ck.word_emb)?, up(&ck.pos_emb)?, up(&ck.type0_emb)?, pair(&ck.emb_ln)?);
        Ok(Self { config: ck.config, sentence: ck.sentence, dev, kernels, word_emb, pos_emb, type0_emb, emb_ln, layers, scratch: None })
    }

    pub fn device_name(&self) -> String {
        self.dev.name()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Writes the kernels' program binaries for this device to `dir` (for
    /// `KernelSource::Binaries`).
    pub fn save_kernel_binaries(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        self.kernels.save_binaries(&self.dev, dir).map_err(cl_err)
    }

    /// Sentence vectors `[seqs.len(), hidden]`, as `BertModel::embed` (same contract).
    pub fn embed(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        self.embed_inner(seqs).map_err(cl_err)
    }

    fn embed_inner(&mut self, seqs: &[&[u32]]) -> std::result::Result<Vec<f32>, OpenClError> {
        let c = &self.config;
        let (h, heads, inter, eps) = (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps);
        let rows: usize = seqs.iter().map(|s| s.len()).sum();
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // The packing indices, built on the host: the only per-pass uploads.
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
        let need_new = self.scratch.as_ref().is_none_or(|sc| sc.rows < rows || sc.seqs < seqs.len());
        if need_new {
            let (old_rows, old_seqs) = self.scratch.as_ref().map_or((0, 0), |sc| (sc.rows, sc.seqs));
            self.scratch = None; // free the old buffers before allocating larger ones
            self.scratch = Some(Scratch::new(&self.dev, c, rows.max(old_rows).next_power_of_two(), seqs.len().max(old_seqs).next_power_of_two())?);
        }
        let sc = self.scratch.as_mut().expect("scratch allocated above");
        let (dev, k) = (&self.dev, &self.kernels);
        dev.write(&mut sc.tokens, &tokens)?;
        dev.write(&mut sc.positions, &positions)?;
        dev.write(&mut sc.row_seq, &row_seq)?;
        dev.write(&mut sc.seq_offsets, &offsets)?;

        // From here to the read: enqueue only, in BertModel::encode's order.
        k.embedding_lookup(dev, &self.word_emb, &self.pos_emb, &self.type0_emb, &sc.tokens, &sc.positions, &sc.x, rows, h)?;
        k.layer_norm(dev, &sc.x, None, &self.emb_ln.0, &self.emb_ln.1, rows, h, eps)?;
        for l in &self.layers {
            k.linear(dev, &sc.x, &l.qkv.0, Some(&l.qkv.1), &sc.qkv, rows, 3 * h, h, false)?;
            k.encoder_attention(dev, &sc.qkv, &sc.seq_offsets, &sc.row_seq, &sc.ctx, rows, heads)?;
            k.linear(dev, &sc.ctx, &l.attn_out.0, Some(&l.attn_out.1), &sc.tmp, rows, h, h, false)?;
            k.layer_norm(dev, &sc.tmp, Some(&sc.x), &l.attn_ln.0, &l.attn_ln.1, rows, h, eps)?;
            std::mem::swap(&mut sc.x, &mut sc.tmp);
            k.linear(dev, &sc.x, &l.ffn_in.0, Some(&l.ffn_in.1), &sc.inter, rows, inter, h, true)?;
            k.linear(dev, &sc.inter, &l.ffn_out.0, Some(&l.ffn_out.1), &sc.tmp, rows, h, inter, false)?;
            k.layer_norm(dev, &sc.tmp, Some(&sc.x), &l.out_ln.0, &l.out_ln.1, rows, h, eps)?;
            std::mem::swap(&mut sc.x, &mut sc.tmp);
        }
        k.mean_pool(dev, &sc.x, &sc.seq_offsets, &sc.pooled, seqs.len(), h, self.sentence.normalize)?;
        let mut out = vec![0.0f32; seqs.len() * h];
        dev.read(&sc.pooled, &mut out)?;
        Ok(out)
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
    let dev = OpenClDevice::open(device_index).map_err(cl_err)?;
    let kernels = BertKernels::build(&dev, config.hidden_size / config.num_attention_heads, &KernelSource::Embedded).map_err(cl_err)?;
    kernels.save_binaries(&dev, out).map_err(cl_err)
}

//! Per-kernel throughput of the chat model's OpenCL kernels against their native CPU
//! counterparts, on SmolLM2-135M's shapes (dim 576, 9 heads, 3 KV heads of 64, FFN 1536,
//! vocabulary 49152, Q4_1 layer weights, Q8_0 tied output / embedding matrix).
//!
//! `cargo run --release --example opencl_kernel_bench -p ferroserve-kernels [-- DEVICE_INDEX [REPS]]`
//!
//! Prints Markdown: one row per (kernel, rows per step m) for m = 1 (one decode row), 16
//! (16-stream decode) and 656 (16 prompts of 41 tokens prefilled together), then the
//! per-step sums those numbers imply for a whole forward pass (30 layers).
//!
//! Method. Each kernel is first run once on both devices from the same random inputs and
//! the results compared (the `check` column). Timing then: one call (PoCL specialises a
//! kernel for its launch sizes on first use), a 3-call estimate, a warm-up batch, then 5
//! batches of N calls; we report the median batch's time per call. N = min(REPS, enough
//! calls for ≈ 0.15 s), so cheap kernels run REPS (default 200) back-to-back calls per
//! batch and the big ones a few; a call that takes ≥ 0.5 s is timed alone, 3 times (median).
//! On OpenCL a batch is N enqueued launches and one `finish()`, so the launch overhead
//! counts as it does inside a real step (where ≈ 600 launches are enqueued back to back). The CPU kernels run inside `rayon::scope`, i.e. on a
//! pool worker, as `LlamaModel::forward` runs them. Weights and KV caches are 30 distinct
//! copies used in turn (one per layer, as in a step), so they come from the cache level a
//! real step would read them from, not from a warm L2.
//!
//! Both devices compute the exact numerics path (`Numerics::Exact`: llama.cpp's order; the
//! OpenCL kernels are bitwise the CPU's on PoCL), so the timings compare like with like.

use std::collections::HashMap;
use std::ops::Range;
use std::process::ExitCode;
use std::time::Instant;

use ferroserve_kernels::cpu::llama_ops::{self, AttentionArith, PagedSeq, RopeParams};
use ferroserve_kernels::kv_layout::PagedKvLayout;
use ferroserve_kernels::opencl::ops::{AttentionTables, LlamaKernels, Q8Buffers, QuantWeights};
use ferroserve_kernels::opencl::{DeviceBuffer, KernelSource, OpenClDevice, OpenClError};
use ferroserve_kernels::quant::f16::f32_to_f16;
use ferroserve_kernels::quant::{self, quant_matmul_prepared, Q8Activations, QuantLevel, QuantType};
use ferroserve_kernels::testing::Rng;
use ferroserve_kernels::Isa;
use rayon::prelude::*;

// SmolLM2-135M.
const DIM: usize = 576;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const Q_WIDTH: usize = HEADS * HEAD_DIM;
const KV_WIDTH: usize = KV_HEADS * HEAD_DIM;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;
const EPS: f32 = 1e-5;
const ROPE_BASE: f32 = 100_000.0;
/// Positions in the device's RoPE table (the model's context length).
const CONTEXT: usize = 8192;

// The batches.
const BLOCK_TOKENS: usize = 16;
const SEQS: usize = 16;
/// Context of each sequence in the attention benchmarks (decode rows attend to all of it).
const SEQ_CONTEXT: usize = 256;
const MAX_BLOCKS: usize = SEQ_CONTEXT / BLOCK_TOKENS;
const PROMPT: usize = 41;
const ROW_COUNTS: [usize; 3] = [1, SEQS, SEQS * PROMPT];
/// At most one logits row per sequence.
const MAX_LOGIT_ROWS: usize = SEQS;

// Timing.
const DEFAULT_REPS: usize = 200;
const BATCH_SECONDS: f64 = 0.15;
const SAMPLES: usize = 5;
/// Calls this slow are timed one at a time, `SLOW_SAMPLES` times.
const SLOW_CALL_SECONDS: f64 = 0.5;
const SLOW_SAMPLES: usize = 3;

type ClResult<T> = Result<T, OpenClError>;

/// A random `[n, k]` weight matrix in `t`'s packed blocks (valid finite f16 scales: the
/// crate's own round-to-nearest quantiser writes them).
fn random_matrix(t: QuantType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let row_bytes = t.row_bytes(k);
    let mut w = vec![0u8; n * row_bytes];
    w.par_chunks_exact_mut(row_bytes).enumerate().for_each(|(j, bytes)| {
        let row = Rng::new(seed ^ (j as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93)).vec_scaled(k, 0.1);
        quant::quantize_row(t, &row, bytes);
    });
    w
}

/// Per-call time of a measured kernel and the batch size it was measured with.
#[derive(Clone, Copy)]
struct Timing {
    us: f64,
    calls: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn batch_calls(estimate_s: f64, max_calls: usize) -> usize {
    ((BATCH_SECONDS / estimate_s.max(1e-9)).ceil() as usize).clamp(1, max_calls)
}

/// The timing schedule shared by both devices; `run(n)` makes `n` calls and returns the
/// seconds they took. One call first (PoCL specialises a kernel for its launch sizes on
/// first use), then either (slow calls) `SLOW_SAMPLES` single calls, or a 3-call estimate,
/// a warm-up batch and `SAMPLES` batches of N calls.
fn measure(max_calls: usize, mut run: impl FnMut(usize) -> ClResult<f64>) -> ClResult<Timing> {
    let first = run(1)?;
    if first >= SLOW_CALL_SECONDS {
        let samples = (0..SLOW_SAMPLES).map(|_| run(1)).collect::<ClResult<Vec<f64>>>()?;
        return Ok(Timing { us: median(samples) * 1e6, calls: 1 });
    }
    let n = batch_calls(run(3)? / 3.0, max_calls);
    run(n.min(20))?;
    let samples = (0..SAMPLES).map(|_| Ok(run(n)? / n as f64)).collect::<ClResult<Vec<f64>>>()?;
    Ok(Timing { us: median(samples) * 1e6, calls: n })
}

/// Times `enqueue(i)` (call number `i`, for cycling through per-layer buffers): batches of
/// N launches, each batch ended by one `finish()`.
fn time_cl(dev: &OpenClDevice, max_calls: usize, mut enqueue: impl FnMut(usize) -> ClResult<()>) -> ClResult<Timing> {
    let mut i = 0;
    measure(max_calls, |n| {
        let t = Instant::now();
        for _ in 0..n {
            enqueue(i)?;
            i += 1;
        }
        dev.finish()?;
        Ok(t.elapsed().as_secs_f64())
    })
}

/// Times `f(i)` on a rayon pool worker, as `LlamaModel::forward` runs its kernels.
fn time_cpu(max_calls: usize, mut f: impl FnMut(usize) + Send) -> Timing {
    rayon::scope(|_| {
        let mut i = 0;
        measure(max_calls, |n| {
            let t = Instant::now();
            for _ in 0..n {
                f(i);
                i += 1;
            }
            Ok(t.elapsed().as_secs_f64())
        })
        .expect("CPU timing cannot fail")
    })
}

/// "bitwise", or how far apart the two results are.
fn compare(got: &[f32], want: &[f32]) -> String {
    assert_eq!(got.len(), want.len());
    if got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()) {
        return "bitwise".into();
    }
    let mut worst = 0f32;
    let mut differ = 0usize;
    for (a, b) in got.iter().zip(want) {
        if a.to_bits() != b.to_bits() {
            differ += 1;
            let d = (a - b).abs();
            worst = if d.is_nan() { f32::INFINITY } else { worst.max(d) };
        }
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    format!("max abs diff {worst:.2e} (max abs {scale:.2e}; {differ}/{} differ)", got.len())
}

fn compare_bits(got: &[u16], want: &[u16]) -> String {
    let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
    if differ == 0 {
        "bitwise".into()
    } else {
        format!("{differ}/{} halves differ", got.len())
    }
}

/// One measured (kernel, m).
struct Row {
    key: &'static str,
    op: String,
    shape: String,
    m: usize,
    cl: Timing,
    cpu: Timing,
    /// Bytes per call the throughput counts (weights for matmuls, unique KV bytes for
    /// attention, activations read + written otherwise).
    bytes: f64,
    /// Floating-point (or integer multiply-add) operations per call; 0 where meaningless.
    flops: f64,
    check: String,
}

/// One step's rows: which sequence each row belongs to and its position.
struct Batch {
    /// Per sequence: its rows and the position of its first row.
    seqs: Vec<(usize, Range<usize>, usize)>,
    positions: Vec<u32>,
    row_seq: Vec<u32>,
    slots: Vec<u32>,
}

impl Batch {
    /// `m` rows: one decode row per sequence at position `SEQ_CONTEXT - 1` (m ≤ 16), or
    /// 16 chunks of `m / 16` rows ending at `SEQ_CONTEXT - 1` or starting at 0.
    fn new(m: usize, from_zero: bool, tables: &[u32]) -> Self {
        let (num_seqs, per_seq) = if m <= SEQS { (m, 1) } else { (SEQS, m / SEQS) };
        assert_eq!(num_seqs * per_seq, m);
        let start = if from_zero { 0 } else { SEQ_CONTEXT - per_seq };
        let mut b = Batch { seqs: Vec::new(), positions: Vec::new(), row_seq: Vec::new(), slots: Vec::new() };
        for s in 0..num_seqs {
            let first = b.positions.len();
            for p in start..start + per_seq {
                b.positions.push(p as u32);
                b.row_seq.push(s as u32);
                b.slots.push(tables[s * MAX_BLOCKS + p / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (p % BLOCK_TOKENS) as u32);
            }
            b.seqs.push((s, first..b.positions.len(), start));
        }
        b
    }

    fn paged<'a>(&self, tables: &'a [u32]) -> Vec<PagedSeq<'a>> {
        self.seqs
            .iter()
            .map(|(s, rows, start)| PagedSeq { rows: rows.clone(), start_pos: *start, block_table: &tables[s * MAX_BLOCKS..(s + 1) * MAX_BLOCKS] })
            .collect()
    }

    /// The last row of each sequence (the rows that want logits).
    fn logit_rows(&self) -> Vec<u32> {
        self.seqs.iter().map(|(_, r, _)| r.end as u32 - 1).collect()
    }
}

struct Bench<'a> {
    dev: &'a OpenClDevice,
    kn: &'a LlamaKernels,
    qisa: QuantLevel,
    isa: Isa,
    reps: usize,
    rng: Rng,
    rows: Vec<Row>,
}

impl Bench<'_> {
    #[allow(clippy::too_many_arguments)]
    fn push(&mut self, key: &'static str, op: impl Into<String>, shape: impl Into<String>, m: usize, cl: Timing, cpu: Timing, bytes: f64, flops: f64, check: String) {
        let op = op.into();
        eprintln!("  {op} m={m}: OpenCL {:.1} µs, CPU {:.1} µs, {check}", cl.us, cpu.us);
        self.rows.push(Row { key, op, shape: shape.into(), m, cl, cpu, bytes, flops, check });
    }

    /// Quantised activations for `m × k` random values, on both devices (the device ones
    /// from the device's own quantiser).
    fn acts(&mut self, m: usize, k: usize) -> ClResult<(Q8Activations, Q8Buffers)> {
        let x = self.rng.vec_scaled(m * k, 1.0);
        let mut cpu = Q8Activations::new();
        cpu.quantize_with_isa(self.qisa, &x, m, k);
        let dx = self.dev.upload(&x)?;
        let cl = Q8Buffers::new(self.dev, m, k)?;
        self.kn.quantize(self.dev, &dx, &cl, m, k)?;
        self.dev.finish()?;
        Ok((cpu, cl))
    }

    /// `y[m, n] = acts · wᵀ` with `copies` distinct weight matrices used in turn.
    fn matmul(&mut self, key: &'static str, op: &str, format: QuantWeights, n: usize, k: usize, copies: usize) -> ClResult<()> {
        let wtype = match format {
            QuantWeights::Q4_1 => QuantType::Q4_1,
            QuantWeights::Q8_0 => QuantType::Q8_0,
        };
        let host_w = random_matrix(wtype, n, k, self.rng.next_u64());
        let dev_w: Vec<DeviceBuffer<u8>> = (0..copies).map(|_| self.dev.upload(&host_w)).collect::<ClResult<_>>()?;
        let host_w: Vec<Vec<u8>> = (0..copies).map(|_| host_w.clone()).collect();
        let weight_bytes = host_w[0].len() as f64;
        for m in ROW_COUNTS {
            let (acts, dacts) = self.acts(m, k)?;
            let dy = self.dev.alloc::<f32>(m * n)?;
            let mut y = vec![0f32; m * n];
            let (dev, kn, qisa) = (self.dev, self.kn, self.qisa);
            kn.matmul(dev, &dev_w[0], format, &dacts, &dy, m, n, k)?;
            let mut got = vec![0f32; m * n];
            dev.read(&dy, &mut got)?;
            quant_matmul_prepared(qisa, wtype, &host_w[0], n, &acts, &mut y);
            let check = compare(&got, &y);
            let cl = time_cl(dev, self.reps, |i| kn.matmul(dev, &dev_w[i % copies], format, &dacts, &dy, m, n, k))?;
            let cpu = time_cpu(self.reps, |i| quant_matmul_prepared(qisa, wtype, &host_w[i % copies], n, &acts, &mut y));
            let flops = 2.0 * (m * n * k) as f64;
            self.push(key, op, format!("{} n={n} k={k}", wtype.name()), m, cl, cpu, weight_bytes, flops, check);
        }
        Ok(())
    }

    fn quantize(&mut self, key: &'static str, k: usize) -> ClResult<()> {
        for m in ROW_COUNTS {
            let x = self.rng.vec_scaled(m * k, 1.0);
            let dx = self.dev.upload(&x)?;
            let dacts = Q8Buffers::new(self.dev, m, k)?;
            let mut acts = Q8Activations::new();
            let (dev, kn, qisa) = (self.dev, self.kn, self.qisa);
            // The check: the values the matmuls multiply by (q·d) bitwise; the q8_1 sums are
            // covered by the Q4_1 matmul check, whose device side uses this kernel's output.
            kn.quantize(dev, &dx, &dacts, m, k)?;
            let mut qs = vec![0i8; m * k];
            let mut scales = vec![0f32; m * k / 16];
            dev.read(&dacts.qs, &mut qs)?;
            dev.read(&dacts.scales, &mut scales)?;
            acts.quantize_with_isa(qisa, &x, m, k);
            let got: Vec<f32> = qs.iter().enumerate().map(|(i, &q)| q as f32 * scales[2 * (i / 32)]).collect();
            let mut want = vec![0f32; m * k];
            for (r, out) in want.chunks_exact_mut(k).enumerate() {
                acts.dequantize_row(r, out);
            }
            let check = compare(&got, &want);
            let cl = time_cl(dev, self.reps, |_| kn.quantize(dev, &dx, &dacts, m, k))?;
            let cpu = time_cpu(self.reps, |_| acts.quantize_with_isa(qisa, &x, m, k));
            let bytes = (m * k) as f64 * (4.0 + 1.0 + 12.0 / 32.0);
            self.push(key, format!("quantize_q8 k={k}"), format!("[{m}, {k}] f32 → Q8"), m, cl, cpu, bytes, 0.0, check);
        }
        Ok(())
    }

    fn rms_norm(&mut self) -> ClResult<()> {
        let weight: Vec<f32> = self.rng.vec_scaled(DIM, 0.2).iter().map(|v| 1.0 + v).collect();
        let dweight = self.dev.upload(&weight)?;
        for m in ROW_COUNTS {
            let x = self.rng.vec_scaled(m * DIM, 1.0);
            let dx = self.dev.upload(&x)?;
            let dout = self.dev.alloc::<f32>(m * DIM)?;
            let mut out = vec![0f32; m * DIM];
            let (dev, kn, isa) = (self.dev, self.kn, self.isa);
            kn.rms_norm(dev, &dx, &dweight, &dout, m, DIM, EPS)?;
            let mut got = vec![0f32; m * DIM];
            dev.read(&dout, &mut got)?;
            llama_ops::rms_norm(isa, &x, DIM, &weight, EPS, &mut out);
            let check = compare(&got, &out);
            let cl = time_cl(dev, self.reps, |_| kn.rms_norm(dev, &dx, &dweight, &dout, m, DIM, EPS))?;
            let cpu = time_cpu(self.reps, |_| llama_ops::rms_norm(isa, &x, DIM, &weight, EPS, &mut out));
            self.push("rms", "rms_norm", format!("[{m}, {DIM}]"), m, cl, cpu, (m * DIM * 8) as f64, 0.0, check);
        }
        Ok(())
    }

    fn rope(&mut self, key: &'static str, heads: usize, tables: &[u32], cos_sin: &DeviceBuffer<f32>, rope: &RopeParams) -> ClResult<()> {
        let width = heads * HEAD_DIM;
        for m in ROW_COUNTS {
            let batch = Batch::new(m, false, tables);
            let mut table = vec![0f32; m * HEAD_DIM];
            for (cs, &p) in table.chunks_exact_mut(HEAD_DIM).zip(&batch.positions) {
                llama_ops::rope_cos_sin(p as usize, rope, cs);
            }
            let dpos = self.dev.upload(&batch.positions)?;
            let mut x = self.rng.vec_scaled(m * width, 1.0);
            let dx = self.dev.upload(&x)?;
            let (dev, kn) = (self.dev, self.kn);
            kn.rope(dev, &dx, &dpos, cos_sin, m, heads, HEAD_DIM)?;
            let mut got = vec![0f32; m * width];
            dev.read(&dx, &mut got)?;
            llama_ops::rope_pairs(&mut x, heads, HEAD_DIM, HEAD_DIM, &table);
            let check = compare(&got, &x);
            // In place: a rotation, so repeated calls keep the values' size.
            let cl = time_cl(dev, self.reps, |_| kn.rope(dev, &dx, &dpos, cos_sin, m, heads, HEAD_DIM))?;
            let cpu = time_cpu(self.reps, |_| llama_ops::rope_pairs(&mut x, heads, HEAD_DIM, HEAD_DIM, &table));
            let name = if heads == HEADS { "rope (Q)" } else { "rope (K)" };
            self.push(key, name, format!("[{m}, {heads}×{HEAD_DIM}]"), m, cl, cpu, (m * width * 8) as f64, 0.0, check);
        }
        Ok(())
    }

    fn silu_mul(&mut self) -> ClResult<()> {
        for m in ROW_COUNTS {
            let count = m * FFN;
            let mut gate = self.rng.vec_scaled(count, 4.0);
            let up = self.rng.vec_scaled(count, 1.0);
            let mut dgate = self.dev.upload(&gate)?;
            let mut dup = self.dev.upload(&up)?;
            let (dev, kn, isa) = (self.dev, self.kn, self.isa);
            kn.silu_mul(dev, &dgate, &dup, count)?;
            let mut got = vec![0f32; count];
            dev.read(&dgate, &mut got)?;
            llama_ops::silu_mul(isa, &mut gate, &up);
            let check = compare(&got, &gate);
            // In place, so the timed calls iterate g ← silu(g)·u. With random `up` that decays
            // into subnormals within ~130 calls (slow arithmetic on x86), so time it on
            // g < 0, u = 2, which creeps towards 0 like −2/t and stays normal.
            let mut gate: Vec<f32> = self.rng.vec_scaled(count, 1.0).iter().map(|v| -2.5 + 1.5 * v).collect();
            let up = vec![2f32; count];
            dev.write(&mut dgate, &gate)?;
            dev.write(&mut dup, &up)?;
            let cl = time_cl(dev, self.reps, |_| kn.silu_mul(dev, &dgate, &dup, count))?;
            let cpu = time_cpu(self.reps, |_| llama_ops::silu_mul(isa, &mut gate, &up));
            self.push("silu", "silu_mul", format!("[{m}, {FFN}]"), m, cl, cpu, (count * 12) as f64, 0.0, check);
        }
        Ok(())
    }

    fn add(&mut self) -> ClResult<()> {
        for m in ROW_COUNTS {
            let count = m * DIM;
            let mut x = self.rng.vec_scaled(count, 1.0);
            let y = self.rng.vec_scaled(count, 0.01);
            let dx = self.dev.upload(&x)?;
            let dy = self.dev.upload(&y)?;
            let (dev, kn) = (self.dev, self.kn);
            kn.add(dev, &dx, &dy, count)?;
            let mut got = vec![0f32; count];
            dev.read(&dx, &mut got)?;
            add_in_place(&mut x, &y);
            let check = compare(&got, &x);
            let cl = time_cl(dev, self.reps, |_| kn.add(dev, &dx, &dy, count))?;
            let cpu = time_cpu(self.reps, |_| add_in_place(&mut x, &y));
            self.push("add", "add (residual)", format!("[{m}, {DIM}]"), m, cl, cpu, (count * 12) as f64, 0.0, check);
        }
        Ok(())
    }

    fn gather(&mut self, tables: &[u32]) -> ClResult<()> {
        for m in ROW_COUNTS {
            let batch = Batch::new(m, false, tables);
            let wanted = batch.logit_rows();
            let n = wanted.len();
            let x = self.rng.vec_scaled(m * DIM, 1.0);
            let dx = self.dev.upload(&x)?;
            let dwanted = self.dev.upload(&wanted)?;
            let dout = self.dev.alloc::<f32>(n * DIM)?;
            let (dev, kn) = (self.dev, self.kn);
            kn.gather_rows(dev, &dx, &dwanted, &dout, n, DIM)?;
            let mut got = vec![0f32; n * DIM];
            dev.read(&dout, &mut got)?;
            let mut last = Vec::with_capacity(n * DIM);
            let gather = |last: &mut Vec<f32>| {
                last.clear();
                for &r in &wanted {
                    let r = r as usize;
                    last.extend_from_slice(&x[r * DIM..(r + 1) * DIM]);
                }
            };
            gather(&mut last);
            let check = compare(&got, &last);
            let cl = time_cl(dev, self.reps, |_| kn.gather_rows(dev, &dx, &dwanted, &dout, n, DIM))?;
            let cpu = time_cpu(self.reps, |_| gather(&mut last));
            self.push("gather", "gather_rows (logit rows)", format!("{n} of {m} rows × {DIM}"), m, cl, cpu, (n * DIM * 8) as f64, 0.0, check);
        }
        Ok(())
    }

    fn embedding(&mut self, table: &[u8], dtable: &DeviceBuffer<u8>) -> ClResult<()> {
        let row_bytes = QuantType::Q8_0.row_bytes(DIM);
        for m in ROW_COUNTS {
            let tokens: Vec<u32> = (0..m).map(|_| (self.rng.next_u64() % VOCAB as u64) as u32).collect();
            let dtokens = self.dev.upload(&tokens)?;
            let dx = self.dev.alloc::<f32>(m * DIM)?;
            let mut x = vec![0f32; m * DIM];
            let (dev, kn) = (self.dev, self.kn);
            let lookup = |x: &mut [f32]| {
                for (out, &t) in x.chunks_exact_mut(DIM).zip(&tokens) {
                    let t = t as usize;
                    quant::dequantize_row(QuantType::Q8_0, &table[t * row_bytes..(t + 1) * row_bytes], out);
                }
            };
            kn.embedding_lookup(dev, dtable, &dtokens, &dx, m, DIM)?;
            let mut got = vec![0f32; m * DIM];
            dev.read(&dx, &mut got)?;
            lookup(&mut x);
            let check = compare(&got, &x);
            let cl = time_cl(dev, self.reps, |_| kn.embedding_lookup(dev, dtable, &dtokens, &dx, m, DIM))?;
            let cpu = time_cpu(self.reps, |_| lookup(&mut x));
            let bytes = (m * (row_bytes + DIM * 4)) as f64;
            self.push("embed", "embedding_lookup (Q8_0)", format!("{m} of {VOCAB} rows × {DIM}"), m, cl, cpu, bytes, 0.0, check);
        }
        Ok(())
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The paged KV caches of `LAYERS` layers, on both devices, filled with random halves.
struct Caches {
    layout: PagedKvLayout,
    host_k: Vec<Vec<u16>>,
    host_v: Vec<Vec<u16>>,
    dev_k: Vec<DeviceBuffer<u16>>,
    dev_v: Vec<DeviceBuffer<u16>>,
    /// `[SEQS][MAX_BLOCKS]`, interleaved between sequences as a pool hands blocks out.
    tables: Vec<u32>,
    dev_tables: DeviceBuffer<u32>,
}

impl Caches {
    fn new(dev: &OpenClDevice, rng: &mut Rng) -> ClResult<Self> {
        let layout = PagedKvLayout::new(BLOCK_TOKENS, KV_HEADS, HEAD_DIM);
        let elems = SEQS * MAX_BLOCKS * layout.block_elems();
        let one: Vec<u16> = (0..elems).map(|_| f32_to_f16(rng.f32())).collect();
        let other: Vec<u16> = (0..elems).map(|_| f32_to_f16(rng.f32())).collect();
        let mut c = Caches {
            layout,
            host_k: vec![one; LAYERS],
            host_v: vec![other; LAYERS],
            dev_k: Vec::new(),
            dev_v: Vec::new(),
            tables: (0..SEQS * MAX_BLOCKS).map(|i| ((i % MAX_BLOCKS) * SEQS + i / MAX_BLOCKS) as u32).collect(),
            dev_tables: dev.alloc(0)?,
        };
        for l in 0..LAYERS {
            c.dev_k.push(dev.upload(&c.host_k[l])?);
            c.dev_v.push(dev.upload(&c.host_v[l])?);
        }
        c.dev_tables = dev.upload(&c.tables)?;
        Ok(c)
    }
}

impl Bench<'_> {
    fn kv_write(&mut self, c: &mut Caches) -> ClResult<()> {
        for m in ROW_COUNTS {
            let batch = Batch::new(m, false, &c.tables);
            let k = self.rng.vec_scaled(m * KV_WIDTH, 1.0);
            let v = self.rng.vec_scaled(m * KV_WIDTH, 1.0);
            let (dk, dv, dslots) = (self.dev.upload(&k)?, self.dev.upload(&v)?, self.dev.upload(&batch.slots)?);
            let (dev, kn) = (self.dev, self.kn);
            let layout = c.layout;
            let (host_k, host_v) = (&mut c.host_k, &mut c.host_v);
            // LlamaModel::forward_in_pool's loop.
            let write = |k_cache: &mut [u16], v_cache: &mut [u16]| {
                for (s, rows, start) in &batch.seqs {
                    let table = &c.tables[s * MAX_BLOCKS..(s + 1) * MAX_BLOCKS];
                    for (i, row) in rows.clone().enumerate() {
                        let p = start + i;
                        let (kr, vr) = (&k[row * KV_WIDTH..(row + 1) * KV_WIDTH], &v[row * KV_WIDTH..(row + 1) * KV_WIDTH]);
                        layout.write_token(k_cache, v_cache, table[p / BLOCK_TOKENS] as usize, p % BLOCK_TOKENS, kr, vr);
                    }
                }
            };
            kn.kv_write(dev, &dk, &dv, &dslots, &c.dev_k[0], &c.dev_v[0], m, KV_HEADS, BLOCK_TOKENS)?;
            write(&mut host_k[0], &mut host_v[0]);
            let mut got = vec![0u16; host_k[0].len()];
            dev.read(&c.dev_k[0], &mut got)?;
            let mut check = compare_bits(&got, &host_k[0]);
            dev.read(&c.dev_v[0], &mut got)?;
            if check == "bitwise" {
                check = compare_bits(&got, &host_v[0]);
            }
            let (dev_k, dev_v) = (&c.dev_k, &c.dev_v);
            let cl = time_cl(dev, self.reps, |i| kn.kv_write(dev, &dk, &dv, &dslots, &dev_k[i % LAYERS], &dev_v[i % LAYERS], m, KV_HEADS, BLOCK_TOKENS))?;
            let cpu = time_cpu(self.reps, |i| write(&mut host_k[i % LAYERS], &mut host_v[i % LAYERS]));
            let bytes = (m * KV_WIDTH * 2 * (4 + 2)) as f64;
            self.push("kvw", "kv_write", format!("[{m}, 2×{KV_HEADS}×{HEAD_DIM}] → f16 cache"), m, cl, cpu, bytes, 0.0, check);
        }
        Ok(())
    }

    /// One attention kernel on one batch; the CPU counterpart's timing is cached per batch
    /// (the CPU has one attention function for both).
    #[allow(clippy::too_many_arguments)]
    fn attention(&mut self, key: &'static str, decode: bool, m: usize, from_zero: bool, c: &Caches, cpu_cache: &mut HashMap<(usize, bool), Timing>) -> ClResult<()> {
        let batch = Batch::new(m, from_zero, &c.tables);
        let seqs = batch.paged(&c.tables);
        let q = self.rng.vec_scaled(m * Q_WIDTH, 1.0);
        let (dq, drow_seq, drow_pos) = (self.dev.upload(&q)?, self.dev.upload(&batch.row_seq)?, self.dev.upload(&batch.positions)?);
        let dout = self.dev.alloc::<f32>(m * Q_WIDTH)?;
        let t = AttentionTables {
            block_tables: &c.dev_tables,
            row_seq: &drow_seq,
            row_pos: &drow_pos,
            rows: m,
            heads: HEADS,
            kv_heads: KV_HEADS,
            block_tokens: BLOCK_TOKENS,
            max_blocks: MAX_BLOCKS,
        };
        let (dev, kn, isa) = (self.dev, self.kn, self.isa);
        let layout = c.layout;
        let mut out = vec![0f32; m * Q_WIDTH];
        let cpu_attend = |l: usize, out: &mut [f32]| {
            llama_ops::paged_attention(isa, AttentionArith::LlamaCpp, &q, &seqs, HEADS, &layout, &c.host_k[l], &c.host_v[l], out)
        };
        kn.attention(dev, decode, &t, &dq, &c.dev_k[0], &c.dev_v[0], &dout)?;
        let mut got = vec![0f32; m * Q_WIDTH];
        dev.read(&dout, &mut got)?;
        cpu_attend(0, &mut out);
        let check = compare(&got, &out);
        let cl = time_cl(dev, self.reps, |i| kn.attention(dev, decode, &t, &dq, &c.dev_k[i % LAYERS], &c.dev_v[i % LAYERS], &dout))?;
        let cpu = *cpu_cache.entry((m, from_zero)).or_insert_with(|| time_cpu(self.reps, |i| cpu_attend(i % LAYERS, &mut out)));
        // Keys each row attends to; K and V of every (row, KV head) read once.
        let keys: usize = batch.positions.iter().map(|&p| p as usize + 1).sum();
        let per_seq_keys: usize = batch.seqs.iter().map(|(_, r, start)| start + r.len()).sum();
        let bytes = (per_seq_keys * KV_WIDTH * 2 * 2) as f64;
        let flops = (keys * HEADS * HEAD_DIM * 4) as f64;
        let kernel = if decode { "attention decode kernel" } else { "attention prefill kernel" };
        let shape = match (m, from_zero) {
            (1, _) => format!("1 row at pos {}", SEQ_CONTEXT - 1),
            (m, _) if m <= SEQS => format!("{m} seqs × 1 row at pos {}", SEQ_CONTEXT - 1),
            (_, false) => format!("{SEQS} × {PROMPT} rows at pos {}..{}", SEQ_CONTEXT - PROMPT, SEQ_CONTEXT - 1),
            (_, true) => format!("{SEQS} × {PROMPT} rows at pos 0..{}", PROMPT - 1),
        };
        self.push(key, kernel, shape, m, cl, cpu, bytes, flops, check);
        Ok(())
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else if us >= 10.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.2}")
    }
}

fn fmt_rate(amount: f64, us: f64) -> String {
    if amount <= 0.0 {
        return "–".into();
    }
    let g = amount / us / 1e3; // per µs → G per s
    if g >= 10.0 {
        format!("{g:.1}")
    } else {
        format!("{g:.2}")
    }
}

fn print_table(rows: &[Row]) {
    println!("| op | shape | m | calls/batch CL, CPU | OpenCL µs/call | CPU µs/call | OpenCL/CPU time | OpenCL GB/s | CPU GB/s | OpenCL GFLOP/s | CPU GFLOP/s | check |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {}, {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
            r.op,
            r.shape,
            r.m,
            r.cl.calls,
            r.cpu.calls,
            fmt_us(r.cl.us),
            fmt_us(r.cpu.us),
            r.cl.us / r.cpu.us,
            fmt_rate(r.bytes, r.cl.us),
            fmt_rate(r.bytes, r.cpu.us),
            fmt_rate(r.flops, r.cl.us),
            fmt_rate(r.flops, r.cpu.us),
            r.check
        );
    }
}

/// The step totals implied by the per-call numbers: a forward pass is
/// embedding → 30 × (rms_norm ×2, quantize ×4, Q4_1 matmul ×7, rope ×2, kv_write, attention,
/// add ×2, silu_mul) → gather, rms_norm, quantize, Q8_0 matmul on the logits rows.
fn print_step(rows: &[Row], m: usize, title: &str) {
    let find = |key: &str, m: usize| rows.iter().find(|r| r.key == key && r.m == m).unwrap_or_else(|| panic!("no row {key} m={m}"));
    let n = m.min(MAX_LOGIT_ROWS);
    let l = LAYERS;
    let attention = if m <= SEQS { "attn_decode" } else { "attn_prefill_0" };
    let parts: Vec<(&str, &Row, usize)> = vec![
        ("embedding_lookup", find("embed", m), 1),
        ("rms_norm", find("rms", m), 2 * l),
        ("quantize_q8 k=576", find("q576", m), 3 * l),
        ("quantize_q8 k=1536", find("q1536", m), l),
        ("Q4_1 matmul q, o (576×576)", find("mm_qo", m), 2 * l),
        ("Q4_1 matmul k, v (192×576)", find("mm_kv", m), 2 * l),
        ("Q4_1 matmul gate, up (1536×576)", find("mm_gu", m), 2 * l),
        ("Q4_1 matmul down (576×1536)", find("mm_down", m), l),
        ("rope (Q)", find("rope_q", m), l),
        ("rope (K)", find("rope_k", m), l),
        ("kv_write", find("kvw", m), l),
        (if m <= SEQS { "attention (decode kernel)" } else { "attention (prefill kernel, from pos 0)" }, find(attention, m), l),
        ("add", find("add", m), 2 * l),
        ("silu_mul", find("silu", m), l),
        ("gather_rows", find("gather", m), 1),
        ("rms_norm (logit rows)", find("rms", n), 1),
        ("quantize_q8 (logit rows)", find("q576", n), 1),
        ("Q8_0 matmul output (49152×576)", find("mm_out", n), 1),
    ];
    let total_cl: f64 = parts.iter().map(|(_, r, c)| r.cl.us * *c as f64).sum();
    let total_cpu: f64 = parts.iter().map(|(_, r, c)| r.cpu.us * *c as f64).sum();
    let launches: usize = parts.iter().map(|(_, _, c)| c).sum();
    println!("\n### {title}: m = {m} rows, logits for {n}\n");
    println!("| op | calls/step | OpenCL ms | OpenCL share | CPU ms | CPU share | OpenCL/CPU |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r, c) in &parts {
        let (cl, cpu) = (r.cl.us * *c as f64, r.cpu.us * *c as f64);
        println!(
            "| {name} | {c} | {:.3} | {:.1}% | {:.3} | {:.1}% | {:.2} |",
            cl / 1e3,
            100.0 * cl / total_cl,
            cpu / 1e3,
            100.0 * cpu / total_cpu,
            cl / cpu
        );
    }
    println!(
        "| **total** | {launches} | **{:.2}** | 100% | **{:.2}** | 100% | **{:.2}** |",
        total_cl / 1e3,
        total_cpu / 1e3,
        total_cl / total_cpu
    );
    if m <= SEQS {
        let (dec, pre) = (find("attn_decode", m), find("attn_prefill", m));
        let with_prefill = total_cl + (pre.cl.us - dec.cl.us) * l as f64;
        println!(
            "| (OpenCL total with the prefill attention kernel instead, same bits) | | {:.2} | | | | {:.2} |",
            with_prefill / 1e3,
            with_prefill / total_cpu
        );
    }
    println!(
        "\nImplied: OpenCL {:.1} tokens/s, CPU {:.1} tokens/s ({m} tokens per step; kernel time only: no index uploads or logits read-back).",
        m as f64 / (total_cl / 1e6),
        m as f64 / (total_cpu / 1e6)
    );
}

fn run(index: usize, reps: usize) -> ClResult<()> {
    let t = Instant::now();
    let dev = OpenClDevice::open(index)?;
    let kn = LlamaKernels::build(&dev, HEAD_DIM, &KernelSource::Embedded)?;
    let build_s = t.elapsed().as_secs_f64();
    let info = &dev.info;
    let (qisa, isa) = (QuantLevel::selected(), Isa::selected());
    println!("# OpenCL kernels vs CPU kernels, SmolLM2-135M shapes\n");
    println!(
        "- OpenCL device {}: {} ({}, {}), {} compute units, IEEE fp32 (bitwise-capable): {}; kernels built in {build_s:.1} s",
        info.index, info.name, info.platform, info.version, info.compute_units, info.ieee_fp32
    );
    println!(
        "- CPU: quant ISA {}, ops ISA {}, {} rayon threads; {} logical CPUs",
        qisa.as_str(),
        isa.as_str(),
        rayon::current_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "- shapes: dim {DIM}, {HEADS} heads / {KV_HEADS} KV heads × {HEAD_DIM}, FFN {FFN}, vocab {VOCAB}, {LAYERS} layers; Q4_1 layer weights, Q8_0 output; \
         KV cache f16, blocks of {BLOCK_TOKENS}, {SEQS} sequences of context {SEQ_CONTEXT}"
    );
    println!(
        "- m = 1: one decode row; m = {SEQS}: {SEQS} sequences decoding one row each; m = {}: {SEQS} prompts × {PROMPT} tokens in one step",
        SEQS * PROMPT
    );
    println!(
        "- timing: median of {SAMPLES} batches of N calls (N = min({reps}, ≈{BATCH_SECONDS} s of calls)) after warm-up, or of {SLOW_SAMPLES} single calls when one takes ≥ {SLOW_CALL_SECONDS} s; \
         OpenCL batch = N launches + one finish(); CPU on a rayon worker; {LAYERS} copies of every weight matrix and KV cache used in turn"
    );
    eprintln!("device {}: kernels built in {build_s:.1} s; measuring…", dev.name());

    let mut rng = Rng::new(0x5EED);
    let mut caches = Caches::new(&dev, &mut rng)?;
    let rope = RopeParams { dims: HEAD_DIM, base: ROPE_BASE, freq_scale: 1.0, freq_factors: Vec::new() };
    let mut table = vec![0f32; CONTEXT * HEAD_DIM];
    for (p, cs) in table.chunks_exact_mut(HEAD_DIM).enumerate() {
        llama_ops::rope_cos_sin(p, &rope, cs);
    }
    let cos_sin = dev.upload(&table)?;
    let mut b = Bench { dev: &dev, kn: &kn, qisa, isa, reps, rng, rows: Vec::new() };

    let output = random_matrix(QuantType::Q8_0, VOCAB, DIM, 77);
    let doutput = dev.upload(&output)?;
    b.embedding(&output, &doutput)?;
    b.rms_norm()?;
    b.quantize("q576", DIM)?;
    b.quantize("q1536", FFN)?;
    b.matmul("mm_qo", "matmul Q4_1 q / o", QuantWeights::Q4_1, Q_WIDTH, DIM, LAYERS)?;
    b.matmul("mm_kv", "matmul Q4_1 k / v", QuantWeights::Q4_1, KV_WIDTH, DIM, LAYERS)?;
    b.matmul("mm_gu", "matmul Q4_1 gate / up", QuantWeights::Q4_1, FFN, DIM, LAYERS)?;
    b.matmul("mm_down", "matmul Q4_1 down", QuantWeights::Q4_1, DIM, FFN, LAYERS)?;
    b.rope("rope_q", HEADS, &caches.tables, &cos_sin, &rope)?;
    b.rope("rope_k", KV_HEADS, &caches.tables, &cos_sin, &rope)?;
    // Attention before kv_write, which changes the caches.
    let mut cpu_attention = HashMap::new();
    // The runner takes the decode kernel when every sequence adds one row (m = 1, 16), the
    // prefill kernel otherwise; both are timed on the decode batches. The decode kernel is
    // not timed on the 656-row batch: no step uses it there, and on PoCL it takes seconds.
    for m in [1, SEQS] {
        b.attention("attn_decode", true, m, false, &caches, &mut cpu_attention)?;
        b.attention("attn_prefill", false, m, false, &caches, &mut cpu_attention)?;
    }
    b.attention("attn_prefill", false, SEQS * PROMPT, false, &caches, &mut cpu_attention)?;
    b.attention("attn_prefill_0", false, SEQS * PROMPT, true, &caches, &mut cpu_attention)?;
    b.kv_write(&mut caches)?;
    b.add()?;
    b.silu_mul()?;
    b.gather(&caches.tables)?;
    // The tied output matrix: one copy (one per step), 30 MB.
    {
        // Same as `Bench::matmul` but reusing the uploaded table.
        let (n, k) = (VOCAB, DIM);
        for m in ROW_COUNTS {
            let (acts, dacts) = b.acts(m, k)?;
            let dy = dev.alloc::<f32>(m * n)?;
            let mut y = vec![0f32; m * n];
            kn.matmul(&dev, &doutput, QuantWeights::Q8_0, &dacts, &dy, m, n, k)?;
            let mut got = vec![0f32; m * n];
            dev.read(&dy, &mut got)?;
            quant_matmul_prepared(qisa, QuantType::Q8_0, &output, n, &acts, &mut y);
            let check = compare(&got, &y);
            let cl = time_cl(&dev, reps, |_| kn.matmul(&dev, &doutput, QuantWeights::Q8_0, &dacts, &dy, m, n, k))?;
            let cpu = time_cpu(reps, |_| quant_matmul_prepared(qisa, QuantType::Q8_0, &output, n, &acts, &mut y));
            let shape = format!("Q8_0 n={n} k={k}");
            b.push("mm_out", "matmul Q8_0 output", shape, m, cl, cpu, output.len() as f64, 2.0 * (m * n * k) as f64, check);
        }
    }

    println!("\n## Per kernel\n");
    print_table(&b.rows);
    println!(
        "\nGB/s: weight bytes per call for matmuls (as in a step, where every weight is read once); unique KV-cache bytes for attention; \
         activation (and cache) bytes read + written otherwise. GFLOP/s: 2·m·n·k for matmuls (integer multiply-adds on 8-bit codes), \
         4·keys·head_dim per (row, head) for attention. OpenCL/CPU time > 1: the OpenCL kernel is slower. \
         check: the OpenCL result against the CPU kernel's on the same inputs (quantize_q8: the q·d values; its q8_1 sums feed the Q4_1 matmul check). \
         The Q8_0 matmul at m = {} is shown for completeness: a step computes logits for at most {MAX_LOGIT_ROWS} rows.",
        SEQS * PROMPT
    );

    println!("\n## A whole forward pass, summed from the per-call times ({LAYERS} layers)");
    print_step(&b.rows, 1, "Decode, one sequence");
    print_step(&b.rows, SEQS, "Decode, 16 sequences");
    print_step(&b.rows, SEQS * PROMPT, "Prefill, 16 prompts × 41 tokens from position 0");
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let index: usize = match args.next().map(|s| s.parse()) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => {
            eprintln!("usage: opencl_kernel_bench [DEVICE_INDEX [REPS]]");
            return ExitCode::from(2);
        }
    };
    let reps: usize = match args.next().map(|s| s.parse()) {
        None => DEFAULT_REPS,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => {
            eprintln!("usage: opencl_kernel_bench [DEVICE_INDEX [REPS]] (REPS > 0)");
            return ExitCode::from(2);
        }
    };
    match run(index, reps) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (OpenClError::NoRuntime | OpenClError::NoPlatform | OpenClError::NoSuchDevice { .. })) => {
            println!("No OpenCL device to benchmark: {e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("opencl_kernel_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

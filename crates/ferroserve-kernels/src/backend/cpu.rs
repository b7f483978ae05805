//! [`Backend`] over the native CPU kernels: buffers are `Vec`s, the f32 ops are
//! [`CpuDevice`]'s and the quantised linear layers the panel kernels (`quant::panels`); the
//! decoder's ops are `cpu::llama_ops` and the quantised matmuls (`quant`), called as the CPU
//! llama model called them (the same arguments, so the same bits and the same parallel
//! splits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{normalize, AttentionArith, Backend, BackendError, BackendResult, DecodeStep, Element, MatrixUse, Packing, Pooling, RopeParams, StoredMatrix, WeightFile};
use crate::cpu::llama_ops;
use crate::kv_layout::PagedKvLayout;
use crate::quant::{self, panel_matmul, panel_matmuls, quant_matmul_prepared, quant_matmul_with_isa, Panels, Q8Activations, QuantLevel, QuantType};
use crate::{Activation, CpuDevice, Device, PackedLinear, SeqLayout};

/// The CPU backend: [`CpuDevice`]'s ISA level for the f32 kernels, a [`QuantLevel`] for the
/// quantised ones (every level gives the same bits there).
pub struct CpuBackend {
    device: CpuDevice,
    quant_isa: QuantLevel,
    /// The quantised activations, reused pass after pass (grown to the largest).
    acts: Mutex<Q8Activations>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new(CpuDevice::new())
    }
}

impl CpuBackend {
    /// The backend over `device`, quantised kernels at the process's level.
    pub fn new(device: CpuDevice) -> Self {
        Self { device, quant_isa: QuantLevel::selected(), acts: Mutex::new(Q8Activations::new()) }
    }

    /// Runs the quantised matmuls on `isa` instead (tests compare the levels; `isa` must be
    /// supported by this CPU).
    pub fn set_quant_level(&mut self, isa: QuantLevel) {
        self.quant_isa = isa;
    }

    pub fn device(&self) -> &CpuDevice {
        &self.device
    }
}

/// One linear layer `y = act(x · Wᵀ + b)` on the CPU.
pub enum CpuLinear {
    /// The device's f32 (or bf16) panels, bias and activation fused.
    F32(PackedLinear),
    /// Quantised panels and the f32 bias (added after the integer matmul).
    Quantized { panels: Panels, bias: Vec<f32> },
}

/// A decoder weight matrix `[rows, cols]` in its file's packed blocks, read in place from the
/// file's memory map; for fast numerics also repacked into panels.
pub struct CpuMatrix {
    ptr: *const u8,
    len: usize,
    /// Keeps the map `ptr` points into alive, and reads embedding rows without mapping them.
    file: Arc<dyn WeightFile>,
    wtype: QuantType,
    rows: usize,
    cols: usize,
    panels: Option<Panels>,
}

// SAFETY: `ptr..ptr + len` is a slice of `file`'s tensors, which stay valid and unchanged while
// `file` lives (the `WeightFile` contract), and `file` is held here; the bytes are only read.
unsafe impl Send for CpuMatrix {}
unsafe impl Sync for CpuMatrix {}

impl CpuMatrix {
    fn bytes(&self) -> &[u8] {
        // SAFETY: see the Send/Sync note.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Bytes a matmul reads (the panels if repacked, else the file's blocks), and the file's
    /// own bytes of the matrix: what the decode floors of bench/NOTES.md divide.
    pub fn weight_bytes(&self) -> (usize, usize) {
        (self.panels.as_ref().map_or(self.len, Panels::size_bytes), self.len)
    }
}

/// A paged KV cache's K and V blocks, per layer, in host memory.
pub struct CpuKv {
    layout: PagedKvLayout,
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

impl CpuKv {
    /// Layer `layer`'s K and V (f16 bits, laid out as [`PagedKvLayout`] says).
    pub fn layer(&self, layer: usize) -> (&[u16], &[u16]) {
        (&self.k[layer], &self.v[layer])
    }
}

impl Backend for CpuBackend {
    type Buffer<T: Element> = Vec<T>;
    type Linear = CpuLinear;
    type Matrix = CpuMatrix;
    type Acts = Q8Activations;
    /// Each step's rows get their factors from the parameters (`rope_rows`): a whole-context
    /// table would be megabytes for nothing the step does not compute anyway.
    type Rope = RopeParams;
    type KvStorage = CpuKv;

    fn name(&self) -> String {
        self.device.name()
    }

    fn alloc<T: Element>(&self, len: usize) -> BackendResult<Vec<T>> {
        Ok(vec![T::default(); len])
    }

    fn upload<T: Element>(&self, data: Vec<T>) -> BackendResult<Vec<T>> {
        Ok(data)
    }

    fn write<T: Element>(&self, buf: &mut Vec<T>, data: &[T]) -> BackendResult<()> {
        if data.len() > buf.len() {
            return Err(BackendError(format!("write of {} elements into a buffer of {}", data.len(), buf.len())));
        }
        buf[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read<T: Element>(&self, buf: &Vec<T>, out: &mut [T]) -> BackendResult<()> {
        let src = buf.get(..out.len()).ok_or_else(|| BackendError(format!("read of {} elements from a buffer of {}", out.len(), buf.len())))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn run_pass<R: Send>(&self, pass: impl FnOnce() -> R + Send) -> R {
        // `rayon::scope` runs its body on a worker of the global pool (in place if the
        // caller already is one); no tasks are spawned into the scope itself.
        rayon::scope(|_| {
            let _awake = PoolAwake::start();
            pass()
        })
    }

    fn prepare_encoder(&mut self, _head_dim: usize) -> BackendResult<()> {
        Ok(())
    }

    fn pack_linear(&self, weight: &[f32], bias: &[f32], out_features: usize, in_features: usize, format: QuantType) -> BackendResult<CpuLinear> {
        if format == QuantType::F32 {
            return Ok(CpuLinear::F32(self.device.pack_linear(weight, out_features, in_features, Some(bias))));
        }
        if !Panels::supports(format) {
            return Err(BackendError(format!("{} weights are not supported by the quantised panels", format.name())));
        }
        // Round to nearest per block, then repacked into panels.
        let row_bytes = format.row_bytes(in_features);
        let mut bytes = vec![0u8; out_features * row_bytes];
        for (src, dst) in weight.chunks_exact(in_features).zip(bytes.chunks_exact_mut(row_bytes)) {
            quant::quantize_row(format, src, dst);
        }
        Ok(CpuLinear::Quantized { panels: Panels::pack(format, &bytes, out_features, in_features), bias: bias.to_vec() })
    }

    fn embedding_lookup(&self, word: &Vec<f32>, pos: &Vec<f32>, type0: &Vec<f32>, seqs: &Packing<'_, Self>, x: &mut Vec<f32>, dim: usize) -> BackendResult<()> {
        let rows = seqs.rows;
        let (tokens, positions) = (&seqs.tokens[..rows], &seqs.positions[..rows]);
        for ((dst, &id), &p) in x[..rows * dim].chunks_exact_mut(dim).zip(tokens).zip(positions) {
            let word = &word[id as usize * dim..(id as usize + 1) * dim];
            let posv = &pos[p as usize * dim..(p as usize + 1) * dim];
            for j in 0..dim {
                dst[j] = word[j] + posv[j] + type0[j];
            }
        }
        Ok(())
    }

    fn layer_norm(&self, x: &mut Vec<f32>, residual: Option<&Vec<f32>>, gamma: &Vec<f32>, beta: &Vec<f32>, rows: usize, dim: usize, eps: f32) -> BackendResult<()> {
        let n = rows * dim;
        self.device.add_layer_norm(&mut x[..n], residual.map(|r| &r[..n]), dim, gamma, beta, eps);
        Ok(())
    }

    fn linear(&self, x: &Vec<f32>, w: &CpuLinear, act: Activation, y: &mut Vec<f32>, rows: usize) -> BackendResult<()> {
        match w {
            CpuLinear::F32(w) => self.device.linear(&x[..rows * w.in_features], rows, w, act, &mut y[..rows * w.out_features]),
            CpuLinear::Quantized { panels, bias } => {
                if rows == 0 {
                    return Ok(());
                }
                let y = &mut y[..rows * bias.len()];
                let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
                // Element-wise after the matmul: each output row still depends on its own
                // input row only (batch invariance).
                acts.quantize_with_isa(self.quant_isa, &x[..rows * panels.cols()], rows, panels.cols());
                panel_matmul(self.quant_isa, panels, &acts, y);
                for row in y.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
                match act {
                    Activation::None => {}
                    Activation::Gelu => self.device.gelu(y),
                }
            }
        }
        Ok(())
    }

    fn encoder_attention(&self, qkv: &Vec<f32>, seqs: &Packing<'_, Self>, heads: usize, head_dim: usize, out: &mut Vec<f32>) -> BackendResult<()> {
        let offsets: Vec<usize> = seqs.seq_offsets[..=seqs.seqs].iter().map(|&o| o as usize).collect();
        let width = heads * head_dim;
        let rows = seqs.rows;
        self.device.encoder_attention(&qkv[..rows * 3 * width], &SeqLayout { offsets: &offsets }, heads, head_dim, &mut out[..rows * width]);
        Ok(())
    }

    fn pool(&self, hidden: &Vec<f32>, seqs: &Packing<'_, Self>, mode: Pooling, normalize_rows: bool, out: &mut Vec<f32>, dim: usize) -> BackendResult<()> {
        let offsets = &seqs.seq_offsets[..=seqs.seqs];
        for (s, dst) in out[..seqs.seqs * dim].chunks_exact_mut(dim).enumerate() {
            let rows = &hidden[offsets[s] as usize * dim..offsets[s + 1] as usize * dim];
            pool(mode, rows, dim, dst);
            if normalize_rows {
                normalize(dst);
            }
        }
        Ok(())
    }

    fn prepare_decoder(&mut self, _head_dim: usize) -> BackendResult<()> {
        Ok(())
    }

    fn pack_matrix(&self, m: StoredMatrix<'_>, usage: MatrixUse) -> BackendResult<CpuMatrix> {
        let bytes = m.bytes();
        let panels = (usage == MatrixUse::FastMatmul && Panels::supports(m.wtype)).then(|| Panels::pack(m.wtype, bytes, m.rows, m.cols));
        if panels.is_some() {
            // The kernels read the panels only; the file's form is kept for tied embeddings'
            // row gathers, which read it from the file (`embed_rows`).
            m.file().release_resident(bytes);
        }
        Ok(CpuMatrix { ptr: bytes.as_ptr(), len: bytes.len(), file: Arc::clone(m.file()), wtype: m.wtype, rows: m.rows, cols: m.cols, panels })
    }

    fn prepare_rope(&self, params: &RopeParams, _context: usize) -> BackendResult<RopeParams> {
        Ok(params.clone())
    }

    fn alloc_acts(&self, _rows: usize, _k: usize) -> BackendResult<Q8Activations> {
        Ok(Q8Activations::new())
    }

    fn alloc_kv(&self, layout: PagedKvLayout, layers: usize, num_blocks: usize) -> BackendResult<CpuKv> {
        let elems = num_blocks.checked_mul(layout.block_elems()).ok_or_else(|| BackendError("KV cache size overflows".into()))?;
        // Zeroed allocations come from the OS as untouched pages: memory is committed as
        // blocks are first written, not for the whole budget up front.
        Ok(CpuKv { layout, k: (0..layers).map(|_| vec![0u16; elems]).collect(), v: (0..layers).map(|_| vec![0u16; elems]).collect() })
    }

    /// Each row is read from the file (`WeightFile::read_copy`), not through the map:
    /// gathering through the map would bring the table's pages back into RSS a few at a time
    /// until all of it was resident, while the matmuls read only the panels.
    fn embed_rows(&self, table: &CpuMatrix, step: &DecodeStep<'_, Self>, x: &mut Vec<f32>, dim: usize) -> BackendResult<()> {
        let row_bytes = table.wtype.row_bytes(table.cols);
        let embd = table.bytes();
        let mut row = vec![0u8; row_bytes];
        for (out, &t) in x[..step.rows * dim].chunks_exact_mut(dim).zip(&step.tokens[..step.rows]) {
            let t = t as usize;
            table.file.read_copy(&embd[t * row_bytes..(t + 1) * row_bytes], &mut row);
            quant::dequantize_row(table.wtype, &row, out);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &Vec<f32>, out: &mut Vec<f32>, rows: usize, dim: usize, eps: f32) -> BackendResult<()> {
        llama_ops::rms_norm(self.device.isa(), &x[..rows * dim], dim, weight, eps, &mut out[..rows * dim]);
        Ok(())
    }

    fn quantize_activations(&self, x: &Vec<f32>, rows: usize, k: usize, acts: &mut Q8Activations) -> BackendResult<()> {
        // Only block-format weights read the quantised copy, and those have rows of whole
        // 32-blocks (checked at load).
        if k.is_multiple_of(32) {
            acts.quantize_with_isa(self.quant_isa, &x[..rows * k], rows, k);
        }
        Ok(())
    }

    fn matmuls(&self, outputs: &mut [(&CpuMatrix, &mut Vec<f32>)], x: &Vec<f32>, acts: &Q8Activations, rows: usize) -> BackendResult<()> {
        if outputs.iter().all(|(w, _)| w.panels.is_some()) {
            // One parallel region for all of them: the panels are split over the threads
            // together (`panel_matmuls`), the same bits.
            let mut panels: Vec<(&Panels, &mut [f32])> =
                outputs.iter_mut().map(|(w, y)| (w.panels.as_ref().unwrap(), &mut y[..rows * w.rows])).collect();
            panel_matmuls(self.quant_isa, &mut panels, acts);
            return Ok(());
        }
        for (w, y) in outputs.iter_mut() {
            let y = &mut y[..rows * w.rows];
            if let Some(panels) = &w.panels {
                panel_matmul(self.quant_isa, panels, acts, y);
            } else if w.wtype.is_block_quantised() {
                quant_matmul_prepared(self.quant_isa, w.wtype, w.bytes(), w.rows, acts, y);
            } else {
                quant_matmul_with_isa(self.quant_isa, w.wtype, w.bytes(), w.rows, w.cols, &x[..rows * w.cols], rows, y);
            }
        }
        Ok(())
    }

    fn rope_rows(&self, rope: &RopeParams, step: &DecodeStep<'_, Self>, cos_sin: &mut Vec<f32>) -> BackendResult<()> {
        let dims = rope.dims;
        if dims > 0 {
            for (cs, &p) in cos_sin[..step.rows * dims].chunks_exact_mut(dims).zip(&step.positions[..step.rows]) {
                llama_ops::rope_cos_sin(p as usize, rope, cs);
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, rope: &RopeParams, cos_sin: &Vec<f32>, step: &DecodeStep<'_, Self>, heads: usize, head_dim: usize) -> BackendResult<()> {
        let rows = step.rows;
        llama_ops::rope_pairs(&mut x[..rows * heads * head_dim], heads, head_dim, rope.dims, &cos_sin[..rows * rope.dims]);
        Ok(())
    }

    fn kv_write(&self, kv: &mut CpuKv, layer: usize, k: &Vec<f32>, v: &Vec<f32>, step: &DecodeStep<'_, Self>) -> BackendResult<()> {
        let layout = kv.layout;
        let (bt, width) = (layout.block_tokens, layout.kv_heads * layout.head_dim);
        let (k_cache, v_cache) = (&mut kv.k[layer], &mut kv.v[layer]);
        for s in step.seqs {
            for (i, row) in s.rows.clone().enumerate() {
                let p = s.start_pos + i;
                let (k, v) = (&k[row * width..(row + 1) * width], &v[row * width..(row + 1) * width]);
                layout.write_token(k_cache, v_cache, s.block_table[p / bt] as usize, p % bt, k, v);
            }
        }
        Ok(())
    }

    fn paged_attention(&self, q: &Vec<f32>, kv: &CpuKv, layer: usize, step: &DecodeStep<'_, Self>, heads: usize, arith: AttentionArith, out: &mut Vec<f32>) -> BackendResult<()> {
        let n = step.rows * heads * kv.layout.head_dim;
        llama_ops::paged_attention(self.device.isa(), arith, &q[..n], step.seqs, heads, &kv.layout, &kv.k[layer], &kv.v[layer], &mut out[..n]);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, count: usize) -> BackendResult<()> {
        for (a, &b) in x[..count].iter_mut().zip(&y[..count]) {
            *a += b;
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, count: usize) -> BackendResult<()> {
        llama_ops::silu_mul(self.device.isa(), &mut gate[..count], &up[..count]);
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &Vec<u32>, count: usize, dim: usize, out: &mut Vec<f32>) -> BackendResult<()> {
        for (dst, &r) in out[..count * dim].chunks_exact_mut(dim).zip(&rows[..count]) {
            dst.copy_from_slice(&x[r as usize * dim..(r as usize + 1) * dim]);
        }
        Ok(())
    }
}

/// Keeps the pool's other workers awake for the length of a pass: one job per other worker
/// that steals the pass's work (`rayon::yield_now`) until the guard drops. Left to rayon, an
/// idle worker sleeps after 32 `sched_yield` rounds (tens of µs), so every serial stretch of a
/// short pass (A packing, a layer norm, a region's tail) put the other worker to sleep and the
/// next of the pass's ≈ 30 parallel regions waited for its futex wake-up: ≈ 8 sleeps per
/// one-sentence pass on a 2-vCPU Zen 1 (bench/NOTES.md, session 16). Spawned at the pass's
/// start, the wake-up also overlaps the pass's serial first steps. Scheduling only: which
/// worker computes a tile never changes its bits.
struct PoolAwake {
    done: Arc<AtomicBool>,
}

/// Idle polls of a spinning worker between `sched_yield`s: the core is given up now and then
/// in case another thread (the HTTP layer) is waiting for it, without sleeping.
const SPIN_POLLS_PER_YIELD: u32 = 64;

impl PoolAwake {
    fn start() -> Self {
        let done = Arc::new(AtomicBool::new(false));
        // The worker running the pass: a spinner it pops itself (waiting at a join) must
        // return at once, or the pass under it would never resume.
        let home = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = Arc::clone(&done);
            rayon::spawn(move || {
                if rayon::current_thread_index() == home {
                    return;
                }
                let mut idle = 0u32;
                while !done.load(Ordering::Acquire) {
                    match rayon::yield_now() {
                        Some(rayon::Yield::Executed) => idle = 0,
                        _ => {
                            idle += 1;
                            if idle.is_multiple_of(SPIN_POLLS_PER_YIELD) {
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    }
                }
            });
        }
        Self { done }
    }
}

impl Drop for PoolAwake {
    fn drop(&mut self) {
        // On a panic in the pass too: the spinners must not outlive it.
        self.done.store(true, Ordering::Release);
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::{Duration, Instant};

    /// The kernel's state letter of thread `tid` of this process (`S`: asleep, `R`: running or
    /// runnable).
    fn state(tid: &str) -> char {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
    }

    /// CPU seconds (user + system) of thread `tid` so far.
    fn cpu_seconds(tid: &str) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) as f64 / 100.0
    }

    /// A parallel region, then a serial stretch of `serial` on the calling worker during which
    /// the other worker's state is sampled: whether it was ever seen asleep.
    fn region_then_serial(other: &str, serial: Duration, stop_when_asleep: bool) -> bool {
        (0..64).into_par_iter().for_each(|i| {
            std::hint::black_box((0..20_000u64).fold(i as u64, |a, b| a.wrapping_mul(31).wrapping_add(b)));
        });
        let (until, mut slept) = (Instant::now() + serial, false);
        while Instant::now() < until {
            if state(other) == 'S' {
                slept = true;
                if stop_when_asleep {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        slept
    }

    /// Inside `run_pass` the other worker never goes to sleep in a serial stretch of the pass
    /// (in a plain `rayon::scope` it does, after rayon's few dozen idle rounds), and once the
    /// pass has ended it stops spinning.
    #[test]
    fn a_pass_keeps_the_other_worker_awake_until_it_ends() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let home_and_other: Vec<String> = pool.broadcast(|_| {
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            link.file_name().unwrap().to_string_lossy().into_owned()
        });
        let backend = CpuBackend::default();
        // Which worker runs the pass is rayon's choice: sample the one that does not.
        let other = |me: String| home_and_other.iter().find(|t| **t != me).unwrap().clone();
        let me = || std::fs::read_link("/proc/thread-self").unwrap().file_name().unwrap().to_string_lossy().into_owned();
        // Without the guard the idle worker falls asleep (checks that the sampling sees it).
        let slept_plain = pool.install(|| rayon::scope(|_| region_then_serial(&other(me()), Duration::from_secs(5), true)));
        assert!(slept_plain, "the other worker never slept in a plain scope's 5 s serial stretch");
        let slept_in_pass = pool.install(|| {
            backend.run_pass(|| {
                let other = other(me());
                (0..5).any(|_| region_then_serial(&other, Duration::from_millis(100), false))
            })
        });
        assert!(!slept_in_pass, "the other worker fell asleep during run_pass");
        // The spinner has returned: the idle pool burns no CPU, and runs new work.
        std::thread::sleep(Duration::from_millis(50));
        let idle0: f64 = home_and_other.iter().map(|t| cpu_seconds(t)).sum();
        std::thread::sleep(Duration::from_millis(300));
        let spent = home_and_other.iter().map(|t| cpu_seconds(t)).sum::<f64>() - idle0;
        assert!(spent < 0.1, "the idle pool used {spent} s of CPU in 0.3 s");
        assert_eq!(pool.install(|| (0..1000u64).into_par_iter().sum::<u64>()), 499_500);
    }
}

//! [`Backend`] over the native CPU kernels: buffers are `Vec`s, the f32 ops are
//! [`CpuDevice`]'s and the quantised linear layers the panel kernels (`quant::panels`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{normalize, Backend, BackendError, BackendResult, Element, Packing, Pooling};
use crate::quant::{self, panel_matmul, Panels, Q8Activations, QuantLevel, QuantType};
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

impl Backend for CpuBackend {
    type Buffer<T: Element> = Vec<T>;
    type Linear = CpuLinear;

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

    fn supports_pooling(&self, _mode: Pooling) -> bool {
        true
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

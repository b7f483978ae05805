//! Native CPU kernels with run-time ISA dispatch (AVX-512 / AVX2+FMA / portable) on the
//! process's [`Isa`] (`FERROSERVE_ISA`, see [`crate::isa`]).

mod attention;
pub(crate) mod elementwise;
pub mod gemm;
pub mod llama_ops;
mod gemm_amx;
mod gemm_bf16;
mod math;

pub use crate::isa::{Isa, IsaError};
use crate::{Activation, Device, PackedLinear, PackedWeights, SeqLayout};

/// The native CPU device. Threads come from the global rayon pool (sized to the cores).
#[derive(Debug, Clone)]
pub struct CpuDevice {
    isa: Isa,
}

impl Default for CpuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuDevice {
    pub fn new() -> Self {
        Self { isa: Isa::selected() }
    }

    /// A device pinned to one ISA level, or `None` if this CPU cannot run it.
    pub fn with_isa(isa: Isa) -> Option<Self> {
        isa.is_supported().then_some(Self { isa })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

impl Device for CpuDevice {
    fn name(&self) -> String {
        format!("cpu({})", self.isa.as_str())
    }

    fn pack_linear(&self, weight: &[f32], out_features: usize, in_features: usize, bias: Option<&[f32]>) -> PackedLinear {
        assert_eq!(weight.len(), out_features * in_features, "weight shape");
        if let Some(b) = bias {
            assert_eq!(b.len(), out_features, "bias shape");
        }
        // AMX tiles and `vdpbf16ps` read the same bf16 panels.
        let weights = if self.isa.has_bf16() {
            PackedWeights::Bf16(gemm_amx::pack_b(weight, out_features, in_features))
        } else {
            PackedWeights::F32(gemm::pack_b(weight, out_features, in_features))
        };
        PackedLinear { out_features, in_features, weights, bias: bias.map(|b| b.to_vec()) }
    }

    fn linear(&self, x: &[f32], rows: usize, w: &PackedLinear, act: Activation, out: &mut [f32]) {
        let (n, k) = (w.out_features, w.in_features);
        assert!(x.len() >= rows * k, "x too short");
        assert!(out.len() >= rows * n, "out too short");
        self.isa.assert_supported(); // the kernels run `isa`'s instructions
        if rows == 0 || n == 0 {
            return;
        }
        match &w.weights {
            PackedWeights::F32(panels) => gemm::linear(self.isa, x, rows, w, panels, act, out),
            PackedWeights::Bf16(panels) if self.isa.has_amx() => gemm_amx::linear(x, rows, w, panels, act, out),
            PackedWeights::Bf16(panels) if self.isa.has_bf16() => gemm_bf16::linear(x, rows, w, panels, act, out),
            PackedWeights::Bf16(_) => panic!("bf16 weights need the avx512bf16 or amx level, not {}", self.isa.as_str()),
        }
    }

    fn add_layer_norm(&self, x: &mut [f32], residual: Option<&[f32]>, dim: usize, gamma: &[f32], beta: &[f32], eps: f32) {
        elementwise::add_layer_norm(self.isa, x, residual, dim, gamma, beta, eps);
    }

    fn gelu(&self, x: &mut [f32]) {
        elementwise::gelu(self.isa, x);
    }

    fn softmax(&self, x: &mut [f32], cols: usize) {
        elementwise::softmax_rows(self.isa, x, cols);
    }

    fn encoder_attention(&self, qkv: &[f32], layout: &SeqLayout<'_>, heads: usize, head_dim: usize, out: &mut [f32]) {
        attention::encoder_attention(self.isa, qkv, layout, heads, head_dim, out);
    }
}

/// Runs `body` compiled for the given ISA. The body is `#[inline(always)]` generic code;
/// instantiating it inside a `#[target_feature]` function lets the compiler vectorise it
/// with that ISA's registers (the usual Rust multiversioning pattern).
macro_rules! dispatch_isa {
    ($isa:expr, $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            let isa: $crate::cpu::Isa = $isa;
            isa.assert_supported();
            // SAFETY: the CPU supports `isa` (asserted above), hence the target features it has.
            if isa.has_avx512() {
                unsafe { run_avx512($body) }
            } else if isa.has_avx2() {
                unsafe { run_avx2($body) }
            } else {
                ($body)()
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _: $crate::cpu::Isa = $isa;
            ($body)()
        }
    }};
}
pub(crate) use dispatch_isa;

#[cfg(test)]
pub(crate) mod test_util {
    /// Fresh data each run: the tests seed it with the process id.
    pub use crate::testing::Rng;

    /// The kernel levels this CPU can run, lowest first; prints the ones it skips and why
    /// (a test never runs a level the host lacks: that would be SIGILL).
    pub fn levels(test: &str) -> Vec<super::Isa> {
        for isa in super::Isa::ALL.into_iter().filter(|i| !i.is_supported()) {
            eprintln!("{test}: skipping {}: this CPU lacks {}", isa.as_str(), isa.requires());
        }
        super::Isa::available()
    }

    /// Max |got - want| must be ≤ tol · max(1, max |want|); NaN never passes.
    pub fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(err <= tol * scale, "{what}: index {i}: got {g}, want {w} (err {err:e})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_the_cpu_lacks_panics_instead_of_running() {
        let Some(&missing) = Isa::ALL.iter().find(|i| !i.is_supported()) else {
            eprintln!("skipping: this CPU supports every level, so none can be refused");
            return;
        };
        let mut x = vec![1.0f32; 64];
        let err = std::panic::catch_unwind(move || elementwise::gelu(missing, &mut x)).expect_err("must panic, not run");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains(missing.as_str()) && msg.contains("lacks"), "{msg}");
    }
}

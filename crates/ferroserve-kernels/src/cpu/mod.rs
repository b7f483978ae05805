//! Native CPU kernels with run-time ISA dispatch (AVX-512 / AVX2+FMA / portable).
//!
//! The ISA is detected once; `FERROSERVE_ISA=avx512|avx2|portable` forces a lower path
//! (tests use it to cover every path on a machine that has them all).

mod attention;
pub(crate) mod elementwise;
pub mod gemm;
pub mod llama_ops;
mod gemm_amx;
mod math;

use std::sync::OnceLock;

use crate::{Activation, Device, PackedLinear, SeqLayout};

/// The instruction-set level a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
    /// AVX-512 plus AMX-BF16 tile matmuls for linear layers: bf16-rounded weights and
    /// activations, f32 accumulation (embeddings stay at cosine ≥ 0.99998 to the f32
    /// reference, see tests/bert_reference.rs); everything else as `Avx512`.
    Amx,
}

impl Isa {
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// The best level this CPU supports.
    pub fn detect_best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma");
            if avx512 && gemm_amx::amx_available() {
                return Isa::Amx;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The level to use: the best supported, lowered by `FERROSERVE_ISA`
    /// (`portable|avx2|avx512|amx`) if set.
    /// An override above what the CPU supports is ignored (never run illegal instructions).
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let best = Isa::detect_best();
            match std::env::var("FERROSERVE_ISA").ok().as_deref() {
                Some("portable") => Isa::Portable,
                Some("avx2") => best.min(Isa::Avx2),
                Some("avx512") => best.min(Isa::Avx512),
                Some("amx") => best.min(Isa::Amx),
                _ => best,
            }
        })
    }
}

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

    /// A device pinned to one ISA level (clamped to what the CPU supports).
    pub fn with_isa(isa: Isa) -> Self {
        Self { isa: isa.min(Isa::detect_best()) }
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
        let bf16 = self.isa == Isa::Amx;
        PackedLinear {
            out_features,
            in_features,
            data: if bf16 { Vec::new() } else { gemm::pack_b(weight, out_features, in_features) },
            data_bf16: if bf16 { gemm_amx::pack_b(weight, out_features, in_features) } else { Vec::new() },
            bias: bias.map(|b| b.to_vec()),
        }
    }

    fn linear(&self, x: &[f32], rows: usize, w: &PackedLinear, act: Activation, out: &mut [f32]) {
        gemm::linear(self.isa, x, rows, w, act, out);
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
            match $isa {
                // SAFETY: `Isa` values above Portable are only constructed after run-time
                // detection confirmed the features (see `Isa::selected`/`with_isa`).
                $crate::cpu::Isa::Avx512 | $crate::cpu::Isa::Amx => unsafe { run_avx512($body) },
                $crate::cpu::Isa::Avx2 => unsafe { run_avx2($body) },
                $crate::cpu::Isa::Portable => ($body)(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            ($body)()
        }
    }};
}
pub(crate) use dispatch_isa;

#[cfg(test)]
pub(crate) mod test_util {
    /// xorshift64*: fresh data each run comes from seeding with the process id.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }
        pub fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next_f32()).collect()
        }
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

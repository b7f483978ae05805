//! Native CPU kernels with run-time ISA dispatch (AVX-512 / AVX2+FMA / portable).
//!
//! The ISA is detected once; `FERROSERVE_ISA=amx|avx512bf16|avx512|avx2|portable` forces a lower path
//! (`make test` runs the model checks under every level the host has). A level above the
//! host's, or an unknown name, is an error ([`Isa::configured`]): never a silent fallback,
//! never an instruction the CPU lacks.

mod attention;
pub(crate) mod elementwise;
pub mod gemm;
pub mod llama_ops;
mod gemm_amx;
mod gemm_bf16;
mod math;

use std::sync::OnceLock;

use crate::{Activation, Device, PackedLinear, SeqLayout};

/// The instruction-set level a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
    /// AVX-512 plus AVX512_BF16 dot products (`vdpbf16ps`) for linear layers: bf16-rounded
    /// weights and activations, f32 accumulation (the same operands as `Amx`); everything
    /// else as `Avx512`. Worth it where `vdpbf16ps` issues at the FMA's rate (AMD Zen 5).
    Avx512Bf16,
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
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// Every level, lowest first.
    pub const ALL: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    /// What the CPU must have for this level (for messages).
    pub fn requires(self) -> &'static str {
        match self {
            Isa::Portable => "nothing",
            Isa::Avx2 => "AVX2 and FMA",
            Isa::Avx512 => "AVX-512 F/BW/VL and FMA",
            Isa::Avx512Bf16 => "AVX-512 F/BW/VL, FMA and AVX512_BF16",
            Isa::Amx => "AVX-512 F/BW/VL, FMA, AVX512_BF16 and AMX-BF16 tiles (with the kernel's permission)",
        }
    }

    /// Whether this CPU can run the level (detected once; cheap enough to check per call).
    pub fn is_supported(self) -> bool {
        static SUPPORTED: OnceLock<[bool; 5]> = OnceLock::new();
        SUPPORTED.get_or_init(|| Isa::ALL.map(Isa::detect))[self as usize]
    }

    /// Panics with a clear message unless this CPU can run the level. Every kernel entry
    /// that may use wider instructions calls it before its `unsafe` dispatch: any `Isa`
    /// value can be constructed (tests loop over them), and a panic beats SIGILL.
    #[inline]
    pub fn assert_supported(self) {
        assert!(self.is_supported(), "kernel level {} needs {}, which this CPU lacks", self.as_str(), self.requires());
    }

    fn detect(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = || {
                avx2()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            };
            let avx512_bf16 = || avx512() && is_x86_feature_detected!("avx512bf16");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2(),
                Isa::Avx512 => avx512(),
                Isa::Avx512Bf16 => avx512_bf16(),
                // amx_available reads cpuid leaf 7, which every AVX-512 CPU has. Every AMX
                // CPU has AVX512_BF16 too (Sapphire Rapids and later): the ladder stays linear.
                Isa::Amx => avx512_bf16() && gemm_amx::amx_available(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every level this CPU supports, lowest first (the levels tests may run).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best level this CPU supports.
    pub fn detect_best() -> Isa {
        *Isa::available().last().expect("portable is always supported")
    }

    /// The level `FERROSERVE_ISA` names (`portable|avx2|avx512|avx512bf16|amx`; unset or empty: the
    /// best this CPU supports). A name this CPU cannot run, or an unknown one, is an error
    /// that says what the CPU supports.
    pub fn configured() -> Result<Isa, IsaError> {
        Isa::parse_level(std::env::var("FERROSERVE_ISA").ok().as_deref())
    }

    /// [`Isa::configured`] for a given value of `FERROSERVE_ISA`.
    pub fn parse_level(value: Option<&str>) -> Result<Isa, IsaError> {
        let value = value.map(str::trim).unwrap_or("");
        if value.is_empty() {
            return Ok(Isa::detect_best());
        }
        let Some(isa) = Isa::ALL.into_iter().find(|i| i.as_str().eq_ignore_ascii_case(value)) else {
            return Err(IsaError::Unknown(value.to_string()));
        };
        if !isa.is_supported() {
            return Err(IsaError::Unsupported { isa, available: Isa::available() });
        }
        Ok(isa)
    }

    /// The process-wide level ([`Isa::configured`], read once). Servers check
    /// [`Isa::configured`] at start and refuse a bad `FERROSERVE_ISA` with its message;
    /// reaching this with one anyway panics with the same message rather than guess.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Result<Isa, IsaError>> = OnceLock::new();
        match SELECTED.get_or_init(Isa::configured) {
            Ok(isa) => *isa,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A `FERROSERVE_ISA` this process cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsaError {
    #[error("FERROSERVE_ISA={0:?} is not a kernel level: use portable, avx2, avx512, avx512bf16 or amx (or unset it for the best this CPU has)")]
    Unknown(String),
    #[error("FERROSERVE_ISA={} needs {}, which this CPU lacks; it supports {}", .isa.as_str(), .isa.requires(), level_list(.available))]
    Unsupported { isa: Isa, available: Vec<Isa> },
}

fn level_list(levels: &[Isa]) -> String {
    levels.iter().map(|i| i.as_str()).collect::<Vec<_>>().join(", ")
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
        let bf16 = self.isa >= Isa::Avx512Bf16;
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
            let isa: $crate::cpu::Isa = $isa;
            isa.assert_supported();
            match isa {
                // SAFETY: the CPU supports `isa` (asserted above), hence its target features.
                $crate::cpu::Isa::Avx512 | $crate::cpu::Isa::Avx512Bf16 | $crate::cpu::Isa::Amx => unsafe { run_avx512($body) },
                $crate::cpu::Isa::Avx2 => unsafe { run_avx2($body) },
                $crate::cpu::Isa::Portable => ($body)(),
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
    fn levels_are_ordered_and_portable_is_always_there() {
        let available = Isa::available();
        assert_eq!(available.first(), Some(&Isa::Portable));
        assert!(available.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(Isa::detect_best(), *available.last().unwrap());
        // A level implies the ones below it (the dispatch relies on it).
        for (i, isa) in Isa::ALL.into_iter().enumerate() {
            if isa.is_supported() {
                assert!(Isa::ALL[..i].iter().all(|lower| lower.is_supported()), "{isa:?} without the levels below it");
            }
        }
        eprintln!("this CPU runs {}", level_list(&available));
    }

    #[test]
    fn ferroserve_isa_is_honoured_or_refused_clearly() {
        assert_eq!(Isa::parse_level(None), Ok(Isa::detect_best()));
        assert_eq!(Isa::parse_level(Some("")), Ok(Isa::detect_best()));
        for isa in Isa::ALL {
            let got = Isa::parse_level(Some(isa.as_str()));
            if isa.is_supported() {
                assert_eq!(got, Ok(isa));
                assert_eq!(Isa::parse_level(Some(&isa.as_str().to_uppercase())), Ok(isa));
            } else {
                let err = got.expect_err("a level above the host's must be refused");
                let msg = err.to_string();
                assert!(msg.contains(isa.as_str()) && msg.contains(isa.requires()), "{msg}");
                assert!(msg.contains(&level_list(&Isa::available())), "{msg}");
            }
        }
        let err = Isa::parse_level(Some("avx3")).unwrap_err().to_string();
        assert!(err.contains("\"avx3\"") && err.contains("portable, avx2, avx512, avx512bf16 or amx"), "{err}");
    }

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

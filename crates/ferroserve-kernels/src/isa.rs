//! The CPU instruction-set level, read from `FERROSERVE_ISA` in one place
//! ([`Isa::configured`]), and what it lets a kernel use ([`Isa::has_avx2`], [`Isa::has_f16c`],
//! …). Kernels ask these questions rather than compare levels; the quantised kernels' level
//! ([`QuantLevel`]) is computed from an `Isa`, never read from the environment.
//!
//! The ISA is detected once; `FERROSERVE_ISA=amx|avx512bf16|avx512|avx2|portable` forces a
//! lower path (`make test` runs the model checks under every level the host has). A level
//! above the host's, or an unknown name, is an error ([`Isa::configured`]): never a silent
//! fallback, never an instruction the CPU lacks.

use std::sync::OnceLock;

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
                Isa::Amx => avx512_bf16() && amx_available(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// AVX2 and FMA: every level from avx2 up.
    pub fn has_avx2(self) -> bool {
        self >= Isa::Avx2
    }

    /// AVX-512 F/BW/VL: every level from avx512 up.
    pub fn has_avx512(self) -> bool {
        self >= Isa::Avx512
    }

    /// AVX512_BF16 (`vdpbf16ps`): linear layers take bf16 panels (avx512bf16 and amx).
    pub fn has_bf16(self) -> bool {
        self >= Isa::Avx512Bf16
    }

    /// AMX-BF16 tiles for linear layers.
    pub fn has_amx(self) -> bool {
        self == Isa::Amx
    }

    /// F16C under a level with AVX2. No level promises it (the avx2 level asks only AVX2
    /// and FMA, though every AVX2 CPU made has F16C), so it is this CPU's answer.
    pub fn has_f16c(self) -> bool {
        self.has_avx2() && host().f16c
    }

    /// AVX512_VNNI (`vpdpbusd`) under a level with AVX-512: no level promises it either.
    pub fn has_vnni(self) -> bool {
        self.has_avx512() && host().vnni
    }

    /// The level the quantised kernels run with under this one: the widest whose
    /// instructions this level allows and the CPU has (their AVX2 kernels also need F16C,
    /// their AVX-512 ones VNNI; avx512bf16 and amx add nothing they use).
    pub fn quant_level(self) -> QuantLevel {
        if self.has_vnni() && self.has_f16c() {
            QuantLevel::Avx512
        } else if self.has_f16c() {
            QuantLevel::Avx2
        } else {
            QuantLevel::Portable
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

/// Whether this CPU and OS let us use AMX-BF16 (asks the kernel for the tile state once).
fn amx_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            // SAFETY: cpuid leaf 7 exists on every x86-64 CPU that has AVX-512 (checked by
            // the caller); arch_prctl only changes this process's xstate permissions.
            unsafe {
                let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
                let amx_bf16 = leaf7.edx & (1 << 22) != 0;
                let amx_tile = leaf7.edx & (1 << 24) != 0;
                if !(amx_bf16 && amx_tile) {
                    return false;
                }
                // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux ≥ 5.16 needs
                // this before a process may touch tile data.
                let ret: i64;
                std::arch::asm!(
                    "syscall",
                    inlateout("rax") 158i64 => ret,
                    in("rdi") 0x1023i64,
                    in("rsi") 18i64,
                    lateout("rcx") _, lateout("r11") _,
                    options(nostack)
                );
                ret == 0
            }
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// CPU features no level promises, detected once (see [`Isa::has_f16c`], [`Isa::has_vnni`]).
struct HostFeatures {
    /// AVX2 + FMA + F16C.
    f16c: bool,
    /// AVX-512 F/BW/VL + AVX512_VNNI.
    vnni: bool,
}

fn host() -> &'static HostFeatures {
    static HOST: OnceLock<HostFeatures> = OnceLock::new();
    HOST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            HostFeatures {
                f16c: Isa::Avx2.is_supported() && is_x86_feature_detected!("f16c"),
                vnni: Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            HostFeatures { f16c: false, vnni: false }
        }
    })
}

/// The level the quantised kernels (`crate::quant`) instantiate: a view of an [`Isa`]
/// ([`Isa::quant_level`]), never read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QuantLevel {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI, on top of AVX2.
    Avx512,
}

impl QuantLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantLevel::Portable => "portable",
            QuantLevel::Avx2 => "avx2",
            QuantLevel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        self <= QuantLevel::detect_best()
    }

    /// Every level this CPU supports, lowest first (tests run each one).
    pub fn available() -> Vec<QuantLevel> {
        [QuantLevel::Portable, QuantLevel::Avx2, QuantLevel::Avx512].into_iter().filter(|l| l.is_supported()).collect()
    }

    /// The best level this CPU supports.
    pub fn detect_best() -> QuantLevel {
        Isa::detect_best().quant_level()
    }

    /// The process-wide level: [`Isa::selected`]'s ([`Isa::quant_level`]).
    pub fn selected() -> QuantLevel {
        Isa::selected().quant_level()
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

    /// The quantised kernels' level under each CPU level, as it was defined before it became
    /// a view of `Isa`: the best one the CPU has (AVX2 needs FMA and F16C, AVX-512 also
    /// F/BW/VL and VNNI), capped at the CPU level's own width.
    #[test]
    fn quant_level_is_the_best_the_cpu_has_under_the_level() {
        #[cfg(target_arch = "x86_64")]
        let best = {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if avx2 && avx512 {
                QuantLevel::Avx512
            } else if avx2 {
                QuantLevel::Avx2
            } else {
                QuantLevel::Portable
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let best = QuantLevel::Portable;
        assert_eq!(QuantLevel::detect_best(), best);
        for isa in Isa::ALL {
            let ceiling = match isa {
                Isa::Portable => QuantLevel::Portable,
                Isa::Avx2 => QuantLevel::Avx2,
                Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => QuantLevel::Avx512,
            };
            assert_eq!(isa.quant_level(), best.min(ceiling), "{isa:?}");
        }
        let available = QuantLevel::available();
        assert_eq!(available.first(), Some(&QuantLevel::Portable));
        assert_eq!(available.last(), Some(&best));
    }
}

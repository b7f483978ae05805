//! The kernel sources (`kernels/*.cl` and `common.h`), embedded in the binary at build time
//! so that a wheel needs no kernel files beside it. OpenCL's `#include` resolves against the
//! file system (`-I dir`), which an installed wheel does not have: `common.h` is spliced in
//! textually instead (it has an include guard, so several kernels may share a program).

/// `kernels/common.h`.
pub const COMMON_H: &str = include_str!("../../../../kernels/common.h");

/// Every kernel: (name = file stem = kernel function, source). One kernel per file.
pub const KERNELS: &[(&str, &str)] = &[
    ("add_f32", include_str!("../../../../kernels/add_f32.cl")),
    ("attention_encoder_f32", include_str!("../../../../kernels/attention_encoder_f32.cl")),
    ("attention_paged_f16_decode", include_str!("../../../../kernels/attention_paged_f16_decode.cl")),
    ("attention_paged_f16_prefill", include_str!("../../../../kernels/attention_paged_f16_prefill.cl")),
    ("embedding_lookup_f32", include_str!("../../../../kernels/embedding_lookup_f32.cl")),
    ("embedding_lookup_q8_0", include_str!("../../../../kernels/embedding_lookup_q8_0.cl")),
    ("gather_rows_f32", include_str!("../../../../kernels/gather_rows_f32.cl")),
    ("gelu_f32", include_str!("../../../../kernels/gelu_f32.cl")),
    ("kv_write_f16_f32", include_str!("../../../../kernels/kv_write_f16_f32.cl")),
    ("layer_norm_f32", include_str!("../../../../kernels/layer_norm_f32.cl")),
    ("matmul_f32_f32", include_str!("../../../../kernels/matmul_f32_f32.cl")),
    ("matmul_f32_f32_tiled", include_str!("../../../../kernels/matmul_f32_f32_tiled.cl")),
    ("matmul_q4_1_q8_1", include_str!("../../../../kernels/matmul_q4_1_q8_1.cl")),
    ("matmul_q8_0_q8_0", include_str!("../../../../kernels/matmul_q8_0_q8_0.cl")),
    ("pool_f32", include_str!("../../../../kernels/pool_f32.cl")),
    ("quantize_q8_f32", include_str!("../../../../kernels/quantize_q8_f32.cl")),
    ("rms_norm_f32", include_str!("../../../../kernels/rms_norm_f32.cl")),
    ("rope_f32", include_str!("../../../../kernels/rope_f32.cl")),
    ("silu_mul_f32", include_str!("../../../../kernels/silu_mul_f32.cl")),
    ("softmax_f32", include_str!("../../../../kernels/softmax_f32.cl")),
];

const INCLUDE_LINE: &str = "#include \"common.h\"";

/// The source of kernel `name` with `common.h` spliced in place of its `#include`, or
/// `None` for an unknown name.
pub fn source(name: &str) -> Option<String> {
    let (_, text) = KERNELS.iter().find(|(n, _)| *n == name)?;
    Some(text.replacen(INCLUDE_LINE, COMMON_H, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_includes_common_h_once_and_splices() {
        for (name, text) in KERNELS {
            assert_eq!(text.matches(INCLUDE_LINE).count(), 1, "{name}");
            let spliced = source(name).unwrap();
            assert!(!spliced.contains(INCLUDE_LINE), "{name}");
            assert!(spliced.contains("FERROSERVE_COMMON_H"), "{name}");
            assert!(spliced.contains(&format!("__kernel void {name}(")), "{name}: kernel named after its file");
        }
        assert!(source("no_such_kernel").is_none());
    }
}

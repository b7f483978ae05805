//! Shared test helpers: where the model packages and fixtures are.

use std::path::PathBuf;

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

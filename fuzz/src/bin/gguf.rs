//! Fuzz target `gguf` (see `ferroserve_fuzz::gguf`). Built by `cargo afl build` it is an AFL++
//! target; built by plain `cargo build` it replays the files or directories it is given.

#[cfg(fuzzing)]
fn main() {
    ferroserve_fuzz::warm_up("gguf");
    afl::fuzz!(|data: &[u8]| ferroserve_fuzz::gguf(data));
}

#[cfg(not(fuzzing))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let failed = ferroserve_fuzz::replay(ferroserve_fuzz::gguf, &args);
    std::process::exit(i32::from(failed > 0));
}

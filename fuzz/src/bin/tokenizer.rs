//! Fuzz target `tokenizer` (see `ferroserve_fuzz::tokenizer`). Built by `cargo afl build` it is an AFL++
//! target; built by plain `cargo build` it replays the files or directories it is given.

#[cfg(fuzzing)]
fn main() {
    ferroserve_fuzz::warm_up("tokenizer");
    afl::fuzz!(|data: &[u8]| ferroserve_fuzz::tokenizer(data));
}

#[cfg(not(fuzzing))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let failed = ferroserve_fuzz::replay(ferroserve_fuzz::tokenizer, &args);
    std::process::exit(i32::from(failed > 0));
}

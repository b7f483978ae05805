#!/usr/bin/env bash
# The ISA matrix of `make test` (README: "CPUs and kernel levels"). `make test` first runs
# every test at the host's best level; the CPU kernel unit tests there already loop over
# every level this CPU has. This script then proves the other paths on this machine:
#   1. the model-level checks (llama.cpp fixtures, batch invariance, the OpenCL device's
#      bitwise agreement with the CPU, embedding fixtures) once per lower level the host
#      has, with FERROSERVE_ISA forced;
#   2. the kernel crate's tests on emulated CPUs without AVX-512 (qemu-x86_64 -cpu Haswell:
#      AVX2/FMA/F16C) and without AVX (-cpu qemu64), so an AVX-512 machine shows that the
#      run-time detection never picks an instruction an older host lacks (no SIGILL).
# Levels the host lacks are listed as skipped, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
read -r -a levels <<<"$($PY -c 'from ferroserve import _core; print(" ".join(_core.cpu_isa_levels()))')"
best=${levels[-1]}
summary=()
for level in portable avx2 avx512 avx512bf16 amx; do
    if [[ " ${levels[*]} " != *" $level "* ]]; then
        why=$(FERROSERVE_ISA=$level $PY -m ferroserve devices 2>&1 | sed 's/.*needs //; s/, which.*//' || true)
        summary+=("$level: skipped, this CPU lacks it (it needs $why)")
    elif [[ $level == "$best" ]]; then
        summary+=("$level: the host's best level, covered by the full cargo test and pytest runs")
    fi
done

for level in "${levels[@]}"; do
    [[ $level == "$best" ]] && continue
    echo "=== ISA matrix: FERROSERVE_ISA=$level (model-level checks)"
    start=$SECONDS
    # The 14-prompt OpenCL-against-CPU greedy runs are left to the best level: at a lower level
    # the device still passes its bitwise load check against that level's CPU kernels (run at
    # every start, asserted below), and the CPU side is held to llama.cpp's fixture here. So
    # is the 32-stream HTTP test (90 s at portable on Zen 1): batch invariance at this level is
    # llama_reference's bitwise `logits_are_bitwise_batch_invariant`.
    FERROSERVE_ISA=$level cargo test --profile ci -q -p ferroserve-core --test llama_reference --test llama_opencl \
        -- --skip greedy_fixture_output_equals_the_cpu_device
    FERROSERVE_ISA=$level .venv/bin/pytest -q -p no:cacheprovider -m isa_matrix --durations=5 \
        --deselect tests/api/test_opencl_chat.py::test_greedy_fixture_output_equals_the_cpu_server \
        --deselect tests/api/test_chat.py::test_32_concurrent_streams_equal_each_alone
    summary+=("$level: model-level checks passed ($((SECONDS - start)) s)")
done

if ! command -v qemu-x86_64 >/dev/null; then
    summary+=("emulated CPUs: skipped, qemu-x86_64 is not installed (apt-get install qemu-user; \`make test\` does where apt works)")
else
    mapfile -t bins < <(cargo test --profile ci -q -p ferroserve-kernels --no-run --message-format=json 2>/dev/null \
        | $PY -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
    lib_tests=$(printf '%s\n' "${bins[@]}" | grep '/ferroserve_kernels-' || true)
    [[ ${#bins[@]} -ge 2 && -n $lib_tests ]] || { echo "isa_matrix: could not list the kernel crate's test binaries" >&2; exit 1; }
    # Haswell: AVX2/FMA/F16C, no AVX-512 (minus the system features qemu's TCG cannot
    # emulate, which it would warn about); qemu64: x86-64's baseline, no AVX at all.
    cpus=(Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-invpcid,-rtm qemu64)
    if [[ $best == avx2 ]]; then
        # This host is itself an AVX2 CPU without AVX-512: the native runs above already showed
        # that detection picks nothing it lacks, so emulating Haswell repeats them (≈ 100 s).
        cpus=(qemu64)
        summary+=("emulated Haswell: skipped, this host is an AVX2-only CPU, so the native runs are that proof")
    fi
    for cpu in "${cpus[@]}"; do
        echo "=== ISA matrix: kernel tests on an emulated ${cpu%%,*} CPU (qemu-x86_64 -cpu $cpu)"
        start=$SECONDS
        for bin in "${bins[@]}"; do
            # FERROSERVE_ISA unset: the levels are whatever the emulated CPU reports.
            env -u FERROSERVE_ISA qemu-x86_64 -cpu "$cpu" "$bin" -q
        done
        summary+=("emulated ${cpu%%,*}: kernel crate tests passed, levels $(env -u FERROSERVE_ISA qemu-x86_64 -cpu "$cpu" "$lib_tests" --exact isa::tests::levels_are_ordered_and_portable_is_always_there --nocapture 2>&1 | sed -n 's/^this CPU runs //p') ($((SECONDS - start)) s)")
    done
fi

echo "=== ISA matrix summary (host levels: ${levels[*]})"
printf '  %s\n' "${summary[@]}"

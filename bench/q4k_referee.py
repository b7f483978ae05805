"""Who is closer to the file's own maths on a re-quantised model, ours or llama-server?
(issue 14: the Q4_K_M file's greedy texts leave llama-server's on Zen 1.)

The referee is tests/llama_f64.py: the same GGUF's weights decoded to f64, an f64 forward
pass, no activation quantisation. On the fixture prompts (shared/fixtures/smollm2_reference.json)
it measures, for ours (exact and fast, in process through `_core.ChatEngine`) and
llama-server (`--no-repack`, as tests/api/test_requantised_models.py runs it):
- greedy: 16 tokens each; where ours and llama-server's first part, the referee's log-prob
  of each side's token there (teacher-forced on the shared prefix) and its own top-1;
- distributions: teacher-forced along llama-server's greedy tokens (every position after the
  prompt), each side's top-20 log-probs against the referee: KL(ref ‖ side) over the partition
  {side's top 20, everything else} (a lower bound of the full KL, the same bound for both
  sides), and whether the side's top-1 is the referee's.

    PYTHONPATH=python .venv/bin/python bench/q4k_referee.py [--quant q4_k_m] [--ref-file PATH]

--ref-file: score against another file's f64 pass (a control: ours on Q4_K_M against the
Q4_0 file's maths must look bad). Needs bench/.work/models and llama-server built.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.llama_f64 import LlamaF64  # noqa: E402
from tests.llama_server import llama_server  # noqa: E402

from ferroserve import _core  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "smollm2_reference.json"
MODELS = REPO / "bench" / ".work" / "models"
MAX_TOKENS, TOP, EOS = 16, 20, 2


class Ours:
    def __init__(self, path: Path, numerics: str):
        self.engine = _core.ChatEngine(str(path), numerics=numerics)
        self.next_id = 1

    def _run(self, tokens: list[int], max_tokens: int):
        rid, self.next_id = self.next_id, self.next_id + 1
        self.engine.submit(rid, tokens, max_tokens=max_tokens, temperature=0.0, logprobs=True,
                           top_logprobs=TOP, ignore_eos=max_tokens == 1)
        ids, tops = [], []
        while True:
            for ev in self.engine.drain():
                if isinstance(ev, _core.ChatDelta):
                    ids += ev.token_ids
                    tops += [{t: lp for t, _, lp in top} for _, _, _, top in ev.logprobs or []]
                elif isinstance(ev, _core.ChatFinished):
                    # The end-of-turn token it stopped at is not among the deltas' ids.
                    if ev.finish_reason == "stop" and max_tokens > 1 and EOS not in ids:
                        ids.append(EOS)
                    return ids, tops
                elif isinstance(ev, _core.EngineFailed):
                    raise RuntimeError(ev.message)
            time.sleep(0.002)

    def greedy(self, prompt):
        return self._run(prompt, MAX_TOKENS)[0]

    def top(self, tokens) -> dict[int, float]:
        return self._run(tokens, 1)[1][0]


class Llama:
    """llama-server on the file (tests/llama_server.py, as the test runs it)."""

    def __init__(self, path: Path):
        self._server = llama_server(path)
        self.url, self.log = self._server.__enter__()

    def stop(self):
        self._server.__exit__(None, None, None)

    def _post(self, tokens, n):
        r = httpx.post(self.url + "/completion", json={
            "prompt": tokens, "n_predict": n, "top_k": 1, "temperature": 0, "cache_prompt": False,
            "return_tokens": True, "n_probs": TOP if n == 1 else 0}, timeout=120)
        r.raise_for_status()
        return r.json()

    def greedy(self, prompt):
        return self._post(prompt, MAX_TOKENS)["tokens"]

    def top(self, tokens) -> dict[int, float]:
        p = self._post(tokens, 1)["completion_probabilities"][0]["top_logprobs"]
        return {e["id"]: e["logprob"] for e in p}


def kl_partition(ref_lp: np.ndarray, top: dict[int, float]) -> float:
    """KL(ref ‖ side) over {side's top tokens, the rest}."""
    ids = np.array(list(top))
    side = np.array(list(top.values()))
    p = np.exp(ref_lp[ids])
    kl = float(np.sum(p * (ref_lp[ids] - side)))
    p_rest, q_rest = max(1.0 - p.sum(), 1e-300), max(1.0 - np.exp(side).sum(), 1e-300)
    return kl + p_rest * math.log(p_rest / q_rest)


def first_split(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--ref-file", type=Path)
    ap.add_argument("--json", type=Path, help="write the per-prompt numbers here")
    ap.add_argument("--skip", type=int, default=0, help="start at this fixture prompt")
    args = ap.parse_args()
    path = MODELS / f"smollm2-135m-{args.quant}.gguf"
    fixture = json.loads(FIXTURE.read_text())
    items = (fixture["completions"] + fixture["chats"])[args.skip:]

    t0 = time.time()
    ref = LlamaF64(args.ref_file or path)
    print(f"f64 referee loaded in {time.time() - t0:.0f} s", flush=True)
    sides = {"exact": Ours(path, "exact"), "fast": Ours(path, "fast")}
    llama = Llama(path)
    sides["llama"] = llama
    try:
        for line in llama.log.read_text().splitlines():
            if any(k in line for k in ("system_info", "CPU_REPACK", "repack", "llamafile", "AVX", "CPU model buffer")):
                print("llama-server log:", line.strip())
        rows = []
        for item in items:
            prompt = item["prompt_tokens"]
            greedy = {k: s.greedy(prompt) for k, s in sides.items()}
            greedy = {k: [t for t in g if t != EOS] + ([EOS] if EOS in g else []) for k, g in greedy.items()}
            row = {"prompt": item["prompt"][:28], "n_prompt": len(prompt), "greedy": greedy}
            # First divergence of each of ours from llama-server's: the referee's verdict there.
            for k in ("exact", "fast"):
                i = first_split(greedy[k], greedy["llama"])
                if i is None:
                    row[k + "_split"] = None
                    continue
                lp = ref.log_probs(prompt + greedy["llama"][:i])[-1]
                ours_t, llama_t = greedy[k][i], greedy["llama"][i]
                own = sides[k].top(prompt + greedy["llama"][:i])
                lla = llama.top(prompt + greedy["llama"][:i])
                row[k + "_split"] = {
                    "at": i, "ours": ours_t, "llama": llama_t, "ref_top1": int(lp.argmax()),
                    "ref_gap_ours_minus_llama": float(lp[ours_t] - lp[llama_t]),
                    "ours_gap": own[ours_t] - own.get(llama_t, -math.inf),
                    "llama_gap": lla[llama_t] - lla.get(ours_t, -math.inf),
                }
            # Distributions along llama-server's greedy tokens (every position after the prompt).
            seq = prompt + [t for t in greedy["llama"] if t != EOS]
            ref_lp = ref.log_probs(seq)[len(prompt) - 1:]
            stats = {}
            for k, s in sides.items():
                kls, top1 = [], 0
                for j, lp in enumerate(ref_lp):
                    top = s.top(seq[:len(prompt) + j])
                    kls.append(kl_partition(lp, top))
                    top1 += max(top, key=top.get) == int(lp.argmax())
                stats[k] = {"kl_mean": float(np.mean(kls)), "kl_max": float(np.max(kls)), "top1": top1, "n": len(kls)}
            row["dist"] = stats
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "greedy"}), flush=True)
    finally:
        llama.stop()
    print("\nprompt | exact split: at, ref gap (ours − llama), ours' gap, llama's gap, ref top-1 = | "
          "KL×1e3 mean exact / fast / llama | top-1 = ref exact / fast / llama")
    tot = {k: [0.0, 0, 0] for k in sides}
    for r in rows:
        s = r["exact_split"]
        split = "same" if s is None else (
            f"{s['at']}, {s['ref_gap_ours_minus_llama']:+.3f}, {s['ours_gap']:.3f}, {s['llama_gap']:.3f}, "
            + ("ours" if s["ref_top1"] == s["ours"] else "llama" if s["ref_top1"] == s["llama"] else "neither"))
        d = r["dist"]
        for k in sides:
            tot[k][0] += d[k]["kl_mean"] * d[k]["n"]
            tot[k][1] += d[k]["top1"]
            tot[k][2] += d[k]["n"]
        print(f"{r['prompt']!r} | {split} | " + " / ".join(f"{d[k]['kl_mean'] * 1e3:.2f}" for k in sides)
              + " | " + " / ".join(f"{d[k]['top1']}/{d[k]['n']}" for k in sides))
    print("all positions: KL×1e3 mean " + " / ".join(f"{k} {tot[k][0] / tot[k][2] * 1e3:.3f}" for k in sides)
          + "; top-1 = ref " + " / ".join(f"{k} {tot[k][1]}/{tot[k][2]}" for k in sides))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

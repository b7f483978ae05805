#!/usr/bin/env python3
"""Long-prompt prefill: ferroserve vs llama-server on one ~2,048-token prompt (issue 14 step 4).
    .venv/bin/python bench/prefill.py                  # 2 rounds, A B A B, 3 prompts each
    .venv/bin/python bench/prefill.py --tokens 1024 --rounds 3
The prompt is the opening of the GNU GPL v3 as Debian ships it (/usr/share/common-licenses/GPL-3,
package base-files: the prose the numerics test uses too), cut to about --tokens tokens, with a
request number up front so that no two requests share a KV block (llama-server gets
cache_prompt=false; ours has no block to reuse). POST /v1/completions, max_tokens 1: the
latency is the prefill (plus one sampled token and the HTTP round trip), reported as prompt
tokens per second. Servers start one at a time (see bench/chat.py; its options apply:
--ours-args, --ours-env, --model, --llama-args, --rounds, --order, --wait-quiet).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat  # noqa: E402  (Server, make_servers, the shared options)
from embeddings import Usage, wait_quiet  # noqa: E402

PROSE = Path("/usr/share/common-licenses/GPL-3")


def prompt_text(n: int, words: int) -> str:
    text = " ".join(PROSE.read_text().split()[:words])
    return f"[{n:04d}] {text}"


async def one(client, server: chat.Server, model: str, n: int, words: int) -> dict:
    req = {"model": model, "prompt": prompt_text(n, words), "max_tokens": 1, "temperature": 0.0}
    if server.name == "llama.cpp":
        req["cache_prompt"] = False
    t0 = time.perf_counter()
    r = await client.post(server.url + "/v1/completions", content=json.dumps(req).encode(), headers=chat.HEADERS)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.text[:300]}")
    usage = r.json()["usage"]
    return {"latency": dt, "prompt_tokens": usage["prompt_tokens"], "tok_s": usage["prompt_tokens"] / dt}


async def session(server: chat.Server, model: str, a, rnd: int, words: int) -> dict:
    import httpx

    server.start()
    try:
        await server.wait_ready(a.ready_timeout)
        async with httpx.AsyncClient(timeout=600.0) as client:
            await one(client, server, model, 9000 + rnd, words)  # warm-up
            if a.wait_quiet:
                wait_quiet(a.wait_quiet, server.pid)
            usage = Usage(server.pid)
            s0 = usage.snap()
            runs = [await one(client, server, model, 100 * rnd + i + 1, words) for i in range(a.prompts)]
            cores = {k: round(v, 2) for k, v in usage.delta(s0, usage.snap()).items()}
    finally:
        server.stop()
    tok = statistics.median(r["tok_s"] for r in runs)
    chat.log(f"  [{server.name} r{rnd}] {runs[0]['prompt_tokens']} prompt tokens: "
             f"{', '.join('%.0f' % r['tok_s'] for r in runs)} tok/s (median {tok:.0f}); cores: {cores}")
    return {"server": server.name, "round": rnd, "runs": runs, "median_tok_s": tok, "cores": cores}


async def run(a) -> int:
    servers, info = chat.make_servers(a)
    # ≈ 1.22 SmolLM2 tokens a word in this text.
    words = int(a.tokens / 1.22)
    sessions = []
    for rnd in range(a.rounds):
        order = list(servers) if (a.order == "ab" or rnd % 2 == 0) else list(reversed(servers))
        for s in order:
            model = a.ours_model if s.name == "ours" else "smollm2"
            sessions.append(await session(s, model, a, rnd, words))
    print()
    meds = {}
    for name in [s.name for s in servers]:
        vals = [x["median_tok_s"] for x in sessions if x["server"] == name]
        meds[name] = statistics.median(vals)
        print(f"{name:10s} prefill {meds[name]:8.0f} tok/s  [{min(vals):.0f}–{max(vals):.0f}] over {len(vals)} rounds")
    if len(meds) == 2:
        print(f"ours/llama.cpp: {meds['ours'] / meds['llama.cpp']:.2f}×")
    out = Path(a.out) if a.out else chat.BENCH_DIR / "results" / f"prefill-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "prefill", "servers": info, "tokens": a.tokens, "sessions": sessions,
                               "medians": meds, "cpu": chat.cpu_model()}, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def main() -> int:
    extra = []
    tokens, prompts = 2048, 3
    argv = sys.argv[1:]
    while argv:
        arg = argv.pop(0)
        if arg == "--tokens":
            tokens = int(argv.pop(0))
        elif arg == "--prompts":
            prompts = int(argv.pop(0))
        else:
            extra.append(arg)
    a = chat.parse_args(extra)
    if "--llama-args" not in extra:
        a.llama_args = "-t 2 -c 4096 -np 1"  # one slot with the whole context (chat.py's 16 slots get 512 each)
    a.tokens, a.prompts = tokens, prompts
    return asyncio.run(run(a))


if __name__ == "__main__":
    sys.exit(main())

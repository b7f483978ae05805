"""A control for test_greedy_text_follows_llama_server's f64 referee (issue 14): ours serves a copy
of the Q4_K_M file with bit 4 of sub-block 0's 6-bit scale flipped in every Q4_K super-block (what
a wrong scale unpacking would do to 1/8 of those weights), llama-server and the f64 referee read
the intact file. The check must fail.

    PYTHONPATH=python .venv/bin/python bench/q4k_flip_control.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tests.api.test_requantised_models as T  # noqa: E402
from tests.conftest import FIXTURES, Server  # noqa: E402
from tests.llama_f64 import LlamaF64  # noqa: E402


def flipped_copy(src: Path, dst: Path) -> int:
    from gguf import GGUFReader

    shutil.copyfile(src, dst)
    mm = np.memmap(dst, mode="r+", dtype=np.uint8)
    n = 0
    for t in GGUFReader(str(src)).tensors:
        if t.tensor_type.name == "Q4_K":
            blocks = mm[t.data_offset:t.data_offset + t.n_bytes].reshape(-1, 144)
            blocks[:, 4] ^= 0x10
            n += blocks.shape[0]
    mm.flush()
    return n


def main():
    wrong = Path(os.environ.get("TMPDIR", "/tmp")) / "q4k-flipped.gguf"
    print("flipped", flipped_copy(T.model_path("q4_k_m"), wrong), "super-blocks")
    fx = json.loads((FIXTURES / "smollm2_reference.json").read_text())
    items = fx["completions"] + fx["chats"]
    loaded = []

    def referee():
        if not loaded:
            loaded.append(LlamaF64(T.model_path("q4_k_m")))
        return loaded[0]

    with T.llama_server(T.model_path("q4_k_m")) as (url, _log):
        srv = Server(["--model", f"q4_k_m={wrong}", "--numerics", "exact", "--log-level", "warning"])
        srv.wait_ready()
        try:
            refs = [T._llama_greedy(url, it["prompt_tokens"]) for it in items]
            T._check_against(srv, "q4_k_m", items, refs, f"llama-server, ours on {wrong.name}", referee)
            print("PASSED: the check did not catch it")
        except AssertionError as e:
            print("FAILED, as it must:", e)
        finally:
            srv.stop()
            wrong.unlink()


if __name__ == "__main__":
    main()

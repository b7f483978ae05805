"""Locust load for POST /v1/embeddings: single sentences and batches of 32.

    locust -f bench/locustfile_embeddings.py --host http://127.0.0.1:8000
    locust -f bench/locustfile_embeddings.py --host http://127.0.0.1:8000 \
        --headless -u 16 -r 16 -t 60s --csv bench/.work/locust

Inputs are the deterministic workload of bench/workload.py; request bodies are encoded once at
start-up. Environment knobs:
    EMB_MODEL         `model` field of the requests (default all-minilm)
    EMB_BATCH         sentences per batch request (default 32)
    EMB_SINGLE_WEIGHT / EMB_BATCH_WEIGHT   task weights (default 8 / 1)
    EMB_WAIT          seconds each user waits between requests (default 0: closed loop)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from locust import FastHttpUser, constant, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

MODEL = os.environ.get("EMB_MODEL", "all-minilm")
BATCH = int(os.environ.get("EMB_BATCH", "32"))
SINGLE_WEIGHT = int(os.environ.get("EMB_SINGLE_WEIGHT", "8"))
BATCH_WEIGHT = int(os.environ.get("EMB_BATCH_WEIGHT", "1"))
WAIT = float(os.environ.get("EMB_WAIT", "0"))

_SENTENCES = workload.sentences()
_HEADERS = {"content-type": "application/json"}


def _body(texts: list[str]) -> bytes:
    return json.dumps({"model": MODEL, "input": texts}, separators=(",", ":")).encode()


SINGLE_BODIES = [_body([s]) for s in _SENTENCES]
BATCH_BODIES = [_body(b) for b in workload.batches(_SENTENCES, BATCH) if len(b) == BATCH]


class EmbeddingsUser(FastHttpUser):
    wait_time = constant(WAIT)

    def on_start(self):
        # Each user starts at a different place in the workload, all deterministic.
        self._i = id(self) % len(SINGLE_BODIES)

    def _post(self, body: bytes, n: int, name: str):
        with self.client.post(
            "/v1/embeddings", data=body, headers=_HEADERS, name=name, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            elif r.content.count(b'"index"') != n:
                r.failure(f"expected {n} embeddings")
            else:
                r.success()

    @task(SINGLE_WEIGHT)
    def single_sentence(self):
        self._i += 1
        self._post(SINGLE_BODIES[self._i % len(SINGLE_BODIES)], 1, "/v1/embeddings [1]")

    @task(BATCH_WEIGHT)
    def batch_of_32(self):
        self._i += 1
        self._post(BATCH_BODIES[self._i % len(BATCH_BODIES)], BATCH, f"/v1/embeddings [{BATCH}]")

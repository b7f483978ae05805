"""Batch tests: gateway servers with keys in two workspaces, a real webhook receiver, and
helpers to wait for batches and read their results."""

from __future__ import annotations

import base64
import http.server
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server, free_port
from tests.gateway.conftest import EMBED, auth, create_key

FINAL_NURE = ("completed", "failed", "cancelled")


class Receiver:
    """A real HTTP server in this process that records each webhook POST; the first
    `fail_first` get a 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = 503 if len(receiver.requests) < receiver.fail_first else 200
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def wait(self, count: int, timeout: float) -> list[tuple[dict[str, str], bytes, int]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {count} webhook calls after {timeout} s"
            time.sleep(0.05)
        return self.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    made: list[Receiver] = []

    def make(fail_first: int = 0) -> Receiver:
        made.append(Receiver(fail_first))
        return made[-1]

    yield make
    for r in made:
        r.close()


def start_server(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    srv = Server(["--log-level", "info", *args], data_dir=data_dir,
                 env={"FERROSERVE_WEBHOOK_RETRY_BASE_S": "0.2", **(env or {})})
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ferroserve-batch-"))


@pytest.fixture(scope="module")
def keys(data_dir) -> dict[str, str]:
    return {"alpha": create_key(data_dir, "alpha"), "beta": create_key(data_dir, "beta")}


def sentences(n: int, tag: str = "") -> list[str]:
    subjects = ("The cat", "A ship", "My neighbour", "This server", "The river", "An old tree", "Our team")
    verbs = ("watches", "carries", "remembers", "builds", "follows", "answers", "paints")
    return [f"{subjects[i % 7]} {verbs[(i // 7) % 7]} item {i}{tag}." for i in range(n)]


def wait_batch(url: str, key: str, batch_id: str, timeout: float = 300, until=FINAL_NURE) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/batch/{batch_id}", headers=auth(key), timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        if until(got) if callable(until) else got["status"] in until:
            return got
        assert time.monotonic() < deadline, f"batch still {got} after {timeout} s"
        time.sleep(0.1)


def sync_vectors(url: str, key: str, texts: list[str]) -> np.ndarray:
    """The synchronous endpoint's vectors (base64, so exactly the float32 it computed)."""
    out = []
    for start in range(0, len(texts), 2048):
        r = httpx.post(url + "/v1/embeddings", headers=auth(key), timeout=300,
                       json={"model": EMBED, "input": texts[start:start + 2048], "encoding_format": "base64"})
        assert r.status_code == 200, r.text
        out += [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    return np.stack(out)


def results_jsonl(url: str, key: str, batch_id: str) -> list[dict]:
    r = httpx.get(f"{url}/v1/batch/{batch_id}/results", headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    got = httpx.get(r.json()["url"], timeout=300)  # no bearer token: the URL is the credential
    assert got.status_code == 200, got.text
    return [json.loads(line) for line in got.text.splitlines()]

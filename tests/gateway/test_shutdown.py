"""Graceful shutdown and usage durability (issue 16, part 7), against real servers and their
real SQLite files.

- SIGTERM: new connections are refused at once, the streams in flight run to their end, the
  process exits 0, and every request has its usage row.
- With a short --shutdown-timeout a long stream is cut (the client gets an error event, the
  row says server_shutting_down with what was generated) and the process still exits 0 in time.
- SIGKILL under load: the guarantee is that an inference request's usage row is committed
  before the last byte of its answer, so every request a client saw answered has its row.
"""

from __future__ import annotations

import concurrent.futures
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import Server
from tests.gateway.conftest import CHAT, EMBED, PRICES, auth, create_key


def _rows(data_dir: Path) -> dict[str, sqlite3.Row]:
    db = sqlite3.connect(data_dir / "ferroserve.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return {row["request_id"]: row for row in db.execute("SELECT * FROM usage")}
    finally:
        db.close()


def _start(*args: str) -> tuple[Server, str]:
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-shutdown-"))
    key = create_key(data_dir, "shut")
    srv = Server(["--log-level", "info", *PRICES, *args], data_dir=data_dir)
    srv.wait_ready()
    return srv, key


def _client(srv: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _refuses_connections(srv: Server) -> bool:
    try:
        httpx.get(srv.url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def _wait_exit(srv: Server, timeout_s: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        code = srv.proc.wait(timeout=timeout_s)
    finally:
        if srv.proc.poll() is None:
            srv.kill()
        srv.log.close()
    return code, time.monotonic() - started


def test_sigterm_lets_streams_finish_and_meters_every_request():
    srv, key = _start()
    client = _client(srv, key)
    max_tokens = 48
    begun = threading.Barrier(5)

    def stream(i: int) -> tuple[str, int, str | None, int]:
        rid = f"drain-stream-{i}"
        chunks = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"Count to {i + 50}."}], max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"x-request-id": rid})
        finish, usage, pieces = None, None, 0
        for n, chunk in enumerate(chunks):
            if n == 1:
                begun.wait(timeout=60)  # every stream is under way before the SIGTERM
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            pieces += 1
        return rid, pieces, finish, usage

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        begun.wait(timeout=60)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = _refuses_connections(srv)
        results = [f.result(timeout=120) for f in futures]
    code, _ = _wait_exit(srv, 60)
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert refused, "a new connection was accepted after SIGTERM"
    rows = _rows(srv.data_dir)
    for rid, pieces, finish, usage in results:
        assert finish == "length" and usage == max_tokens, (rid, pieces, finish, usage)
        assert rows[rid]["status"] == 200 and rows[rid]["completion_tokens"] == max_tokens, dict(rows[rid])
    log = srv.log_path.read_text()
    assert "Traceback" not in log and '"level":"error"' not in log


def test_a_short_shutdown_timeout_cuts_a_long_stream_and_still_exits_0_in_time():
    srv, key = _start("--shutdown-timeout", "2")
    client = _client(srv, key)
    begun = threading.Event()
    outcome: dict = {}

    def long_stream() -> None:
        chunks = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Tell a very long story."}], max_tokens=4000,
            stream=True, extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "cut-stream"})
        try:
            for _ in chunks:
                begun.set()
        except openai.APIError as exc:  # the error event the server ends a cut stream with
            outcome["error"] = exc

    def long_plain() -> None:
        outcome["plain"] = httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                                      headers={**auth(key), "x-request-id": "cut-plain"},
                                      json={"model": CHAT, "messages": [{"role": "user", "content": "Go on."}],
                                            "max_tokens": 4000, "ignore_eos": True})

    threads = [threading.Thread(target=long_stream), threading.Thread(target=long_plain)]
    for t in threads:
        t.start()
    assert begun.wait(60)
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    code, seconds = _wait_exit(srv, 30)
    for t in threads:
        t.join(30)
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert seconds < 2 + 8, f"exited {seconds:.1f} s after SIGTERM with --shutdown-timeout 2"
    assert "server is shutting down" in str(outcome.get("error")), outcome
    plain = outcome["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "server_shutting_down", plain.text
    rows = _rows(srv.data_dir)
    cut = rows["cut-stream"]
    assert cut["status"] == 503 and cut["error_code"] == "server_shutting_down", dict(cut)
    assert 0 < cut["completion_tokens"] < 4000 and cut["cost_usd"] > 0, dict(cut)
    assert rows["cut-plain"]["status"] == 503, dict(rows["cut-plain"])
    log = srv.log_path.read_text()
    assert "Traceback" not in log and '"level":"error"' not in log


def test_sigkill_loses_no_usage_row_of_an_answered_request():
    """Clients hammer the server; it is killed mid-load. Every request a client saw answered
    (a 200 body, or a stream to its [DONE]) has its row; requests cut by the kill may or may not."""
    srv, key = _start()
    answered: list[str] = []
    stop = threading.Event()

    def embeddings(worker: int) -> None:
        with httpx.Client(timeout=30, headers=auth(key)) as c:
            for i in range(100_000):
                if stop.is_set():
                    return
                rid = f"kill-e{worker}-{i}"
                try:
                    r = c.post(srv.url + "/v1/embeddings", headers={"x-request-id": rid},
                               json={"model": EMBED, "input": f"text {worker} {i}", "metadata": {"cache_mode": "bypass"}})
                except httpx.HTTPError:
                    return
                if r.status_code == 200 and r.json()["data"]:
                    answered.append(rid)

    def streams(worker: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            rid = f"kill-s{worker}-{i}"
            try:
                with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                                  headers={**auth(key), "x-request-id": rid},
                                  json={"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                        "stream": True}) as r:
                    done = any(line == "data: [DONE]" for line in r.iter_lines())
            except httpx.HTTPError:
                return
            if done:
                answered.append(rid)

    threads = [threading.Thread(target=embeddings, args=(w,)) for w in range(6)]
    threads += [threading.Thread(target=streams, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(answered) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.kill()  # SIGKILL, server and worker: nothing is flushed
    stop.set()
    for t in threads:
        t.join(30)
    assert len(answered) >= 300, f"only {len(answered)} answers before the kill"
    rows = _rows(srv.data_dir)
    missing = [rid for rid in answered if rid not in rows]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no usage row: {missing[:10]}"
    assert any(rid.startswith("kill-s") for rid in answered)

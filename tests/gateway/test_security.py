"""Security (issue 16, part 9), against real servers:

- no API key, prompt or completion text in any log line below debug: requests with planted
  secrets go through every route that takes text, and the whole log is searched for them;
- request heads are bounded (a head over --max-header-bytes, or too many headers, is a 431) and
  the server stays up;
- slow clients (slowloris: headers at 1 byte/s) are cut off by --header-timeout and do not
  hold up anyone else.

(Timing-safe key comparison and workspace isolation are in test_fuzz_findings.py.)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.gateway.conftest import CHAT, EMBED, auth, create_key


@pytest.mark.parametrize("level", ["info", "warning"])
def test_no_key_prompt_or_completion_in_the_log(level):
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-secrets-"))
    key = create_key(data_dir, "secrets", "--capture-prompts")  # captured prompts go to the database only
    wrong_key = "fs-" + secrets.token_urlsafe(32)
    marker = f"PLANTED{secrets.token_hex(8)}"  # one word: it survives tokenizing and echoing
    prompt = f"Please repeat the word {marker} three times."
    srv = Server(["--log-level", level], data_dir=data_dir)
    completions: list[str] = []
    try:
        srv.wait_ready()
        url, h = srv.url, auth(key)

        def post(path: str, body: dict | None = None, **kw) -> httpx.Response:
            return httpx.post(url + path, json=body, headers=kw.pop("headers", h), timeout=120, **kw)

        chat = {"model": CHAT, "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": prompt}],
                "max_tokens": 24, "temperature": 0}
        r = post("/v1/chat/completions", chat)
        completions.append(r.json()["choices"][0]["message"]["content"])
        with httpx.stream("POST", url + "/v1/chat/completions", json={**chat, "stream": True}, headers=h, timeout=120) as s:
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in s.iter_lines() if line.startswith("data: {"))
        completions.append(text)
        r = post("/v1/completions", {"model": CHAT, "prompt": prompt, "max_tokens": 24, "temperature": 0})
        completions.append(r.json()["choices"][0]["text"])
        r = post("/v1/responses", {"model": CHAT, "input": prompt, "instructions": prompt, "max_output_tokens": 24})
        completions.append(r.json()["output"][0]["content"][0]["text"])
        for path, body in (("/v1/embeddings", {"model": EMBED, "input": [prompt, marker]}),
                           ("/v1/tokenize", {"model": CHAT, "prompt": prompt}),
                           ("/v1/estimate", {"model": CHAT, "messages": [{"role": "user", "content": prompt}]}),
                           ("/v1/responses/input_tokens", {"model": CHAT, "input": prompt}),
                           ("/v1/batch/embeddings", {"model": EMBED, "inputs": [prompt]})):
            assert post(path, body).status_code in (200, 201), path
        assert httpx.post(url + "/v1/files?purpose=user_data", content=prompt.encode(), headers=h, timeout=30).status_code == 200
        # Requests that fail: a wrong key (as a bearer token and as x-api-key), bad bodies with the
        # marker in them, a marker where a number belongs.
        assert post("/v1/chat/completions", chat, headers=auth(wrong_key)).status_code == 401
        assert post("/v1/embeddings", {"model": EMBED, "input": "x"}, headers={"x-api-key": wrong_key}).status_code == 401
        assert httpx.post(url + "/v1/chat/completions", content=f'{{"model": "{CHAT}", "messages": [{marker}'.encode(),
                          headers=h, timeout=30).status_code == 400
        assert post("/v1/chat/completions", {**chat, "max_tokens": marker}).status_code == 400
        assert post("/v1/chat/completions", {**chat, "messages": [{"role": marker, "content": prompt}]}).status_code == 400
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert '"msg":"request"' in log or level != "info", "the access log is on at info: the test must see it"
    for planted in (key, key[3:], wrong_key, wrong_key[3:], marker):
        assert planted not in log, f"a planted secret is in the {level} log"
    completions = [c.strip() for c in completions if len(c.strip()) >= 16]
    assert completions, "no completion long enough to look for"
    for text in completions:
        assert text not in log, f"a completion is in the {level} log: {text!r}"


@pytest.fixture(scope="module")
def limited():
    s = Server(["--log-level", "warning", "--header-timeout", "3", "--max-header-bytes", "16384"])
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_oversize_heads_are_431_and_the_server_stays_up(limited):
    assert httpx.get(limited.url + "/health", headers={"x-fine": "a" * 8000}, timeout=10).status_code == 200
    r = httpx.get(limited.url + "/health", headers={"x-big": "a" * 20_000}, timeout=10)
    # granian's parser answers before the app runs: no OpenAI error body is possible (README,
    # "Limits"); should granian ever hand such a head to the app, this fails and the README changes.
    assert r.status_code == 431 and r.content == b""
    r = httpx.get(limited.url + "/health", headers={f"x-h{i}": "v" for i in range(200)}, timeout=10)
    assert r.status_code == 431
    big_body = {"model": EMBED, "input": "b" * 100_000}  # the body is not the head: its own limit applies
    assert httpx.post(limited.url + "/v1/embeddings", json=big_body, timeout=60).status_code == 200
    assert httpx.get(limited.url + "/health", timeout=10).status_code == 200


async def _slow_client(port: int, started: float) -> float:
    """Sends a request head 1 byte a second; returns when the server hung up (seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 60 + b"\r\n\r\n"

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)

    sender = asyncio.ensure_future(trickle())
    try:
        await asyncio.wait_for(reader.read(), 15)  # b"" (or a reset) once the server hangs up
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()
        writer.transport.abort()
    return time.monotonic() - started


def test_slow_clients_are_cut_off_and_do_not_block_others(limited):
    async def run() -> tuple[list[float], list[float]]:
        started = time.monotonic()
        slow = [asyncio.ensure_future(_slow_client(limited.port, started)) for _ in range(16)]
        latencies = []
        async with httpx.AsyncClient(timeout=30) as client:
            while time.monotonic() - started < 5:
                t = time.monotonic()
                r = await client.post(limited.url + "/v1/embeddings", json={"model": EMBED, "input": f"hello {t}"})
                assert r.status_code == 200, r.text
                latencies.append(time.monotonic() - t)
                await asyncio.sleep(0.1)
        return await asyncio.gather(*slow), latencies

    cut_after, latencies = asyncio.run(run())
    # --header-timeout 3: every slow client is cut at about 3 s (not at the end of its head, 60+ s).
    assert all(2.5 <= s <= 6 for s in cut_after), cut_after
    assert len(latencies) >= 10 and max(latencies) < 2.0, latencies

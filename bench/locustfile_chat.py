"""Locust load for POST /v1/chat/completions: streaming and non-streaming requests.

    locust -f bench/locustfile_chat.py --host http://127.0.0.1:8000
    locust -f bench/locustfile_chat.py --host http://127.0.0.1:8000 \
        --headless -u 16 -r 16 -t 120s --csv bench/.work/locust-chat

Works against ferroserve and llama-server alike (OpenAI shapes plus `ignore_eos`). Each request
is one user message ("Tell me a story.") with a request number in it (so prompts differ and no
prefix cache helps), greedy, `max_tokens` 128 with `ignore_eos` (every completion is exactly 128
tokens; checked against `usage.completion_tokens` where the response has usage). Bodies are
encoded once at start-up. Locust entries:

    POST /v1/chat/completions            non-streaming, whole request
    POST /v1/chat/completions [stream]   streaming, until `data: [DONE]` (not just the headers)
    TTFT /v1/chat/completions [stream]   streaming, time to the first content delta

Environment knobs:
    CHAT_MODEL          `model` field (default smollm2)
    CHAT_MAX_TOKENS     max_tokens (default 128)
    CHAT_IGNORE_EOS     1/0 (default 1)
    CHAT_DISTINCT       1: a request number in every message (default); 0: the same message
    CHAT_CACHE_PROMPT   if set (1/0), sent as llama-server's `cache_prompt` (ferroserve ignores it)
    CHAT_STREAM_WEIGHT / CHAT_PLAIN_WEIGHT   task weights (default 1 / 1)
    CHAT_WAIT           seconds each user waits between requests (default 0: closed loop)
"""

from __future__ import annotations

import itertools
import json
import os
import time

from locust import FastHttpUser, constant, task

MODEL = os.environ.get("CHAT_MODEL", "smollm2")
MAX_TOKENS = int(os.environ.get("CHAT_MAX_TOKENS", "128"))
IGNORE_EOS = os.environ.get("CHAT_IGNORE_EOS", "1") not in ("0", "", "false")
DISTINCT = os.environ.get("CHAT_DISTINCT", "1") not in ("0", "", "false")
CACHE_PROMPT = os.environ.get("CHAT_CACHE_PROMPT")
STREAM_WEIGHT = int(os.environ.get("CHAT_STREAM_WEIGHT", "1"))
PLAIN_WEIGHT = int(os.environ.get("CHAT_PLAIN_WEIGHT", "1"))
WAIT = float(os.environ.get("CHAT_WAIT", "0"))
N_BODIES = 4096

PATH = "/v1/chat/completions"
_HEADERS = {"content-type": "application/json"}


def _body(i: int, stream: bool) -> bytes:
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"[{i:04d}] Tell me a story."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": IGNORE_EOS,
        "stream": stream,
    }
    if stream:
        req["stream_options"] = {"include_usage": True}
    if CACHE_PROMPT is not None:
        req["cache_prompt"] = CACHE_PROMPT not in ("0", "", "false")
    return json.dumps(req, separators=(",", ":")).encode()


_n = N_BODIES if DISTINCT else 1
PLAIN_BODIES = [_body(i + 1 if DISTINCT else 0, False) for i in range(_n)]
STREAM_BODIES = [_body(i + 1 if DISTINCT else 0, True) for i in range(_n)]
_counter = itertools.count()  # shared by all users of this process (gevent: no races)


class ChatUser(FastHttpUser):
    wait_time = constant(WAIT)
    network_timeout = 600.0
    connection_timeout = 60.0

    @task(PLAIN_WEIGHT)
    def chat(self):
        body = PLAIN_BODIES[next(_counter) % len(PLAIN_BODIES)]
        with self.client.post(PATH, data=body, headers=_HEADERS, name=PATH,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                resp = json.loads(r.content)
                n = (resp.get("usage") or {}).get("completion_tokens")
                text = resp["choices"][0]["message"].get("content")
            except Exception as exc:  # noqa: BLE001
                r.failure(f"bad response: {exc!r}")
                return
            if not text:
                r.failure("empty completion")
            elif IGNORE_EOS and n is not None and n != MAX_TOKENS:
                r.failure(f"completion_tokens {n} != {MAX_TOKENS}")
            else:
                r.success()

    @task(STREAM_WEIGHT)
    def chat_stream(self):
        body = STREAM_BODIES[next(_counter) % len(STREAM_BODIES)]
        name = f"{PATH} [stream]"
        t0 = time.perf_counter()
        with self.client.post(PATH, data=body, headers=_HEADERS, name=name, stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            ttft = None
            usage = None
            chunks = 0
            error = None
            try:
                for line in _lines(r):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        error = f"stream error: {data[:200]!r}"
                        break
                    ch = obj.get("choices") or []
                    if ch and (ch[0].get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                    if obj.get("usage"):
                        usage = obj["usage"]
            except Exception as exc:  # noqa: BLE001
                error = f"stream broke: {exc!r}"
            total = time.perf_counter() - t0
            # Locust would report the time to the response headers for stream=True: report the
            # whole stream instead, and the time to the first token as its own entry.
            meta = getattr(r, "request_meta", None)
            if isinstance(meta, dict):
                meta["response_time"] = total * 1000
            if ttft is not None:
                self.environment.events.request.fire(
                    request_type="TTFT", name=name, response_time=ttft * 1000,
                    response_length=0, exception=None, context={},
                )
            n = (usage or {}).get("completion_tokens")
            if error:
                r.failure(error)
            elif ttft is None:
                r.failure("no content in the stream")
            elif IGNORE_EOS and n is not None and n != MAX_TOKENS:
                r.failure(f"completion_tokens {n} != {MAX_TOKENS}")
            else:
                r.success()


def _lines(r):
    """SSE lines as they arrive. geventhttpclient's read(n) waits for n bytes, so read whole
    lines from the underlying response (a private attribute); fall back to iter_content."""
    raw = getattr(r, "_response", None)
    if raw is not None and hasattr(raw, "readline"):
        while True:
            line = raw.readline(b"\n")
            if not line:
                return
            yield line.rstrip(b"\r\n")
    else:
        buf = b""
        for chunk in r.iter_content(chunk_size=1, decode_content=False):
            buf += chunk if isinstance(chunk, bytes) else chunk.encode()
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.rstrip(b"\r")

"""The RSGI application: route table, body limits, errors, access log.

granian calls ``create_app()`` in its worker; models load in ``__rsgi_init__`` on the
worker's event loop, so ``/v1/ready`` is true as soon as requests are served.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from urllib.parse import unquote

import msgspec

from ferroserve import log
from ferroserve.api import chat, completions, embeddings, models, tokenize
from ferroserve.config import SETTINGS_ENV, Settings
from ferroserve.errors import ApiError
from ferroserve.log import logger
from ferroserve.registry import Registry

JSON = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode
# Request ids: a random per-process prefix and a counter (unique, and cheaper than uuid4).
_ID_PREFIX = os.urandom(6).hex()
_REQUEST_IDS = (f"{_ID_PREFIX}{n:010x}" for n in itertools.count())


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self.ready = False
        self._routes = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/ready"): self._ready,
            ("GET", "/v1/models"): self._list_models,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/tokenize"): self._tokenize,
            ("POST", "/v1/detokenize"): self._detokenize,
            ("GET", "/metrics"): self._metrics,
        }
        self._paths = {path for _, path in self._routes}
        self._models_body: bytes | None = None

    # RSGI lifecycle -------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        log.setup(self.settings.log_level)
        self.registry.load_all(self.settings)
        for m in self.registry.models.values():
            m.backend.attach(loop)
        # The model list cannot change while serving: encode it once.
        self._models_body = models.list_models(self.registry)
        self.ready = True
        logger.info("serving", extra={"fields": {"host": self.settings.host, "port": self.settings.port, "models": list(self.registry.models)}})

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        for m in self.registry.models.values():
            m.backend.detach()

    # Request path ---------------------------------------------------------------
    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        started = time.perf_counter()
        request_id = scope.headers.get("x-request-id") or next(_REQUEST_IDS)
        method, path = scope.method, scope.path
        extra: dict = {}
        try:
            handler = self._routes.get((method, path))
            if handler is not None:
                status, body, extra = await handler(scope, proto)
                if body is None:  # a streamed response, already sent
                    log.access(method, path, status, started, request_id, **extra)
                    return
            elif method == "GET" and path.startswith("/v1/models/"):
                status, body = 200, models.get_model(self.registry, unquote(path[len("/v1/models/"):]))
            elif path in self._paths:
                raise ApiError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")
            else:
                raise ApiError(404, f"Unknown route {method} {path}.", code="not_found")
            headers = [("content-type", "text/plain; version=0.0.4")] if path == "/metrics" else JSON
            proto.response_bytes(status, [*headers, ("x-request-id", request_id)], body)
        except ApiError as err:
            status = err.status
            proto.response_bytes(status, [*JSON, ("x-request-id", request_id), *err.headers], err.body())
        except Exception:
            logger.exception("unhandled error", extra={"fields": {"request_id": request_id, "path": path}})
            status = 500
            err = ApiError(500, "The server had an error while processing your request.", type="server_error")
            proto.response_bytes(status, [*JSON, ("x-request-id", request_id)], err.body())
        log.access(method, path, status, started, request_id, **extra)

    async def _read_body(self, scope, proto) -> bytes:
        limit = self.settings.max_body_bytes
        declared = scope.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.", code="request_too_large")
        if declared is not None and declared.isdigit():
            return await proto()
        chunks, size = [], 0
        async for chunk in proto:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # Handlers: (scope, proto) -> (status, body, log fields) ------------------------
    async def _health(self, scope, proto):
        return 200, b'{"status":"ok"}', {}

    async def _ready(self, scope, proto):
        if not self.ready:
            raise ApiError(503, "Models are still loading.", type="server_error", code="not_ready")
        return 200, _encode({"status": "ready", "models": list(self.registry.models)}), {}

    async def _list_models(self, scope, proto):
        return 200, self._models_body or models.list_models(self.registry), {}

    async def _chat(self, scope, proto):
        return await chat.create_chat_completion(self.registry, await self._read_body(scope, proto), proto)

    async def _completions(self, scope, proto):
        return await completions.create_completion(self.registry, await self._read_body(scope, proto), proto)

    async def _tokenize(self, scope, proto):
        return 200, tokenize.tokenize(self.registry, await self._read_body(scope, proto)), {}

    async def _detokenize(self, scope, proto):
        return 200, tokenize.detokenize(self.registry, await self._read_body(scope, proto)), {}

    async def _metrics(self, scope, proto):
        # Prometheus text format; the gateway issue extends this with request metrics.
        lines = []
        for name, m in self.registry.models.items():
            engine = m.backend.engine
            if "chat" in m.capabilities:
                s = engine.stats()
                label = f'{{model="{name}"}}'
                lines += [
                    f"ferroserve_kv_cache_usage_ratio{label} {s['kv_usage']}",
                    f"ferroserve_kv_cache_blocks_free{label} {s['kv_blocks_free']}",
                    f"ferroserve_kv_cache_blocks_total{label} {s['kv_blocks_total']}",
                    f"ferroserve_running_sequences{label} {s['running_sequences']}",
                    f"ferroserve_waiting_sequences{label} {s['waiting_sequences']}",
                    f"ferroserve_generated_tokens_total{label} {s['generated_tokens']}",
                    f"ferroserve_preemptions_total{label} {s['preemptions']}",
                ]
        return 200, ("\n".join(lines) + "\n").encode(), {}

    async def _embeddings(self, scope, proto):
        body = await self._read_body(scope, proto)
        out, extra = await embeddings.create_embedding(self.registry, body, self.settings.max_inputs)
        return 200, out, extra


def create_app() -> App:
    """granian's factory: settings come from the CLI through the environment."""
    text = os.environ.get(SETTINGS_ENV)
    settings = Settings.from_json(text) if text else Settings()
    if not text:
        from ferroserve.config import resolve

        settings = resolve()
    return App(settings)

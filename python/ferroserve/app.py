"""The RSGI application: route table, gateway, body limits, errors, access log.

granian calls ``create_app()`` in its worker; models load in ``__rsgi_init__`` on the
worker's event loop, so ``/v1/ready`` is true as soon as requests are served.

Shutdown (SIGTERM): granian stops accepting connections and waits for the requests in flight;
the app gives them ``shutdown_timeout_s``, then cuts the rest (a stream ends with an error
event and is metered for what it sent, any other request is a 503), and ``__rsgi_del__`` stops
the engines and flushes the usage writer.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from urllib.parse import unquote

import msgspec
from granian.rsgi import ProtocolClosed

from ferroserve import http_priority, log
from ferroserve.api import (
    admission, admin, batch_embeddings, batches, chat, completions, embeddings, estimate, files, history, models, openapi, responses, status,
    tokenize, usage,
)
from ferroserve.api.generate import SHUTDOWN, Disconnect, shutdown_error
from ferroserve.backends.local import interactive_in_flight, interactive_request
from ferroserve.config import SETTINGS_ENV, STARTUP_ERROR_ENV, Settings
from ferroserve.errors import ApiError
from ferroserve.gateway.embed_cache import EmbedCache
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.gateway.router import Router, health_of as router_health
from ferroserve.jobs.runner import BatchRunner
from ferroserve.log import logger
from ferroserve.registry import Registry, StartupRefused

JSON = ("content-type", "application/json")
_encode = msgspec.json.Encoder().encode
# Request ids: a random per-process prefix and a counter (unique, and cheaper than uuid4).
_ID_PREFIX = os.urandom(6).hex()
_REQUEST_IDS = (f"{_ID_PREFIX}{n:010x}" for n in itertools.count())

# Who may call a route: PUBLIC (probes, scraping), USER (any valid key), INFERENCE (a key,
# and the request is metered), ADMIN (an admin key).
PUBLIC, USER, INFERENCE, ADMIN = "public", "user", "inference", "admin"
_CONTENT_TYPES = {
    "/metrics": ("content-type", "text/plain; version=0.0.4; charset=utf-8"),
    "/v1/usage/export": ("content-type", "text/csv; charset=utf-8"),
}


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self.router = Router(self.registry, settings)
        self.embed_cache = (EmbedCache(settings.embed_cache_mb * 1024 * 1024, settings.embed_cache_ttl_s)
                            if settings.embed_cache_mb > 0 else None)
        self.gateway = Gateway(settings, self.registry) if settings.gateway else None
        self.batches = BatchRunner(self.router, self.gateway, settings) if self.gateway is not None else None
        self.ready = False
        # Shutdown: the handlers' tasks in flight, and those cut when the timeout ran out.
        self.stopping = False
        self._in_flight: set[asyncio.Task] = set()
        self._cut: set[asyncio.Task] = set()
        self._stop_deadline: float | None = None
        # (method, path) -> (handler, access); handlers: (scope, proto, ticket, arg) -> (status, body, log fields)
        self._routes = {
            ("GET", "/health"): (self._health, PUBLIC),
            ("GET", "/v1/ready"): (self._ready, PUBLIC),
            ("GET", "/v1/status"): (self._status, PUBLIC),
            ("GET", "/v1/openapi.json"): (self._openapi, PUBLIC),
            ("GET", "/metrics"): (self._metrics, PUBLIC),
            ("GET", "/v1/models"): (self._list_models, USER),
            ("POST", "/v1/embeddings"): (self._embeddings, INFERENCE),
            ("POST", "/v1/chat/completions"): (self._chat, INFERENCE),
            ("POST", "/v1/completions"): (self._completions, INFERENCE),
            ("POST", "/v1/responses"): (self._responses_create, INFERENCE),
            ("POST", "/v1/responses/input_tokens"): (self._responses_input_tokens, USER),
            ("POST", "/v1/tokenize"): (self._tokenize, USER),
            ("POST", "/v1/detokenize"): (self._detokenize, USER),
            ("POST", "/v1/estimate"): (self._estimate, USER),
            ("GET", "/v1/usage"): (self._usage, USER),
            ("GET", "/v1/usage/export"): (self._usage_export, USER),
            ("GET", "/v1/request-history"): (self._history, USER),
            ("GET", "/v1/admin/keys"): (self._admin_list_keys, ADMIN),
            ("POST", "/v1/admin/keys"): (self._admin_create_key, ADMIN),
            ("POST", "/v1/files"): (self._files_upload, USER),
            ("GET", "/v1/files"): (self._files_list, USER),
            ("POST", "/v1/batches"): (self._batches_create, USER),
            ("GET", "/v1/batches"): (self._batches_list, USER),
            ("POST", "/v1/batch/embeddings"): (self._batch_embeddings_create, USER),
        }
        # Routes with one path parameter: (method, prefix) -> (handler, access, route label).
        self._prefix_routes = [
            ("GET", "/v1/models/", self._get_model, USER, "/v1/models/{id}"),
            ("GET", "/v1/request-history/", self._history_item, USER, "/v1/request-history/{id}"),
            ("GET", "/v1/admin/keys/", self._admin_get_key, ADMIN, "/v1/admin/keys/{id}"),
            ("GET", "/v1/responses/", self._responses_get, USER, "/v1/responses/{id}"),
            ("DELETE", "/v1/responses/", self._responses_delete, USER, "/v1/responses/{id}"),
            ("POST", "/v1/responses/", self._responses_cancel, USER, "/v1/responses/{id}/cancel"),
            ("DELETE", "/v1/admin/keys/", self._admin_revoke_key, ADMIN, "/v1/admin/keys/{id}"),
            ("GET", "/v1/files/", self._files_get, USER, "/v1/files/{id}"),
            ("DELETE", "/v1/files/", self._files_delete, USER, "/v1/files/{id}"),
            ("GET", "/v1/batches/", self._batches_get, USER, "/v1/batches/{id}"),
            ("POST", "/v1/batches/", self._batches_cancel, USER, "/v1/batches/{id}/cancel"),
            ("GET", "/v1/batch/", self._batch_embeddings_get, USER, "/v1/batch/{id}"),
            ("DELETE", "/v1/batch/", self._batch_embeddings_cancel, USER, "/v1/batch/{id}"),
            # Signed: the URL itself is the credential (no bearer token).
            ("GET", batch_embeddings.RESULTS_PREFIX, self._batch_embeddings_download, PUBLIC, "/v1/batch-results/{id}"),
        ]
        self._paths = {path for _, path in self._routes}
        # Routes whose refusals are decided before the body is read (api/admission.py); not
        # embeddings while the embedding cache is on (a cached answer needs no engine).
        self._refused_early = {path: capability for path, capability in admission.ROUTES.items()
                               if capability != admission.EMBEDDINGS or self.embed_cache is None}
        # Every route has its operations in api/openapi.py: a route added without them fails here.
        openapi.check(self.route_list())
        self._openapi_json: bytes | None = None

    def route_list(self) -> list[tuple[str, str, str]]:
        """(method, route label, access) of every route, for the OpenAPI document."""
        return ([(m, path, access) for (m, path), (_, access) in self._routes.items()]
                + [(m, label, access) for m, _, _, access, label in self._prefix_routes])

    # RSGI lifecycle -------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        log.setup(self.settings.log_level)
        if self.gateway is not None:
            self.gateway.start(loop)
        try:
            self.registry.load_all(self.settings)
        except StartupRefused as exc:
            logger.error("refusing to start", extra={"fields": {"reason": str(exc)}})
            path = os.environ.get(STARTUP_ERROR_ENV)
            if not path:
                raise
            # Hand the reason to the CLI (it prints it and exits with status 2) and end this
            # worker without a traceback: granian then stops. Nothing has been served yet.
            with open(path, "w") as f:
                f.write(str(exc))
            os._exit(2)
        for m in self.registry.models.values():
            m.backend.start(loop)
        if self.gateway is not None:
            responses.start_background(loop, self.router, self.gateway)
            assert self.batches is not None
            self.batches.start(loop)
        try:
            # granian stops a worker on SIGINT or SIGTERM and then waits for every connection
            # with no limit; the app takes SIGTERM to start its own clock first.
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm, loop)
        except (NotImplementedError, RuntimeError):  # no signals here (not the main thread)
            pass
        # After the engines' threads started (a thread inherits its creator's policy).
        http_priority.start(loop)
        self.ready = True
        logger.info("serving", extra={"fields": {"host": self.settings.host, "port": self.settings.port, "models": list(self.registry.models)}})

    def _on_sigterm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.stopping:
            return
        self.stopping, self.ready = True, False
        timeout = self.settings.shutdown_timeout_s
        self._stop_deadline = loop.time() + timeout
        logger.info("shutting down", extra={"fields": {"requests_in_flight": len(self._in_flight), "timeout_s": timeout}})
        loop.call_later(timeout, self._cut_in_flight)
        # Hand the stop itself to granian's own handler (on SIGINT, as for SIGTERM): it closes
        # the listener at once, lets each connection finish its request and then ends the worker.
        signal.raise_signal(signal.SIGINT)

    def _cut_in_flight(self) -> None:
        """The shutdown timeout ran out: cancel what is still running (each handler's cleanup
        aborts its generation; the app logs and records it as a 503)."""
        tasks = [t for t in self._in_flight if not t.done()]
        if tasks:
            logger.warning("shutdown timeout: cutting requests", extra={"fields": {"requests": len(tasks)}})
        for task in tasks:
            self._cut.add(task)
            task.cancel(SHUTDOWN)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs the loop until the handlers still running are done (those of clients that left
        are no connection granian waits for), within what is left of the shutdown timeout."""
        pending = {t for t in self._in_flight if not t.done()}
        if not pending:
            return
        now = loop.time()
        deadline = self._stop_deadline if self._stop_deadline is not None else now + self.settings.shutdown_timeout_s
        _, pending = loop.run_until_complete(asyncio.wait(pending, timeout=max(deadline - now, 0.0)))
        if pending:
            self._cut_in_flight()
            loop.run_until_complete(asyncio.wait(pending, timeout=5.0))

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stopping, self.ready = True, False
        self._drain(loop)
        log.flush_access()  # lines queued for a loop turn that will not come
        responses.stop_background()
        if self.batches is not None:
            self.batches.stop()
        for m in self.registry.models.values():
            m.backend.stop()
        if self.gateway is not None:
            self.gateway.stop()  # writes every queued usage record before the process exits

    # Request path ---------------------------------------------------------------
    def _resolve(self, method: str, path: str):
        """(handler, access, route label, path argument); raises 404/405."""
        route = self._routes.get((method, path))
        if route is not None:
            return route[0], route[1], path, None
        known_prefix = False
        for m, prefix, handler, access, label in self._prefix_routes:
            if path.startswith(prefix) and len(path) > len(prefix):
                if m == method:
                    return handler, access, label, unquote(path[len(prefix):])
                known_prefix = True
        if known_prefix or path in self._paths:
            raise ApiError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")
        raise ApiError(404, f"Unknown route {method} {path}.", code="not_found")

    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        task = asyncio.current_task()
        self._in_flight.add(task)
        try:
            await self._serve(scope, proto)
        finally:
            self._in_flight.discard(task)

    async def _serve(self, scope, proto) -> None:
        """One request: route, gateway, handler, response, access line and usage record. Never
        raises: granian would log a traceback for what is an answer (a 499 or a 503 too)."""
        started = time.perf_counter()
        request_id = scope.headers.get("x-request-id")
        if not request_id or len(request_id) > 200:  # a client's own id is kept if it is sane
            request_id = next(_REQUEST_IDS)
        method, path = scope.method, scope.path
        gateway = self.gateway
        fields: dict = {}
        ticket: Ticket | None = None
        label, access, cost, error_code = "other", PUBLIC, None, None
        metered = False
        body_unread = False
        try:
            handler, access, label, arg = self._resolve(method, path)
            if gateway is None or access is PUBLIC:
                ticket = Ticket(None, request_id, started, None, None, None, False)
            else:
                ticket = gateway.open_ticket(scope, request_id, started, admin=access is ADMIN, metered=access is INFERENCE)
            metered = ticket.metered = access is INFERENCE
            ticket.route = label
            capability = self._refused_early.get(label)
            if capability is not None:
                # A refusal answered in this first turn of the loop, without the body's turn;
                # else a place held until the body is read (`_read_body` decides again then).
                refused, ticket.place = admission.on_arrival(self.registry, capability)
                if refused is not None:
                    body_unread = True
                    # Answered before the body is read: the connection ends after this answer.
                    # Kept open, a keep-alive client's next request on it could be lost when
                    # hyper drops a connection whose request body was unread at the answer
                    # (measured: hundreds of client timeouts in a 90 s overload run).
                    refused.headers.append(("connection", "close"))
                    raise refused
            if metered:
                ticket.interactive = interactive_request()
            status, body, fields = await handler(scope, proto, ticket, arg)
            if fields.pop(responses.METERED_LATER, False):
                # A background response: its task settles and records the usage.
                metered = ticket.metered = False
            if body is not None:
                # A metered answer leaves once its usage record is committed.
                await ticket.finish(status, fields)
                proto.response_bytes(status, [_CONTENT_TYPES.get(label, JSON), *ticket.response_headers()], body)
            ticket.end_interactive()
        except ApiError as err:
            status, error_code = err.status, err.code
            if error_code == "capacity_unavailable":
                fields = {**fields, **_refusal_fields(ticket, body_unread, started)}
            if gateway is not None and metered and not _counted_after(ticket):
                cost = gateway.settle(ticket, fields)  # before the response: its rate-limit headers are current
            headers = ticket.response_headers() if ticket is not None else [("x-request-id", request_id)]
            proto.response_bytes(status, [JSON, *headers, *err.headers], err.body())
        except ProtocolClosed:
            # The client went away while its body was read or the answer written: nginx's 499.
            status, fields = 499, {**fields, "client_disconnected": True}
        except asyncio.CancelledError:
            if asyncio.current_task() in self._cut:
                # The shutdown timeout ran out before the answer (streams end themselves).
                err = shutdown_error()
                status, error_code = err.status, err.code
                proto.response_bytes(status, [JSON, ("x-request-id", request_id)], err.body())
            else:
                # The client left as the handler finished (its Disconnect fired too late to be absorbed).
                status, fields = 499, {**fields, "client_disconnected": True}
        except Exception:
            logger.exception("unhandled error", extra={"fields": {"request_id": request_id, "path": path}})
            status, error_code = 500, "server_error"
            err = ApiError(500, "The server had an error while processing your request.", type="server_error")
            proto.response_bytes(status, [JSON, ("x-request-id", request_id)], err.body())
        if status == 499:  # here, or a handler's own (`Disconnect`)
            error_code = "client_disconnected"
        elif fields.get("shutdown_cut"):  # a stream the shutdown cut
            error_code = "server_shutting_down"
        if ticket is not None:
            ticket.end_interactive()  # after an error too
            if ticket.place is not None:  # a body never read (413, the client left, ...)
                ticket.place.release()
        if ticket is not None and ticket.key is not None:
            fields = {**fields, "key": ticket.key.id, "workspace": ticket.workspace}
        log.access(method, path, status, started, request_id, **fields)
        if gateway is not None and not (ticket is not None and ticket.finished):
            if metered and cost is None:
                cost = gateway.settle(ticket, fields)
            gateway.record(ticket, started, label, status, fields, cost or 0.0, error_code, metered)
        if body_unread:
            await self._discard_body(scope, proto)

    async def _discard_body(self, scope, proto) -> None:
        """After a refusal answered before its body was read: the body is read now and dropped.
        A request whose body is left unread ends its connection (hyper closes it, at times
        without a `connection: close`, and a keep-alive client's next request on it fails); read,
        the connection serves the client's next request. A client that never sends the body is
        let go after `header_timeout_s`; one whose declared body is over the limit, at once."""
        declared = scope.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return
        try:
            await asyncio.wait_for(proto(), self.settings.header_timeout_s)
        except (asyncio.TimeoutError, ProtocolClosed):
            pass

    async def _read_body(self, scope, proto, ticket: Ticket | None = None) -> bytes:
        limit = self.settings.max_body_bytes
        declared = scope.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.", code="request_too_large")
        if declared is not None and declared.isdigit():
            body = await proto()
        else:
            chunks, size = [], 0
            async for chunk in proto:
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
                chunks.append(chunk)
            body = b"".join(chunks)
        if ticket is not None and ticket.capture and self.gateway is not None:
            self.gateway.capture(ticket, body)
        if ticket is not None and ticket.place is not None:
            # The place taken at arrival is given back; decided again before any parsing.
            refused = ticket.place.after_body()
            if refused is not None:
                raise refused
        return body

    def _needs_gateway(self) -> Gateway:
        if self.gateway is None:
            raise ApiError(503, "The gateway is turned off on this server (FERROSERVE_GATEWAY=off).", type="server_error", code="gateway_disabled")
        return self.gateway

    # Handlers: (scope, proto, ticket, path argument) -> (status, body, log fields) --------
    async def _health(self, scope, proto, ticket, arg):
        status.check_engines(self.registry)
        return 200, b'{"status":"ok"}', {}

    async def _ready(self, scope, proto, ticket, arg):
        if not self.ready:
            raise ApiError(503, "Models are still loading.", type="server_error", code="not_ready")
        status.check_engines(self.registry)
        return 200, _encode({"status": "ready", "models": list(self.registry.models)}), {}

    async def _status(self, scope, proto, ticket, arg):
        return 200, status.status(self.registry, self.ready, scope.query_string, self.embed_cache), {}

    async def _openapi(self, scope, proto, ticket, arg):
        if self._openapi_json is None:
            self._openapi_json = msgspec.json.encode(openapi.document(self.route_list()))
        return 200, self._openapi_json, {}

    async def _list_models(self, scope, proto, ticket, arg):
        return 200, models.list_models(self.registry), {}

    async def _get_model(self, scope, proto, ticket, arg):
        return 200, models.get_model(self.registry, arg), {}

    async def _chat(self, scope, proto, ticket, arg):
        return await chat.create_chat_completion(self.router, await self._read_body(scope, proto, ticket), proto, ticket)

    async def _completions(self, scope, proto, ticket, arg):
        return await completions.create_completion(self.router, await self._read_body(scope, proto, ticket), proto, ticket)

    async def _responses_create(self, scope, proto, ticket, arg):
        return await responses.create_response(self.router, self.gateway, await self._read_body(scope, proto, ticket), proto, ticket)

    async def _responses_input_tokens(self, scope, proto, ticket, arg):
        return 200, await responses.input_tokens(self.router, self.gateway, await self._read_body(scope, proto), ticket), {}

    async def _responses_get(self, scope, proto, ticket, arg):
        return 200, await responses.get(self._needs_gateway(), ticket, arg, scope.query_string, proto), {}

    async def _responses_delete(self, scope, proto, ticket, arg):
        return 200, await responses.delete(self._needs_gateway(), ticket, arg), {}

    async def _responses_cancel(self, scope, proto, ticket, arg):
        return 200, await responses.cancel(self._needs_gateway(), ticket, arg), {}

    async def _embeddings(self, scope, proto, ticket, arg):
        body = await self._read_body(scope, proto, ticket)
        # A client that goes away stops the wait (its place in the model's queue is freed; the
        # engine's answer, when it comes, is dropped), as for chat.
        with Disconnect(proto):
            out, extra, headers = await embeddings.create_embedding(self.router, body, self.settings.max_inputs, ticket,
                                                                    self.embed_cache)
            ticket.extra_headers = headers
            return 200, out, extra
        return 499, None, {"client_disconnected": True}

    async def _tokenize(self, scope, proto, ticket, arg):
        return 200, tokenize.tokenize(self.registry, await self._read_body(scope, proto), ticket), {}

    async def _detokenize(self, scope, proto, ticket, arg):
        return 200, tokenize.detokenize(self.registry, await self._read_body(scope, proto), ticket), {}

    async def _estimate(self, scope, proto, ticket, arg):
        return 200, estimate.estimate(self.registry, await self._read_body(scope, proto), ticket), {}

    async def _usage(self, scope, proto, ticket, arg):
        return 200, await usage.summary(self._needs_gateway(), ticket, scope.query_string), {}

    async def _usage_export(self, scope, proto, ticket, arg):
        return 200, await usage.export_csv(self._needs_gateway(), ticket, scope.query_string), {}

    async def _history(self, scope, proto, ticket, arg):
        return 200, await history.list_records(self._needs_gateway(), ticket, scope.query_string), {}

    async def _history_item(self, scope, proto, ticket, arg):
        return 200, await history.get_record(self._needs_gateway(), ticket, arg), {}

    async def _admin_list_keys(self, scope, proto, ticket, arg):
        return 200, admin.list_keys(self._needs_gateway()), {}

    async def _admin_get_key(self, scope, proto, ticket, arg):
        return 200, admin.get_key(self._needs_gateway(), arg), {}

    async def _admin_create_key(self, scope, proto, ticket, arg):
        return 200, await admin.create_key(self._needs_gateway(), await self._read_body(scope, proto)), {}

    async def _admin_revoke_key(self, scope, proto, ticket, arg):
        return 200, await admin.revoke_key(self._needs_gateway(), ticket, arg), {}

    # Files and batches -----------------------------------------------------------------
    def _needs_batches(self) -> tuple[Gateway, BatchRunner]:
        gateway = self._needs_gateway()
        assert self.batches is not None
        return gateway, self.batches

    async def _files_upload(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        return 200, await files.upload(gateway, runner.files, self.settings.max_file_bytes, scope, proto, ticket), {}

    async def _files_list(self, scope, proto, ticket, arg):
        return 200, await files.list_files(self._needs_gateway(), ticket, scope.query_string), {}

    async def _files_get(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        return 200, await files.get(gateway, runner.files, ticket, arg, proto), {}

    async def _files_delete(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        return 200, await files.delete(gateway, runner.files, ticket, arg), {}

    async def _batches_create(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        return 200, await batches.create(gateway, runner, await self._read_body(scope, proto), ticket), {}

    async def _batches_list(self, scope, proto, ticket, arg):
        return 200, await batches.list_batches(self._needs_gateway(), ticket, scope.query_string), {}

    async def _batches_get(self, scope, proto, ticket, arg):
        return 200, await batches.get(self._needs_gateway(), ticket, arg), {}

    async def _batches_cancel(self, scope, proto, ticket, arg):
        return 200, await batches.cancel(self._needs_gateway(), ticket, arg), {}

    async def _batch_embeddings_create(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        body = await self._read_body(scope, proto)
        return 201, await batch_embeddings.create(self.router, gateway, runner, body, ticket), {}

    async def _batch_embeddings_get(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        return 200, await batch_embeddings.get(gateway, runner, scope, ticket, arg), {}

    async def _batch_embeddings_cancel(self, scope, proto, ticket, arg):
        return 200, await batch_embeddings.cancel(self._needs_gateway(), ticket, arg), {}

    async def _batch_embeddings_download(self, scope, proto, ticket, arg):
        gateway, runner = self._needs_batches()
        await batch_embeddings.download(gateway, runner, scope, proto, arg)
        return 200, None, {}

    async def _metrics(self, scope, proto, ticket, arg):
        engines = [(name, stats) for name, m in self.registry.models.items() if (stats := m.backend.engine_stats()) is not None]
        routing = [(name, m.info.backend, router_health(m), m.health) for name, m in self.registry.models.items()]
        gateway = self.gateway
        if gateway is None:
            from ferroserve.gateway.metrics import Metrics

            return 200, Metrics().render(rate_limit_rejections={}, usage_queue_depth=0, engines=engines, routing=routing,
                                         cache=self.embed_cache, process=_process_gauges(),
                                         interactive_in_flight=interactive_in_flight()), {}
        return 200, gateway.metrics.render(
            rate_limit_rejections=gateway.limiter.rejected,
            usage_queue_depth=gateway.usage_queue_depth(),
            engines=engines, routing=routing, cache=self.embed_cache, process=_process_gauges(),
            interactive_in_flight=interactive_in_flight(),
            admissions_ahead=gateway.budgets.ahead_verdicts if gateway.budgets is not None else None,
            admissions_leased=gateway.limiter.leased if gateway.budgets is not None else None,
        ), {}


def _counted_after(ticket: Ticket | None) -> bool:
    """An error answered before its request was admitted, with Redis counting the key's window:
    it is counted right after the answer (settled below it), so an error waits for no round
    trip; its rate-limit headers read the window as this replica last saw it plus this request
    (shared_limits.SharedRateLimiter.admit_request)."""
    window = ticket.window if ticket is not None else None
    return window is not None and window.pending and ticket.admission is None


def _refusal_fields(ticket: Ticket | None, body_unread: bool, started: float) -> dict:
    """Access-line fields of a 503 capacity_unavailable: where it was decided (`arrival`: before
    the body; `body`: right after it; `engine`: by the generation's own check or the router)
    and, after the body, when the body had been read (ms from the handler's start)."""
    if body_unread:
        return {"refused": "arrival"}
    place = ticket.place if ticket is not None else None
    if place is None or place.body_read_at is None:
        return {"refused": "engine"}
    return {"refused": "body" if place.refused else "engine", "body_ms": round((place.body_read_at - started) * 1000, 3)}


def _process_gauges() -> dict[str, int]:
    """What a leak per request would grow: tasks on the loop (this scrape's own included) and
    open file descriptors (sockets, the database, the engines' eventfds)."""
    gauges = {"asyncio_tasks": len(asyncio.all_tasks())}
    try:
        gauges["open_fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs (not Linux)
        pass
    return gauges


def create_app() -> App:
    """granian's factory: settings come from the CLI through the environment."""
    text = os.environ.get(SETTINGS_ENV)
    settings = Settings.from_json(text) if text else Settings()
    if not text:
        from ferroserve.config import resolve

        settings = resolve()
    return App(settings)

"""Per-request gateway work, all in memory on the event loop.

`Gateway.open_ticket` authenticates a request (a dict lookup by the key's hash) and counts it
against the key's request limit (with Redis: at `admit`, in the same round trip as the rest;
shared_limits.py); handlers call `Ticket.admit` once they know the model and the
prompt's token count (model allow-list, budget, token limit); `Gateway.settle` reconciles the
actual usage before the response is sent (so its rate-limit headers are current; with Redis, an
error answered before its admission is settled right after its answer, app.py) and
`Gateway.record` queues the usage record for the store's writer. Limits and budgets are
counted here in memory, or in Redis when replicas share them (shared_limits.py). An inference request that is
answered (a body, or a stream to its end) goes through `Ticket.finish`, which waits until its
record is committed before the answer's last byte is sent: a request the client saw answered
is in the usage table even if the process is killed right after.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ferroserve.backends.local import interactive_in_flight
from ferroserve.errors import ApiError
from ferroserve.gateway.keys import ApiKey, Workspace, hash_secret
from ferroserve.gateway.limits import RateLimiter, Window, budget_exceeded
from ferroserve.gateway.metrics import Metrics
from ferroserve.gateway.store import month_start
from ferroserve.gateway.store_api import GatewayStore, open_store
from ferroserve.gateway.worker import StoreWorker
from ferroserve.log import logger

if TYPE_CHECKING:
    from ferroserve.backends.base import ChatRequest
    from ferroserve.config import Settings
    from ferroserve.gateway.pg_usage import PgUsageWriter
    from ferroserve.gateway.router import Plan
    from ferroserve.registry import LoadedModel, Registry

OPEN_WORKSPACE = "default"
_PROMPT_CAPTURE_BYTES = 64 * 1024


def invalid_key(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")




class Ticket:
    """One request as the gateway sees it."""

    __slots__ = ("gateway", "request_id", "started", "key", "workspace", "window", "capture", "prompt",
                 "model", "price", "charged_prompt_tokens", "ttft_s", "requests_used", "backend", "fallbacks", "cache_hit",
                 "extra_headers", "route", "metered", "finished", "interactive", "reservation", "place", "admission")

    def __init__(self, gateway: Gateway | None, request_id: str, started: float, key: ApiKey | None,
                 workspace: str | None, window: Window | None, capture: bool) -> None:
        self.gateway = gateway
        self.request_id = request_id
        self.started = started
        self.key = key
        self.workspace = workspace
        self.window = window
        self.capture = capture
        self.prompt: str | None = None
        self.model: str | None = None
        self.price: tuple[float, float] = (0.0, 0.0)
        self.charged_prompt_tokens = 0
        self.ttft_s: float | None = None
        self.requests_used = window.requests if window is not None else 0
        self.backend: str | None = None
        self.fallbacks: list[str] | None = None
        self.cache_hit = False
        self.extra_headers: list[tuple[str, str]] | None = None
        self.route = "other"  # the route label the usage record and metrics name
        self.metered = False  # an inference route: settled and recorded as usage
        self.finished = False  # settled and recorded (by `finish`)
        # While set, this request counts as interactive on the server's engines (batch work
        # waits): from arrival until answered, unless it asks for batch priority.
        self.interactive: Any = None
        # With shared budgets (Redis): (the counter, USD reserved), until `settle` reconciles it.
        self.reservation: tuple[str, float] | None = None
        # A place in the model's queue taken at arrival, given back once the body is read
        # (api/admission.py).
        self.place: Any = None
        # With Redis: the admission script in flight while the request's work runs
        # (`admit(..., ahead=True)`), until `confirm` reads its verdict.
        self.admission: Any = None

    async def finish(self, status: int, fields: dict) -> None:
        """Settles a metered request and records its usage, then waits until the record is
        committed. Called right before the answer's last byte (the body, a stream's final
        event), once; the app records anything that did not get here (errors, disconnects)
        after the response, without waiting."""
        gw = self.gateway
        if gw is None or not self.metered or self.finished:
            return
        self.finished = True
        cost = gw.settle(self, fields)
        committed = gw.record(self, self.started, self.route, status, fields, cost, None, True, durable=True)
        if committed is not None:
            await committed

    def end_interactive(self) -> None:
        """Answered, or running at batch priority: batch work no longer waits for this request."""
        if self.interactive is not None:
            self.interactive.close()
            self.interactive = None

    def allow(self, model: LoadedModel) -> None:
        """403 unless the key may use the model (for routes that cost nothing, e.g. tokenize)."""
        key = self.key
        spec = model.spec
        if key is not None and not key.allows((spec.name, *spec.aliases)):
            raise ApiError(403, f"This API key may not use the model `{spec.name}`.", param="model", code="model_not_allowed")

    def allows(self, model: LoadedModel) -> bool:
        key = self.key
        return key is None or key.allows((model.spec.name, *model.spec.aliases))

    def admit_plan(self, plans: list[Plan], requests: list[ChatRequest], max_completion_tokens: int) -> None:
        """`admit` for routed generations (one plan per request: a text completion may carry
        several prompts). A model asked for by name must be allowed (403); candidates the key
        may not use are dropped (for "auto", 403 if none is left). Each prompt is counted by
        its first candidate (the local backend tokenizes once for count and generation)."""
        prompt_tokens = 0
        for plan, request in zip(plans, requests):
            self.restrict(plan)
            prompt_tokens += plan.candidates[0].backend.count_tokens(request)
        self.admit(plans[0].candidates[0], prompt_tokens, max_completion_tokens)

    def restrict(self, plan: Plan) -> None:
        """Keeps the plan's candidates this key may use: a model asked for by name must be
        allowed (403), others it may not use are dropped (403 if none is left)."""
        if plan.named is not None:
            self.allow(plan.named)
        allowed = [m for m in plan.candidates if self.allows(m)]
        if not allowed:
            raise ApiError(403, f"This API key may not use any model `{plan.requested}` can route to.", param="model",
                           code="model_not_allowed")
        plan.candidates = allowed
        if not any(m.spec.backend == "local" for m in allowed):
            # Served by other servers only: batch work on this server's engines need not wait.
            self.end_interactive()

    def served(self, model: LoadedModel, plan: Plan | None = None) -> None:
        """The candidate that serves: its prices apply, and the usage record names it."""
        spec = model.spec
        self.model = spec.name
        self.price = (spec.input_usd_per_million_tokens, spec.output_usd_per_million_tokens)
        self.backend = model.info.backend
        if plan is not None and plan.tried:
            self.fallbacks = list(plan.tried)

    def needs_prompt_tokens(self, model: LoadedModel) -> bool:
        """Whether `admit` needs the prompt's token count: a token limit on the key or a budget
        on a priced model. Otherwise routes that count late (embeddings) skip counting."""
        gw, key = self.gateway, self.key
        if gw is None:
            return False
        if key is not None and key.tpm is not None:
            return True
        spec = model.spec
        priced = spec.input_usd_per_million_tokens or spec.output_usd_per_million_tokens
        return bool(priced) and gw.budget_of(self.workspace) is not None

    def admit(self, model: LoadedModel, prompt_tokens: int = 0, max_completion_tokens: int = 0, ahead: bool = False) -> None:
        """Before the backend runs: is the model allowed, does the budget hold, are there tokens
        left this minute? `prompt_tokens` are charged now (embeddings count them first only
        when `needs_prompt_tokens`); `settle` reconciles with the actual usage.

        `ahead` (with Redis): the caller runs the work before its verdict is known and calls
        `confirm` before answering, so the round trip overlaps the work instead of preceding
        it; granted only while this replica's last view of the key's window and budget leaves
        room (shared_limits.SharedBudgets.send_admit), else the verdict is read here as usual.
        Only for work that is not answered before `confirm` and costs nothing if dropped."""
        spec = model.spec
        self.model = spec.name
        self.price = (spec.input_usd_per_million_tokens, spec.output_usd_per_million_tokens)
        gw = self.gateway
        if gw is None:
            return
        key = self.key
        self.allow(model)
        budget = gw.budget_of(self.workspace)
        estimate = (prompt_tokens * self.price[0] + max_completion_tokens * self.price[1]) / 1e6
        window = self.window
        tpm = key.tpm if key is not None and window is not None else None
        if gw.budgets is not None:
            # Replicas: the request counted in its window (if pending), the budget's worst case
            # reserved and the prompt tokens counted in Redis, atomically and in one round trip
            # (settle reconciles the budget and tokens).
            pending = window is not None and window.pending
            if budget is not None or tpm is not None or pending:
                rpm = key.rpm if key is not None else None
                leased = gw.budgets.admit_leased(self, budget, estimate, rpm, tpm, prompt_tokens)
                if leased is not False:  # this replica's leases held all of it: no round trip
                    self.reservation = leased
                    if pending:
                        self.requests_used = window.requests
                    self.charged_prompt_tokens = prompt_tokens
                    return
                admission = gw.budgets.send_admit(self, budget, estimate, gw.spent(self.workspace), rpm, tpm, prompt_tokens,
                                                  ahead)
                self.admission = admission
                if admission.ahead is None:
                    self.confirm()
                return
        else:
            if budget is not None:
                spent = gw.spent(self.workspace)
                if spent >= budget or spent + estimate > budget:
                    raise budget_exceeded(self.workspace, budget, spent, estimate)
            if tpm is not None:
                gw.limiter.admit_tokens(self.window, tpm, prompt_tokens, time.time())
        self.charged_prompt_tokens = prompt_tokens

    def confirm(self) -> None:
        """Reads the verdict of an admission sent by `admit` (Redis): raises its 429 or 402, or
        holds the reservation. Nothing to do when there is none in flight."""
        admission = self.admission
        if admission is None:
            return
        self.admission = None
        try:
            self.reservation = self.gateway.budgets.finish_admit(admission)
        finally:
            if admission.count:  # the headers of the answer (or refusal) count this request
                self.requests_used = self.window.requests
        self.charged_prompt_tokens = admission.prompt_tokens

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def response_headers(self) -> list[tuple[str, str]]:
        headers = [("x-request-id", self.request_id)]
        if self.extra_headers:
            headers += self.extra_headers
        key = self.key
        if key is not None and self.window is not None and (key.rpm is not None or key.tpm is not None):
            headers += self.gateway.limiter.headers(self.window, key.rpm, key.tpm, time.time(), self.requests_used)
        return headers


class Gateway:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.limiter = RateLimiter(settings.rate_window_s)
        self.budgets = None
        if settings.redis_url:
            from ferroserve.gateway import shared_limits

            client = shared_limits.connect(settings.redis_url)
            self.limiter = shared_limits.SharedRateLimiter(settings.rate_window_s, client, leases=settings.limit_leases)
            self.budgets = shared_limits.SharedBudgets(client, self.limiter)
        self.metrics = Metrics()
        self._keys: dict[str, ApiKey] = {}  # by the secret's sha256
        self._keys_by_id: dict[str, ApiKey] = {}
        self._workspaces: dict[str, Workspace] = {}
        self._spend: dict[str, float] = {}
        self._spend_month = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.worker: StoreWorker | None = None
        # On PostgreSQL, usage records are written from the loop (pg_usage.py); else by the worker.
        self.usage_writer: PgUsageWriter | None = None

    # Lifecycle ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        store = open_store(self.settings.data_dir, self.settings.database_url, pg_async_commit=self.settings.pg_async_commit)
        self.replace_keys(store.keys(), store.workspaces())
        now = time.time()
        self._spend_month = month_start(now)
        self._spend = store.spend_since(self._spend_month)
        self.worker = StoreWorker(store, on_external_change=self._reload_from)
        usage_writer = getattr(store, "usage_writer", None)
        if usage_writer is not None:
            self.usage_writer = usage_writer()
        logger.info("gateway", extra={"fields": {"data": store.location, "keys": len(self._keys_by_id),
                                                  "auth": "on" if self.auth_required else "off (no keys)"}})

    def stop(self) -> None:
        """Writes every queued usage record (running the loop for the PostgreSQL writer: granian
        calls this from `__rsgi_del__`, with the loop stopped), then closes the store."""
        if self.worker is None:
            return
        if self.budgets is not None:
            self.budgets.release()  # budget leases back to the other replicas
        writer = self.usage_writer
        if writer is not None:
            for row in writer.close(self._loop):  # only if the loop is gone: the thread writes them
                self.worker.record(row)
        self.worker.close()
        writers = [self.worker] if writer is None else [self.worker, writer]
        logger.info("usage flushed", extra={"fields": {"written": sum(w.written for w in writers),
                                                       "commits": sum(w.commits for w in writers),
                                                       "failed": sum(w.failed for w in writers)}})
        self.worker = None

    def usage_queue_depth(self) -> int:
        """Usage records queued and not yet committed, on whichever writer holds them."""
        depth = self.worker.queue_depth() if self.worker is not None else 0
        return depth + (self.usage_writer.queue_depth() if self.usage_writer is not None else 0)

    def call(self, fn: Callable[[GatewayStore], Any]) -> asyncio.Future:
        """Runs `fn(store)` on the store's thread, after every usage record queued before it."""
        assert self.worker is not None, "gateway not started"
        writer = self.usage_writer
        if writer is not None and writer.queue_depth():
            return asyncio.ensure_future(self._call_after_usage(writer, fn))
        return self.worker.call(fn)

    async def _call_after_usage(self, writer: PgUsageWriter, fn: Callable[[GatewayStore], Any]) -> Any:
        await writer.barrier()
        assert self.worker is not None, "gateway stopped"
        return await self.worker.call(fn)

    def _reload_from(self, store: GatewayStore) -> None:
        """On the worker thread, after another process committed: reload keys and workspaces."""
        keys, workspaces = store.keys(), store.workspaces()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.replace_keys, keys, workspaces)

    def replace_keys(self, keys: list[ApiKey], workspaces: dict[str, Workspace]) -> None:
        self._keys = {k.secret_sha256: k for k in keys}
        self._keys_by_id = {k.id: k for k in keys}
        self._workspaces = workspaces

    @property
    def auth_required(self) -> bool:
        # Open only while no key exists at all; a revoked last key does not reopen the server.
        return bool(self._keys)

    def key_by_id(self, key_id: str) -> ApiKey | None:
        return self._keys_by_id.get(key_id)

    # Budgets ----------------------------------------------------------------------------
    def budget_of(self, workspace: str | None) -> float | None:
        ws = self._workspaces.get(workspace) if workspace is not None else None
        return ws.monthly_budget_usd if ws is not None else None

    def spent(self, workspace: str | None) -> float:
        self._roll_month(time.time())
        return self._spend.get(workspace, 0.0)

    def _roll_month(self, now: float) -> None:
        if month_start(now) != self._spend_month:
            self._spend_month = month_start(now)
            self._spend = {}

    # The request path ---------------------------------------------------------------------
    def open_ticket(self, scope, request_id: str, started: float, *, admin: bool, metered: bool = True) -> Ticket:
        """Authenticates the request and, for a metered (inference) route, counts it against the
        key's limits; raises 401/403/429. Reading usage, models or history is not metered, so a
        key over its limit can still see why."""
        if not self._keys:
            ws = self._workspaces.get(OPEN_WORKSPACE)
            return Ticket(self, request_id, started, None, OPEN_WORKSPACE, None, ws is not None and ws.capture_prompts)
        headers = scope.headers
        auth = headers.get("authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            secret = auth[7:].strip()
        else:
            secret = headers.get("x-api-key")
        if not secret:
            raise invalid_key("You didn't provide an API key. Send it as `Authorization: Bearer KEY`.")
        digest = hash_secret(secret)
        key = self._keys.get(digest)
        # The dict lookup is by a hash of a 256-bit secret, which leaks nothing useful through
        # its timing; the stored digest is still compared in constant time.
        if key is None or not hmac.compare_digest(key.secret_sha256, digest):
            raise invalid_key("Incorrect API key provided.")
        now = time.time()
        if key.revoked_at is not None:
            raise invalid_key("This API key has been revoked.")
        if key.expires_at is not None and now >= key.expires_at:
            raise invalid_key("This API key has expired.")
        if admin and not key.admin:
            raise ApiError(403, "This route needs an admin API key.", code="permission_denied")
        window = None
        if metered and (key.rpm is not None or key.tpm is not None):
            window = self.limiter.admit_request(key.id, key.rpm, key.tpm, now)
        ws = self._workspaces.get(key.workspace)
        return Ticket(self, request_id, started, key, key.workspace, window, ws is not None and ws.capture_prompts)

    def settle(self, ticket: Ticket, fields: dict) -> float:
        """The request's actual usage: tokens against the rate window, cost against the budget.
        Returns the cost in USD."""
        if ticket.admission is not None:  # ended (an error) while its admission was in flight
            try:
                ticket.confirm()
            except ApiError:
                pass  # refused as well: no tokens or budget were reserved for it
        prompt = fields.get("prompt_tokens", 0)
        completion = fields.get("completion_tokens", 0)
        key = ticket.key
        window = ticket.window
        if window is not None and window.pending and key is not None:
            # Ended before its admission (an error): counted now (shared_limits.py).
            self.limiter.count_request(window, key.rpm, key.tpm, time.time())
            ticket.requests_used = window.requests
        if key is not None and key.tpm is not None and ticket.window is not None:
            self.limiter.add_tokens(ticket.window, prompt - ticket.charged_prompt_tokens + completion)
            ticket.charged_prompt_tokens = prompt
        cost = (prompt * ticket.price[0] + completion * ticket.price[1]) / 1e6
        if ticket.reservation is not None:
            counter, reserved = ticket.reservation
            ticket.reservation = None
            self.budgets.settle(counter, reserved, cost)
        if cost:
            self._roll_month(time.time())
            self._spend[ticket.workspace] = self._spend.get(ticket.workspace, 0.0) + cost
        return cost

    def record(self, ticket: Ticket | None, started: float, route: str, status: int, fields: dict, cost: float,
               error_code: str | None, metered: bool, durable: bool = False) -> asyncio.Future | None:
        """Metrics always; a usage record for metered (inference) routes. `durable`: returns a
        future that is done once the record is committed."""
        seconds = time.perf_counter() - started
        self.metrics.observe_request(route, status, seconds)
        if not metered or ticket is None:
            return None
        model = ticket.model or fields.get("model")
        prompt = fields.get("prompt_tokens", 0)
        completion = fields.get("completion_tokens", 0)
        cached = fields.get("cached_tokens", 0)
        if model is not None and (prompt or completion):
            self.metrics.observe_tokens(model, prompt, completion, cached)
        if ticket.ttft_s is not None and model is not None:
            self.metrics.observe_ttft(model, ticket.ttft_s)
        key = ticket.key
        assert self.worker is not None
        # cache_hit: a cache served the request (the embedding cache all of it: backend "cache";
        # the prefix cache part of the prompt: cached_tokens); fallbacks: the candidates that
        # failed before the one that served.
        backend = ticket.backend or (("cache" if ticket.cache_hit else "local") if model is not None else None)
        row = (
            ticket.request_id, time.time(), key.id if key is not None else None, ticket.workspace, route, model,
            backend, int(ticket.cache_hit or cached > 0), prompt, completion, cached,
            cost, round(seconds * 1000, 3), round(ticket.ttft_s * 1000, 3) if ticket.ttft_s is not None else None,
            status, error_code, ticket.prompt, "\n".join(ticket.fallbacks) if ticket.fallbacks else None,
        )
        writer = self.usage_writer or self.worker
        if durable:
            # A lone request (no other interactive request in flight on this server: nothing
            # could share a group commit with it) commits its row itself if the writer is idle:
            # SQLite's on the store's connection, PostgreSQL's (at --pg-async-commit) on the
            # loop writer's, waiting for it with the loop blocked (pg_usage.py).
            if interactive_in_flight() <= 1:
                if writer is self.worker:
                    if self.worker.commit_now(row):
                        return None
                else:
                    return writer.commit_now(row)
            return writer.record_committed(row)
        writer.record(row)
        return None

    def capture(self, ticket: Ticket, body: bytes) -> None:
        if ticket.capture:
            ticket.prompt = body[:_PROMPT_CAPTURE_BYTES].decode("utf-8", errors="replace")

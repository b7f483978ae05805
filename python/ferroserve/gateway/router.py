"""The router: a model name (or "auto") → an ordered list of candidates, each a backend with
its measured health, tried in order until one serves.

Per candidate it keeps EWMAs of time to first token per prompt token, seconds per generated
token and the error rate, and a circuit breaker: `breaker_failures` consecutive failures open
it; after `breaker_cooldown_s` one request probes it (half-open); a success closes it.

The scoring rule of `model: "auto"` (also in the README):
- candidates: every model with the capability the route needs, minus those whose breaker is
  open or whose backend is down, minus those whose `options.task_classes` does not list the
  request's `route.task_class` (models without `task_classes` take any class);
- `max_latency_ms`: each candidate's predicted time for this request is
  prompt tokens × its measured prefill seconds per token + max_tokens × its measured decode
  seconds per token + its queue wait (queue depth × its measured time to first token); a cold
  candidate uses its configured `prefill_tokens_per_s` / `decode_tokens_per_s`, and one with
  neither is assumed to meet the bound. Candidates predicted to miss are dropped; if none is left,
  the fastest predicted is chosen and `reason` says the bound cannot be met;
- objective `latency`: the smallest predicted time; `cost`: the smallest price for this request
  (prompt tokens × input price + max_tokens × output price); `quality`: the highest `quality`
  (unset = 0.5); `quality-per-dollar` (the default): quality / (input + output price per million
  tokens + 0.01). Ties go to the next criterion (quality, then cost, then configuration order);
- the order tried: the choice, then `route.fallbacks`, then the choice's configured
  `fallbacks`, then the remaining candidates in score order.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from ferroserve.backends.base import (
    DEGRADED, DOWN, HEALTHY, Admitted, AtCapacity, ChatRequest, Delta, Event, Failed, Finished, Unavailable,
)
from ferroserve.errors import ApiError, from_engine, invalid, model_not_found
from ferroserve.log import logger
from ferroserve.schemas.chat import Route

if TYPE_CHECKING:
    from ferroserve.registry import LoadedModel

OBJECTIVES = ("latency", "cost", "quality", "quality-per-dollar")
DEFAULT_OBJECTIVE = "quality-per-dollar"
_ALPHA = 0.2  # EWMA weight of the newest sample


def check_route(route: Route | None) -> None:
    if route is None:
        return
    if route.objective is not None and route.objective not in OBJECTIVES:
        raise invalid(f"route.objective must be one of {', '.join(OBJECTIVES)}.", param="route")
    if route.max_latency_ms is not None and route.max_latency_ms <= 0:
        raise invalid("route.max_latency_ms must be positive.", param="route")


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Health:
    """What the router has measured about one candidate."""

    failures_to_open: int
    cooldown_s: float
    prefill_s_per_token: float | None = None
    decode_s_per_token: float | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens_per_s: float | None = None
    error_rate: float = 0.0
    consecutive_failures: int = 0
    state: str = CLOSED
    opened_at: float = 0.0
    probing: bool = False
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    last_code: str | None = None  # the last failure's error code, if it had one

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + _ALPHA * (new - old)

    def available(self, now: float) -> bool:
        """May a request be sent now? An open breaker lets one probe through per cool-down."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = HALF_OPEN
        return self.state == HALF_OPEN and not self.probing

    def begin(self) -> None:
        if self.state == HALF_OPEN:
            self.probing = True

    def success(self, *, prompt_tokens: int, completion_tokens: int, ttft_s: float | None, total_s: float) -> None:
        self.requests += 1
        self.consecutive_failures = 0
        self.state, self.probing = CLOSED, False
        self.error_rate = self._ewma(self.error_rate, 0.0)
        self.latency_s = self._ewma(self.latency_s, total_s)
        per_token = None
        if ttft_s is not None:  # streamed: the first token splits prefill from decode
            self.ttft_s = self._ewma(self.ttft_s, ttft_s)
            self.prefill_s_per_token = self._ewma(self.prefill_s_per_token, ttft_s / max(prompt_tokens, 1))
            if completion_tokens > 1:
                per_token = max(total_s - ttft_s, 0.0) / (completion_tokens - 1)
        elif completion_tokens > 0:
            # Buffered: only the total is known; what the prefill estimate (if any) does not
            # explain is charged to decoding (conservative while prefill is unmeasured).
            prefill = prompt_tokens * (self.prefill_s_per_token or 0.0)
            per_token = max(total_s - prefill, 0.0) / completion_tokens
        if per_token is not None:
            self.decode_s_per_token = self._ewma(self.decode_s_per_token, per_token)
            if per_token > 0:
                self.tokens_per_s = self._ewma(self.tokens_per_s, 1.0 / per_token)

    def failure(self, reason: str, now: float, code: str | None = None) -> None:
        self.requests += 1
        self.failures += 1
        self.last_error = reason
        self.last_code = code
        self.consecutive_failures += 1
        self.error_rate = self._ewma(self.error_rate, 1.0)
        if self.state == HALF_OPEN or self.consecutive_failures >= self.failures_to_open:
            if self.state != OPEN:
                logger.warning("circuit open", extra={"fields": {"reason": reason[:200]}})
            self.state, self.opened_at, self.probing = OPEN, now, False

    def release(self) -> None:
        """A request that neither succeeded nor failed (the client left): free the probe."""
        self.probing = False

    def as_json(self) -> dict:
        return {
            "breaker": self.state, "consecutive_failures": self.consecutive_failures,
            "error_rate": round(self.error_rate, 4), "requests": self.requests, "failures": self.failures,
            "ewma_latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 3),
            "ewma_ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
            "ewma_tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
        }


def health_of(model) -> str:
    """healthy / degraded / down for a LoadedModel: its backend's own view and its breaker."""
    own = model.backend.health()
    h: Health = model.health
    if own == DOWN or (h.state == OPEN and time.monotonic() - h.opened_at < h.cooldown_s):
        return DOWN
    if own == DEGRADED or h.state != CLOSED or h.error_rate > 0.2:
        return DEGRADED
    return HEALTHY


@dataclass
class Plan:
    """The candidates of one request, in the order they are tried, and why."""

    requested: str
    candidates: list[LoadedModel]
    objective: str | None = None
    reason: str | None = None
    considered: int = 0
    routed: bool = False  # the request asked for auto or carried `route`: answer with `routing`
    tried: list[str] = field(default_factory=list)  # candidates that failed, with why
    # Why each candidate tried or skipped could not serve: its error code (None: no code).
    failure_codes: list[str | None] = field(default_factory=list)
    at_capacity: list[AtCapacity] = field(default_factory=list)  # candidates whose queue was full
    served_by: LoadedModel | None = None
    named: LoadedModel | None = None  # the model asked for by name (None for "auto")

    def response_model_name(self) -> str:
        """Responses name the model asked for (an alias as its model's name); for "auto", the
        model chosen."""
        if self.named is not None:
            return self.named.spec.name
        return self.served_by.spec.name if self.served_by is not None else self.requested

    def routing(self) -> dict:
        selected = self.served_by.spec.name if self.served_by is not None else None
        return {
            "selected": selected,
            "objective": self.objective,
            "candidates_considered": self.considered,
            "reason": self.reason,
            "fallbacks_used": list(self.tried),
        }


def _retry_after(seconds: float) -> list[tuple[str, str]]:
    return [("retry-after", str(max(1, int(seconds + 0.999))))]


class NoProvider(ApiError):
    def __init__(self, message: str, retry_after: float, code: str = "no_provider_available") -> None:
        super().__init__(503, message, type="server_error", code=code, headers=_retry_after(retry_after))


def over_capacity(plan: Plan) -> ApiError:
    """Every candidate's queue was full: 503 `capacity_unavailable` (the engine's Overloaded
    mapping), with `retry-after`."""
    err = from_engine("Overloaded", " ".join(e.reason for e in plan.at_capacity))
    err.headers = _retry_after(min(e.retry_after or 1.0 for e in plan.at_capacity))
    return err


class Router:
    def __init__(self, registry, settings) -> None:
        self.registry = registry
        self.settings = settings

    # Planning ------------------------------------------------------------------------------
    def require(self, requested: str, capability: str) -> None:
        """404 unless `requested` is "auto" or a model with the capability (checked before the
        request's other fields, as OpenAI does)."""
        if requested == "auto":
            return
        model = self.registry.get(requested)
        if model is None or capability not in model.capabilities:
            raise model_not_found(requested)

    def plan(self, requested: str, capability: str, route: Route | None, *, prompt_tokens_hint: int = 0,
             max_tokens: int = 0) -> Plan:
        """The candidates for `requested` (a model name or "auto"); 404 if it names nothing."""
        registry = self.registry
        check_route(route)
        now = time.monotonic()
        if requested == "auto":
            pool = [m for m in registry.models.values() if capability in m.capabilities]
            if not pool:
                raise model_not_found(requested)
            objective = (route.objective if route else None) or DEFAULT_OBJECTIVE
            eligible = [m for m in pool if m.health.available(now) and m.backend.health() != DOWN]
            task = route.task_class if route else None
            if task is not None:
                eligible = [m for m in eligible if _takes_task(m, task)]
            ranked, reason = self._rank(eligible, objective, route, prompt_tokens_hint, max_tokens)
            if not ranked:
                ranked, reason = pool, "no candidate is healthy; trying all"
            order = [ranked[0], *self._named(route.fallbacks if route else [], capability),
                     *self._named(ranked[0].spec.fallbacks, capability), *ranked[1:]]
            return Plan(requested, _dedup(order), objective, reason, len(pool), True)
        model = registry.get(requested)
        if model is None or capability not in model.capabilities:
            raise model_not_found(requested)
        order = [model, *self._named(route.fallbacks if route else [], capability), *self._named(model.spec.fallbacks, capability)]
        order = _dedup(order)
        plan = Plan(requested, order, route.objective if route else None, "requested model", len(order), route is not None,
                    named=model)
        if route is not None and route.max_latency_ms is not None:
            predicted = {id(m): self._predict(m, prompt_tokens_hint, max_tokens) for m in order}
            meets = [m for m in order if _within(predicted[id(m)], route.max_latency_ms)]
            if not meets:
                order.sort(key=lambda m: predicted[id(m)] or 0.0)
                plan.reason = f"no candidate is predicted within {route.max_latency_ms:g} ms; fastest predicted first"
            elif meets[0] is not order[0]:
                plan.reason = f"{order[0].spec.name} is predicted to miss {route.max_latency_ms:g} ms"
                order[:] = meets + [m for m in order if m not in meets]
            plan.candidates = order
        return plan

    def _named(self, names: list[str], capability: str) -> list:
        out = []
        for n in names:
            m = self.registry.get(n)
            if m is None or capability not in m.capabilities:
                raise invalid(f"Fallback model `{n}` does not exist or cannot serve this route.", param="route")
            out.append(m)
        return out

    def _predict(self, m, prompt_tokens: int, max_tokens: int) -> float | None:
        """Seconds this request is predicted to take on `m`; None when nothing is known."""
        h: Health = m.health
        spec = m.spec
        prefill = h.prefill_s_per_token
        if prefill is None and spec.prefill_tokens_per_s:
            prefill = 1.0 / spec.prefill_tokens_per_s
        decode = h.decode_s_per_token
        if decode is None and spec.decode_tokens_per_s:
            decode = 1.0 / spec.decode_tokens_per_s
        if prefill is None and decode is None:
            return None
        queue = m.backend.stats().queue_depth * (h.ttft_s or 0.0)
        return max(prompt_tokens, 1) * (prefill or 0.0) + max(max_tokens, 0) * (decode or 0.0) + queue

    def _rank(self, pool: list, objective: str, route: Route | None, prompt_tokens: int, max_tokens: int):
        reason = None
        bound = route.max_latency_ms if route else None
        predicted = {id(m): self._predict(m, prompt_tokens, max_tokens) for m in pool}
        if bound is not None and pool:
            meets = [m for m in pool if _within(predicted[id(m)], bound)]
            if not meets:
                fastest = min(pool, key=lambda m: predicted[id(m)] or 0.0)
                rest = sorted((m for m in pool if m is not fastest), key=lambda m: predicted[id(m)] or 0.0)
                return [fastest, *rest], (f"no candidate is predicted within {bound:g} ms; chose the fastest predicted "
                                          f"({(predicted[id(fastest)] or 0.0) * 1000:.0f} ms)")
            pool = meets

        def quality(m) -> float:
            return 0.5 if m.spec.quality is None else m.spec.quality

        def cost(m) -> float:
            s = m.spec
            return (max(prompt_tokens, 1) * s.input_usd_per_million_tokens + max(max_tokens, 1) * s.output_usd_per_million_tokens) / 1e6

        def qpd(m) -> float:
            s = m.spec
            return quality(m) / (s.input_usd_per_million_tokens + s.output_usd_per_million_tokens + 0.01)

        def latency(m) -> float:
            p = predicted[id(m)]
            return float("inf") if p is None else p

        keys = {
            "latency": lambda m: (latency(m), -quality(m), cost(m)),
            "cost": lambda m: (cost(m), -quality(m), latency(m)),
            "quality": lambda m: (-quality(m), cost(m), latency(m)),
            "quality-per-dollar": lambda m: (-qpd(m), -quality(m), latency(m)),
        }
        ranked = sorted(pool, key=keys[objective])  # stable: configuration order breaks ties
        if ranked:
            best = ranked[0]
            detail = {
                "latency": lambda m: "lowest predicted latency" + (f" ({latency(m) * 1000:.0f} ms)" if latency(m) != float("inf") else " (no measurement yet)"),
                "cost": lambda m: f"lowest cost (${cost(m):.6f} for this request)",
                "quality": lambda m: f"highest quality ({quality(m):g})",
                "quality-per-dollar": lambda m: f"best quality-per-dollar ({qpd(m):.3g})",
            }[objective](best)
            reason = detail + (f" within {bound:g} ms" if bound is not None else "")
        return ranked, reason

    # Serving -------------------------------------------------------------------------------
    def _next(self, plan: Plan, index: int):
        """The next candidate from `index` whose breaker lets a request through."""
        now = time.monotonic()
        for i in range(index, len(plan.candidates)):
            m = plan.candidates[i]
            if m.health.available(now):
                return i, m
            last = f" (last error: {m.health.last_error})" if m.health.last_error else ""
            plan.tried.append(f"{m.spec.name}: circuit open{last}"[:300])
            plan.failure_codes.append(m.health.last_code)
        return None, None

    def _attempts(self, plan: Plan):
        """Each candidate a request may be sent to now, in order, as `(index after it, model)`
        with its breaker told a request is going (a half-open one lets this one probe);
        NoProvider when none is left."""
        index = 0
        while True:
            index, m = self._next(plan, index)
            if m is None:
                raise self._exhausted(plan)
            index += 1
            m.health.begin()
            yield index, m

    def _exhausted(self, plan: Plan) -> ApiError:
        codes = set(plan.failure_codes)
        if codes == {"capacity_unavailable"}:
            return over_capacity(plan)
        waits = [max(0.0, m.health.cooldown_s - (time.monotonic() - m.health.opened_at))
                 for m in plan.candidates if m.health.state == OPEN]
        retry = min(waits) if waits else 1.0
        names = ", ".join(m.spec.name for m in plan.candidates)
        # Every candidate failed the same known way (say its engine died): that code, else ours.
        code = codes.pop() if len(codes) == 1 and None not in codes else "no_provider_available"
        return NoProvider(f"No provider is available for `{plan.requested}`: every candidate ({names}) failed or is "
                          f"open. Tried: {'; '.join(plan.tried) or 'none'}.", retry, code)

    async def open_generation(self, plan: Plan, request: ChatRequest, *, first_byte_commits: bool):
        """Starts the generation on the first candidate that can serve it.

        Returns `(model, events)`: an async iterator whose first events are those already
        received. With `first_byte_commits` (streaming), a candidate is kept as soon as it
        produced its first Delta or Finished (what the client will see); before that, an
        Unavailable moves on to the next candidate. Without it (a buffered response), the
        whole generation is collected first, so a failure at any point moves on."""
        for index, m in self._attempts(plan):
            h: Health = m.health
            started = time.perf_counter()
            gen = m.backend.generate(request)
            buffered: list[Event] = []
            failure: ApiError | Unavailable | None = None
            try:
                async for ev in gen:
                    if type(ev) is Failed:
                        failure = ev.error
                        break
                    buffered.append(ev)
                    if first_byte_commits and type(ev) is not Admitted:
                        break
            except Unavailable as exc:
                failure = exc
            except BaseException:  # a client error, or the client left (cancelled)
                await gen.aclose()
                h.release()
                raise
            if failure is None:
                plan.served_by = m
                if not first_byte_commits:
                    # Buffered: only the total time is known (success() splits it).
                    self._observe(m, buffered, started, None)
                    return m, _replay(buffered)
                ttft = (time.perf_counter() - started) if any(type(e) is Delta for e in buffered) else None
                return m, self._tracked(plan, request, index, m, gen, buffered, started, ttft)
            await gen.aclose()
            if isinstance(failure, ApiError):
                h.release()
                raise failure
            self._failed(plan, m, failure)
        raise AssertionError("unreachable: _attempts raises NoProvider when no candidate is left")

    def _observe(self, m, events: list[Event], started: float, ttft: float | None) -> None:
        prompt = completion = 0
        for e in events:
            if type(e) is Finished:
                completion += e.completion_tokens
                prompt = e.prompt_tokens or prompt
            elif type(e) is Admitted:
                prompt = e.prompt_tokens
        m.health.success(prompt_tokens=prompt, completion_tokens=completion, ttft_s=ttft, total_s=time.perf_counter() - started)

    async def _tracked(self, plan: Plan, request: ChatRequest, index: int, m, gen, first: list[Event], started: float,
                       ttft: float | None) -> AsyncIterator[Event]:
        """The committed generation: replays what was buffered, then the rest, and records the
        outcome in the candidate's health. If the candidate stops serving mid-stream (n = 1),
        the answer continues on the next candidate that can resume one (`_resume`)."""
        events: list[Event] = list(first)
        text: list[str] = [e.text for e in first if type(e) is Delta]
        done = False
        try:
            for ev in first:
                yield ev
            async for ev in gen:
                t = type(ev)
                if t is Failed:
                    done = True
                    if isinstance(ev.error, Unavailable):
                        m.health.failure(ev.error.reason, time.monotonic(), ev.error.code)
                        if request.params.n == 1:
                            await gen.aclose()
                            async for resumed in self._resume(plan, request, index, m, ev.error, text):
                                yield resumed
                            return
                    yield ev
                    return
                if t is Delta:
                    text.append(ev.text)
                    if ttft is None:
                        ttft = time.perf_counter() - started
                else:
                    events.append(ev)
                yield ev
            done = True
            self._observe(m, events, started, ttft)
        finally:
            if not done:
                m.health.release()
            await gen.aclose()

    async def _resume(self, plan: Plan, request: ChatRequest, index: int, failed, error: Unavailable,
                      text: list[str]) -> AsyncIterator[Event]:
        """Continues a streamed answer whose candidate stopped mid-stream: the next candidate
        that can resume (today: local models) generates from the prompt plus the text already
        sent, with the tokens left of max_tokens; the client sees one continuous stream.
        Completion tokens count both parts."""
        sent = "".join(text)
        emitted = len(text)  # one delta per token from every backend we have
        params = request.params
        left = None if params.max_tokens is None else params.max_tokens - emitted
        plan.tried.append(f"{failed.spec.name}: {error.reason} after {emitted} tokens"[:300])
        if left is not None and left <= 0:
            yield Finished(0, "length", emitted)
            return
        resumed = msgspec.structs.replace(request, params=msgspec.structs.replace(params, max_tokens=left), memo={},
                                          resume=sent)
        while True:
            index, m = self._next(plan, index)
            if m is None:
                yield Failed(error)
                return
            index += 1
            if not m.backend.can_resume:
                continue
            gen = m.backend.generate(resumed)
            got_any = False
            try:
                async for ev in gen:
                    t = type(ev)
                    if t is Failed:
                        if got_any or not isinstance(ev.error, Unavailable):
                            yield ev
                            return
                        if isinstance(ev.error, AtCapacity):
                            m.health.release()
                        else:
                            m.health.failure(ev.error.reason, time.monotonic(), ev.error.code)
                        plan.tried.append(f"{m.spec.name}: {ev.error.reason}"[:300])
                        break
                    got_any = True
                    plan.served_by = m
                    if t is Finished:
                        ev = msgspec.structs.replace(ev, completion_tokens=ev.completion_tokens + emitted)
                    yield ev
                else:
                    logger.info("stream resumed", extra={"fields": {"from": failed.spec.name, "on": m.spec.name,
                                                                    "tokens_before": emitted}})
                    return
            finally:
                await gen.aclose()

    async def embed(self, plan: Plan, request):
        for _, m in self._attempts(plan):
            h: Health = m.health
            started = time.perf_counter()
            try:
                result = await m.backend.embed(request)
            except Unavailable as exc:
                self._failed(plan, m, exc)
                continue
            except BaseException:
                h.release()
                raise
            elapsed = time.perf_counter() - started
            h.success(prompt_tokens=result.prompt_tokens, completion_tokens=0, ttft_s=elapsed, total_s=elapsed)
            plan.served_by = m
            return m, result
        raise AssertionError("unreachable: _attempts raises NoProvider when no candidate is left")

    @staticmethod
    def _failed(plan: Plan, m: LoadedModel, error: Unavailable) -> None:
        """A candidate could not serve: its breaker counts it, the plan and the log say why.
        A full queue is load, not a fault: the breaker and the log leave it out (under
        overload there is one per refused request; the access line says it)."""
        plan.failure_codes.append(error.code)
        if isinstance(error, AtCapacity):
            m.health.release()
            plan.at_capacity.append(error)
            plan.tried.append(f"{m.spec.name}: at capacity")
            return
        m.health.failure(error.reason, time.monotonic(), error.code)
        plan.tried.append(f"{m.spec.name}: {error.reason}"[:300])
        logger.info("fallback", extra={"fields": {"model": m.spec.name, "reason": error.reason[:200]}})


async def _replay(events: list[Event]) -> AsyncIterator[Event]:
    for e in events:
        yield e


def _within(predicted_s: float | None, bound_ms: float) -> bool:
    """A candidate with no prediction is assumed to meet the bound (so it gets measured)."""
    return predicted_s is None or predicted_s * 1000 <= bound_ms


def _dedup(models: list) -> list:
    seen, out = set(), []
    for m in models:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _takes_task(m, task: str) -> bool:
    classes = m.spec.options.get("task_classes")
    return classes is None or task in classes

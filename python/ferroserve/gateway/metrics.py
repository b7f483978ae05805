"""Request metrics in memory, rendered in the Prometheus text format on `GET /metrics`.

Updating is a few dict operations per request (no locks: everything runs on the event loop);
the engines' own gauges (queue depth, running batch, KV-cache use) are read at scrape time.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str, out: list[str]) -> None:
        cumulative = 0
        sep = "," if labels else ""
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {self.count}")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.cached_tokens: dict[str, int] = defaultdict(int)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] += 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = Histogram(LATENCY_BUCKETS_S)
        h.observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int, cached: int) -> None:
        self.prompt_tokens[model] += prompt
        self.completion_tokens[model] += completion
        self.cached_tokens[model] += cached

    def observe_ttft(self, model: str, seconds: float) -> None:
        h = self.ttft.get(model)
        if h is None:
            h = self.ttft[model] = Histogram(TTFT_BUCKETS_S)
        h.observe(seconds)

    def render(self, *, rate_limit_rejections: dict[str, int], usage_queue_depth: int, engines: list[tuple[str, dict]],
               routing: list[tuple] = (), cache=None, process: dict[str, int] | None = None,
               interactive_in_flight: int = 0, admissions_ahead: dict[str, int] | None = None,
               admissions_leased: int | None = None) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            # The classic text format (0.0.4) names counters with their _total suffix here.
            if kind == "counter":
                name += "_total"
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        family("ferroserve_requests", "counter", "HTTP requests by route and status.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'ferroserve_requests_total{{route="{_label(route)}",status="{status}"}} {n}')
        family("ferroserve_request_duration_seconds", "histogram", "Time from request to last byte, by route.")
        for route, h in sorted(self.latency.items()):
            h.render("ferroserve_request_duration_seconds", f'route="{_label(route)}"', out)
        family("ferroserve_time_to_first_token_seconds", "histogram", "Streaming chat/completions: time to the first token.")
        for model, h in sorted(self.ttft.items()):
            h.render("ferroserve_time_to_first_token_seconds", f'model="{_label(model)}"', out)
        for name, help_, values in (
            ("ferroserve_prompt_tokens", "Prompt (input) tokens served, by model.", self.prompt_tokens),
            ("ferroserve_completion_tokens", "Completion (output) tokens generated, by model.", self.completion_tokens),
            ("ferroserve_cached_prompt_tokens", "Prompt tokens served from the prefix cache, by model.", self.cached_tokens),
        ):
            family(name, "counter", help_)
            for model, n in sorted(values.items()):
                out.append(f'{name}_total{{model="{_label(model)}"}} {n}')
        family("ferroserve_rate_limit_rejections", "counter", "Requests rejected with 429, by the limit that was hit.")
        for kind, n in sorted(rate_limit_rejections.items()):
            out.append(f'ferroserve_rate_limit_rejections_total{{limit="{kind}"}} {n}')
        if admissions_ahead is not None:
            family("ferroserve_admissions_ahead", "counter",
                   "With Redis: requests whose admission was read after their work ran, by Redis's verdict.")
            for verdict, n in sorted(admissions_ahead.items()):
                out.append(f'ferroserve_admissions_ahead_total{{verdict="{verdict}"}} {n}')
        if admissions_leased is not None:
            family("ferroserve_admissions_leased", "counter",
                   "With Redis: requests counted against this replica's leases of their limits, without a round trip.")
            out.append(f"ferroserve_admissions_leased_total {admissions_leased}")
        family("ferroserve_usage_queue_depth", "gauge", "Usage records waiting for their commit (the SQLite writer, or PostgreSQL's usage writer).")
        out.append(f"ferroserve_usage_queue_depth {usage_queue_depth}")
        gauges = (
            ("ferroserve_queue_depth", "gauge", "Sequences waiting to be scheduled.", "waiting_sequences"),
            ("ferroserve_running_batch_size", "gauge", "Sequences in the running batch.", "running_sequences"),
            ("ferroserve_waiting_sequences", "gauge", "Sequences waiting (same as queue depth).", "waiting_sequences"),
            ("ferroserve_running_sequences", "gauge", "Sequences running (same as batch size).", "running_sequences"),
            ("ferroserve_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.", "kv_usage"),
            ("ferroserve_kv_cache_blocks_free", "gauge", "Free KV-cache blocks.", "kv_blocks_free"),
            ("ferroserve_kv_cache_blocks_used", "gauge", "KV-cache blocks held by sequences.", "kv_blocks_used"),
            ("ferroserve_kv_cache_blocks_total", "gauge", "KV-cache blocks.", "kv_blocks_total"),
            ("ferroserve_generated_tokens", "counter", "Tokens generated by the engine.", "generated_tokens"),
            ("ferroserve_preemptions", "counter", "Sequences preempted for lack of KV-cache blocks.", "preemptions"),
            ("ferroserve_admission_in_flight", "gauge",
             "Interactive work admitted and not finished: chat sequences, embedding requests.", "admission_in_flight"),
            ("ferroserve_admission_reserved", "gauge",
             "Places in a chat model's queue held by requests whose body is being read (counted as waiting).",
             "admission_reserved"),
            ("ferroserve_admission_waiting", "gauge",
             "What admission control compares with its limit: chat sequences waiting for the running batch, "
             "embedding requests in the engine.", "admission_waiting"),
            ("ferroserve_admission_queue_limit", "gauge", "The admission limit (--max-queue, --max-embedding-queue).",
             "admission_queue_limit"),
            ("ferroserve_capacity_rejections", "counter",
             "Requests a model refused because its queue was full (503 capacity_unavailable unless another "
             "candidate served them).", "capacity_rejections"),
        )
        for name, kind, help_, stat in gauges:
            family(name, kind, help_)
            suffix = "_total" if kind == "counter" else ""
            for model, stats in engines:
                value = stats.get(stat)
                if value is None and stat == "kv_blocks_used" and "kv_blocks_total" in stats:
                    value = stats["kv_blocks_total"] - stats["kv_blocks_free"]
                if value is not None:
                    out.append(f'{name}{suffix}{{model="{_label(model)}"}} {value}')
        family("ferroserve_interactive_in_flight", "gauge",
               "Interactive work in flight: an inference request counts at the HTTP layer from arrival to its last "
               "byte, and again in the engine running it. Batch work waits while this is above zero.")
        out.append(f"ferroserve_interactive_in_flight {interactive_in_flight}")
        # Embedding engines: the batcher's queue and passes by priority (batch jobs run at batch).
        for name, kind, help_, stat in (
            ("ferroserve_embed_waiting_inputs", "gauge", "Embedding inputs queued in the engine, by priority.", "waiting_inputs"),
            ("ferroserve_embed_passes", "counter", "Embedding forward passes, by priority.", "passes"),
            ("ferroserve_embed_inputs", "counter", "Inputs embedded, by priority.", "embedded_inputs"),
        ):
            family(name, kind, help_)
            suffix = "_total" if kind == "counter" else ""
            for model, stats in engines:
                for priority in ("interactive", "batch"):
                    if f"{stat}_{priority}" in stats:
                        out.append(f'{name}{suffix}{{model="{_label(model)}",priority="{priority}"}} {stats[f"{stat}_{priority}"]}')
        # The router: per model (candidate) its backend, health, breaker and measured speed.
        family("ferroserve_backend_up", "gauge", "1 if the model's backend is healthy, 0.5 degraded, 0 down.")
        for model, backend, health, _ in routing:
            value = {"healthy": 1, "degraded": 0.5}.get(health, 0)
            out.append(f'ferroserve_backend_up{{model="{_label(model)}",backend="{_label(backend)}",health="{health}"}} {value}')
        family("ferroserve_backend_breaker_open", "gauge", "1 while the model's circuit breaker is open or half-open.")
        for model, backend, _, h in routing:
            out.append(f'ferroserve_backend_breaker_open{{model="{_label(model)}",backend="{_label(backend)}"}} {int(h.state != "closed")}')
        family("ferroserve_backend_failures", "counter", "Requests a model's backend could not serve (then a fallback was tried).")
        for model, backend, _, h in routing:
            out.append(f'ferroserve_backend_failures_total{{model="{_label(model)}",backend="{_label(backend)}"}} {h.failures}')
        family("ferroserve_backend_latency_seconds", "gauge", "EWMA of a model's request latency as the router measured it.")
        for model, backend, _, h in routing:
            if h.latency_s is not None:
                out.append(f'ferroserve_backend_latency_seconds{{model="{_label(model)}",backend="{_label(backend)}"}} {h.latency_s}')
        # The serving process itself: what a leak (a task or connection per request that is
        # never let go) would grow.
        for name, help_, key in (("ferroserve_asyncio_tasks", "asyncio tasks on the server's event loop.", "asyncio_tasks"),
                                 ("process_open_fds", "Open file descriptors of the serving process.", "open_fds")):
            if process is not None and key in process:
                family(name, "gauge", help_)
                out.append(f"{name} {process[key]}")
        if cache is not None:
            family("ferroserve_embed_cache_hits", "counter", "Embedding requests answered from the cache.")
            out.append(f"ferroserve_embed_cache_hits_total {cache.hits}")
            family("ferroserve_embed_cache_misses", "counter", "Embedding requests the cache could not answer.")
            out.append(f"ferroserve_embed_cache_misses_total {cache.misses}")
            family("ferroserve_embed_cache_bytes", "gauge", "Bytes held by the embedding cache.")
            out.append(f"ferroserve_embed_cache_bytes {cache.size}")
        return ("\n".join(out) + "\n").encode()

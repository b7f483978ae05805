"""`GET /v1/status`: per-model availability in the IPOP spec's `PublicStatus` shape, plus each
model's backend, router health and breaker; `/health` and `/v1/ready`'s engine check."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

import msgspec

from ferroserve.errors import ApiError
from ferroserve.gateway.router import health_of
from ferroserve.registry import Registry

_encode = msgspec.json.Encoder().encode


def check_engines(registry: Registry) -> None:
    """503 `engine_unavailable` naming every model whose engine in this process stopped (its
    thread died): the process cannot serve them until it restarts, so liveness and readiness
    probes must fail. Remote backends never fail it."""
    down = [(name, why) for name, m in registry.models.items() if (why := m.backend.fault()) is not None]
    if down:
        names = ", ".join(f"`{name}` ({why})" for name, why in down)
        raise ApiError(503, f"The engine of {names} stopped; the server must be restarted to serve "
                       f"{'it' if len(down) == 1 else 'them'}.", type="server_error", code="engine_unavailable")


def status(registry: Registry, ready: bool, query: str = "", cache=None) -> bytes:
    """`?ready=true` lists only the models that can serve now (as in the spec)."""
    only_ready = parse_qs(query or "").get("ready", ["false"])[-1].lower() in ("1", "true")
    models = []
    for name, m in registry.models.items():
        health = health_of(m)
        available = ready and health != "down"
        fault = m.backend.fault()
        models.append({
            "id": name,
            "display_name": name,
            "available": available,
            "status": "available" if available else "unavailable",
            "supports_chat": "chat" in m.capabilities,
            "supports_embeddings": "embeddings" in m.capabilities,
            "supports_tools": False,
            "supports_vision": False,
            "supports_json_schema": False,
            "supports_reasoning": False,
            "latency_class": "local" if m.info.kind == "local" else "remote",
            "backend": m.info.backend,
            "backend_kind": m.info.kind,
            "health": health,
            "router": m.health.as_json(),
            "load": msgspec.structs.asdict(m.backend.stats()),
            **({"error": fault} if fault is not None else {}),
        })
    n_up = sum(m["available"] for m in models)
    overall = "available" if models and n_up == len(models) else ("degraded" if n_up else "not_enabled")
    if only_ready:
        models = [m for m in models if m["available"]]
    out = {"object": "ipop.status", "status": overall, "generated_at_unix": int(time.time()), "models": models}
    if cache is not None:
        out["embed_cache"] = cache.stats()
    return _encode(out)

"""Refusals decided before a request's body is read (issue 16 part 4: a refusal is fast).

Reading a body is an await: granian hands the bytes over through the event loop, so a request
that reads its body waits for a second turn of the loop, behind everything the loop has queued
meanwhile (the answers of finished requests, the engines' events). Under overload that wait is
most of a refusal's time. When the one model that serves a route is a local model whose queue
is full, every interactive request of that route would be refused whatever its body says, so
the refusal is decided from the route alone, in the handler's first turn, and the body is never
read.

What the early refusal does not know, the body would have said: a request naming a model that
does not exist gets this 503 instead of its 404, and a chat request asking for batch priority
(`service_tier: "flex"`, which the queue bound does not apply to) is refused with the rest
while the interactive queue is full (as OpenAI's flex tier answers "resource unavailable" when
it has no capacity). With two or more models of the route's kind, or any remote one, the body
decides as before."""

from __future__ import annotations

from ferroserve.backends.local import LocalChatModel, LocalEmbeddingModel
from ferroserve.errors import ApiError
from ferroserve.gateway.router import Plan, over_capacity

# Route -> the capability its request needs (routes whose interactive requests the local
# models' queue bound applies to).
CHAT, EMBEDDINGS = "chat", "embeddings"
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": "completions", "/v1/embeddings": EMBEDDINGS}


def refusal_before_body(registry, capability: str) -> ApiError | None:
    """The 503 `capacity_unavailable` (with `retry-after`, counted in the model's
    `capacity_rejections`) every request needing `capability` would get now, or None when the
    body may decide otherwise."""
    only = None
    for m in registry.models.values():
        if capability in m.capabilities:
            if only is not None:
                return None  # the body names which one
            only = m
    if only is None or not isinstance(only.backend, (LocalChatModel, LocalEmbeddingModel)):
        return None
    refused = only.backend.at_capacity()
    if refused is None:
        return None
    plan = Plan(only.spec.name, [only])
    plan.at_capacity.append(refused)
    return over_capacity(plan)

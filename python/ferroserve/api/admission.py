"""Refusals decided before a request's body is read, and places held while it is read
(issue 16 part 4: a refusal is fast).

Reading a body is an await: granian hands the bytes over through the event loop, so a request
that reads its body waits for a second turn of the loop, behind everything the loop has queued
meanwhile (the answers of finished requests, the engines' events). Under overload that wait is
most of a refusal's time. When the one model that serves a route is a local model whose queue
is full, every interactive request of that route would be refused whatever its body says, so
the refusal is decided from the route alone, in the handler's first turn, and the body is never
read.

A request that finds room when it arrives takes a `Place` in that model's queue (a local chat
model counts it as waiting until the request is submitted or ends), so the requests arriving
while its body is read see the queue as it will be: the ones beyond its bound are refused at
arrival too, instead of each reading its body, parsing and tokenizing it and then finding the
queue full (the "late path": its refusal took the body's turn of the loop, tens of ms at p99
under overload). The place is given back once the body is read, and the decision is checked
again at once, before anything costly (decoding, tokenizing, grammar, usage): with places, that
check refuses only when the model filled up some other way (the engine's own waiting sequences
when the KV budget runs short; a place held longer than `PLACE_HOLD_S`, which lapses so that a
client that sends its headers and never its body cannot keep a place; routes that take no
place). The generation's own check (backends/local.py) stays, for the routes and fallbacks
that take no place; nothing awaits between this re-check and the (first) submit, so no other
request can take the place in between.

What the early refusal does not know, the body would have said: a request naming a model that
does not exist gets this 503 instead of its 404, and a chat request asking for batch priority
(`service_tier: "flex"`, which the queue bound does not apply to) is refused with the rest
while the interactive queue is full (as OpenAI's flex tier answers "resource unavailable" when
it has no capacity). With two or more models of the route's kind, or any remote one, the body
decides as before."""

from __future__ import annotations

import asyncio
import time

from ferroserve.backends.local import LocalChatModel, LocalEmbeddingModel
from ferroserve.errors import ApiError
from ferroserve.gateway.router import Plan, over_capacity

# Route -> the capability its request needs (routes whose interactive requests the local
# models' queue bound applies to).
CHAT, EMBEDDINGS = "chat", "embeddings"
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": "completions", "/v1/embeddings": EMBEDDINGS}

# How long a place is held for a request whose body has not been read yet. A body follows its
# headers within milliseconds (tens under overload); a client slower than this loses its place
# and its request is decided when its body is read.
PLACE_HOLD_S = 1.0


class Place:
    """What a request that found room at arrival holds until its body is read: the one model
    that serves its route, and (on a local chat model) a counted place in its queue."""

    __slots__ = ("model", "backend", "timer", "body_read_at", "refused")

    def __init__(self, model) -> None:
        self.model = model
        self.body_read_at: float | None = None
        self.refused = False  # refused by the check after the body (the late path)
        backend = model.backend
        if isinstance(backend, LocalChatModel):
            backend.reserved += 1
            self.backend: LocalChatModel | None = backend
            self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(PLACE_HOLD_S, self.release)
        else:
            self.backend = self.timer = None

    def release(self) -> None:
        """Gives the place back (once; later calls do nothing)."""
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.reserved -= 1
            assert self.timer is not None
            self.timer.cancel()

    def after_body(self) -> ApiError | None:
        """Right after the body is read: the place is given back and the request decided as at
        arrival (the 503 it gets now, counted, or None: it goes on to parsing and its engine)."""
        self.body_read_at = time.perf_counter()
        self.release()
        refused = self.model.backend.at_capacity()
        if refused is None:
            return None
        self.refused = True
        return _refusal(self.model, refused)


def on_arrival(registry, capability: str) -> tuple[ApiError | None, Place | None]:
    """Decides what can be decided before the body: `(the 503 capacity_unavailable every
    request needing `capability` would get now (with `retry-after`, counted in the model's
    `capacity_rejections`), None)`, or `(None, the place this request holds)`, or `(None,
    None)` when the body decides (several models, or a remote one)."""
    only = None
    for m in registry.models.values():
        if capability in m.capabilities:
            if only is not None:
                return None, None  # the body names which one
            only = m
    if only is None or not isinstance(only.backend, (LocalChatModel, LocalEmbeddingModel)):
        return None, None
    refused = only.backend.at_capacity()
    if refused is not None:
        return _refusal(only, refused), None
    return None, Place(only)


def _refusal(model, refused) -> ApiError:
    plan = Plan(model.spec.name, [model])
    plan.at_capacity.append(refused)
    return over_capacity(plan)

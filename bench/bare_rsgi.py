"""The HTTP floor: a bare granian RSGI app answering GET /v1/models with a msgspec-encoded
body of the same shape as ferroserve's, and nothing else (no routing table, no middleware,
no engine). `bench/http_floor.py` serves it with the same granian settings as `ferroserve
serve` and compares requests/s under wrk.
"""

from __future__ import annotations

import time

import msgspec


class Model(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: str
    data: list[Model]


_BODY = msgspec.json.encode(ModelList("list", [
    Model("smollm2", "model", int(time.time()), "ferroserve"),
    Model("all-MiniLM-L6-v2", "model", int(time.time()), "ferroserve"),
]))
_HEADERS = [("content-type", "application/json")]


class App:
    async def __rsgi__(self, scope, proto) -> None:
        if scope.path == "/v1/models" and scope.method == "GET":
            proto.response_bytes(200, _HEADERS, msgspec.json.encode(msgspec.json.decode(_BODY, type=ModelList)))
        else:
            proto.response_bytes(404, _HEADERS, b'{"error":"not found"}')


def create_app() -> App:
    return App()

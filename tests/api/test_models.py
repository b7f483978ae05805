"""/v1/models, /v1/models/{id}, /health, /v1/ready."""

from __future__ import annotations

import httpx

CANONICAL = "sentence-transformers/all-MiniLM-L6-v2"


def test_list_models(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert CANONICAL in ids
    m = next(m for m in models.data if m.id == CANONICAL)
    assert m.object == "model" and m.owned_by and m.created > 0
    extra = m.model_dump()
    assert extra["context_length"] == 256
    assert "embeddings" in extra["capabilities"]
    assert extra["dimensions"] == 384


def test_retrieve_by_alias_and_id(client):
    for name in ("all-minilm", CANONICAL):
        m = client.models.retrieve(name)
        assert m.id == CANONICAL


def test_retrieve_unknown_404(server):
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_health_and_ready(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/v1/ready")
    assert r.status_code == 200 and CANONICAL in r.json()["models"]


def test_client_request_id_is_honoured(server):
    r = httpx.get(server.url + "/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"

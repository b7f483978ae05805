"""`GET /v1/openapi.json`: every route of the app's table is documented, every documented
operation answers on a real server, and the document is one schemathesis loads."""

from __future__ import annotations

import httpx
import pytest

from ferroserve.api import openapi
from ferroserve.app import App
from ferroserve.config import Settings


@pytest.fixture(scope="module")
def document(server) -> dict:
    r = httpx.get(server.url + "/v1/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def test_is_openapi_3_1_and_public(document):
    assert document["openapi"] == "3.1.0"
    assert document["paths"]["/v1/openapi.json"]["get"]["security"] == []
    assert document["paths"]["/v1/status"]["get"]["security"] == []
    assert document["paths"]["/v1/models"]["get"]["security"] != []


def test_every_route_of_the_table_is_documented(document):
    app = App(Settings())
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    by_label = {(op.method, op.label) for op in openapi.OPERATIONS}
    for method, label, _ in app.route_list():
        assert (method, label) in by_label, (method, label)
    assert {(op.method, op.path) for op in openapi.OPERATIONS} == documented


def test_an_undocumented_route_is_refused():
    app = App(Settings())
    with pytest.raises(openapi.UndocumentedRoute, match="/v1/new-thing"):
        openapi.check([*app.route_list(), ("GET", "/v1/new-thing", "user")])
    with pytest.raises(openapi.UndocumentedRoute, match="/v1/usage/export"):
        openapi.check([r for r in app.route_list() if r[1] != "/v1/usage/export"])


def test_every_error_response_has_the_error_shape(document):
    codes = {"400", "401", "402", "403", "404", "405", "413", "429", "503"}
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status in codes:
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}
                    assert answer["headers"]["x-request-id"]["required"] is True
            if op["security"]:  # an authenticated route documents its auth failures and limits
                assert {"401", "403", "429"} <= set(op["responses"]), (method, path)
            if "requestBody" in op:
                assert "413" in op["responses"], (method, path)
    body = document["components"]["schemas"]["ErrorBody"]
    assert body["properties"]["code"] == {"type": "string"}
    assert {"message", "type", "param", "code"} <= set(body["required"])


@pytest.mark.parametrize("op", openapi.OPERATIONS, ids=lambda op: f"{op.method} {op.path}")
def test_every_documented_operation_answers(server, document, op):
    """A request to each documented operation reaches its handler: never "Unknown route",
    never 405, and its status is one the document lists."""
    path = op.path.replace("{id}", "does-not-exist")
    kwargs: dict = {}
    if op.request is not None:
        kwargs["json"] = {}
    r = httpx.request(op.method, server.url + path, timeout=60, **kwargs)
    documented = document["paths"][op.path][op.method.lower()]["responses"]
    assert str(r.status_code) in documented, (r.status_code, r.text[:300])
    assert r.status_code != 405
    if r.status_code == 404:
        assert not r.json()["error"]["message"].startswith("Unknown route"), r.text


def test_loads_in_schemathesis(document):
    import schemathesis

    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(openapi.OPERATIONS)

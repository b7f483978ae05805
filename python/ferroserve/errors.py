"""The one error type of the HTTP layer and its OpenAI-shaped body.

Engine exceptions (``ferroserve._core``) map to HTTP statuses in one table here;
handlers raise :class:`ApiError` and the app turns it into a response.
"""

from __future__ import annotations

import re

import msgspec

from ferroserve import _core


class ErrorBody(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or []

    def body(self) -> bytes:
        return _encode(ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code)))


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


# Engine error kind -> (status, type, code). The single mapping from engine to HTTP.
_ENGINE_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "InvalidRequest": (400, "invalid_request_error", None),
    "ContextLengthExceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "Overloaded": (503, "server_error", "capacity_unavailable"),
    "EngineDead": (503, "server_error", "engine_unavailable"),
    "ModelLoadError": (503, "server_error", "model_unavailable"),
    "DeviceError": (503, "server_error", "device_unavailable"),
    "FerroserveError": (500, "server_error", None),
}


def from_engine(kind: str, message: str, param: str | None = None) -> ApiError:
    status, type_, code = _ENGINE_ERRORS.get(kind, (500, "server_error", None))
    return ApiError(status, message, type=type_, param=param if status == 400 else None, code=code)


def from_engine_exception(exc: _core.FerroserveError, param: str | None = None) -> ApiError:
    """The engine names the parameter at fault (``exc.param``); the caller's ``param`` is the
    fallback for errors where only it knows (``messages`` or ``prompt`` for a long context)."""
    return from_engine(type(exc).__name__, str(exc), getattr(exc, "param", None) or param)


_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def from_validation(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """A msgspec decode/validation failure as a 400 naming the offending field."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        m = _AT_PATH.search(text)
        param = m.group(1) if m else None
        missing = _MISSING.search(text)
        if missing and not param:
            param = missing.group(1)
        if param:
            param = re.sub(r"\[\d+\]", "", param).split(".")[0] or None
        return invalid(text, param=param)
    return invalid(f"We could not parse the JSON body of your request. ({text})", code="invalid_json")

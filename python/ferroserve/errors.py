"""The one error type of the HTTP layer and its OpenAI-shaped body.

Engine exceptions (``ferroserve._core``) map to HTTP statuses in one table here;
handlers raise :class:`ApiError` and the app turns it into a response.
"""

from __future__ import annotations

import re

import msgspec

from ferroserve import _core


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """OpenAI's error object. `param` is always sent (null when no parameter is at fault);
    `code` is always a string (OpenAI's where it has one), so clients and specs that require
    it (OpenFPGA's) can switch on it."""

    message: str
    type: str
    param: str | None
    code: str
    retry_after: int | None = None  # 429 only: the seconds in `retry-after` (the NUREV spec's field)


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


_encode = msgspec.json.Encoder().encode

# The code an error gets when the raiser names none: OpenAI's word for the status.
DEFAULT_CODES = {
    400: "invalid_value", 401: "invalid_api_key", 402: "insufficient_quota", 403: "permission_denied",
    404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit_exceeded",
    500: "server_error", 503: "service_unavailable",
}


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
        self.code = code if code is not None else DEFAULT_CODES.get(status, type)
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
    "InvalidRequest": (400, "invalid_request_error", "invalid_value"),
    "ContextLengthExceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "Overloaded": (503, "server_error", "capacity_unavailable"),
    "EngineDead": (503, "server_error", "engine_unavailable"),
    "ModelLoadError": (503, "server_error", "model_unavailable"),
    "DeviceError": (503, "server_error", "device_unavailable"),
    "FerroserveError": (500, "server_error", "server_error"),
}


def engine_code(kind: str) -> str:
    """The error code of an engine error kind (as `from_engine` gives it)."""
    return _ENGINE_ERRORS.get(kind, (500, "server_error", "server_error"))[2] or "server_error"


def from_engine(kind: str, message: str, param: str | None = None) -> ApiError:
    status, type_, code = _ENGINE_ERRORS.get(kind, (500, "server_error", "server_error"))
    return ApiError(status, message, type=type_, param=param if status == 400 else None, code=code)


def from_engine_exception(exc: _core.FerroserveError, param: str | None = None) -> ApiError:
    """The engine names the parameter at fault (``exc.param``); the caller's ``param`` is the
    fallback for errors where only it knows (``messages`` or ``prompt`` for a long context)."""
    return from_engine(type(exc).__name__, str(exc), getattr(exc, "param", None) or param)


_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def from_validation(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """A msgspec decode/validation failure as a 400 naming the offending field."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        m = _AT_PATH.search(text)
        param = m.group(1) if m else None
        missing = _MISSING.search(text)
        if missing and not param:
            param = missing.group(1)
        unknown = _UNKNOWN.search(text)
        if param:
            param = re.sub(r"\[\d+\]", "", param).split(".")[0] or None
        # OpenAI's codes for the three ways a body can be wrong.
        if missing:
            code = "missing_required_parameter"
        elif unknown:
            code, param = "unknown_parameter", param or unknown.group(1)
        elif text.startswith("Expected `"):
            code = "invalid_type"
        else:
            code = "invalid_value"
        return invalid(text, param=param, code=code)
    return invalid(f"We could not parse the JSON body of your request. ({text})", code="invalid_json")

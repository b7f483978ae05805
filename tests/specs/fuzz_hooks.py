"""Loaded into the schemathesis CLI process (`SCHEMATHESIS_HOOKS`, see fuzz.py).

CPython 3.11 can raise `SystemError: AST constructor recursion depth mismatch` from
`ast.parse` when it runs deep in the stack (gh-106905, fixed in 3.12); hypothesis parses a
lambda's source there only to *describe* a strategy in its repr, and the error then aborts the
whole schemathesis run as a runtime error that has nothing to do with the server. A strategy's
description is cosmetic, so a failed parse falls back to a plain one; every request, check and
failure stays as it was."""

from hypothesis.internal import lambda_sources

_describe = lambda_sources.lambda_description


def _lambda_description(f):
    try:
        return _describe(f)
    except SystemError:
        return "lambda: <source not parsed>"


lambda_sources.lambda_description = _lambda_description

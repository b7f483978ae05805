"""Per-key rate limits: requests per minute and tokens per minute.

The window is a fixed one per key: it opens at the key's first request and lasts
`window_s` (60 s; tests shorten it). Within it at most `rpm` requests are admitted and
tokens are admitted while `used + prompt_tokens <= tpm`; completion tokens are added when
the request ends, so a long completion can overdraw the window and the next requests wait
for the reset. Fixed windows were chosen over a continuously refilling bucket because the
three numbers clients see (limit, remaining, reset) then mean exactly what they say, and
"remaining" only ever goes down within a window. The cost: a burst of up to 2·rpm across a
window boundary.

Everything runs on the event loop thread and no check awaits between reading and bumping a
counter, so counts are exact under any number of concurrent clients — of this process. These
windows are per process: replicas behind a load balancer each grant the full limit unless
they count in Redis (`--redis-url`, shared_limits.py).
"""

from __future__ import annotations

import math

import msgspec

from ferroserve.errors import ApiError, ErrorBody, ErrorEnvelope

_encode = msgspec.json.Encoder().encode


class Window:
    # pending: the request is not counted yet (Redis windows count it at admission, shared_limits.py).
    __slots__ = ("started", "requests", "tokens", "pending")

    def __init__(self, started: float) -> None:
        self.started = started
        self.requests = 0
        self.tokens = 0
        self.pending = False


class RateLimiter:
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._windows: dict[str, Window] = {}
        self.rejected = {"requests": 0, "tokens": 0}

    def window(self, key_id: str, now: float) -> Window:
        w = self._windows.get(key_id)
        if w is None or now >= w.started + self.window_s:
            w = self._windows[key_id] = Window(now)
        return w

    def admit_request(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> Window:
        """Counts one request, or raises 429 if the window has no request (or token) left."""
        w = self.window(key_id, now)
        if rpm is not None and w.requests >= rpm:
            self._reject("requests", w, now, headers=self.headers(w, rpm, tpm, now))
        if tpm is not None and w.tokens >= tpm:
            self._reject("tokens", w, now, headers=self.headers(w, rpm, tpm, now))
        w.requests += 1
        return w

    def count_request(self, w: Window, rpm: int | None, tpm: int | None, now: float) -> None:
        """Counts a request whose window is pending; in process, `admit_request` counted it."""

    def admit_tokens(self, w: Window, tpm: int | None, prompt_tokens: int, now: float) -> None:
        if tpm is not None and w.tokens + prompt_tokens > tpm:
            self._reject("tokens", w, now, prompt_tokens=prompt_tokens, tpm=tpm)
        w.tokens += prompt_tokens

    def add_tokens(self, w: Window, tokens: int) -> None:
        """A request's actual usage, reconciled after it ran (may be negative)."""
        w.tokens += tokens

    def _reject(self, kind: str, w: Window, now: float, *, prompt_tokens: int = 0, tpm: int = 0,
                headers: list[tuple[str, str]] | None = None) -> None:
        """Raises 429. `headers`: the rate-limit headers, when no ticket exists yet to add them."""
        self.rejected[kind] += 1
        retry_after = max(1, math.ceil(w.started + self.window_s - now))
        if prompt_tokens > tpm:
            message = f"This request's {prompt_tokens} prompt tokens exceed the key's limit of {tpm} tokens per minute."
        else:
            message = f"Rate limit reached for {kind} per minute. Please try again in {retry_after} s."
        raise RateLimited(message, retry_after, headers or [])

    def headers(self, w: Window, rpm: int | None, tpm: int | None, now: float, requests_used: int | None = None) -> list[tuple[str, str]]:
        """OpenAI's six headers and the X-RateLimit-* trio (which describes requests).

        Remaining requests are as of this request's admission (`requests_used`), so concurrent
        responses count down 4, 3, 2, 1, 0 whatever order they finish in; remaining tokens are
        as of now, after this request's own completion tokens were added."""
        reset_s = max(0.0, w.started + self.window_s - now)
        reset = f"{reset_s:.3f}s"
        out = []
        if rpm is not None:
            remaining = str(max(0, rpm - (w.requests if requests_used is None else requests_used)))
            out += [
                ("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", remaining),
                ("x-ratelimit-reset-requests", reset),
                ("X-RateLimit-Limit", str(rpm)),
                ("X-RateLimit-Remaining", remaining),
                ("X-RateLimit-Reset", str(math.ceil(reset_s))),
            ]
        if tpm is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, tpm - w.tokens))),
                ("x-ratelimit-reset-tokens", reset),
            ]
            if rpm is None:  # the X-RateLimit trio follows tokens when only tokens are limited
                out += [
                    ("X-RateLimit-Limit", str(tpm)),
                    ("X-RateLimit-Remaining", str(max(0, tpm - w.tokens))),
                    ("X-RateLimit-Reset", str(math.ceil(reset_s))),
                ]
        return out


def budget_exceeded(workspace: str | None, budget: float, spent: float, estimate: float) -> ApiError:
    return ApiError(
        402,
        f"The workspace `{workspace}` has reached its monthly budget of ${budget:.2f} "
        f"(spent ${spent:.4f}; this request needs up to ${estimate:.4f}).",
        type="insufficient_quota", code="budget_exceeded",
    )


class RateLimited(ApiError):
    def __init__(self, message: str, retry_after: int, headers: list[tuple[str, str]]) -> None:
        super().__init__(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                         headers=[("retry-after", str(retry_after)), *headers])
        self.retry_after = retry_after

    def body(self) -> bytes:
        # error.retry_after as in the nurev spec; the rest is the usual OpenAI body.
        return _encode(ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code, self.retry_after)))

"""Rate-limit windows and budget reservations counted in Redis, for replicas (`--redis-url`).

The same fixed windows as `limits.RateLimiter` (opened by a key's first request, `window_s`
long), but the counts live in one Redis hash per key, and each check-and-count is one Lua
script: Redis runs a script alone, so N replicas together admit exactly `rpm` requests a
window, and each request costs one round trip. The hash expires with its window.

Budgets: one counter per workspace and month holds what was spent plus what is reserved by
requests in flight. `SharedBudgets.admit` adds a request's worst-case cost (prompt tokens and
max_tokens at the model's prices) only if the total stays within the budget, and counts the
prompt's tokens in the key's window, in the same script (one round trip; neither or both);
`settle` then replaces the reservation with the actual cost. Since the actual cost never exceeds the
reservation, concurrent requests on any replicas never spend more than the budget. The
counter starts from the database's spend for the month (the first replica to need it sets it).

These calls are synchronous on the event loop: the api handlers admit synchronously, and a
loopback round trip (tens of µs) costs no more than a hop to a thread and back. The socket
timeout bounds what a stalled Redis can cost; then the request gets a 503 instead of an
unchecked pass.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis

from ferroserve.errors import ApiError
from ferroserve.gateway.limits import RateLimiter, Window, budget_exceeded
from ferroserve.gateway.store import month_start
from ferroserve.log import logger

if TYPE_CHECKING:
    from ferroserve.gateway.gate import Ticket

_TIMEOUT_S = 1.0
# A month's budget counter outlives its month by a few days (late settlements land in it).
_BUDGET_TTL_S = 40 * 86400

# KEYS[1] the key's window; ARGV: now, window length in ms, rpm, tpm (-1: no limit).
# Returns {admitted 0/1, started, requests, tokens, what ran out}.
_ADMIT_REQUEST = """
local k = KEYS[1]
if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'started', ARGV[1], 'requests', 0, 'tokens', 0)
    redis.call('PEXPIRE', k, ARGV[2])
end
local v = redis.call('HMGET', k, 'started', 'requests', 'tokens')
local requests, tokens = tonumber(v[2]), tonumber(v[3])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
if rpm >= 0 and requests >= rpm then return {0, v[1], requests, tokens, 'requests'} end
if tpm >= 0 and tokens >= tpm then return {0, v[1], requests, tokens, 'tokens'} end
return {1, v[1], redis.call('HINCRBY', k, 'requests', 1), tokens, ''}
"""
_ADD_TOKENS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[1])
"""
# The budget and the prompt's tokens, checked and counted together (a request refused for
# tokens reserves no budget). KEYS[1] the workspace's month, KEYS[2] the key's window;
# ARGV: budget (-1: none), estimate, the spend to start the month's counter from, its ttl,
# tpm (-1: none), prompt tokens. Returns {what refused ('' when admitted), spent and reserved
# before this request (a string: Lua numbers would come back truncated to integers), tokens
# used in the window}. A window that ended meanwhile counts no tokens.
_ADMIT = """
local budget, estimate, tpm, prompt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5]), tonumber(ARGV[6])
local spent, used = 0, 0
if budget >= 0 then
    if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4]) end
    spent = tonumber(redis.call('GET', KEYS[1]))
    if spent >= budget or spent + estimate > budget then return {'budget', tostring(spent), 0} end
end
local counted = tpm >= 0 and redis.call('EXISTS', KEYS[2]) == 1
if counted then
    used = tonumber(redis.call('HGET', KEYS[2], 'tokens'))
    if used + prompt > tpm then return {'tokens', tostring(spent), used} end
end
if budget >= 0 then redis.call('INCRBYFLOAT', KEYS[1], ARGV[2]) end
if counted then used = redis.call('HINCRBY', KEYS[2], 'tokens', prompt) end
return {'', tostring(spent), used}
"""


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)


def unavailable(exc: Exception) -> ApiError:
    logger.error("redis unavailable", extra={"fields": {"error": type(exc).__name__}})
    return ApiError(503, "The rate limiter is unavailable; please retry shortly.", type="server_error",
                    code="limits_unavailable", headers=[("retry-after", "1")])


class SharedWindow(Window):
    """A snapshot of the shared window, as of this replica's last round trip for it."""

    __slots__ = ("key",)

    def __init__(self, key: str, started: float, requests: int, tokens: int) -> None:
        super().__init__(started)
        self.key, self.requests, self.tokens = key, requests, tokens


class SharedRateLimiter(RateLimiter):
    def __init__(self, window_s: float, client: redis.Redis) -> None:
        super().__init__(window_s)
        self.client = client
        self._admit_request = client.register_script(_ADMIT_REQUEST)
        self._add_tokens = client.register_script(_ADD_TOKENS)

    def admit_request(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> Window:
        key = f"ferroserve:rate:{key_id}"
        try:
            ok, started, requests, tokens, what = self._admit_request(
                keys=[key], args=[repr(now), int(self.window_s * 1000), -1 if rpm is None else rpm, -1 if tpm is None else tpm])
        except redis.RedisError as exc:
            raise unavailable(exc) from None
        w = SharedWindow(key, float(started), int(requests), int(tokens))
        if not ok:
            self._reject(what.decode(), w, now, headers=self.headers(w, rpm, tpm, now))
        return w

    def add_tokens(self, w: Window, tokens: int) -> None:
        assert isinstance(w, SharedWindow)
        if not tokens:
            return
        try:
            w.tokens = int(self._add_tokens(keys=[w.key], args=[tokens]))
        except redis.RedisError as exc:
            # The request is answered already: its tokens go uncounted, and the log says so.
            logger.error("redis unavailable: tokens not counted", extra={"fields": {"error": type(exc).__name__}})


class SharedBudgets:
    def __init__(self, client: redis.Redis, limiter: SharedRateLimiter) -> None:
        self.client = client
        self.limiter = limiter
        self._admit = client.register_script(_ADMIT)

    @staticmethod
    def counter(workspace: str, now: float) -> str:
        return f"ferroserve:spend:{workspace}:{int(month_start(now))}"

    def admit(self, ticket: Ticket, budget: float | None, estimate_usd: float, spent_in_database: float,
              tpm: int | None, prompt_tokens: int) -> tuple[str, float] | None:
        """Reserves `estimate_usd` of the workspace's budget and counts the prompt's tokens in
        the key's window, or neither: raises 402 (budget) or 429 (tokens). Returns the
        reservation (counter, USD) for `settle`, None without a budget."""
        now = time.time()
        counter = self.counter(ticket.workspace or "", now)
        window = ticket.window
        window_key = window.key if isinstance(window, SharedWindow) else ""
        try:
            refused, spent, used = self._admit(
                keys=[counter, window_key],
                args=[-1 if budget is None else repr(budget), repr(estimate_usd), repr(spent_in_database), _BUDGET_TTL_S,
                      -1 if tpm is None else tpm, prompt_tokens])
        except redis.RedisError as exc:
            raise unavailable(exc) from None
        if refused == b"budget":
            raise budget_exceeded(ticket.workspace, budget, float(spent), estimate_usd)
        if tpm is not None and window is not None:
            window.tokens = int(used)
        if refused == b"tokens":
            self.limiter._reject("tokens", window, now, prompt_tokens=prompt_tokens, tpm=tpm)
        return (counter, estimate_usd) if budget is not None else None

    def settle(self, counter: str, reserved_usd: float, cost_usd: float) -> None:
        """Replaces the reservation with the actual cost."""
        delta = cost_usd - reserved_usd
        if not delta:
            return
        try:
            self.client.incrbyfloat(counter, delta)
        except redis.RedisError as exc:
            logger.error("redis unavailable: budget not settled", extra={"fields": {"error": type(exc).__name__}})

"""Rate-limit windows and budget reservations counted in Redis, for replicas (`--redis-url`).

The same fixed windows as `limits.RateLimiter` (opened by a key's first request, `window_s`
long), but the counts live in one Redis hash per key, and each check-and-count is one Lua
script: Redis runs a script alone, so N replicas together admit exactly `rpm` requests a
window. The hash expires with its window.

Budgets: one counter per workspace and month holds what was spent plus what is reserved by
requests in flight. `SharedBudgets.admit` adds a request's worst-case cost (prompt tokens and
max_tokens at the model's prices) only if the total stays within the budget, and counts the
prompt's tokens in the key's window, in the same script (neither or both); `settle` then
replaces the reservation with the actual cost. Since the actual cost never exceeds the
reservation, concurrent requests on any replicas never spend more than the budget. The
counter starts from the database's spend for the month (the first replica to need it sets it).

One round trip per request. Every metered route admits its request (`Ticket.admit`) before
its answer, once it knows the model and the prompt, so the request is counted there, in the
same script as its tokens and budget (`_ADMIT`): `admit_request` at the ticket's opening only
hands out a pending window. A request that ends before it admits (a 400, an unknown model, a
capacity refusal) is counted when it is settled (`count_request`, the one round trip it makes),
right after its answer (app.py). Refusing a client over its RPM before its body is read is kept
for the common case of a flood: a window this replica saw full is refused locally until it ends
(requests only go up within a window, so that answer cannot be wrong), without a round trip.

Leases (`--limit-leases`, on by default): a replica whose traffic would otherwise pay a round
trip per request takes, in the same admission script, a lease of 1/LEASE_PARTS of each large
limit (the key's window requests and tokens, the workspace's budget) while LEASE_ROOM leases'
worth is left after it, and admits the next requests from what it holds, with no round trip
(`SharedBudgets.admit_leased`). Leased room is counted in Redis as used, so the replicas
together never grant more than the limit; near it (less than a tenth left) no lease is given and
every request is counted alone again. What it costs: room a replica leased and did not use by its
window's end is granted to nobody (≤ 1 % of the limit per replica and window), and a budget lease
is handed back after LEASE_IDLE_S idle and at shutdown (a replica killed -9 strands one lease for
the month). Limits too small for a lease to cover two requests are never leased, so they stay
exact. A settled request's unreserved cost goes back into the lease (the counter holds both).

The calls are written and read on the event loop through one `Pipe` on the held connection, so
a command's answer can be read later than it was sent: an embedding's admission is written
before the model runs and read after (`send_admit`, `finish_admit`), so the round trip hides
behind the work; a budget settlement is written and its answer read with the next call's. The
writes and reads are synchronous (a loopback answer that is not there yet is tens to hundreds
of µs, less than a hop to a thread and back); the socket timeout bounds what a stalled Redis
can cost, and then the request gets a 503 instead of an unchecked pass.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import redis

from ferroserve.errors import ApiError
from ferroserve.gateway.limits import RateLimiter, Window, budget_exceeded
from ferroserve.gateway.store import month_start
from ferroserve.log import logger

if TYPE_CHECKING:
    from ferroserve.gateway.gate import Ticket

_TIMEOUT_S = 1.0
# Leases (see the module's doc): a lease is 1/LEASE_PARTS of a limit, taken only while
# LEASE_ROOM leases' worth is left after it; a budget lease unused for LEASE_IDLE_S goes back.
LEASE_PARTS = 100
LEASE_ROOM = 10
LEASE_IDLE_S = 2.0
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
# One request's admission: its count in the key's window, its budget reservation and its
# prompt's tokens, checked and counted together (a request refused for its budget or tokens is
# still counted, as a request refused at any later step is). KEYS[1] the workspace's month,
# KEYS[2] the key's window ('' without limits); ARGV: budget (-1: none), estimate, the spend to
# start the month's counter from, its ttl, tpm (-1: none), prompt tokens, count the request
# (1/0), now, window length in ms, rpm (-1: none). Returns {what refused ('' when admitted),
# spent and reserved before this request (a string: Lua numbers would come back truncated to
# integers), the window's start (a string), requests, tokens}. A window that ended meanwhile
# (only possible when the request was counted before) counts no tokens. ARGV[11..14]: a lease
# of requests, tokens and USD to take as well (0: none) and the room, in leases, that must be left
# after it; the granted sizes are returned after the counts (`Leases`).
_ADMIT = """
local budget, estimate, tpm, prompt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5]), tonumber(ARGV[6])
local count, rpm = tonumber(ARGV[7]), tonumber(ARGV[10])
local w = KEYS[2]
local spent, started, requests, used = 0, '', 0, 0
if count == 1 then
    if redis.call('EXISTS', w) == 0 then
        redis.call('HSET', w, 'started', ARGV[8], 'requests', 0, 'tokens', 0)
        redis.call('PEXPIRE', w, ARGV[9])
    end
    local v = redis.call('HMGET', w, 'started', 'requests', 'tokens')
    started, requests, used = v[1], tonumber(v[2]), tonumber(v[3])
    if rpm >= 0 and requests >= rpm then return {'requests', '0', started, requests, used} end
    if tpm >= 0 and used >= tpm then return {'window_tokens', '0', started, requests, used} end
    requests = redis.call('HINCRBY', w, 'requests', 1)
end
if budget >= 0 then
    if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4]) end
    spent = tonumber(redis.call('GET', KEYS[1]))
    if spent >= budget or spent + estimate > budget then return {'budget', tostring(spent), started, requests, used} end
end
local counted = tpm >= 0 and w ~= '' and redis.call('EXISTS', w) == 1
if counted then
    used = tonumber(redis.call('HGET', w, 'tokens'))
    if used + prompt > tpm then return {'tokens', tostring(spent), started, requests, used} end
end
if budget >= 0 then redis.call('INCRBYFLOAT', KEYS[1], ARGV[2]) end
if counted then used = redis.call('HINCRBY', w, 'tokens', prompt) end
local lr, lt, lu, room = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local gr, gt, gu = 0, 0, 0
if lr > 0 and count == 1 and (rpm < 0 or rpm - requests >= room * lr) then
    requests, gr = redis.call('HINCRBY', w, 'requests', lr), lr
end
if lt > 0 and counted and tpm - used >= room * lt then used, gt = redis.call('HINCRBY', w, 'tokens', lt), lt end
if lu > 0 and budget >= 0 and budget - spent - estimate >= room * lu then
    redis.call('INCRBYFLOAT', KEYS[1], ARGV[13])
    gu = lu
end
return {'', tostring(spent), started, requests, used, gr, gt, tostring(gu)}
"""


def connect(url: str) -> redis.Redis:
    """One connection held for the server's life (only the event loop calls Redis, one call at a
    time): no pool checkout and liveness poll per call. redis-py parses replies with hiredis
    when it is installed (the `replicas` extra), else in Python. A connection that breaks is
    reopened by the client's retry on the next call.

    redis-py opens a held connection at once: if Redis is down right then (a worker restarted
    during an outage), the client is a pooled one instead, which connects on first use, so the
    server still starts and answers 503 until Redis is back."""
    kwargs = {"socket_timeout": _TIMEOUT_S, "socket_connect_timeout": _TIMEOUT_S}
    try:
        return redis.Redis.from_url(url, single_connection_client=True, **kwargs)
    except redis.ConnectionError as exc:
        logger.warning("redis unavailable at start: connecting on first use", extra={"fields": {"error": type(exc).__name__}})
        return redis.Redis.from_url(url, **kwargs)


def _pack(parts: tuple) -> bytes:
    """One command in RESP (an array of bulk strings), as redis-py's encoder would write it for
    these argument types (str as UTF-8, int, bytes)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if type(part) is bytes else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Pipe:
    """The commands in flight on the client's held connection, answered in the order they were
    sent (Redis answers one connection's commands in order). A command can be written now and
    its answer read later (`send`, then `result`), so a request's admission travels while its
    work runs (`SharedBudgets.send_admit`); every other call goes through here too, reading the
    answers still due before its own. Only the event loop calls it, so no lock."""

    __slots__ = ("client", "_due")

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._due: deque[_Sent] = deque()

    def send(self, packed: bytes, what: str | None = None) -> _Sent | None:
        """Writes one command; None when it cannot be pipelined here (a pooled client: Redis was
        down at start; or the write failed), and the caller goes through redis-py instead.
        `what`: nobody waits for this answer; a failure is logged as "redis unavailable: <what>"."""
        conn = self.client.connection
        if conn is None:
            return None
        try:
            conn.send_packed_command([packed], check_health=False)
        except (redis.ConnectionError, redis.TimeoutError):
            self._broken(conn, None)
            return None
        sent = _Sent()
        sent.what = what
        self._due.append(sent)
        return sent

    def result(self, sent: _Sent):
        """`sent`'s answer, reading the earlier ones first; raises its error (a Redis error reply
        such as NOSCRIPT, or the connection's failure)."""
        conn = self.client.connection
        while not sent.done:
            head = self._due.popleft()
            try:
                head.value = conn.read_response()
            except redis.ResponseError as exc:  # that command's own error reply: the connection is fine
                head.error = exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                head.error = exc
                self._broken(conn, exc)  # the answers still due are lost with it
            head.done = True
            if head.error is not None and head.what is not None:
                logger.error(f"redis unavailable: {head.what}", extra={"fields": {"error": type(head.error).__name__}})
        if sent.error is not None:
            raise sent.error
        return sent.value

    def drain(self) -> None:
        """Reads every answer still due, before redis-py itself uses the connection."""
        if self._due:
            last = self._due[-1]
            try:
                self.result(last)
            except redis.RedisError:
                pass  # its owner sees it when it asks

    def _broken(self, conn, exc: Exception | None) -> None:
        failure = exc or redis.ConnectionError("connection lost")
        while self._due:
            s = self._due.popleft()
            s.error, s.done = failure, True
            if s.what is not None:
                logger.error(f"redis unavailable: {s.what}", extra={"fields": {"error": type(failure).__name__}})
        conn.disconnect()  # (redis-py did already, unless the error came from elsewhere)


class _Sent:
    __slots__ = ("value", "error", "done", "what")

    def __init__(self) -> None:
        self.value = self.error = self.what = None
        self.done = False


class Script:
    """A Lua script called by EVALSHA on the client's held connection, packed here and written
    through the connection's `Pipe`: redis-py's command path (Script → evalsha → execute_command
    → retry wrapper → its encoder) costs more CPU than the round trip on a slow core
    (bench/NOTES.md, issue 18 round three: 137 → 63 µs a call on Zen 1). Whatever that path
    handles is handed to it: a pooled client (Redis was down at start), a script Redis does not
    know (NOSCRIPT: it restarted or was flushed; redis-py loads it), a broken or timed-out
    connection (redis-py reconnects and retries, as it would have anyway)."""

    __slots__ = ("pipe", "script", "_sha")

    def __init__(self, pipe: Pipe, source: str) -> None:
        self.pipe = pipe
        self.script = pipe.client.register_script(source)
        self._sha = self.script.sha.encode()

    def send(self, keys: list, args: list) -> tuple[_Sent | None, list, list]:
        """Writes the call; `result` reads its answer."""
        return self.pipe.send(_pack((b"EVALSHA", self._sha, len(keys), *keys, *args))), keys, args

    def result(self, call: tuple[_Sent | None, list, list]):
        sent, keys, args = call
        if sent is not None:
            try:
                return self.pipe.result(sent)
            except (redis.exceptions.NoScriptError, redis.ConnectionError, redis.TimeoutError):
                pass
        self.pipe.drain()
        return self.script(keys=keys, args=args)

    def __call__(self, keys: list, args: list):
        return self.result(self.send(keys, args))


def unavailable(exc: Exception) -> ApiError:
    logger.error("redis unavailable", extra={"fields": {"error": type(exc).__name__}})
    return ApiError(503, "The rate limiter is unavailable; please retry shortly.", type="server_error",
                    code="limits_unavailable", headers=[("retry-after", "1")])


class SharedWindow(Window):
    """A snapshot of the shared window, as of this replica's last round trip for it; `pending`
    until the request is counted in it (at its admission, or when it is settled)."""

    __slots__ = ("key",)

    def __init__(self, key: str, started: float, requests: int, tokens: int, pending: bool = False) -> None:
        super().__init__(started)
        self.key, self.requests, self.tokens, self.pending = key, requests, tokens, pending


class WindowLease:
    """Requests and tokens of one window of a key, taken from Redis by this replica and not yet
    used; `requests`/`tokens` are the window's counts in Redis as of the lease's last refill
    (they include every replica's leases)."""

    __slots__ = ("started", "left_requests", "left_tokens", "requests", "tokens")

    def __init__(self, started: float) -> None:
        self.started = started
        self.left_requests = self.left_tokens = self.requests = self.tokens = 0

    def view(self, w: SharedWindow) -> None:
        """`w` as this replica can tell: Redis's counts less what this replica holds unused."""
        w.started, w.requests, w.tokens = self.started, self.requests - self.left_requests, self.tokens - self.left_tokens


class SharedRateLimiter(RateLimiter):
    def __init__(self, window_s: float, client: redis.Redis, leases: bool = True) -> None:
        super().__init__(window_s)
        self.client = client
        # Window leases held, by Redis key (`SharedBudgets.admit_leased`); None: leases off.
        self.leases: dict[str, WindowLease] | None = {} if leases else None
        self.leased = 0  # requests admitted from a lease, without a round trip
        self.pipe = Pipe(client)
        self._admit_request = Script(self.pipe, _ADMIT_REQUEST)
        self._add_tokens = Script(self.pipe, _ADD_TOKENS)
        # Windows this replica saw with no request left, by Redis key: refused here until they end.
        self._full: dict[str, SharedWindow] = {}
        # The last snapshot of each key's window this replica saw (the headers of a request
        # answered before it is counted; whether an admission may travel behind the work).
        self._last: dict[str, SharedWindow] = {}

    def admit_request(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> Window:
        """A pending window (no round trip): the request is counted at its admission or when
        settled. Raises 429 at once if this replica saw the window full of requests. Until it
        is counted, the window reads as this replica last saw it plus this request (what the
        headers of an answer given before the count say)."""
        key = f"ferroserve:rate:{key_id}"
        full = self._full.get(key)
        if full is not None and self.lease(key, now, requests=1) is None:
            if now >= full.started + self.window_s:
                del self._full[key]
            elif rpm is not None and full.requests >= rpm:
                self._reject("requests", full, now, headers=self.headers(full, rpm, tpm, now))
        last = self.current(key, now)
        if last is None:
            return SharedWindow(key, now, 1, 0, pending=True)
        return SharedWindow(key, last.started, last.requests + 1, last.tokens, pending=True)

    def lease(self, key: str, now: float, requests: int = 0, tokens: int = 0) -> WindowLease | None:
        """This replica's lease of the window at `key`, if it holds that many requests and tokens
        unused and its window has not ended."""
        leases = self.leases
        if not leases:
            return None
        lease = leases.get(key)
        if lease is None:
            return None
        if now >= lease.started + self.window_s:  # the window ended: its lease went with it
            del leases[key]
            return None
        return lease if lease.left_requests >= requests and lease.left_tokens >= tokens else None

    def refill(self, key: str, started: float, requests: int, tokens: int, granted_requests: int,
               granted_tokens: int) -> WindowLease | None:
        """Adds what an admission script granted to the lease of the window at `key` (a new
        window's lease replaces an ended one's); the lease, or None if there is none."""
        leases = self.leases
        if leases is None:
            return None
        lease = leases.get(key)
        if granted_requests or granted_tokens:
            if lease is None or lease.started != started:
                lease = leases[key] = WindowLease(started)
                if len(leases) > 10_000:  # keys that stopped sending: drop the oldest (unused room expires with its window)
                    del leases[next(iter(leases))]
            lease.left_requests += granted_requests
            lease.left_tokens += granted_tokens
        if lease is None or lease.started != started:
            return None
        lease.requests, lease.tokens = requests, tokens
        return lease

    def current(self, key: str, now: float) -> SharedWindow | None:
        """The last snapshot of the window at `key`, if that window has not ended."""
        last = self._last.get(key)
        if last is not None and now >= last.started + self.window_s:
            del self._last[key]
            return None
        return last

    def seen(self, w: SharedWindow, rpm: int | None) -> None:
        """A fresh snapshot of `w` from Redis: remembered, and as full if it has no request left."""
        last = self._last.get(w.key)
        if last is None or (w.started, w.requests) >= (last.started, last.requests):  # answers may land out of order
            snap = self._last[w.key] = SharedWindow(w.key, w.started, w.requests, w.tokens)
            if len(self._last) > 10_000:  # keys that stopped sending: drop the oldest
                del self._last[next(iter(self._last))]
            if rpm is not None and snap.requests >= rpm:
                self._full[w.key] = snap
                if len(self._full) > 10_000:
                    del self._full[next(iter(self._full))]

    def count_request(self, w: Window, rpm: int | None, tpm: int | None, now: float) -> None:
        """Counts a request that ended before its admission (its answer is an error, already
        sent: app.py counts it after the answer, so an error waits for no round trip): not
        counted if the window was full, as a refused request is not."""
        assert isinstance(w, SharedWindow)
        w.pending = False
        lease = self.lease(w.key, now, requests=1)
        if lease is not None:
            lease.left_requests -= 1
            lease.view(w)
            self.leased += 1
            return
        try:
            ok, started, requests, tokens, _ = self._admit_request(
                keys=[w.key], args=[repr(now), int(self.window_s * 1000), -1 if rpm is None else rpm, -1 if tpm is None else tpm])
        except redis.RedisError as exc:
            logger.error("redis unavailable: request not counted", extra={"fields": {"error": type(exc).__name__}})
            return
        w.started, w.requests, w.tokens = float(started), int(requests), int(tokens)
        self.seen(w, rpm)

    def add_tokens(self, w: Window, tokens: int) -> None:
        assert isinstance(w, SharedWindow)
        if not tokens:
            return
        lease = self.lease(w.key, time.time(), tokens=max(tokens, 0))
        if lease is not None:  # from the lease (or back into it, when the prompt was over-counted)
            lease.left_tokens -= tokens
            w.tokens = lease.tokens - lease.left_tokens
            return
        try:
            w.tokens = int(self._add_tokens(keys=[w.key], args=[tokens]))
        except redis.RedisError as exc:
            # The request is answered already: its tokens go uncounted, and the log says so.
            logger.error("redis unavailable: tokens not counted", extra={"fields": {"error": type(exc).__name__}})


class Admission:
    """An admission script in flight (`SharedBudgets.send_admit`), read by `finish_admit`."""

    __slots__ = ("call", "ticket", "counter", "budget", "estimate_usd", "rpm", "tpm", "prompt_tokens", "count", "now",
                 "ahead")

    def __init__(self, call, ticket: Ticket, counter: str, budget: float | None, estimate_usd: float, rpm: int | None,
                 tpm: int | None, prompt_tokens: int, count: bool, now: float, ahead: str | None) -> None:
        self.call, self.ticket, self.counter, self.budget, self.estimate_usd = call, ticket, counter, budget, estimate_usd
        self.rpm, self.tpm, self.prompt_tokens, self.count, self.now, self.ahead = rpm, tpm, prompt_tokens, count, now, ahead


class BudgetLease:
    """USD of a workspace's month, reserved in Redis by this replica and not yet spent."""

    __slots__ = ("usd", "used_at")

    def __init__(self, now: float) -> None:
        self.usd = 0.0
        self.used_at = now


class SharedBudgets:
    def __init__(self, client: redis.Redis, limiter: SharedRateLimiter) -> None:
        self.client = client
        self.limiter = limiter
        self.pipe = limiter.pipe
        self._admit = Script(self.pipe, _ADMIT)
        # The spend (with reservations) of each month's counter as last seen, by counter.
        self._spent: dict[str, float] = {}
        # Admissions in flight behind their work, by window key and by budget counter.
        self._ahead: dict[str, int] = {}
        self.ahead_verdicts = {"admitted": 0, "refused": 0}
        # Budget leases held, by counter (None: leases off), and whether a sweep is scheduled.
        self.leases: dict[str, BudgetLease] | None = {} if limiter.leases is not None else None
        self._sweeping = False

    @staticmethod
    def counter(workspace: str, now: float) -> str:
        return f"ferroserve:spend:{workspace}:{int(month_start(now))}"

    def admit(self, ticket: Ticket, budget: float | None, estimate_usd: float, spent_in_database: float,
              rpm: int | None, tpm: int | None, prompt_tokens: int) -> tuple[str, float] | None:
        """Counts the request in the key's window if it is pending, reserves `estimate_usd` of
        the workspace's budget and counts the prompt's tokens, in one round trip: raises 429
        (requests or tokens) or 402 (budget), reserving nothing then. Returns the reservation
        (counter, USD) for `settle`, None without a budget."""
        return self.finish_admit(self.send_admit(ticket, budget, estimate_usd, spent_in_database, rpm, tpm, prompt_tokens))

    def admit_leased(self, ticket: Ticket, budget: float | None, estimate_usd: float, rpm: int | None,
                     tpm: int | None, prompt_tokens: int) -> tuple[str, float] | None | bool:
        """`admit` from this replica's leases, without a round trip: False unless they hold
        everything the request needs (its count, its prompt's tokens, its worst-case cost);
        else the reservation, as `admit` returns it."""
        if self.leases is None:
            return False
        now = time.time()
        limiter = self.limiter
        window = ticket.window
        shared = window if isinstance(window, SharedWindow) else None
        count = shared is not None and shared.pending
        tokens = prompt_tokens if tpm is not None and shared is not None else 0
        lease = None
        if count or tokens:
            lease = limiter.lease(shared.key, now, requests=int(count), tokens=tokens)
            if lease is None:
                return False
        held = None
        counter = ""
        if budget is not None:
            counter = self.counter(ticket.workspace or "", now)
            held = self.leases.get(counter)
            if held is None or held.usd < estimate_usd:
                return False
            held.usd -= estimate_usd
            held.used_at = now
        if lease is not None:
            lease.left_requests -= int(count)
            lease.left_tokens -= tokens
            shared.pending = False
            lease.view(shared)
        limiter.leased += 1
        return (counter, estimate_usd) if budget is not None else None

    def _lease_sizes(self, count: bool, budget: float | None, estimate_usd: float, rpm: int | None, tpm: int | None,
                     prompt_tokens: int) -> tuple[int, int, float]:
        """The leases an admission script should take along (requests, tokens, USD): each 1/LEASE_PARTS
        of its limit, all or none, and none unless each would last for at least two requests like
        this one (small limits are counted one request at a time, exactly)."""
        if self.leases is None:
            return 0, 0, 0.0
        requests = (rpm // LEASE_PARTS if rpm is not None else LEASE_PARTS) if count else 0
        tokens = tpm // LEASE_PARTS if tpm is not None else 0
        usd = budget / LEASE_PARTS if budget is not None else 0.0
        if (count and requests < 2) or (tpm is not None and tokens < 2 * max(prompt_tokens, 1)) or (
                budget is not None and usd < 2 * estimate_usd):
            return 0, 0, 0.0
        return requests, tokens, usd

    def send_admit(self, ticket: Ticket, budget: float | None, estimate_usd: float, spent_in_database: float,
                   rpm: int | None, tpm: int | None, prompt_tokens: int, ahead: bool = False) -> Admission:
        """`admit`'s script, written and not waited for: `finish_admit` reads the verdict.
        `ahead`: the caller means to run the request's work before reading it; that is allowed
        (`Admission.ahead` set) only while what this replica last saw of the key's window and
        the workspace's budget leaves room for this request and the others already running
        ahead, so work done for a request Redis then refuses is bounded by what the key could
        have spent anyway; otherwise the caller must read the verdict first."""
        now = time.time()
        counter = self.counter(ticket.workspace or "", now)
        window = ticket.window
        shared = window if isinstance(window, SharedWindow) else None
        count = shared is not None and shared.pending
        slot = None
        if ahead:
            slot = self._room(shared, counter, budget, estimate_usd, rpm, tpm, prompt_tokens, now)
            if slot is not None:
                for k in slot:
                    self._ahead[k] = self._ahead.get(k, 0) + 1
        lease_requests, lease_tokens, lease_usd = self._lease_sizes(count, budget, estimate_usd, rpm,
                                                                    tpm if shared is not None else None, prompt_tokens)
        call = self._admit.send(
            keys=[counter, shared.key if shared is not None else ""],
            args=[-1 if budget is None else repr(budget), repr(estimate_usd), repr(spent_in_database), _BUDGET_TTL_S,
                  -1 if tpm is None else tpm, prompt_tokens, int(count), repr(now),
                  int(self.limiter.window_s * 1000), -1 if rpm is None else rpm,
                  lease_requests, lease_tokens, repr(lease_usd), LEASE_ROOM])
        return Admission(call, ticket, counter, budget, estimate_usd, rpm, tpm, prompt_tokens, count, now, slot)

    def _room(self, shared: SharedWindow | None, counter: str, budget: float | None, estimate_usd: float,
              rpm: int | None, tpm: int | None, prompt_tokens: int, now: float) -> tuple[str, ...] | None:
        """The keys of `_ahead` this request would hold if it may run ahead of its verdict, else None."""
        held: tuple[str, ...] = ()
        if shared is not None and (rpm is not None or tpm is not None):
            last = self.limiter.current(shared.key, now)
            if last is None:
                return None
            n = self._ahead.get(shared.key, 0) + 1
            if rpm is not None and last.requests + n > rpm:
                return None
            if tpm is not None and last.tokens + n * prompt_tokens > tpm:
                return None
            held = (shared.key,)
        if budget is not None:
            spent = self._spent.get(counter)
            n = self._ahead.get(counter, 0) + 1
            if spent is None or spent + n * estimate_usd > budget:
                return None
            held += (counter,)
        return held

    def finish_admit(self, a: Admission) -> tuple[str, float] | None:
        """Reads the verdict of `send_admit` and acts on it as `admit` says."""
        for k in a.ahead or ():
            left = self._ahead[k] - 1
            if left:
                self._ahead[k] = left
            else:
                del self._ahead[k]
        ticket, budget, rpm, tpm, now = a.ticket, a.budget, a.rpm, a.tpm, a.now
        try:
            refused, spent, started, requests, used, *granted = self._admit.result(a.call)
        except redis.RedisError as exc:
            raise unavailable(exc) from None
        granted_requests, granted_tokens, granted_usd = (int(granted[0]), int(granted[1]), float(granted[2])) if granted \
            else (0, 0, 0.0)
        if a.ahead is not None:
            self.ahead_verdicts["refused" if refused else "admitted"] += 1
        limiter = self.limiter
        window = ticket.window
        if budget is not None:
            self._spent[a.counter] = float(spent) + (a.estimate_usd + granted_usd if not refused else 0.0)
            if len(self._spent) > 10_000:
                del self._spent[next(iter(self._spent))]
            if granted_usd:
                self._hold(a.counter, granted_usd, now)
        lease = None
        if isinstance(window, SharedWindow) and (a.count or tpm is not None):
            lease = limiter.refill(window.key, float(started), int(requests), int(used), granted_requests, granted_tokens)
        if isinstance(window, SharedWindow) and a.count:
            window.pending = False
            window.started, window.requests, window.tokens = float(started), int(requests), int(used)
            limiter.seen(window, rpm)
            if refused in (b"requests", b"window_tokens"):  # (the ticket adds the rate-limit headers)
                limiter._reject("requests" if refused == b"requests" else "tokens", window, now)
            if lease is not None:  # the headers: what this replica holds unused is not used
                lease.view(window)
        elif tpm is not None and window is not None:
            window.tokens = int(used) - (lease.left_tokens if lease is not None else 0)
        if refused == b"budget":
            raise budget_exceeded(ticket.workspace, budget, float(spent), a.estimate_usd)
        if refused == b"tokens":
            limiter._reject("tokens", window, now, prompt_tokens=a.prompt_tokens, tpm=tpm)
        return (a.counter, a.estimate_usd) if budget is not None else None

    def settle(self, counter: str, reserved_usd: float, cost_usd: float) -> None:
        """Replaces the reservation with the actual cost. Written and not waited for: its
        answer is read (and a failure logged) with the next call's. While this replica holds a
        lease of the counter, the difference goes to (or comes from) the lease instead: Redis's
        counter holds both, so the sum it guards is the same, and no command is sent."""
        delta = cost_usd - reserved_usd
        if not delta:
            return
        held = self.leases.get(counter) if self.leases else None
        if held is not None and held.usd >= delta:
            held.usd -= delta
            return
        if self.pipe.send(_pack((b"INCRBYFLOAT", counter, repr(delta))), what="budget not settled") is not None:
            return
        try:
            self.pipe.drain()
            self.client.incrbyfloat(counter, delta)
        except redis.RedisError as exc:
            logger.error("redis unavailable: budget not settled", extra={"fields": {"error": type(exc).__name__}})

    def _hold(self, counter: str, usd: float, now: float) -> None:
        """Adds a granted budget lease, and makes sure an idle one will be handed back."""
        held = self.leases.get(counter)
        if held is None:
            held = self.leases[counter] = BudgetLease(now)
        held.usd += usd
        held.used_at = now
        if not self._sweeping:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called off the loop (a tool): handed back at `release`
                return
            self._sweeping = True
            loop.call_later(LEASE_IDLE_S, self._sweep)

    def _sweep(self) -> None:
        """Hands back the budget leases unused for LEASE_IDLE_S (they would keep other replicas
        from that part of the budget for the rest of the month); runs again while any is held."""
        self._sweeping = False
        now = time.time()
        for counter in [c for c, held in self.leases.items() if now - held.used_at >= LEASE_IDLE_S]:
            self._return(counter, self.leases.pop(counter).usd)
        if self.leases:
            self._sweeping = True
            asyncio.get_running_loop().call_later(LEASE_IDLE_S, self._sweep)

    def _return(self, counter: str, usd: float) -> None:
        if usd <= 0:
            return
        if self.pipe.send(_pack((b"INCRBYFLOAT", counter, repr(-usd))), what="budget lease not returned") is not None:
            return
        try:
            self.pipe.drain()
            self.client.incrbyfloat(counter, -usd)
        except redis.RedisError as exc:
            logger.error("redis unavailable: budget lease not returned", extra={"fields": {"error": type(exc).__name__}})

    def release(self) -> None:
        """Hands back every budget lease and waits for Redis's answers (the server is stopping).
        A window's lease is not handed back: it ends with its window, within a minute."""
        if not self.leases:
            return
        for counter, held in list(self.leases.items()):
            self._return(counter, held.usd)
        self.leases.clear()
        try:
            self.pipe.drain()
        except redis.RedisError:
            pass

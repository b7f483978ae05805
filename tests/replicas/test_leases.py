"""Limit leases (shared_limits.py) against a real Redis, below the HTTP layer: with leases off
every admission is one script; with them on, a replica admits from what it leased, settles
into the lease, and gives the budget lease back so that Redis's counter is the spend again.
(The two-replica behaviour over HTTP is in test_two_replicas.py.)"""

from __future__ import annotations

import time

import redis

from ferroserve.gateway import shared_limits
from ferroserve.gateway.gate import Ticket


def _evalsha_calls(admin: redis.Redis) -> int:
    return admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def test_leases_off_cost_a_script_a_request_and_on_a_few_with_the_budget_handed_back(redis_server):
    url = redis_server.new_url()
    admin = redis.Redis.from_url(url)
    client = shared_limits.connect(url)
    try:
        admin.script_load(shared_limits._ADMIT)  # (a first EVALSHA would fail with NOSCRIPT and count)
        scripts = {}
        for leases in (False, True):
            limiter = shared_limits.SharedRateLimiter(60.0, client, leases=leases)
            budgets = shared_limits.SharedBudgets(client, limiter)
            workspace = f"ws-{leases}"
            before = _evalsha_calls(admin)
            for i in range(40):
                now = time.time()
                window = limiter.admit_request(f"key-{leases}", 1000, 100_000, now)
                ticket = Ticket(None, f"r{i}", now, None, workspace, window, False)
                # Reserve $0.25 (the worst case); the request costs $0.20; 10 prompt tokens.
                got = budgets.admit_leased(ticket, 100.0, 0.25, 1000, 100_000, 10)
                if got is False:
                    got = budgets.admit(ticket, 100.0, 0.25, 0.0, 1000, 100_000, 10)
                counter, reserved = got
                assert reserved == 0.25 and not window.pending and window.requests >= i + 1
                budgets.settle(counter, reserved, 0.20)
            budgets.pipe.drain()
            scripts[leases] = _evalsha_calls(admin) - before
            spent = float(admin.get(budgets.counter(workspace, time.time())))
            rate = admin.hgetall(f"ferroserve:rate:key-{leases}")
            if leases:
                # Leases of 10 requests, 1,000 tokens and $1 (4 reservations, 5 with the change
                # settled back into it): the budget's lease runs out first.
                assert 40 // 6 <= scripts[leases] <= 40 // 4, scripts
                assert spent > 40 * 0.20 and int(rate[b"requests"]) > 40 and int(rate[b"tokens"]) > 400
                budgets.release()
                spent = float(admin.get(budgets.counter(workspace, time.time())))
            else:
                assert scripts[leases] == 40
                assert (int(rate[b"requests"]), int(rate[b"tokens"])) == (40, 400)
            assert abs(spent - 40 * 0.20) < 1e-9, spent
            assert limiter.leased == (40 - scripts[leases])
    finally:
        client.close()
        admin.close()

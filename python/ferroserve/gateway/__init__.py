"""The gateway: who is calling (keys, workspaces), how much they may (rate limits, budgets),
and what they used (metering, request history, metrics). See `gate.py`."""

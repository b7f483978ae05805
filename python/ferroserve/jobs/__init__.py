"""Durable background work: leases, the batch runner, result files, webhooks."""

"""Delivery: the transport, retry policy, batching, rate limits and workers."""

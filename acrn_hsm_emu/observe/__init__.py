"""Seeing inside the daemon: the live trace (trace.py), life-cycle events (events.py),
Prometheus metrics (metrics.py) and their human renderings (render.py).

Nothing here costs the request path anything while nobody listens: the trace
and the events are off until a control connection subscribes, and metrics are
read from the counters the daemon keeps anyway, at scrape time
(docs/observability.md).
"""

"""Calls from a fast route to backends, within the request's deadline (issue: fan-out).

    deadline   the request's deadline: the route's budget, shortened by X-Request-Deadline-Ms, forwarded
    client     the connection pool (aiohttp), and per upstream: replicas, hedging, the call itself
    estimate   an upstream's recent latencies: the percentile after which a call is hedged
    budget     how many hedges an upstream may have (a share of calls plus a floor)
    breaker    the circuit breaker per upstream
    scope      a request's calls, required or optional, none outliving it
    loader     lookups of one loop turn merged into multi-gets, each key once

The routes that use it are in services/fast/fanout_routes.py; the backends they call by default,
in services/upstream.
"""

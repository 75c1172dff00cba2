"""What both kinds of instance share, and what deploy/, drills/ and bench/ read of a running fleet.

    settings         deploy/fleet.toml, FLEET_* overrides, validation, the run dir's snapshot
    inventory        the [hosts] table: which host runs which part
    server           an instance's life: listen (TLS across hosts), serve, drain on SIGTERM
    web              the handlers' base: who is the edge, request ids, the contract's JSON errors, health
    addresses        a client's address as the fleet compares it (zone id dropped, IPv4-mapped as IPv4)
    logs             JSON log lines with the request id, failed-request lines rate-limited
    metrics          the instance's Prometheus metrics (/metrics); metrics_reader reads that text back
    watchdog         event-loop lag and the blocked-loop detector
    cpu_slice        a short CPU time slice for the fast path (sched_setattr)
    procfs           the fleet's one reader of /proc
"""

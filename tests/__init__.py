"""The fleet's tests (`make test`): two tiers, and what they share.

    unit/         in process, seconds: settings, rendering and `nginx -t`, tasks, admission, the pool,
                  handlers on an inline pool, the run dir's safety, the isolation verdict
    integration/  real fleets (nginx, supervisord, worker processes, Dask clusters) in temp run dirs on
                  free ports, one module per behaviour (contract, faults, lifecycle, hosts, ...)
    support/      what tests share: a private fleet, waiting on conditions, knowing a job runs, raw
                  HTTP, fake pools, test-only tasks that misbehave on purpose, simulated hosts
"""

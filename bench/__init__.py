"""`make bench`: the fleet against the simpler set-ups, what users would run instead and the machine's
floor, side by side (issues 5, 12 and 31).

    .venv/bin/python -m bench                    # every configuration, 3 repetitions
    .venv/bin/python -m bench --quick            # smoke run: 1 repetition, short phases
    .venv/bin/python -m bench --configs fleet,pool --repeat 5 --out /tmp/bench
    .venv/bin/python -m bench --configs pool,fleet --fleet-env FLEET_SLOW_NICE=19 --out /tmp/nice19

Modules, one role each:
    __main__     command line; runs every configuration, repetitions interleaved; writes the results
    subjects     the configurations under test (naive, pool, peers, each peer behind nginx, fleet,
                 floor, edge): start, processes, stop
    jobs         long jobs against issue 26's targets (`--configs jobs`): its own fleet and phases,
                 its figures and its section of results.md
    job_tasks    that fleet's extra tasks: a long job stamping its reports with the clock, a 100 kB result
    streams      many open event streams (SSE) read in processes of their own, and their events' latency
    peers/       the peers' servers (FastAPI, gunicorn sync / gthread + dirty arbiters, Tornado +
                 Dask), run from their own environment, bench/peers/.venv (see peers/__init__.py)
    floor        the floor: nginx -> a Tornado Hello, and the burners that stand in for a flood
    naive_server one Tornado process computing the heavy task in its handler
    pool_server  one Tornado process with a concurrent.futures process pool, no nginx
    edge         the bench's own nginx: answering /fast itself (the edge ceiling), or in front of the
                 floor's Hellos or of a peer
    procs        start, find and stop processes by pid; free ports; waiting for HTTP
    httpclient   a minimal keep-alive HTTP/1.1 client on asyncio streams
    load         load as remote clients: the open-loop probe (a real-time process of its own) and
                 the flood's clients (a low-priority process each, own address, backing off)
    phases       the measurement phases run against one configuration
    sched        whom the fast path waits behind under the flood (perf sched), for the fleets
    wrk          closed-loop saturation with wrk
    memory       RSS and PSS summed over a set of processes
    cpu          CPU used by programs outside the bench (a shared machine), and per process
    stats        percentiles and median/min/max over repetitions
    report       results.md, results.json and machine.md, rendered from the measurements
    machine      what a run ran on: cores, CPU, memory, OS, versions, and the commit measured
    charts       the PNG charts (matplotlib, Agg)
    levers       `python -m bench.levers`: A/B runs of one lever at a time (results/levers.md)
    levels       `python -m bench.levels`: fast p50/p99 at fixed rates up to saturation, idle and
                 under the flood, per configuration (results/levels.md, levels.png)
    request_cost `python -m bench.request_cost`: CPU per fast request, nginx and instances, against
                 bare Tornado Hellos, and py-spy's profile of what the fleet adds (results/request_cost.md)
    doc000       `python -m bench.doc000`: source document 000's experiments (results/doc000.md)
    fanout       `python -m bench.fanout`: the fan-out routes at fixed rates, hedging on and off, against
                 issue 28's targets (results/fanout.md, fanout.png)
    fanout_clients  `python bench/fanout_clients.py`: the outgoing HTTP clients compared (tornado's two,
                 httpx, aiohttp; results/fanout_clients.md), which chose aiohttp
"""

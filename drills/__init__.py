"""The drills: `make chaos` and `make soak` break a running fleet under a steady load and count
every request's outcome. They use the deployer (deploy/) to find and change the fleet; the
deployer never imports them.

    .venv/bin/python -m drills.chaos                       # every fault once, against .run/ (or $FLEET_RUN_DIR)
    .venv/bin/python -m drills.chaos --only kill-fast,reload
    .venv/bin/python -m drills.soak --deploy --minutes 10  # make soak: faults on a schedule, for minutes or hours

Modules, one role each:
    loadgen      the steady mixed load (kept-alive clients, fast and slow routes) and its Tally:
                 sent, failed, hit by the fault, lost, reload races
    faults       every fault the drills produce (kill -9s, drains, reloads, departed clients, bursts...),
                 the Fault type that says what each may reach, and waiting until the fleet is whole
    job_faults   the long jobs' faults: kill -9 of the instance and runner (jobs run on), of job processes, cancels
    chaos        `make chaos`: each fault once under its own load, the table, the exit status
    soak         `make soak`: the fault schedule, the sampling of every long-lived process, the verdict
    soak_jobs    the long jobs all along a soak (submitted, followed, cancelled, judged) and their own faults
    soak_watch   what the soak samples in /proc: the fleet's processes, their figures, leftovers
    soak_charts  the soak's charts and results page (matplotlib, Agg)
"""

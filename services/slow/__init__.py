"""The slow instances: heavy routes, admitted in the event loop and computed in worker processes.

A request's trip: app (parse, coalesce, admit) -> a pool's run -> a worker process -> back as JSON.
With `Prefer: respond-async` (or a long task): app -> a job committed in the store -> 202; the host's
job runner (services/runner) claims it and starts a job process (job_process) that runs it on a
worker of its own (or the Dask cluster), and /jobs/<id> answers for it from the store.

    app           the task routes and /healthz; answers every job outcome with one rule
    jobs          the contract: how a job ends (each error's status, code and metric), the Pool
                  protocol both backends keep, the kill budget for departed clients
    admission     running slots, the bounded waiting line, per-client shares (max-min fair)
    coalesce      identical requests in flight share one job
    backoff       Retry-After estimates from the tasks' recent job times
    pool          the local backend, parent side: W worker processes, one pipe each
    worker        a worker process's life: set-up, one job at a time, results encoded as JSON
    dask_pool     the Dask backend: the same contract on a distributed cluster
    dask_worker   what the cluster's scheduler and workers preload (jobs run in pool.py's workers)
    inline_pool   the contract run in-process, for handler tests
    cpu_priority  nice, SCHED_IDLE and the workers' idle cpu cgroup
    long_jobs     jobs answered 202: submitted, cancelled, waited for (wait=N); the Watcher of store changes
    job_runner    claims queued jobs and runs them (in a job process), their progress, end, lease and fencing
    job_process   one claimed job's own process: it outlives the slow instance and the runner
    job_routes    GET and DELETE /jobs/<id>, and its live events (SSE)
    job_store     long jobs' records and numbered events (SQLite in the run dir): the one source of truth
    job_store_redis  the same on Redis, for several hosts
    progress      what a task calls to report its progress from inside its worker
    registry      how a task is declared (@task), and its argument parsers' helpers
    tasks         the shipped tasks
"""

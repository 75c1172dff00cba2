"""make soak's verdict: each rule it applies can fail (drills/soak.py, drills/soak_watch.py)."""

from __future__ import annotations

from types import SimpleNamespace

from drills import soak
from drills.loadgen import Outcome, Route
from drills.soak import Band, FaultRecord
from drills.soak_watch import Figures, kind_of, leftover_problems

QUIET = {"cgroups": 1, "run dir files": 9, "temp files": 0, "zombies": [], "listening ports": [80, 81],
         "established sockets": 4, "close_wait sockets": 0}


def settings(backend: str = "local", job_store: str = "sqlite") -> SimpleNamespace:
    return SimpleNamespace(slow=SimpleNamespace(backend=backend), dask=SimpleNamespace(scheduler="managed"),
                           jobs=SimpleNamespace(store=job_store, redis_url=""),
                           inventory=SimpleNamespace(runs=lambda role: True))


def test_a_cycle_holds_every_fault_and_a_restart_every_nth_slot():
    every = {f.name for f in soak.CHEAP + soak.RESTARTS + soak.JOB_CHEAP + soak.JOB_RESTARTS}
    assert {"kill-job-process", "kill-runner"} <= every
    for backend, store, extra in (("local", "sqlite", set()), ("dask", "sqlite", {"kill-dask-worker", "kill-dask-scheduler"}),
                                  ("local", "redis", {"kill-job-store"})):
        slots = soak.schedule(settings(backend, store), restart_every=3)
        names = [f.name for f in slots]
        assert set(names) == every | extra
        restarts = [i for i, f in enumerate(slots)
                    if f in soak.RESTARTS + soak.JOB_RESTARTS + soak.DASK_RESTARTS + soak.STORE_RESTARTS]
        assert restarts == list(range(2, 3 * len(restarts), 3))


def test_a_process_is_back_only_when_its_files_threads_and_sockets_are():
    band = Band(files=10, sockets=5, threads=3)
    assert band.excess(Figures(50, fds=10 + 5 + 48, sockets=5 + 48, threads=3, children=0), socket_allowance=48) == ""
    assert band.excess(Figures(50, fds=11 + 5, sockets=5, threads=3, children=0), socket_allowance=48)  # a file more
    assert band.excess(Figures(50, fds=10 + 54, sockets=54, threads=3, children=0), socket_allowance=48)
    assert band.excess(Figures(50, fds=15, sockets=5, threads=4, children=0), socket_allowance=48)


def test_leftovers_are_what_the_quiet_end_holds_beyond_the_quiet_start():
    assert leftover_problems(QUIET, dict(QUIET, **{"established sockets": 4 + 96}), nginx_workers=1) == []
    for change in ({"cgroups": 2}, {"temp files": 1}, {"zombies": [123]}, {"listening ports": [80]},
                   {"close_wait sockets": 1}, {"established sockets": 4 + 97}, {"run dir files": 10}):
        assert leftover_problems(QUIET, dict(QUIET, **change), nginx_workers=1), change


def test_the_verdict_fails_on_growth_slow_workers_an_unproduced_fault_or_a_failed_request():
    ok = FaultRecord("kill-slow-worker", 10, "", 0.1, workers_back_in=0.2)
    growth = [{"process": "fast-01", "pid": 1, "growth": 0.05, "rss_warm_mb": 30, "rss_end_mb": 31.5}]
    clean = soak.Tally(sent=10)
    slots = [soak.CHEAP[0]]
    assert soak._problems(clean, [ok], growth, [], slots) == []
    assert soak._problems(clean, [ok], [dict(growth[0], growth=0.11)], [], slots)
    assert soak._problems(clean, [FaultRecord("kill-slow-worker", 10, "", 0.1, workers_back_in=1.5)], growth, [], slots)
    assert soak._problems(clean, [ok], growth, [], [*slots, soak.RESTARTS[0]])  # never produced
    assert soak._problems(soak.Tally(sent=10, failed=1), [ok], growth, [], slots)
    assert soak._problems(clean, [ok], growth, ["zombies: [1]"], slots)


def test_an_error_counts_as_hit_only_inside_a_window_of_a_fault_that_could_reach_it():
    slow = Route("slow GET /slow/fib/18", "slow", "GET", "/slow/fib/18", rate=1)
    fast = Route("fast GET /fast", "fast", "GET", "/fast", rate=1)
    windows = [(10.0, 20.0, frozenset({"slow", "fault"}))]
    outcomes = [Outcome(slow, 15.0, 502, "worker_died", json_error=True),  # hit
                Outcome(slow, 25.0, 502, "worker_died", json_error=True),  # failed: no fault then
                Outcome(fast, 15.0, 502, "bad_gateway", json_error=True),  # failed: out of this fault's reach
                Outcome(slow, 15.0, None, "ConnectionResetError"),  # lost, whatever the window
                Outcome(fast, 12.0, 200)]
    t = soak._tally(outcomes, windows, [])
    assert (t.sent, t.hit, t.failed, t.lost) == (5, 1, 2, 1)


def test_a_forkserver_s_children_are_workers_though_they_keep_its_command_line():
    forkserver = "python -c from multiprocessing.forkserver import main; main(...)"
    assert kind_of(forkserver, "python -m services.slow.app") == "forkserver"
    assert kind_of(forkserver, forkserver) == "pool worker"
    assert kind_of("nginx: worker process", "nginx: master process") == "nginx worker"  # not a pool's


def test_only_pool_workers_count_as_workers():
    from drills.soak_watch import Proc, pool_workers

    processes = [Proc("nginx worker", 1, True), Proc("slow-01 pool worker", 2, False),
                 Proc("dask-worker-01 pool worker", 3, False), Proc("slow-01 pool worker", 4, False)]
    table = {1: (0, "S", ""), 2: (0, "S", ""), 3: (0, "R", ""), 4: (0, "Z", "")}
    assert pool_workers(processes, table) == 2

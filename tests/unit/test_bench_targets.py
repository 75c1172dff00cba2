"""The benchmark's judgements against the peers (issue 12), on made-up measurements: each can fail."""

from __future__ import annotations

import pytest

from bench import levels, report


def record(config: str, rep: int = 0, **figures: float) -> dict:
    """A repetition's raw measurements shaped as bench/phases.py writes them."""
    m = {"idle": {"p99": figures.get("idle_p99", 1.0), "lateness_p99": figures.get("idle_late", 0.3)},
         "flood": {"p99": figures.get("flood_p99", 2.0), "lateness_p99": figures.get("flood_late", 0.3)},
         "wrk": {"rps": figures.get("wrk", 5000.0)}}
    if "heavy" in figures:
        m["heavy"] = {"jobs_s": figures["heavy"]}
    return {"config": config, "rep": rep, "m": m}


def cross(*records: dict) -> dict[str, list[float]]:
    return report.cross_figures(list(records))


def test_the_fleet_is_compared_with_the_floor_and_the_best_peer_never_with_the_edge():
    c = cross(record("fleet", idle_p99=1.0, flood_p99=3.0, wrk=7000, heavy=75),
              record("floor", idle_p99=1.0, flood_p99=2.0),
              record("fastapi", flood_p99=5.0, wrk=17000, heavy=88),
              record("gunicorn-sync", flood_p99=30.0, wrk=8000, heavy=80),
              record("edge", idle_p99=0.5, flood_p99=0.1, wrk=190000))  # never a peer, never compared
    assert c["fleet_over_floor_isolation"] == [pytest.approx(1.5)]
    assert c["fleet_flood_p99_over_lowest_other"] == [pytest.approx(3.0 / 5.0)]
    assert c["fleet_wrk_over_best_peer"] == [pytest.approx(7000 / 17000)]
    assert c["fleet_heavy_over_best_peer"] == [pytest.approx(75 / 88)]


def test_each_repetition_is_compared_within_itself():
    c = cross(record("fleet", 0, flood_p99=3.0), record("fastapi", 0, flood_p99=6.0),
              record("fleet", 1, flood_p99=3.0), record("fastapi", 1, flood_p99=2.0))
    assert c["fleet_flood_p99_over_lowest_other"] == [pytest.approx(0.5), pytest.approx(1.5)]


def test_the_isolation_target_passes_within_its_bound_and_the_heavy_target_fails_past_it():
    targets = {t.figure: t for t in report.TARGETS}
    floor = targets["peers: fleet isolation ratio ÷ the floor's, same repetition"]
    heavy = targets["peers: fleet heavy jobs/s ÷ the best peer's"]
    agg = report.aggregate([record("fleet", idle_p99=1.0, flood_p99=1.1, heavy=80),
                            record("floor", idle_p99=1.0, flood_p99=1.0), record("fastapi", heavy=100)],
                           ["fleet", "floor", "fastapi"])
    assert floor.verdict(floor.get(agg)) == "pass"  # 1.1 <= 1.2
    assert heavy.verdict(heavy.get(agg)) == "**FAIL**"  # 0.8 < 0.9


def level(idle_p99: float, flood_p99: float, late: float = 0.3) -> dict:
    return {"idle": {"p99": idle_p99, "lateness_p99": 0.3}, "flood": {"p99": flood_p99, "lateness_p99": late}}


def test_load_levels_judge_only_up_to_80_percent_of_saturation():
    run = {"saturation": 1000.0, "levels": {"250": level(1.0, 1.5), "500": level(1.0, 1.9),
                                            "1000": level(1.0, 50.0)}}  # past 80 %: not judged
    ok, lines = levels.judge({"fleet": [run]})
    assert ok is True and len(lines) == 2, lines


def test_load_levels_fail_when_the_flood_doubles_the_tail():
    run = {"saturation": 5000.0, "levels": {"250": level(1.0, 1.5), "1000": level(1.0, 2.5)}}
    ok, lines = levels.judge({"fleet": [run]})
    assert ok is False and "FAIL" in lines[1], lines


def test_a_level_whose_probe_ran_late_is_shown_but_never_failed():
    run = {"saturation": 5000.0, "levels": {"250": level(1.0, 1.5), "1000": level(1.0, 9.0, late=3.0)}}
    ok, lines = levels.judge({"fleet": [run]})
    assert ok is True and "not judged" in lines[1] and "3.00 ms" in lines[1] and "9.00" in lines[1], lines
    only_late = {"saturation": 5000.0, "levels": {"1000": level(1.0, 9.0, late=3.0)}}
    assert levels.judge({"fleet": [only_late]})[0] is None  # nothing judged: not a pass


def test_an_isolation_ratio_whose_probe_ran_late_is_not_judged_and_says_why():
    targets = {t.figure: t for t in report.TARGETS}
    floor = targets["peers: fleet isolation ratio ÷ the floor's, same repetition"]
    fleet = targets["isolation ratio, fleet (fast p99 under flood ÷ idle)"]
    agg = report.aggregate([record("fleet", idle_p99=1.0, flood_p99=5.0, flood_late=2.5),
                            record("floor", idle_p99=1.0, flood_p99=1.0)], ["fleet", "floor"])
    assert fleet.get(agg) is None and floor.get(agg) is None  # never scored, pass or fail
    for target in (fleet, floor):
        assert target.verdict(target.get(agg), agg) == "not judged: the probe sent late past 1 ms at p99 (up to 2.50 ms in fleet's cells)"
    assert agg["configs"]["fleet"]["isolation_not_judged"].median == pytest.approx(5.0)  # shown as measured
    dask = targets["Dask: isolation ratio ÷ the local pool's, same repetition"]
    assert dask.verdict(dask.get(agg), agg) == "not measured"  # fleet-dask did not run: no probe to blame
    # The lowest flood p99 of the others ignores a cell whose probe ran late, and so does the fleet's.
    c = cross(record("fleet", flood_p99=3.0), record("fastapi", flood_p99=1.0, flood_late=4.0),
              record("gunicorn-sync", flood_p99=6.0))
    assert c["fleet_flood_p99_over_lowest_other"] == [pytest.approx(0.5)]


def test_fast_throughput_against_the_peers_is_shown_not_scored():
    wrk = {t.figure: t for t in report.TARGETS}["peers: fleet fast req/s (wrk) ÷ the best peer's"]
    agg = report.aggregate([record("fleet", wrk=7000), record("fastapi", wrk=17000)], ["fleet", "fastapi"])
    assert wrk.get(agg).median == pytest.approx(7000 / 17000) and wrk.verdict(wrk.get(agg), agg) == "not a target"


def test_a_peer_behind_nginx_is_a_peer():
    c = cross(record("fleet", heavy=75), record("fastapi", heavy=70), record("fastapi+nginx", heavy=100))
    assert c["fleet_heavy_over_best_peer"] == [pytest.approx(0.75)]


def test_load_levels_without_the_fleet_are_not_judged():
    assert levels.judge({"fastapi": []})[0] is None


def test_the_results_page_names_the_floor_and_the_best_peer_beside_the_fleet():
    records = [record("fleet", idle_p99=1.0, flood_p99=3.0, wrk=7000, heavy=75),
               record("floor", idle_p99=1.0, flood_p99=2.0, wrk=5500),
               record("fastapi", flood_p99=5.0, wrk=17000, heavy=88),
               record("gunicorn-sync", flood_p99=2.5, wrk=8000, heavy=80)]
    agg = report.aggregate(records, ["fleet", "floor", "fastapi", "gunicorn-sync"])
    text = "\n".join(report.peer_findings(agg))
    assert "ratio 2.00" in text and "ratio 3.00" in text  # the floor's isolation, then the fleet's
    assert "Lowest of the others: gunicorn-sync, 2.50 ms" in text
    assert "Best peer: fastapi, 17,000 req/s" in text and "Best peer: fastapi, 88.0 jobs/s" in text
    assert report.peer_findings(report.aggregate(records[1:], ["floor", "fastapi"])) == []  # no fleet, nothing to say


def test_the_cpu_a_job_cost_splits_into_its_own_process_and_its_dispatching():
    r = record("fleet-dask", heavy=65)
    r["m"]["workers"] = 2
    r["m"]["heavy"].update(cpu_ms_per_job={"forkserver worker": 20.0, "dask worker": 4.0, "dask scheduler": 3.0,
                                           "slow-01": 2.0}, busy_cores=1.8)
    r["w1"] = {"jobs_s": 40.0, "cpu_ms_per_job": {"forkserver worker": 19.0, "dask worker": 5.0}}
    f = report.figures(r)
    assert f["heavy_cpu_ms"] == pytest.approx(29.0) and f["heavy_job_cpu_ms"] == 20.0
    assert f["heavy_dispatch_cpu_ms"] == pytest.approx(9.0) and f["heavy_busy_cores"] == 1.8
    assert f["efficiency"] == pytest.approx(65 / 80)
    assert f["w1_wait_ms"] == pytest.approx(1000 / 40 - 19)  # one worker: 25 ms a job, 19 of them computing
    del r["w1"]  # no one-worker run: no wait to tell
    assert report.figures(r)["w1_wait_ms"] is None
    del r["m"]["heavy"]["cpu_ms_per_job"]  # an older results.json: nothing to split
    assert report.figures(r)["heavy_dispatch_cpu_ms"] is None


def test_a_fast_path_wait_is_charged_to_whatever_held_its_cpu():
    """bench/sched.py: perf sched timehist's switch-outs, one CPU's history read in order."""
    from bench.sched import waits_by_holder

    timehist = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
    100.000100 [0001]  python[30]                          0.000      0.000      4.000
    100.003000 [0001]  python[10]                          0.500      2.500      0.200
    100.003100 [0000]  <idle>                              0.000      0.000      1.000
    100.004500 [0000]  nginx[21]                           1.000      1.300      0.100
    100.005000 [0001]  python[40/11]                       0.100      0.800      0.100
    100.006000 [0001]  python[30]                          0.000      0.000      1.000
    100.008000 [0001]  python[12]                          3.000      1.900      0.100
"""
    roles = {10: "fast-03", 11: "fast-01", 12: "fast-02", 21: "nginx worker", 30: "forkserver worker"}
    assert waits_by_holder(timehist, roles) == {"forkserver worker": 2.5 + 1.9, "idle CPU": 1.3}
    assert waits_by_holder(timehist, roles, longer_than_ms=2.0) == {"forkserver worker": 2.5}
    # The probe is a real-time task (bench/load.py): were it to wait, that is not the fast path's.
    roles[10] = "load generator (bench)"
    assert waits_by_holder(timehist, roles) == {"forkserver worker": 1.9, "idle CPU": 1.3}


def test_make_bench_runs_the_long_jobs_once_and_every_other_set_up_in_each_repetition_unless_told():
    from bench import jobs
    from bench.__main__ import scheduled

    assert [scheduled("jobs", rep, None, jobs.FULL) for rep in range(3)] == [True, False, False]
    assert all(scheduled("fleet", rep, None, jobs.FULL) for rep in range(3))
    assert all(scheduled("jobs", rep, 3, jobs.FULL) for rep in range(3))  # --repeat 3: as asked

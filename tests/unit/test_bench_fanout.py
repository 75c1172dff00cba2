"""bench/fanout.py's verdicts on made-up figures: each of issue 28's targets passes when met and fails when not."""

from __future__ import annotations

import copy

from bench import fanout


def point(rate: int, hedging: bool, p99: float, p999: float, extra: float = 0.03, share: float = 0.05,
          p50: float = 10.0) -> dict:
    return {"rate": rate, "hedging": hedging, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "extra_load": extra,
            "hedge_share": share}


GOOD = {
    "straggler": [point(30, True, 40, 90), point(30, False, 300, 301)],
    "clean": [point(60, True, 12, 30, share=0.05, p50=10.1), point(60, False, 12, 30, share=0, p50=10.0)],
    "slow_all": {"waited": 400, "answered_at_once": 9600, "waited_p01_ms": 299.0, "waited_p999_ms": 312.0,
                 "p50_ms": 5.0, "max_ms": 318.0, "left_in_flight": 0},
    "outage": {"opened_after_s": 1.5, "posts_hedges": 60, "posts_calls": 3000, "seconds": 60, "warmup_profiles": 200,
               "posts_served": 300, "profiles": 3000, "amplification": 0.1},
    "batch": {"requests": 100, "multigets_min": 2, "multigets_max": 2, "keys_min": 150, "keys_max": 150,
              "received_max": 3, "hedged_copies": 1},
    "wide": {"pool_waits": 0, "pool_wait_p99_ms": 0.0, "errors": 0, "statuses": {200: 2000}},
}


def verdicts(results: dict) -> dict[str, bool]:
    return {case: met for case, _, _, met in fanout.judge(results)}


def test_every_target_met_passes():
    assert all(verdicts(GOOD).values()), verdicts(GOOD)


def broken(path: tuple, value) -> dict:
    results = copy.deepcopy(GOOD)
    node = results
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return results


def test_each_missed_target_fails_its_row_alone():
    cases = [
        (("straggler", 0, "p999_ms"), 250, "straggler at 30/s"),
        (("straggler", 0, "extra_load"), 0.08, "straggler at 30/s"),
        (("clean", 0, "hedge_share"), 0.07, "clean upstreams"),
        (("clean", 0, "p50_ms"), 10.5, "clean upstreams"),
        (("slow_all", "waited_p999_ms"), 330.0, "every replica of one upstream slow"),
        (("slow_all", "waited_p01_ms"), 250.0, "every replica of one upstream slow"),
        (("slow_all", "waited"), 0, "every replica of one upstream slow"),
        (("outage", "posts_hedges"), 1000, "one upstream 100 % slow"),
        (("slow_all", "left_in_flight"), 3, "every replica of one upstream slow"),
        (("outage", "opened_after_s"), None, "one upstream 100 % slow"),
        (("outage", "amplification"), 1.2, "one upstream 100 % slow"),
        (("batch", "multigets_max"), 3, "200 lookups of 150 keys"),
        (("batch", "keys_max"), 200, "200 lookups of 150 keys"),
        (("wide", "pool_wait_p99_ms"), 5.0, "50 at once x 20-way"),
    ]
    for path, value, row in cases:
        found = verdicts(broken(path, value))
        assert found[row] is False, (path, value)
        assert all(met for case, met in found.items() if case != row), (path, found)


def test_the_pool_wait_quantile_is_the_upper_bound_of_its_bucket():
    buckets = {0.0001: 90, 0.001: 99, 0.01: 100, float("inf"): 100}
    assert fanout.quantile_ms(buckets, 0.5) == 0.1
    assert fanout.quantile_ms(buckets, 0.99) == 1.0
    assert fanout.quantile_ms(buckets, 1.0) == 10.0

"""The shipped tasks as plain functions, their argument parsers, and the task registry."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from services.slow import progress, registry, tasks
from services.slow.registry import BadArgument

FIB_CONFIG = {"max_n": 35}
PBKDF2_CONFIG = {"max_rounds": 600000}
SLEEP_CONFIG = {"max_seconds": 10}


# fib --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (2, 1), (10, 55), (25, 75025)])
def test_fib_computes_fibonacci_numbers(n, expected):
    assert tasks.fib(n) == expected


def test_parse_fib_accepts_a_decimal_n():
    assert tasks.parse_fib("25", {}, FIB_CONFIG) == {"n": 25}


def test_parse_fib_accepts_zero_and_the_configured_maximum():
    assert tasks.parse_fib("0", {}, FIB_CONFIG) == {"n": 0}
    assert tasks.parse_fib("35", {}, FIB_CONFIG) == {"n": 35}


@pytest.mark.parametrize("path", ["", "-1", "abc", "999", "36", "\u0663", "1e3", " 5", "5.0", "+5", "0x10"])
def test_parse_fib_rejects_anything_but_a_decimal_integer_up_to_max_n(path):
    with pytest.raises(BadArgument):
        tasks.parse_fib(path, {}, FIB_CONFIG)


def test_parse_fib_says_what_is_allowed():
    with pytest.raises(BadArgument, match="n must be an integer 0-35"):
        tasks.parse_fib("999", {}, FIB_CONFIG)
    with pytest.raises(BadArgument, match="missing n"):
        tasks.parse_fib("", {}, FIB_CONFIG)


def test_parse_fib_follows_the_configured_max_n():
    with pytest.raises(BadArgument):
        tasks.parse_fib("21", {}, {"max_n": 20})
    assert tasks.parse_fib("20", {}, {"max_n": 20}) == {"n": 20}


# pbkdf2 -----------------------------------------------------------------------------------------

def test_pbkdf2_matches_hashlib_pbkdf2_hmac_sha256():
    expected = hashlib.pbkdf2_hmac("sha256", b"hunter2", b"pepper", 1000).hex()
    assert tasks.pbkdf2("hunter2", "pepper", 1000) == expected


def test_pbkdf2_depends_on_salt_and_rounds():
    base = tasks.pbkdf2("pw", "a", 1000)
    assert base != tasks.pbkdf2("pw", "b", 1000)
    assert base != tasks.pbkdf2("pw", "a", 1001)


def test_parse_pbkdf2_fills_in_the_default_salt_and_rounds():
    assert tasks.parse_pbkdf2("", {"password": "pw"}, PBKDF2_CONFIG) == {
        "password": "pw", "salt": "", "rounds": 100_000,
    }


def test_parse_pbkdf2_accepts_rounds_as_a_number_or_a_decimal_string():
    assert tasks.parse_pbkdf2("", {"password": "pw", "rounds": 2000}, PBKDF2_CONFIG)["rounds"] == 2000
    assert tasks.parse_pbkdf2("", {"password": "pw", "rounds": "2000"}, PBKDF2_CONFIG)["rounds"] == 2000


@pytest.mark.parametrize("params", [
    {},
    {"password": ""},
    {"password": 123},
    {"password": "x" * 1025},
    {"password": "pw", "salt": 5},
    {"password": "pw", "rounds": 999},
    {"password": "pw", "rounds": True},
    {"password": "pw", "rounds": 1000.5},
])
def test_parse_pbkdf2_rejects_bad_arguments(params):
    with pytest.raises(BadArgument):
        tasks.parse_pbkdf2("", params, PBKDF2_CONFIG)


def test_parse_pbkdf2_rejects_rounds_above_the_configured_maximum():
    assert tasks.parse_pbkdf2("", {"password": "pw", "rounds": 600000}, PBKDF2_CONFIG)["rounds"] == 600000
    with pytest.raises(BadArgument, match="rounds must be an integer 1000-600000"):
        tasks.parse_pbkdf2("", {"password": "pw", "rounds": 600001}, PBKDF2_CONFIG)


# sleep and its per-worker client ----------------------------------------------------------------

def test_sleep_task_reuses_its_per_worker_client():
    registered = registry.load("services.slow.tasks")["sleep"]
    client = registered.setup()
    first = registered.fn(client, 0)
    second = registered.fn(client, 0)
    assert first["client_id"] == second["client_id"] == client.client_id
    assert (first["calls"], second["calls"]) == (1, 2)
    assert first["worker_pid"] == os.getpid()


def test_each_legacy_client_has_its_own_id_and_call_count():
    a, b = tasks.connect_legacy_client(), tasks.connect_legacy_client()
    tasks.blocking_call(a, 0)
    assert a.client_id != b.client_id
    assert tasks.blocking_call(b, 0)["calls"] == 1


def test_parse_sleep_accepts_a_number_of_seconds_up_to_the_maximum():
    assert tasks.parse_sleep("0.5", {}, SLEEP_CONFIG) == {"seconds": 0.5}
    assert tasks.parse_sleep("10", {}, SLEEP_CONFIG) == {"seconds": 10.0}


@pytest.mark.parametrize("path", ["", "-1", "10.5", "nan", "inf", "abc", "\u0663", "1_0", " 5", "5e0", "0x1"])
def test_parse_sleep_rejects_anything_else(path):
    with pytest.raises(BadArgument):
        tasks.parse_sleep(path, {}, SLEEP_CONFIG)


# report: a long job ---------------------------------------------------------------------------------

def test_report_runs_about_its_seconds_and_reports_each_section_coalesced_to_ten_a_second():
    reports = []
    progress.reporting_to(reports.append)
    try:
        started = time.perf_counter()
        result = tasks.report(0.5)
        took = time.perf_counter() - started
    finally:
        progress.reporting_to(None)
    assert result["sections"] == 5 and len(result["digest"]) == 64
    assert 0.5 <= took < 2
    assert [r[1:3] for r in reports] == [(float(n), 5.0) for n in range(1, 6)]
    assert reports[-1][3] == "section 5 of 5"


def test_a_task_reporting_in_a_tight_loop_sends_about_ten_reports_a_second_and_always_the_last():
    sent = []
    progress.reporting_to(sent.append)
    try:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 0.35:
            n += 1
            progress.report(n, None, "busy")
        progress.report(n, n, "done")
    finally:
        progress.reporting_to(None)
    assert n > 1000 and 3 <= len(sent) <= 6
    assert sent[-1] == ("progress", float(n), float(n), "done")


def test_a_report_outside_a_worker_goes_nowhere():
    progress.report(1, 2, "nobody listens")  # no error, nothing sent


@pytest.mark.parametrize("path", ["", "0", "0.05", "601", "abc", "nan"])
def test_parse_report_takes_seconds_from_a_tenth_to_its_maximum(path):
    with pytest.raises(BadArgument):
        tasks.parse_report(path, {}, {"max_seconds": 600})


def test_a_long_task_must_declare_its_timeout_and_may_be_neither_cached_nor_coalesced():
    for options in ({}, {"timeout": 100_000}, {"timeout": 10, "coalesce": True}):
        with pytest.raises(ValueError, match="long task"):
            registry.task("long_one", parse=tasks.parse_report, long=True, **options)


def test_retries_are_a_whole_number_up_to_ten_and_report_declares_one():
    for retries in (-1, 11, 1.5):
        with pytest.raises(ValueError, match="retries"):
            registry.task("retrying", parse=tasks.parse_report, retries=retries)
    assert registry.load("services.slow.tasks")["report"].retries == 1


# the registry -----------------------------------------------------------------------------------

def test_registry_load_returns_only_the_tasks_of_the_named_modules():
    shipped = registry.load("services.slow.tasks")
    assert set(shipped) == {"fib", "pbkdf2", "sleep", "primes", "digest", "report"}
    faulty = registry.load("tests.support.faulty_tasks")
    assert "fib" not in faulty
    assert {"raise_error", "exit_worker", "spin", "pid"} <= set(faulty)
    both = registry.load("services.slow.tasks, tests.support.faulty_tasks")
    assert set(both) == set(shipped) | set(faulty)


def test_registered_tasks_keep_their_plain_functions_and_declarations():
    shipped = registry.load("services.slow.tasks")
    assert shipped["fib"].fn is tasks.fib and shipped["fib"].echo == ("n",)
    assert shipped["pbkdf2"].methods == ("POST",) and "password" not in shipped["pbkdf2"].echo
    assert shipped["sleep"].setup is tasks.connect_legacy_client


def test_registry_load_of_an_unknown_module_raises():
    with pytest.raises(ModuleNotFoundError):
        registry.load("services.slow.no_such_module")


def test_task_decorator_refuses_a_nested_function():
    def outer():
        def inner():
            return 1
        return inner

    with pytest.raises(ValueError, match="module-level"):
        registry.task("nested_test_task", parse=tasks.parse_fib)(outer())
    assert "nested_test_task" not in registry._TASKS


def _another_fib(n: int) -> int:
    return n


def test_task_decorator_refuses_a_name_already_registered_by_another_module():
    with pytest.raises(ValueError, match="registered twice"):
        registry.task("fib", parse=tasks.parse_fib)(_another_fib)
    assert registry.load("services.slow.tasks")["fib"].fn is tasks.fib


def test_a_task_cannot_take_the_name_of_the_edge_s_slow_health_route():
    with pytest.raises(ValueError, match="the edge's"):
        registry.task("healthz", parse=tasks.parse_fib)(_another_fib)


def test_task_decorator_accepts_the_same_function_registered_again():
    # A module imported twice (reload, a forkserver preload) registers its tasks again.
    assert registry.task("fib", parse=tasks.parse_fib, echo=("n",), coalesce=True)(tasks.fib) is tasks.fib
    assert registry.load("services.slow.tasks")["fib"].fn is tasks.fib


@pytest.mark.parametrize("name", ["Fib", "fib-x", "fib x", ""])
def test_task_decorator_refuses_names_that_do_not_fit_the_route(name):
    with pytest.raises(ValueError, match="lower-case"):
        registry.task(name, parse=tasks.parse_fib)


# primes: cached at the edge ----------------------------------------------------------------------

def test_primes_counts_the_primes_below_n():
    assert [tasks.primes(n) for n in (0, 2, 3, 10, 100, 1000)] == [0, 0, 1, 4, 25, 168]


def test_primes_declares_its_cache_ttl_and_canonical_url():
    primes = registry.load("services.slow.tasks")["primes"]
    assert primes.cache_ttl == 60 and primes.methods == ("GET",)
    assert primes.url(tasks.parse_primes("01000", {}, {"max_n": 10**6})) == "1000"


def test_a_cached_task_must_take_get_only_and_say_its_canonical_url():
    with pytest.raises(ValueError, match="declares url="):
        registry.task("bad_cached", parse=lambda p, q, c: {}, cache_ttl=5)
    with pytest.raises(ValueError, match="GET only"):
        registry.task("bad_cached", parse=lambda p, q, c: {}, cache_ttl=5, methods=("POST",), url=str)
    with pytest.raises(ValueError, match="whole seconds"):
        registry.task("bad_cached", parse=lambda p, q, c: {}, cache_ttl=0, url=str)


# digest ------------------------------------------------------------------------------------------

def test_digest_iterates_sha256_over_the_data():
    import hashlib
    once = hashlib.sha256(b"abc").digest()
    assert tasks.digest(1, "abc") == once.hex()
    assert tasks.digest(2, "abc") == hashlib.sha256(once).hexdigest()


@pytest.mark.parametrize("path, params", [("", {}), ("0", {}), ("x", {}), ("5", {"data": "x" * 1025}),
                                          ("5", {"data": ["a"]})])
def test_parse_digest_rejects_bad_rounds_and_data(path, params):
    with pytest.raises(BadArgument):
        tasks.parse_digest(path, params, {"max_rounds": 1000})

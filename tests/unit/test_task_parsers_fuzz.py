"""Generated input for every task's argument parser (Hypothesis): whatever a client sends, a parser
either returns arguments within the task's bounds or raises BadArgument (answered 400). Any other
exception would be a 500 that the request itself caused.

The inputs are what reaches a parser: the rest of the path (any text), and the query's arguments
or a POST's JSON object (any JSON value: huge and negative numbers, nan, deep nesting, lone
surrogates, which JSON allows and UTF-8 does not). 50 cases per task here (some 1,400 in all); 2,000 per task
with HYPOTHESIS_PROFILE=fuzz (`make fuzz`).
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.settings import load
from services.slow import registry
from services.slow.registry import BadArgument

settings.register_profile("default", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=2_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FLEET = load(env={})
TASKS = registry.load("services.slow.tasks,tests.support.faulty_tasks")

# Text as a decoded URL or a JSON string can hold it: any code point, surrogates included.
any_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=60)
numbers_as_text = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.from_regex(r"\A[0-9+\-. _eE]{1,40}\Z"),
    st.sampled_from(["", "0", "00", "1", "35", "36", "40", "0" * 13, "9" * 13, "1_0", " 5", "5 ", "\u0663",
                     "\uff15", "1e3", "nan", "inf", "-0", "0.0", "1.", ".5", "0x10"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
                         st.floats(allow_nan=True, allow_infinity=True), any_text, numbers_as_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)), max_leaves=12)
arg_names = st.sampled_from(["n", "rounds", "data", "password", "salt", "seconds", "x", ""]) | any_text
params = st.dictionaries(arg_names, json_values, max_size=5)
paths = st.one_of(numbers_as_text, any_text)


def within_bounds(name: str, kwargs: dict, config: dict) -> None:
    """The shipped tasks' own promises about what a parser lets through."""
    if name in ("fib", "primes"):
        assert 0 <= kwargs["n"] <= config["max_n"] and type(kwargs["n"]) is int
    elif name == "digest":
        assert 1 <= kwargs["rounds"] <= config["max_rounds"] and type(kwargs["rounds"]) is int
        assert isinstance(kwargs["data"], str) and len(kwargs["data"]) <= 1024
    elif name == "pbkdf2":
        assert 1000 <= kwargs["rounds"] <= config["max_rounds"]
        assert 1 <= len(kwargs["password"]) <= 1024 and len(kwargs["salt"]) <= 1024
        kwargs["password"].encode(), kwargs["salt"].encode()  # valid Unicode: the task can encode it
    elif name == "sleep":
        assert math.isfinite(kwargs["seconds"]) and 0 <= kwargs["seconds"] <= config["max_seconds"]
    elif name == "report":
        assert math.isfinite(kwargs["seconds"]) and 0.1 <= kwargs["seconds"] <= config["max_seconds"]


@pytest.mark.parametrize("name", sorted(TASKS))
@given(path=paths, query=params)
def test_a_parser_returns_bounded_arguments_or_raises_bad_argument(name, path, query):
    task = TASKS[name]
    config = FLEET.task_config(name)
    try:
        kwargs = task.parse(path, query, config)
    except BadArgument as exc:
        assert str(exc), "a BadArgument must say what is allowed"
        return
    assert isinstance(kwargs, dict)
    within_bounds(name, kwargs, config)


def test_the_shipped_tasks_are_all_fuzzed():
    assert {"fib", "pbkdf2", "digest", "primes", "sleep", "report"} <= set(TASKS)

"""Waiting for a condition instead of sleeping: poll the real state until it holds, or fail saying
what never happened.

    wait_for(lambda: fleet.slow_health()["waiting"] == 1, what="the job waits in line")
    await eventually(lambda: pool.stats()["busy"] == 2, what="both workers busy")
    await eventually(line_full, what="4 jobs waiting")    # async def line_full(): asks /healthz

A sleep guesses how long something takes and fails on a slower machine for no fault of the
product; a poll returns as soon as the thing has happened, and its timeout only bounds a failure.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10, *, interval: float = 0.05,
             what: str = "condition") -> T:
    """The first truthy value of `predicate()`, polled every `interval` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        time.sleep(interval)


async def eventually(predicate: Callable[[], T | Awaitable[T]], timeout: float = 5, *, interval: float = 0.02,
                     what: str = "condition") -> T:
    """wait_for inside an event loop: the loop keeps running (servers, pools) while it polls; a
    predicate that is a coroutine function (one asking an app over HTTP) is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(interval)

"""Test-only tasks that misbehave on purpose: raise, crash their worker, outrun their deadline.

Served only by fleets whose slow.task_modules names this module (the integration tests add it).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Mapping

from services.slow.registry import bounded_float, task


def no_args(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    return {}


def seconds_arg(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    return {"seconds": bounded_float(path or "0", "seconds", 0, 600)}


class Unpicklable(Exception):
    def __init__(self, a, b):  # unpickling calls Unpicklable(msg) and fails: bpo-31699
        super().__init__(f"{a}/{b}")


@task("raise_error", parse=no_args)
def raise_error() -> None:
    raise ValueError("this task always raises")


@task("raise_unpicklable", parse=no_args)
def raise_unpicklable() -> None:
    raise Unpicklable("x", "y")


@task("return_unpicklable", parse=no_args)
def return_unpicklable() -> Any:
    return lambda: None


@task("exit_worker", parse=no_args)
def exit_worker() -> None:
    os._exit(3)


@task("segfault_worker", parse=no_args)
def segfault_worker() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


@task("spin", parse=seconds_arg, echo=("seconds",))
def spin(seconds: float) -> float:
    """Burns CPU (never sleeps) for `seconds`: a job that ignores its deadline."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


@task("pid", parse=no_args)
def pid() -> int:
    return os.getpid()

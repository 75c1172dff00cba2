"""Test-only task for tests/unit/test_pool.py: a result that pickles in the worker but cannot be
unpickled in the server (bpo-31699's exception shape, returned instead of raised)."""

from __future__ import annotations

from tests.support.faulty_tasks import Unpicklable, no_args
from services.slow.registry import task


@task("return_unloadable", parse=no_args)
def return_unloadable() -> Unpicklable:
    return Unpicklable("x", "y")

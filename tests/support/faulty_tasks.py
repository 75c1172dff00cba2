"""Test-only tasks that misbehave on purpose: raise, crash their worker, outrun their deadline,
fail their setup, leave processes or huge results behind.

Served only by fleets whose slow.task_modules names this module (the integration tests add it).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from services.slow import progress, registry
from services.slow.registry import bounded_float, bounded_int

# Every call of a fault-injection task must run (tests fill workers with identical /slow/spin/1.5
# requests, kill the worker of one exit_worker and expect the next to run): none coalesces (the
# default). Their exception messages are what the tests check: they are exposed. The tasks that show
# coalescing (below, "shared_*", "cached_*") and the hidden message (hidden_raise) are registered
# with registry.task itself.
task = functools.partial(registry.task, expose_errors=True)


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


@task("spin_past_deadline", parse=no_args, timeout=0.5)
def spin_past_deadline() -> None:
    """Burns CPU until its own deadline (0.5 s, whatever slow.job_timeout says) kills its worker:
    the deadline overrun of `make soak`."""
    while True:
        pass


@task("pid", parse=no_args)
def pid() -> int:
    return os.getpid()


# setups that fail, and jobs that leave processes or huge results behind ---------------------------

def setup_flag(name: str) -> Path:
    """A file whose presence breaks a task's setup: in the fleet's run dir (FLEET_MEMBER_OF, set for
    every process of a fleet) or, in-process, in the temp dir."""
    base = os.environ.get("FLEET_MEMBER_OF") or tempfile.gettempdir()
    return Path(base) / f"break-{name}"


def failing_setup() -> str:
    raise RuntimeError("the model file is missing")


@task("needs_setup", parse=no_args, setup=failing_setup)
def needs_setup(state: str) -> str:
    """A task whose per-worker setup always fails: it alone answers 503 task_unavailable."""
    return state


def flaky_setup() -> str:
    if setup_flag("flaky-setup").exists():
        raise RuntimeError("the backend is down")
    return "connected"


@task("flaky_setup", parse=no_args, setup=flaky_setup)
def uses_flaky_setup(state: str) -> str:
    return state


def setup_that_kills_its_worker() -> None:
    if setup_flag("worker-start").exists():
        os._exit(7)  # the worker dies while starting: the pool cannot start replacements


@task("fragile_start", parse=no_args, setup=setup_that_kills_its_worker)
def fragile_start(state: None) -> str:
    return "started"


@task("spawn_child", parse=no_args)
def spawn_child() -> int:
    """Starts a long-lived child process, tells its pid, then runs past any deadline."""
    child = subprocess.Popen(["sleep", "1000"])
    setup_flag("spawned-child").write_text(str(child.pid))
    while True:  # until its deadline, a cancel or a close kills it
        time.sleep(0.05)


def size_arg(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    return {"size": bounded_int(path or "0", "size", 0, 1 << 30)}


@task("big_result", parse=size_arg)
def big_result(size: int) -> str:
    """A result of `size` characters (as JSON, size + 2 bytes)."""
    return "x" * size


@task("reply_then_exit", parse=no_args)
def reply_then_exit() -> str:
    """Answers, and its worker exits a moment later: the reply and the exit arrive together."""
    threading.Timer(0.05, os._exit, args=(0,)).start()
    return "answered"


def text_arg(path: str, params: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    return {"text": str(params.get("text", ""))}


@task("text_length", parse=text_arg, methods=("POST",))
def text_length(text: str) -> int:
    """A job with arguments as large as the request body allows."""
    return len(text)


@task("spin_and_tell", parse=seconds_arg, echo=("seconds",))
def spin_and_tell(seconds: float) -> float:
    """spin, after writing "<pid> <token>" (the process running it, and this job): a test can see
    it start and stop (tests/support/running_jobs.py). The token tells apart two jobs of one worker;
    the rename, that a reader never sees the file half written."""
    flag = setup_flag("spinner")
    written = flag.with_name(f"{flag.name}.{os.getpid()}")
    written.write_text(f"{os.getpid()} {os.urandom(8).hex()}")
    os.replace(written, flag)
    return spin(seconds)


# coalescing (services/slow/coalesce.py) ------------------------------------------------------------

@registry.task("shared_spin", parse=seconds_arg, echo=("seconds",), coalesce=True)
def shared_spin(seconds: float) -> dict:
    """spin, then say which process ran it: identical requests in flight share one job."""
    spin(seconds)
    return {"pid": os.getpid(), "token": os.urandom(8).hex()}  # the same token for every waiter of one job


@registry.task("shared_raise", parse=seconds_arg, expose_errors=True, coalesce=True)
def shared_raise(seconds: float) -> None:
    """spin, then raise: every waiter of the job gets the same 500."""
    spin(seconds)
    raise ValueError(f"failed after {seconds:g} s")


# the edge cache (cache_ttl) -------------------------------------------------------------------------

def seconds_url(kwargs: dict) -> str:
    return f"{kwargs['seconds']:g}"


@registry.task("cached_spin", parse=seconds_arg, echo=("seconds",), cache_ttl=2, url=seconds_url, coalesce=True)
def cached_spin(seconds: float) -> dict:
    """shared_spin, cached at the edge for 2 s: a test sees it expire."""
    return shared_spin(seconds)


@registry.task("cached_flaky", parse=seconds_arg, cache_ttl=60, url=seconds_url, coalesce=True)
def cached_flaky(seconds: float) -> dict:
    """Raises while the "cached_flaky" flag file exists: an error must never be cached."""
    if setup_flag("cached_flaky").exists():
        raise RuntimeError("the report's source is down")
    return shared_spin(seconds)


# what an exception tells a client ----------------------------------------------------------------------

@registry.task("hidden_raise", parse=no_args)
def hidden_raise() -> None:
    """Raises with a message a client must never see (expose_errors is off by default)."""
    raise PermissionError("cannot open /srv/secret/report.db for user alice")


# memory ---------------------------------------------------------------------------------------------

_kept: list[bytes] = []  # what keep_memory leaves in its worker after the job


def megabytes_arg(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    return {"mb": bounded_int(path or "0", "mb", 0, 8192)}


@task("allocate", parse=megabytes_arg, echo=("mb",))
def allocate(mb: int) -> int:
    """Touches `mb` MiB (every page resident), holds them a moment, then frees them."""
    block = b"x" * (mb << 20)
    time.sleep(0.5)  # resident long enough for any watcher to see it
    return len(block) >> 20


@task("keep_memory", parse=megabytes_arg, echo=("mb",))
def keep_memory(mb: int) -> int:
    """Leaves `mb` MiB resident in its worker after the job: a leak."""
    _kept.append(b"x" * (mb << 20))
    return sum(len(b) for b in _kept) >> 20


# long jobs (services/slow/long_jobs.py) ------------------------------------------------------------

@task("long_spin", parse=seconds_arg, echo=("seconds",), long=True, timeout=600)
def long_spin(seconds: float) -> float:
    """A long job that declares no retries (a lost instance's job fails worker_lost): spin,
    reporting progress every tenth of a second."""
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        progress.report(round(seconds - (end - now), 1), seconds, "spinning")
    return seconds

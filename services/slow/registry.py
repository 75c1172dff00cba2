"""The task registry: a heavy endpoint is a plain module-level function plus one registration.

    from services.slow.registry import BadArgument, task

    def parse_n(path, params, config):          # runs in the server, before any queueing
        if not path.isascii() or not path.isdigit():
            raise BadArgument("n must be a non-negative integer")
        return {"n": int(path)}

    @task("fib", parse=parse_n, echo=("n",))
    def fib(n):                                  # runs in a worker process
        return n if n < 2 else fib(n - 1) + fib(n - 2)

That is all: GET /slow/fib/25 now parses "25", waits for a worker, runs fib(n=25) there and
answers {"task": "fib", "n": 25, "result": 75025, ...}. Functions stay plain and importable, so
tests call them directly.

A task may declare `setup`, a function run once in each worker process when it starts (load a
model, open a connection, warm a cache); its return value is passed as the first argument to every
job of that task on that worker.

A task whose answer depends on its arguments alone, and whose arguments are nobody's secret,
declares `coalesce=True`: identical requests (same task, same parsed arguments) in flight on an
instance then share one job (coalesce.py). Tasks do not share by default: a shared job answers
sooner than a job of one's own, which tells a client that someone else asked the same thing at the
same moment (a password being hashed), and a task whose answer depends on more than its arguments
(the time, a file, who asks) would answer one client with another's result.

A task whose answer may be reused for a while declares `cache_ttl=<seconds>` and `url=` (its
canonical URL from its arguments): nginx then serves it from its cache.

A task that raises answers 500 `job_failed` with the exception's type; its message reaches the
client only with `expose_errors=True` (it stays in the log otherwise: a message may hold anything).

A task that runs for minutes or hours declares `long=True` and its own `timeout` (up to a day; the
fleet caps it at jobs.max_run_time): it is run only as a job (202 Accepted and /jobs/<id>, see
long_jobs.py), never held by an HTTP request, and it may report its progress (progress.py). Any
other task runs as a job too when a request asks for it (`Prefer: respond-async`). A task whose
jobs may simply run again after their instance is lost (killed mid-way) declares `retries=N`:
such a job is queued again, on another instance, instead of failing `worker_lost`; its arguments
are kept in the job store meanwhile, so they must be nobody's secret.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# parse(path, params, config) -> keyword arguments of the task function.
# path: what follows /slow/<name>/ ("" if nothing); params: query arguments and, for a POST, the
# JSON object of the body; config: the task's [tasks.<name>] table of deploy/fleet.toml.
Parser = Callable[[str, Mapping[str, str], Mapping[str, Any]], dict]


class BadArgument(ValueError):
    """A task's arguments are invalid: answered 400 with this message, before any queueing."""


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[..., Any]
    parse: Parser
    timeout: float | None = None  # seconds; the job deadline is min(timeout, slow.job_timeout)
    setup: Callable[[], Any] | None = None
    methods: tuple[str, ...] = ("GET",)
    echo: tuple[str, ...] = ()  # arguments repeated in the response (never secrets)
    module: str = field(default="", compare=False)
    # Identical requests in flight share one job (coalesce.py). Opt-in: only for a task whose answer
    # depends on its arguments alone and whose arguments are no secret (module docstring says why).
    coalesce: bool = False
    # Seconds the edge may serve this task's answer to the same URL without computing it again
    # (nginx's cache, one computation across all slow instances); None: never cached.
    cache_ttl: int | None = None
    # The canonical spelling of a call, what follows /slow/<name>/ (path and query): another
    # spelling of the same arguments is redirected to it, so the cache keeps one entry per call.
    url: Callable[[dict], str] | None = None
    # Whether a client sees the message of an exception the task raised. By default it sees the
    # exception's type and the request id to find it in the log: a message may hold anything (a
    # path, a query, a user's data).
    expose_errors: bool = False
    # Runs only as a job (202 and /jobs/<id>), under its own timeout, which may pass slow.job_timeout.
    long: bool = False
    # A job of it whose instance is lost is queued again (on another instance) this many times; its
    # arguments are then kept in the job store until it ends, so they must be nobody's secret.
    retries: int = 0


_TASKS: dict[str, Task] = {}


MAX_LONG_TIMEOUT = 86_400  # seconds: the longest a long task may declare
MAX_RETRIES = 10

# /slow/healthz at the edge is the slow path's health (nginx/nginx.conf.j2), never a task.
RESERVED = frozenset({"healthz"})


def task(name: str, *, parse: Parser, timeout: float | None = None,
         setup: Callable[[], Any] | None = None, methods: tuple[str, ...] = ("GET",),
         echo: tuple[str, ...] = (), coalesce: bool = False, cache_ttl: int | None = None,
         url: Callable[[dict], str] | None = None, expose_errors: bool = False, long: bool = False,
         retries: int = 0) -> Callable:
    """Register the decorated module-level function as task `name`; the function is unchanged."""
    if not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(f"task name {name!r}: use lower-case letters, digits and underscores")
    if name in RESERVED:
        raise ValueError(f"task name {name!r} is the edge's (GET /slow/{name}): choose another")
    if cache_ttl is not None:
        if not isinstance(cache_ttl, int) or not 1 <= cache_ttl <= 31_536_000:
            raise ValueError(f"task {name!r}: cache_ttl is whole seconds, 1 to a year")
        if tuple(methods) != ("GET",) or url is None:
            raise ValueError(f"task {name!r}: a cached task takes GET only and declares url= (its canonical URL)")
    if not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"task {name!r}: retries is a whole number 0-{MAX_RETRIES}")
    if long and (timeout is None or not 1 <= timeout <= MAX_LONG_TIMEOUT or cache_ttl is not None or coalesce):
        raise ValueError(f"task {name!r}: a long task declares its timeout (1 s to a day), and is neither cached nor "
                         "coalesced (each job is a client's own)")

    def register(fn: Callable) -> Callable:
        if "<locals>" in fn.__qualname__:
            raise ValueError(f"task {name!r}: {fn.__qualname__} must be a module-level function")
        known = _TASKS.get(name)
        if known is not None and (known.module, known.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"task {name!r} is registered twice: {known.module} and {fn.__module__}")
        _TASKS[name] = Task(name, fn, parse, timeout, setup, tuple(methods), tuple(echo), fn.__module__, coalesce,
                            cache_ttl, url, expose_errors, long, retries)
        return fn

    return register


def load(module_names: str) -> dict[str, Task]:
    """Import the comma-separated modules (slow.task_modules) and return the tasks they register."""
    names = [n.strip() for n in module_names.split(",") if n.strip()]
    for module_name in names:
        importlib.import_module(module_name)
    return {t.name: t for t in _TASKS.values() if t.module in names}


def bounded_int(text: Any, what: str, low: int, high: int) -> int:
    """Parse a decimal integer in [low, high], or raise BadArgument saying what is allowed."""
    text = str(text)
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise BadArgument(f"{what} must be an integer {low}-{high}, got {text[:40]!r}")
    value = int(text)
    if not low <= value <= high:
        raise BadArgument(f"{what} must be an integer {low}-{high}, got {value}")
    return value


DECIMAL = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,12})?$")


def bounded_float(text: Any, what: str, low: float, high: float) -> float:
    """Parse a plain decimal number ("2", "0.25") in [low, high], or raise BadArgument."""
    text = str(text)
    value = float(text) if DECIMAL.match(text) else float("nan")  # float() also takes "1_0", " 5", "5e0"
    if not low <= value <= high:  # also rejects nan and inf
        raise BadArgument(f"{what} must be a number {low:g}-{high:g}, got {str(text)[:40]!r}")
    return value

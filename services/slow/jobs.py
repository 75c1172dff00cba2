"""The slow path's contract: how a job can end without a result, what a pool promises, and what a
departed client may cost. Both backends (pool.py, dask_pool.py), the inline pool and the app use it;
none of them defines an outcome of its own.

Every way a job ends without a result is a JobError subclass that carries its HTTP status, the
contract's error code and its metric outcome, as Tornado's HTTPError carries its status; the app
answers any of them with one rule (slow/app.py). A new outcome is a new class here:

    >>> e = JobTimeout("job fib passed its 3 s deadline")
    >>> e.status, e.code, e.outcome
    (504, 'job_timeout', 'timeout')

JobErrors pickle whole (a Dask worker raises them, the slow instance catches them), and a pool's
`run` raises nothing else.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Protocol

# A job whose client went away, left to run past the kill budget, is killed after all once it has
# run this long while another client's job waits: killing a shorter one would cost that job a
# worker's restart, which takes longer than the rest of a short job.
RECLAIM_AFTER = 1.0
# What a client is told to wait when no estimate applies (no worker, a task unavailable): about
# one short job's time. A full line and a client's full share are estimated (backoff.py).
RETRY_AFTER_SECONDS = 1


class JobError(Exception):
    """Base of the errors a job can end with; each class says how it is answered and counted.

    Each pickles with the arguments it was made from, so it crosses a process boundary whole:
    Exception's default pickling replays only the message, which a class with other arguments
    cannot be rebuilt from (bpo-31699).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "job_failed"
    outcome: ClassVar[str] = "error"  # fleet_slow_jobs_total{outcome}
    retry: ClassVar[bool] = False  # the answer tells the client when to come back (Retry-After)
    log_level: ClassVar[int | None] = logging.WARNING  # how the instance logs it; None: not at all

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._init_args = args

    def __reduce__(self):
        return self.__class__, self._init_args

    def retry_after(self, estimate: Any, task: str, line: Any) -> int:
        """Seconds the client should wait (only read when `retry`): backoff.RetryAfter `estimate`
        knows the task's job times, the admission `line` its length."""
        return RETRY_AFTER_SECONDS

    def answer(self, wait: int | None, expose: bool, request_id: str) -> str:
        """The message the client gets."""
        return str(self)

    def details(self) -> dict[str, Any]:
        """Fields the JSON error carries besides error, message and request_id."""
        return {}

    def describe(self, task: str) -> str:
        """The instance's log line about it."""
        return f"job {task} failed: {self}"

    def log_fields(self) -> dict[str, Any]:
        return {}


class JobFailed(JobError):
    """The task raised (or returned what is not JSON): its type goes to the client, its message
    too if the task says so (expose_errors), its traceback to the log."""

    log_level = logging.ERROR

    def __init__(self, type_name: str, message: str, traceback_text: str):
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"

    def answer(self, wait: int | None, expose: bool, request_id: str) -> str:
        if expose:
            return str(self)
        # The message stays in the log, under the request id of the job: it may hold a path, a
        # query or a user's data.
        return (f"the task raised {self.type_name}; its message is in the slow instance's log "
                f"(request id {request_id})")

    def details(self) -> dict[str, Any]:
        return {"type": self.type_name}

    def describe(self, task: str) -> str:
        return f"job {task} raised {self}"

    def log_fields(self) -> dict[str, Any]:
        return {"traceback": self.traceback_text}


class ResultTooLarge(JobError):
    """The job's JSON result is over the pool's max_result_bytes; it never left the worker."""

    code = "result_too_large"
    log_level = logging.ERROR


class JobTimeout(JobError):
    """The job ran past its deadline (counted from its admission, so a job that waited in line had
    only the rest of it to run); its worker was killed and replaced."""

    status, code, outcome = 504, "job_timeout", "timeout"

    def describe(self, task: str) -> str:
        return str(self)


class WorkerDied(JobError):
    """The worker running the job exited (crash, OOM kill, kill -9); the pool replaces it."""

    status, code, outcome = 502, "worker_died", "crashed"

    def __init__(self, pid: int, exitcode: int | None, description: str | None = None):
        how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        super().__init__(description or f"worker {pid} died ({how})")
        self._init_args = (pid, exitcode, description)
        self.pid = pid
        self.exitcode = exitcode

    def answer(self, wait: int | None, expose: bool, request_id: str) -> str:
        return f"the worker running this job died: {self}"


class WorkerOutOfMemory(JobError):
    """The worker's resident memory passed the pool's cap during the job; it was killed and replaced."""

    status, code, outcome = 502, "worker_out_of_memory", "out_of_memory"


class TaskUnavailable(JobError):
    """The task's per-worker setup fails; it is tried again later. Nothing ran."""

    status, code, outcome, retry, log_level = 503, "task_unavailable", "unavailable", True, None


class NoWorkers(JobError):
    """No worker could take the job: none can be started, or none became free in time. Nothing ran."""

    status, code, outcome, retry, log_level = 503, "no_workers", "no_workers", True, None


class BackendUnavailable(JobError):
    """The cluster behind the pool cannot be reached (a Dask scheduler down or restarting). Nothing
    ran, or what ran was lost with the cluster."""

    status, code, outcome, retry, log_level = 503, "backend_unavailable", "unavailable", True, None


class Overloaded(JobError):
    """Every slot is busy and the waiting line is full, or the job was pushed out of it to make
    room for a client that held fewer places (admission.py). Nothing ran."""

    status, code, outcome, retry, log_level = 503, "overloaded", "shed", True, None

    def retry_after(self, estimate: Any, task: str, line: Any) -> int:
        return estimate.overloaded(line.waiting_tasks, line.slots)  # when the work now in line has started

    def answer(self, wait: int | None, expose: bool, request_id: str) -> str:
        return f"slow pool is full ({self}); retry in {wait} s"


class QueueTimeout(JobError):
    """The job's deadline, which counts from its admission, passed while it waited in line
    (admission.py): it never ran, so a retry is safe. A 503, as a proxy's queue timeout is
    (HAProxy's `timeout queue`); a 504 says the job ran out of time while running."""

    status, code, outcome, retry, log_level = 503, "queue_timeout", "expired", True, None

    def retry_after(self, estimate: Any, task: str, line: Any) -> int:
        return estimate.overloaded(line.waiting_tasks, line.slots)

    def answer(self, wait: int | None, expose: bool, request_id: str) -> str:
        return f"the slow pool is too busy to start this job within its deadline ({self}); retry in {wait} s"


class ClientLimited(JobError):
    """This client already holds its share of the slots and waiting places (admission.py)."""

    status, code, outcome, retry, log_level = 429, "rate_limited", "limited", True, None

    def retry_after(self, estimate: Any, task: str, line: Any) -> int:
        return estimate.client_limited(task)

    def answer(self, wait: int | None, expose: bool, request_id: str) -> str:
        return f"{self}; retry when one has finished, in about {wait} s"


def _each(base: type[JobError], attribute: str) -> list[str]:
    """`attribute` of `base` and of every subclass of it defined by now, each value once, in order."""
    found = [getattr(base, attribute)]
    for cls in base.__subclasses__():
        found += [value for value in _each(cls, attribute) if value not in found]
    return found


# Every value of fleet_slow_jobs_total{outcome}: a job's result, its cancellation, and each error's.
OUTCOMES = ("ok", *_each(JobError, "outcome"), "cancelled")


def endings() -> tuple[tuple[str, str], ...]:
    """Every way a long job can end, as the job store tallies it (state, error code): its result,
    a cancel, its runner lost, and each error's code (those defined by the modules imported by
    now: call it once they are). The runner shows each at 0 until it happens (metrics.JobTallies)."""
    return (("succeeded", ""), ("cancelled", "cancelled"), ("failed", "worker_lost"),
            *(("failed", code) for code in _each(JobError, "code") if code not in ("worker_lost", "cancelled")))


class KillBudget:
    """A token bucket: how many workers may be killed for departed clients (rate per second, burst).

    Killing a worker costs its restart; an abort storm (clients that submit and hang up, again and
    again) must not keep the pool restarting. Past the budget a departed client's job runs to its
    end and keeps its slot (pool.py, dask_pool.py)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Line(Protocol):
    """What a pool may ask of the admission in front of it (admission.Admission)."""

    def resize(self, slots: int) -> None:
        """The pool can run this many jobs at once now (a cluster's workers came or went)."""

    def others_waiting(self, client: str) -> bool:
        """A client other than `client` has a job in line."""


class Pool(Protocol):
    """What the slow app needs of a pool: WorkerPool (local), DaskPool, InlinePool (tests)."""

    size: int  # jobs it runs at once (its share of a cluster's)
    kill_on_cancel: bool  # True: a cancelled job is stopped whatever the kill budget says

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = "",
                  progress: Any = None, kill_on_cancel: bool = False) -> tuple[bytes, float]:
        """(the result as JSON bytes, elapsed ms), or a JobError; cancelled: the job is stopped
        (or, past the kill budget, left to finish before this returns; kill_on_cancel: stopped
        whatever the budget). progress(done, total, message): called in the loop with each report
        the task makes (progress.py)."""

    def stats(self) -> dict:
        """Figures for /healthz and /metrics: backend, workers, busy, problem, counters."""

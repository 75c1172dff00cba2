"""Progress from inside a task: one call, in the worker process that runs it.

    from services.slow import progress

    @task("report", parse=parse_report, long=True, timeout=3600)
    def report(seconds):
        for step in range(1, 11):
            ...
            progress.report(step, 10, f"section {step} of 10")

The worker sends each report up its pipe to the pool (worker.py), which hands it to whoever runs
the job (long_jobs.py writes it to the job's record and event stream). On Dask a job runs in the
same kind of worker process, under the Dask worker's own pool. Reports are coalesced here, at the
source: at most one per MIN_INTERVAL per job (the last one, done == total, always goes), so a task
that reports in a tight loop costs neither the pipe, the store nor the streams more than about ten
a second. A report that falls inside the interval is dropped, not delayed: a task reports as it
goes, and the next report carries the news. Outside a worker (a test calling the task's function
directly) a report goes nowhere.
"""

from __future__ import annotations

import math
import time
from typing import Callable

MIN_INTERVAL = 0.1  # seconds between two reports of one job: about 10 a second
MAX_MESSAGE = 200  # characters of a report's message kept

_send: Callable[[tuple], None] | None = None  # set by the worker around each job
_last = -math.inf


def report(done: float, total: float | None = None, message: str = "") -> None:
    """The job has done `done` of `total` (None: unknown), saying `message`."""
    global _last
    if _send is None:
        return
    now = time.monotonic()
    if now - _last < MIN_INTERVAL and done != total:
        return
    done = float(done)
    total = None if total is None else float(total)
    if not math.isfinite(done) or (total is not None and not math.isfinite(total)):
        raise ValueError("progress must be finite numbers")
    _last = now
    _send(("progress", done, total, str(message)[:MAX_MESSAGE]))


def reporting_to(send: Callable[[tuple], None] | None) -> None:
    """Where this process's reports go from now on (None: nowhere): the worker calls it around a job."""
    global _send, _last
    _send, _last = send, -math.inf

"""How long a refused client should wait before it tries again: the Retry-After of a 503 or 429.

A constant tells a client nothing: with a long line of long jobs it comes back far too early (and
is refused again), with a short line of short jobs far too late. Here the wait is the time the
line ahead of it needs to move, from the refused task's recent job times:

    overloaded (the line is full)     (waiting + 1) jobs / slots running at once x the task's job time
    rate_limited (the client's share)  one of the client's jobs: the task's job time

rounded up to whole seconds (the header's unit), at least 1 s and at most `ceiling` (a job's
deadline: a client never waits longer than any job may run). A task's job time is a moving
average (EWMA, weight 0.2) of its recent jobs, 1 s until one has run.
"""

from __future__ import annotations

import math

WEIGHT = 0.2  # of the newest job in the moving average: about the last 10 jobs count
FIRST_GUESS = 1.0  # seconds, before a task has run a job here


class RetryAfter:
    def __init__(self, ceiling: float):
        self.ceiling = max(1, math.ceil(ceiling))
        self.job_seconds: dict[str, float] = {}

    def record(self, task: str, seconds: float) -> None:
        """A job of `task` ran for `seconds` (its deadline, if it ran out)."""
        known = self.job_seconds.get(task)
        self.job_seconds[task] = seconds if known is None else known + WEIGHT * (seconds - known)

    def _bounded(self, seconds: float) -> int:
        return min(self.ceiling, max(1, math.ceil(seconds)))

    def overloaded(self, task: str, waiting: int, slots: int) -> int:
        """Seconds until the line (`waiting` jobs, `slots` running at once) has room for this job."""
        job = self.job_seconds.get(task, FIRST_GUESS)
        return self._bounded((waiting + 1) * job / max(1, slots))

    def client_limited(self, task: str) -> int:
        """Seconds until one of the client's own jobs has finished."""
        return self._bounded(self.job_seconds.get(task, FIRST_GUESS))

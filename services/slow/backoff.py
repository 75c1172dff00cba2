"""How long a refused client should wait before it tries again: the Retry-After of a 503 or 429.

A constant tells a client nothing: with a long line of long jobs it comes back far too early (and
is refused again), with a short line of short jobs far too late. Here the wait is the time the
work ahead of it needs, from the recent job times of the tasks in line:

    overloaded, queue_timeout    the jobs now waiting, each its task's job time, summed,
      (the line is full)           / slots running at once: until that work has reached a worker
    rate_limited                 one of the client's jobs: the task's job time
      (the client's share)

rounded up to whole seconds (the header's unit), at least 1 s and at most `ceiling`, the job
deadline: it counts from admission, so within it every job now in line has started or left. A
task's job time is a moving average (EWMA, weight 0.2) of its recent jobs, 1 s until one has run.

    advice = RetryAfter(ceiling=30)
    advice.record("sleep", 4.0)
    advice.overloaded({"sleep": 4}, slots=1)   # 16: four 4 s jobs wait for one worker
"""

from __future__ import annotations

import math
from typing import Mapping

WEIGHT = 0.2  # of the newest job in the moving average: about the last 10 jobs count
FIRST_GUESS = 1.0  # seconds, before a task has run a job here


class RetryAfter:
    def __init__(self, ceiling: float):
        self.ceiling = max(1, math.ceil(ceiling))
        self.job_seconds: dict[str, float] = {}

    def record(self, task: str, seconds: float) -> None:
        """A job of `task` ran for `seconds`."""
        known = self.job_seconds.get(task)
        self.job_seconds[task] = seconds if known is None else known + WEIGHT * (seconds - known)

    def record_cut_short(self, task: str, seconds: float) -> None:
        """A job of `task` was stopped at its deadline after running `seconds`: it needs at least
        that long. (After a wait in line it ran only what was left, which says little more.)"""
        self.record(task, max(seconds, self.expected(task)))

    def expected(self, task: str) -> float:
        return self.job_seconds.get(task, FIRST_GUESS)

    def _bounded(self, seconds: float) -> int:
        return min(self.ceiling, max(1, math.ceil(seconds)))

    def overloaded(self, waiting: Mapping[str, int], slots: int) -> int:
        """Seconds until the jobs in line (`waiting`: how many of each task) have all reached one
        of `slots` workers."""
        work = sum(count * self.expected(task) for task, count in waiting.items())
        return self._bounded(work / max(1, slots))

    def client_limited(self, task: str) -> int:
        """Seconds until one of the client's own jobs has finished."""
        return self._bounded(self.expected(task))

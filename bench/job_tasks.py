"""The long-jobs benchmark's own tasks (bench/jobs.py), served only by the fleets it starts (it adds
this module to their slow.task_modules).

- stamped: a long job that reports ten times a second for `seconds`, each report's message the
  host's monotonic clock when it was made and the worker's pid ("<seconds> <pid>"): a client of the
  job's event stream on the same host knows how long each event took to reach it, and the bench
  knows which process to watch die when the job is cancelled. It sleeps: a stream's figures are the
  fleet's, not a busy worker's.
- blob: a result of `kb` kilobytes (1,000 bytes, its JSON), made at once: the store under results.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from services.slow import progress
from services.slow.registry import BadArgument, bounded_float, bounded_int, task

# A hair above progress.MIN_INTERVAL: a report made sooner after the last one would be dropped there.
REPORT_EVERY = progress.MIN_INTERVAL * 1.01


def parse_stamped(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing seconds: use /slow/stamped/<seconds>")
    return {"seconds": bounded_float(path, "seconds", 0.1, 3600)}


@task("stamped", parse=parse_stamped, echo=("seconds",), long=True, timeout=3600)
def stamped(seconds: float) -> int:
    """Report "<monotonic clock> <pid>" about ten times a second for `seconds`; the reports made."""
    end = time.monotonic() + seconds
    made = 0
    while (now := time.monotonic()) < end:
        made += 1
        progress.report(made, None, f"{now:.6f} {os.getpid()}")
        time.sleep(max(0.0, now + REPORT_EVERY - time.monotonic()))
    return made


def parse_blob(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing kb: use /slow/blob/<kb>")
    return {"kb": bounded_int(path, "kb", 1, 10_000)}


@task("blob", parse=parse_blob, echo=("kb",))
def blob(kb: int) -> str:
    """A JSON string of exactly `kb` × 1,000 bytes, quotes included."""
    return "x" * (kb * 1000 - 2)

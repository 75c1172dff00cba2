"""What every configuration of the benchmark shares: the heavy work and its answer.

Standard library only: imported by the bench's own servers (.venv) and by the peers
(bench/peers/.venv).
"""

from __future__ import annotations

import json
import re
import time

from services.slow.tasks import fib  # the fleet's own task: the same work everywhere

FIB_MAX = 35  # the fleet's bound (services/slow/tasks.py)
FIB_PATH = re.compile(r"/slow/fib/([0-9]|[12][0-9]|3[0-5])")
HELLO = b"Hello!"


def timed_fib(n: int) -> tuple[int, float]:
    started = time.perf_counter()
    return fib(n), 1000 * (time.perf_counter() - started)


def fib_body(n: int, result: int, elapsed_ms: float) -> str:
    return json.dumps({"task": "fib", "n": n, "result": result, "elapsed_ms": round(elapsed_ms, 2)})


def health_body(role: str) -> str:
    return json.dumps({"status": "ok", "role": role})

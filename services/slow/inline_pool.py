"""A pool that runs each job in the calling process: for handler tests that need no subprocesses.

    pool = InlinePool("services.slow.tasks")
    result_json, elapsed_ms = await pool.run("fib", {"n": 10}, timeout=30)   # b"55", 0.01

The same contract as the real backends (jobs.Pool): results encoded as a worker encodes them, the
task's errors as JobFailed, a result over the cap as ResultTooLarge. It enforces no deadline and
survives no crash; tests of those use WorkerPool.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from services.slow import progress as reports
from services.slow import registry
from services.slow.jobs import JobFailed, ResultTooLarge
from services.slow.worker import encode_result, error_reply


class InlinePool:
    def __init__(self, task_modules: str, max_result_bytes: int = 16 << 20):
        self.tasks = registry.load(task_modules)
        self.state: dict[str, Any] = {}
        self.size = 1
        self.max_result_bytes = max_result_bytes
        self.kill_on_cancel = False
        self.counters = {"ok": 0, "error": 0}

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = "",
                  progress: Callable[[float, float | None, str], None] | None = None,
                  kill_on_cancel: bool = False) -> tuple[bytes, float]:
        t = self.tasks[task]
        started = time.perf_counter()
        # A report is delivered as the worker's pipe delivers it: the caller's callback, in the loop.
        reports.reporting_to(None if progress is None else lambda message: progress(*message[1:4]))
        try:
            if t.setup is not None:
                if task not in self.state:
                    self.state[task] = t.setup()
                result = t.fn(self.state[task], **kwargs)
            else:
                result = t.fn(**kwargs)
        except Exception as exc:
            self.counters["error"] += 1
            raise JobFailed(*error_reply(exc)[1:]) from None
        finally:
            reports.reporting_to(None)
        reply = encode_result(result, self.max_result_bytes)
        if reply[0] != "ok":
            self.counters["error"] += 1
            if reply[0] == "too_large":
                raise ResultTooLarge(f"the result of {task} is over {self.max_result_bytes} bytes of JSON")
            raise JobFailed(*reply[1:4])
        self.counters["ok"] += 1
        return reply[1], 1000 * (time.perf_counter() - started)

    def stats(self) -> dict:
        return {"backend": "inline", "workers": 1, "busy": 0, "problem": None, **self.counters}  # it runs each job itself

"""Pools that run no process, for the slow app's tests in process: each job waits until the test
lets it go, so a test holds the slots and the line exactly where it wants them.

Each is a services.slow.jobs.Pool, as WorkerPool, DaskPool and InlinePool are.
"""

from __future__ import annotations

import asyncio


class HeldPool:
    """A pool whose jobs run until the test sets `release`; `started` is set by the first job."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        self.timeouts: list[float] = []  # the time each job was given to run, in order
        self.kill_on_cancel = False
        self.size = 1
        self.progress = None  # the running job's progress callback: the test reports through it
        self.cancelled = 0  # jobs cancelled while they ran

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = "", progress=None,
                  kill_on_cancel: bool = False):
        self.calls += 1
        self.timeouts.append(timeout)
        self.progress = progress
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"75025", 1.0  # the interface: the result as JSON bytes

    def stats(self) -> dict:
        return {"workers": 1, "busy": int(self.started.is_set() and not self.release.is_set()),
                "calls": self.calls}

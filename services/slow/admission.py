"""Admission control for one slow instance: W running slots plus a bounded waiting line.

Decided in the event loop, before anything reaches the pool: a job either gets a slot now, waits
in line (where it can always be withdrawn), or is refused at once with Overloaded (503).
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator


class Overloaded(Exception):
    """Every slot is busy and the waiting line is full."""


class Admission:
    def __init__(self, slots: int, queue_limit: int):
        self.slots = slots
        self.queue_limit = queue_limit
        self.running = 0
        self._waiting: deque[asyncio.Future] = deque()
        self.shed = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; raises Overloaded at once when the line is full."""
        if self.running < self.slots and not self._waiting:
            self.running += 1
        elif len(self._waiting) < self.queue_limit:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn  # resolved by _release, which hands its slot over
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot arrived as we were cancelled: pass it on
                elif turn in self._waiting:  # _release may have dropped it already
                    self._waiting.remove(turn)
                raise
        else:
            self.shed += 1
            raise Overloaded(f"{self.running} jobs running and {len(self._waiting)} waiting")
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to the next in line
                return
        self.running -= 1

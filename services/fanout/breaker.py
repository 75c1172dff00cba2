"""A circuit breaker per upstream: a failing upstream gets no calls for a while, then one trial call.

Closed: calls go through, and their outcomes are counted in one-second buckets over a window. Once
at least `min_calls` in the window have ended and `failure_rate` of them failed, it opens: calls are
refused at once (a route answers without it: partial, or its JSON error) for `open_seconds`. Then
half-open: one trial call goes through; its success closes it, its failure opens it again.

Only the upstream's own failures count: an error answer, a refused connection, or a call that was
given at least its upstream's usual tail time (FAIR_TIME) and did not answer in it. A hedge's loser
and a call cut short because its request ended (its deadline, a required sibling failed, the client
left) before it had that time are the caller's doing, not the upstream's: they count for nothing.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # the fleet_fanout_breaker_state gauge's values
NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class Breaker:
    def __init__(self, failure_rate: float, min_calls: int, window_seconds: float, open_seconds: float,
                 clock: Callable[[], float] = time.monotonic, on_change: Callable[[int], None] | None = None) -> None:
        self.failure_rate, self.min_calls = failure_rate, min_calls
        self.window, self.open_seconds = window_seconds, open_seconds
        self.clock = clock
        self.on_change = on_change or (lambda state: None)
        self.state = CLOSED
        self.opened_at = 0.0
        self.trial_out = False
        self.buckets: deque[list] = deque()  # [second, calls, failures], oldest first

    # what a caller asks before a call ----------------------------------------------------------

    def allows(self) -> bool:
        """Whether a call may go now (in half-open, only the one trial call)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.open_seconds:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and not self.trial_out:
            self.trial_out = True
            return True
        return False

    @property
    def healthy(self) -> bool:
        """Closed and failing well below the threshold: hedging is on only then (a hedge to a
        failing upstream adds load where it hurts, and wins nothing)."""
        if self.state != CLOSED:
            return False
        calls, failures = self._counts()
        return calls < self.min_calls or failures < calls * self.failure_rate / 2

    # what a caller reports after -----------------------------------------------------------------

    def succeeded(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_out = False
            self.buckets.clear()
            self._set(CLOSED)
        self._count(failed=False)

    def failed(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_out = False
            self._open()
            return
        self._count(failed=True)
        calls, failures = self._counts()
        if self.state == CLOSED and calls >= self.min_calls and failures >= calls * self.failure_rate:
            self._open()

    def neutral(self) -> None:
        """A call that ended without saying anything about the upstream (a loser, cut short)."""
        if self.state == HALF_OPEN:
            self.trial_out = False  # the trial said nothing: the next call is the trial

    # inside ----------------------------------------------------------------------------------------

    def _open(self) -> None:
        self.opened_at = self.clock()
        self._set(OPEN)

    def _set(self, state: int) -> None:
        if state != self.state:
            self.state = state
            self.on_change(state)

    def _count(self, failed: bool) -> None:
        second = math.floor(self.clock())
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += 1
        bucket[2] += failed

    def _counts(self) -> tuple[int, int]:
        oldest = math.floor(self.clock()) - self.window
        while self.buckets and self.buckets[0][0] <= oldest:
            self.buckets.popleft()
        return sum(b[1] for b in self.buckets), sum(b[2] for b in self.buckets)

"""How many hedges an upstream may have: a share of its calls plus a small floor, as a token bucket.

Each call earns `ratio` of a hedge, and time earns `floor_per_second`; a hedge spends one. The
bucket holds at most CAP_SECONDS worth of both, so a long calm spell cannot be saved up and spent
at once when the upstream turns slow (Finagle's RetryBudget and Envoy's retry budgets work the
same way: a ratio of requests, a minimum per second, a bounded window).
"""

from __future__ import annotations

import time
from typing import Callable

CAP_SECONDS = 10  # what the bucket can hold: ten seconds' worth of calls at the recent rate, plus the floor's
MIN_CAP = 2.0  # even an idle upstream may hedge a couple of times


class HedgeBudget:
    def __init__(self, ratio: float, floor_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio, self.floor = ratio, floor_per_second
        self.clock = clock
        self.tokens = MIN_CAP
        self.updated = clock()
        self.recent_calls = 0.0  # calls in about the last CAP_SECONDS (decayed), for the cap

    def on_call(self) -> None:
        self.tokens += self.ratio
        self.recent_calls += 1

    def try_spend(self) -> bool:
        """One hedge, if the budget has it."""
        now = self.clock()
        elapsed = now - self.updated
        self.updated = now
        self.recent_calls *= max(0.0, 1 - elapsed / CAP_SECONDS)
        cap = max(MIN_CAP, self.ratio * self.recent_calls + self.floor * CAP_SECONDS)
        self.tokens = min(cap, self.tokens + elapsed * self.floor)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

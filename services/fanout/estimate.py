"""An upstream's recent latencies, and the percentile after which a call to it is hedged.

The last WINDOW successful calls' times in a ring; a percentile is sorted out of them at most once
every REFRESH new samples (sorting 1,000 floats takes about 50 us: 1 us a call amortised), so the
estimate follows a change in the upstream within a few hundred calls without costing each call.
Failed and cut-off calls are not samples: their time says when we gave up, not how fast the
upstream answers.
"""

from __future__ import annotations

from array import array

WINDOW = 1000
REFRESH = 50
MIN_SAMPLES = 50  # fewer than this: no estimate, and no hedging (a p95 of 5 samples is a guess)


class LatencyEstimate:
    def __init__(self, window: int = WINDOW, refresh: int = REFRESH, min_samples: int = MIN_SAMPLES) -> None:
        self.samples = array("d", [0.0] * window)
        self.window, self.refresh, self.min_samples = window, refresh, min_samples
        self.count = 0  # samples ever added
        self._cache: dict[float, float] = {}
        self._cached_at = -refresh

    def add(self, seconds: float) -> None:
        self.samples[self.count % self.window] = seconds
        self.count += 1

    def percentile(self, p: float) -> float | None:
        """The p-th percentile (0-100) of the recent samples in seconds, or None while too few."""
        n = min(self.count, self.window)
        if n < self.min_samples:
            return None
        if self.count - self._cached_at >= self.refresh:
            self._cache.clear()
            self._cached_at = self.count
        value = self._cache.get(p)
        if value is None:
            ordered = sorted(self.samples[:n])
            value = self._cache[p] = ordered[min(n - 1, int(n * p / 100))]
        return value

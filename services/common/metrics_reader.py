"""The fleet's one reader of /metrics text (Prometheus' format), on prometheus_client's own parser.

    >>> total(text, "fleet_slow_jobs_total", task="fib", outcome="ok")
    12.0

metrics.py is the other side: what an instance serves. This reads what an instance (or Dask)
answers, for `make status`, the drills, the bench and the tests; it registers no metric itself.
"""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def families(text: str) -> dict[str, Metric]:
    """{family name: family}; a counter's family is named without its suffix (fleet_slow_jobs holds
    the samples fleet_slow_jobs_total). ValueError on text that is not Prometheus' format."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str) -> list[Sample]:
    """Every sample, each with its own name (fleet_slow_jobs_total, ..._bucket, ..._count)."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`; 0.0 if there is none."""
    return sum(s.value for s in samples(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

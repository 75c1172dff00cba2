"""The isolation verdict where its reader looks: the exit code and the table on the console, the CSV
beside Locust's own, the web UI's Isolation tab.

locustfile.py runs the phases and brings the samples to the process that judges (Locust's master,
or the one process); once the run is closed it calls `show_verdict`, on Locust's quit
`print_on_quit`, and at start `add_tab` when a web UI runs. The table and the verdict themselves
are isolation_verdict.py's; nothing here imports Locust or gevent (Flask only when the tab is
added), so tests/unit/test_isolation_ui.py shows made-up runs the way Locust would:

    >>> from types import SimpleNamespace
    >>> from isolation_verdict import Recorder
    >>> rules = SimpleNamespace(median_ratio=1.5, median_slack_ms=0.5, ratio=2, slack_ms=0.5, max_lateness_ms=10,
    ...                         min_samples=1000, slow_workers=2, min_heavy_jobs=20, block_seconds=5,
    ...                         stall_ms=100, stall_percent=0.25)
    >>> rec = Recorder(rules, names=["baseline", "mixed"], starts=[0.0, 30.0], ended_at=60.0, ran_out=True)
    >>> environment = SimpleNamespace(parsed_options=SimpleNamespace(headless=True), process_exit_code=None)
    >>> show_verdict(environment, rec)  # no fast sample in either phase: nothing proven
    >>> environment.process_exit_code
    4
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from isolation_verdict import COLUMNS, Recorder, judge, report_text, tab_rows, write_csv

log = logging.getLogger("isolation")

EXIT_CODES = {"PASS": None, "FAIL": 3, "INCONCLUSIVE": 4}  # None: Locust's own rule (0, or 1 on errors)


def show_verdict(environment, rec: Recorder) -> None:
    """The closed run's verdict: written to --csv's <prefix>_isolation.csv; headless, the exit code
    now and the table on quit; with the web UI, the table now (the tab shows it too)."""
    v = judge(rec)
    o = environment.parsed_options
    if o is not None and getattr(o, "csv_prefix", None):
        write_csv(rec, f"{o.csv_prefix}_isolation.csv")
    if o is not None and o.headless:
        # The table is printed on `quit`, after Locust's own summary, so the verdict is the last thing
        # on the screen; the exit code is decided here.
        environment.process_exit_code = EXIT_CODES[v.verdict]
        rec.print_on_quit = True
    else:
        print(report_text(rec), flush=True)
    log.info("isolation verdict: %s: %s", v.verdict, v.reason)


def print_on_quit(rec: Recorder, exit_code: int) -> None:
    """Headless: the table, after Locust's summary; and why the exit code is not the verdict's."""
    if rec.print_on_quit:
        print(report_text(rec), flush=True)
        if exit_code not in (0, 3, 4):
            print(f"exit code {exit_code}: some heavy requests failed in an unexpected way (see the failures above)",
                  flush=True)


def add_tab(web_ui, recorder: Callable[[], Recorder]) -> None:
    """The web UI's Isolation tab, refreshed with Locust's own stats; recorder() is the run on show
    (each run has a new one)."""
    from flask import request  # Locust's web UI is Flask; imported only when it runs

    web_ui.template_args["extended_tabs"] = [{"title": "Isolation", "key": "isolation"}]
    web_ui.template_args["extended_tables"] = [
        {"key": "isolation", "structure": [{"key": key, "title": title} for key, title in COLUMNS]}]

    @web_ui.app.after_request
    def add_isolation_rows(response):
        if request.path != "/stats/requests" or response.status_code != 200:
            return response
        data = response.get_json(silent=True)
        if isinstance(data, dict):
            data["extended_stats"] = [{"key": "isolation", "data": tab_rows(recorder())}]
            response.set_data(json.dumps(data))
        return response

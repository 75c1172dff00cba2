"""The isolation verdict where its reader looks (isolation_ui.py): the exit code, the table on the
console, the CSV, the web UI's Isolation tab. Locust is played by a namespace and its web UI by a
bare Flask app: isolation_ui imports neither Locust nor gevent. Whole Locust runs are
tests/integration/test_load.py's.
"""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
from flask import Flask, jsonify

import isolation_ui
from isolation_verdict import Recorder

RULES = SimpleNamespace(median_ratio=1.5, median_slack_ms=0.5, ratio=2, slack_ms=0.5, max_lateness_ms=10,
                        min_samples=1000, slow_workers=2, min_heavy_jobs=20, block_seconds=5, stall_ms=100,
                        stall_percent=0.25)


def closed_run(mixed_ms: float | None = 1.0) -> Recorder:
    """Baseline then mixed, 30 s each, 100 fast answers a second of 1 ms in the baseline and mixed_ms
    in the mixed phase (None: no fast sample at all), the slow path shedding: PASS with 1 ms, FAIL
    with 50 ms, INCONCLUSIVE without samples."""
    rec = Recorder(RULES, names=["baseline", "mixed"], starts=[0.0, 30.0], ended_at=60.0, ran_out=True,
                   started=True, closed=True)
    if mixed_ms is not None:
        rec.fast = [(t / 100, 1.0 if t < 3000 else mixed_ms, True) for t in range(6000)]
    rec.heavy = [(45.0, "shed503")] + [(30 + t / 10, "ok") for t in range(100)]  # 100 heavy jobs ran
    return rec


def locust(headless: bool = True, csv_prefix: str | None = None) -> SimpleNamespace:
    """What show_verdict reads and writes of Locust's Environment."""
    return SimpleNamespace(parsed_options=SimpleNamespace(headless=headless, csv_prefix=csv_prefix),
                           process_exit_code=None)


@pytest.mark.parametrize("mixed_ms, exit_code", [(1.0, None), (50.0, 3), (None, 4)])
def test_headless_the_verdict_is_the_exit_code_and_the_table_waits_for_quit(mixed_ms, exit_code, capsys):
    environment, rec = locust(), closed_run(mixed_ms)
    isolation_ui.show_verdict(environment, rec)
    assert environment.process_exit_code == exit_code  # None: Locust's own rule (0, or 1 on errors)
    assert rec.print_on_quit
    assert capsys.readouterr().out == ""


def test_with_the_web_ui_the_table_is_printed_at_once_and_the_exit_code_left_to_locust(capsys):
    environment, rec = locust(headless=False), closed_run(50.0)
    isolation_ui.show_verdict(environment, rec)
    assert environment.process_exit_code is None and not rec.print_on_quit
    assert capsys.readouterr().out.splitlines()[-1].startswith("VERDICT: FAIL: the heavy load slowed the fast routes")


def test_with_csv_the_table_goes_beside_locust_s_own_files(tmp_path):
    isolation_ui.show_verdict(locust(csv_prefix=str(tmp_path / "run")), closed_run())
    rows = (tmp_path / "run_isolation.csv").read_text().splitlines()
    assert rows[0].startswith("Phase,State,Seconds,Fast requests")
    assert any(row.startswith("VERDICT,PASS,") for row in rows)


def test_on_quit_the_table_comes_last_and_an_exit_code_not_the_verdict_s_is_explained(capsys):
    rec = closed_run(1.0)
    isolation_ui.show_verdict(locust(), rec)
    isolation_ui.print_on_quit(rec, 0)
    assert capsys.readouterr().out.splitlines()[-1].startswith("VERDICT: PASS")
    isolation_ui.print_on_quit(rec, 1)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "exit code 1: some heavy requests failed in an unexpected way (see the failures above)")


def test_on_quit_nothing_is_printed_for_a_run_whose_table_was_shown_already(capsys):
    rec = closed_run(1.0)
    isolation_ui.show_verdict(locust(headless=False), rec)
    capsys.readouterr()
    isolation_ui.print_on_quit(rec, 1)
    assert capsys.readouterr().out == ""


def web_ui() -> SimpleNamespace:
    """Locust's WebUI as add_tab uses it: its template arguments and its Flask app, with the stats route."""
    app = Flask(__name__)
    app.add_url_rule("/stats/requests", "stats", lambda: jsonify({"stats": []}))
    app.add_url_rule("/other", "other", lambda: jsonify({"stats": []}))
    return SimpleNamespace(app=app, template_args={})


def test_the_isolation_tab_shows_the_run_on_show_at_each_refresh():
    ui, runs = web_ui(), [Recorder(RULES)]
    isolation_ui.add_tab(ui, lambda: runs[-1])
    assert ui.template_args["extended_tabs"] == [{"title": "Isolation", "key": "isolation"}]
    assert ui.template_args["extended_tables"][0]["structure"][0] == {"key": "phase", "title": "Phase"}
    client = ui.app.test_client()
    before = client.get("/stats/requests").get_json()["extended_stats"]
    assert before == [{"key": "isolation", "data": [
        {"phase": "VERDICT", "state": "not started", "check": "start a run: the verdict appears here"}]}]
    runs.append(closed_run(1.0))  # a new run: a new Recorder
    rows = client.get("/stats/requests").get_json()["extended_stats"][0]["data"]
    assert {"phase": "VERDICT", "state": "PASS"}.items() <= rows[4].items()
    assert "extended_stats" not in client.get("/other").get_json()


def test_the_module_docstring_example_holds():
    assert doctest.testmod(isolation_ui).failed == 0

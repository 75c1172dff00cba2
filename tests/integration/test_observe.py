"""`make observe` (deploy/observe.py): Debian's Prometheus on a real fleet, its targets file and the
fleet's rules; Debian's chromium, driven by Playwright, shows every target up and draws the fast
p99 graph. UPDATE_SCREENSHOT=1 also writes the README's picture (docs/prometheus-fast-p99.png)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from bench.procs import free_port_block
from deploy import observe
from tests.support import browser
from tests.support.fleet import REPO
from tests.support.waiting import wait_for

SCREENSHOT = REPO / "docs" / "prometheus-fast-p99.png"
P99 = "fleet_host:fast_request_duration_seconds:p99_5m"  # the rules' recording of the fast p99


def api(port: int, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}{query}", timeout=5) as answer:
        return json.load(answer)["data"]


def targets_up(port: int, expected: int) -> bool:
    fleet = [t for t in api(port, "targets")["activeTargets"] if t["labels"]["job"] == "fleet"]
    return len(fleet) == expected and all(t["health"] == "up" for t in fleet)


@pytest.fixture
def prometheus(fleet, tmp_path):
    """`python -m deploy.observe` (what make observe runs) on the shared fleet, stopped afterwards."""
    if observe.binary() is None:
        pytest.skip("prometheus is not installed (make test installs it as root)")
    port = free_port_block(1)
    env = {**fleet.env, "FLEET_OBSERVE_PROMETHEUS_PORT": str(port)}
    out = (tmp_path / "observe.out").open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "deploy.observe"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Ctrl-C stops" in (tmp_path / "observe.out").read_text() or launcher.poll() is not None,
                 60, interval=0.2, what="make observe's Prometheus ready")
        assert launcher.poll() is None, (tmp_path / "observe.out").read_text()
        yield port, launcher, (tmp_path / "observe.out")
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)  # Ctrl-C
            launcher.wait(40)
        out.close()


def keep_fast_traffic(fleet, stop: threading.Event) -> None:
    while not stop.is_set():
        fleet.get("/fast")
        time.sleep(0.02)


def test_make_observe_scrapes_every_target_with_the_rules_loaded_and_chromium_draws_the_fast_p99(fleet, prometheus,
                                                                                                  tmp_path):
    port, launcher, out = prometheus
    printed = out.read_text()
    assert f"Prometheus: http://127.0.0.1:{port}" in printed and "fast p99 graph" in printed, printed
    targets = sum(len(group["targets"]) for group in json.loads(
        (fleet.run_dir / "prometheus" / "targets.json").read_text()))
    stop = threading.Event()
    traffic = threading.Thread(target=keep_fast_traffic, args=(fleet, stop), daemon=True)
    traffic.start()
    try:
        wait_for(lambda: targets_up(port, targets), 60, interval=1, what=f"all {targets} targets up")
        def rules() -> list[dict]:
            return [rule for group in api(port, "rules")["groups"] for rule in group["rules"]]

        # each evaluated once at least (every 15 s), and without an error
        wait_for(lambda: all(rule["health"] != "unknown" for rule in rules()), 60, interval=1, what="the rules evaluated")
        assert all(rule["health"] == "ok" for rule in rules()), [r for r in rules() if r["health"] != "ok"]
        assert {r["name"] for r in rules() if r["type"] == "alerting"} >= {"FleetTargetDown", "FleetFastP99High"}
        def recorded() -> int:
            found = api(port, "query", query=f"count_over_time({P99}[5m])")["result"]
            return int(found[0]["value"][1]) if found else 0

        # three evaluations of the rule (15 s apart): a line to draw
        wait_for(lambda: recorded() >= 3, 90, interval=2, what="the fast p99 recorded three times")
        p99 = api(port, "query", query=P99)["result"]
        assert 0 < float(p99[0]["value"][1]) < 0.1
        firing = [a for a in api(port, "alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing  # a healthy fleet under light traffic: nothing to tell anyone

        browser.require()
        from playwright.sync_api import expect
        with browser.chromium() as chromium:
            page = chromium.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}{observe.PAGES['targets']}")
            expect(page.get_by_text(f"fleet ({targets}/{targets} up)")).to_be_visible(timeout=20_000)
            states = page.locator("td.state").all_inner_texts()
            assert len(states) == targets + 1 and {s.strip().lower() for s in states} == {"up"}, states
            page.goto(f"http://127.0.0.1:{port}{observe.FAST_P99_GRAPH}")
            # the classic UI draws each series as an SVG path (Rickshaw), named in the legend
            expect(page.locator(".graph_area svg path").first).to_be_visible(timeout=20_000)
            expect(page.locator(".legend").first).to_contain_text(P99)
            page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
            if os.environ.get("UPDATE_SCREENSHOT"):
                page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        stop.set()
        traffic.join(5)


def test_make_stop_stops_make_observe_s_prometheus_and_its_launcher_ends(fleet, prometheus):
    port, launcher, out = prometheus
    pid = observe.stop_running(fleet.run_dir)  # what `make stop` does first
    assert pid is not None
    assert launcher.wait(40) == 0, out.read_text()
    assert not Path(f"/proc/{pid}").exists()
    assert not (fleet.run_dir / observe.PID_FILE).exists()

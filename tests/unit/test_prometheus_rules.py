"""The fleet's Prometheus rules (deploy/prometheus/rules.yml) under promtool, Prometheus's own checker:
the rules and make observe's config are valid, each alert fires when its unit test
(tests/rules/fleet.test.yml) says and stays quiet when it says, and a rule broken on purpose fails
those tests (they can fail)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import observe, render
from services.common.settings import load

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = REPO / "tests" / "rules" / "fleet.test.yml"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (make test installs it as root)")


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_the_shipped_rules_pass_promtool_s_check():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts()) + 5} rules found" in checked.stdout  # the alerts and the 5 recording rules


@needs_promtool
def test_every_alert_fires_and_stays_quiet_as_its_unit_test_says():
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_says_how_bad_what_it_means_and_what_to_do_and_is_tested_firing():
    firing_tested = set(re.findall(r'ALERTS\{alertname="(\w+)", alertstate="firing", severity=', RULE_TESTS.read_text()))
    for alert in alerts():
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"]["summary"].strip() and len(alert["annotations"]["description"]) > 80, alert["alert"]
        assert alert["alert"] in firing_tested, f"{alert['alert']} has no test in which it fires"


# Each a small change a careless edit could make; the unit tests must catch every one.
BREAKAGES = {
    "a threshold": ('expr: fleet_slow_workers{role="slow"} == 0', 'expr: fleet_slow_workers{role="slow"} == 1'),
    "a label filter dropped": ('up{role!=""} == 0', "up == 0"),
    "a duration": ("        for: 5m\n        labels:\n          severity: critical",
                   "        for: 15m\n        labels:\n          severity: critical"),
    "a severity": ('          severity: critical\n        annotations:\n          summary: "the Dask cluster',
                   '          severity: warning\n        annotations:\n          summary: "the Dask cluster'),
    "a ratio inverted": ('(rate(fleet_jobs_ended_total{role="runner"}[15m]))) > 0.25',
                         '(rate(fleet_jobs_ended_total{role="runner"}[15m]))) < 0.25'),
    "a recording rule's quantile": ("histogram_quantile(0.99,", "histogram_quantile(0.5,"),
    "the fast routes' role filter": ('rate(fleet_http_request_duration_seconds_bucket{role="fast", ',
                                     "rate(fleet_http_request_duration_seconds_bucket{"),
    "the objective's role filter": ('fleet_fast_p99_objective_seconds{role="fast"})\n',
                                    "fleet_fast_p99_objective_seconds)\n"),
    "the shed share left out": ("/ on (fleet_host) sum by (fleet_host) (fleet_host:slow_jobs:rate5m) > 0.05",
                                "/ on (fleet_host) sum by (fleet_host) (fleet_host:slow_jobs:rate5m) > 0"),
    "the shed floor left out": ('(fleet_host:slow_jobs:rate5m{outcome=~"shed|expired"}) > 0.1',
                                '(fleet_host:slow_jobs:rate5m{outcome=~"shed|expired"}) > 0'),
    "the free space ignored": ("max by (fleet_host) (fleet_logs_disk_free_bytes) <",
                               "0 * max by (fleet_host) (fleet_logs_disk_free_bytes) <"),
    "jobs counted per host, not per store": (
        'max by (store) (increase(fleet_jobs_ended_total{role="runner", error="worker_lost"}[15m]))',
        'max by (fleet_host, store) (increase(fleet_jobs_ended_total{role="runner", error="worker_lost"}[15m]))'),
    "a cut-off instance's last figure believed": (
        'fleet_dask_workers{role="slow"} and fleet_dask_scheduler_connected{role="slow"} == 1) == 0',
        'fleet_dask_workers{role="slow"}) == 0'),
}


@needs_promtool
@pytest.mark.parametrize("what", BREAKAGES)
def test_a_rule_broken_on_purpose_fails_its_unit_tests(tmp_path, what):
    old, new = BREAKAGES[what]
    text = RULES.read_text()
    assert text.count(old) == 1, f"the breakage of {what} no longer matches the rules"
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "rules").mkdir(parents=True)
    (tmp_path / "deploy" / "prometheus" / "rules.yml").write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "rules" / RULE_TESTS.name)
    tested = promtool("test", "rules", str(tmp_path / "tests" / "rules" / RULE_TESTS.name), cwd=tmp_path)
    assert tested.returncode != 0 and "FAILED" in tested.stdout + tested.stderr, tested.stdout


@needs_promtool
def test_make_observe_s_config_and_the_rules_deploy_copies_pass_promtool_s_check(tmp_path):
    settings = load(env={"FLEET_RUN_DIR": str(tmp_path)})
    (tmp_path / "prometheus").mkdir()
    for name, text in render.render(settings).items():
        if name.startswith("prometheus/"):
            (tmp_path / name).write_text(text)
    (tmp_path / "prometheus" / "prometheus.yml").write_text(observe.config(settings, settings.observe))
    checked = promtool("check", "config", str(tmp_path / "prometheus" / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "rules.yml" in checked.stdout

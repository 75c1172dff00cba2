"""make observe's launcher (deploy/observe.py) before it starts anything: what it refuses, and how it
knows its own Prometheus (the real one runs in tests/integration/test_observe.py)."""

from __future__ import annotations

import os

import pytest

from deploy import observe, render
from deploy.control import FleetError
from services.common.settings import load


def rendered(tmp_path, **env: str):
    settings = load(env={"FLEET_RUN_DIR": str(tmp_path), **env})
    (tmp_path / "prometheus").mkdir()
    for name, text in render.render(settings).items():
        if name.startswith("prometheus/"):
            (tmp_path / name).write_text(text)
    return settings


def test_only_a_live_prometheus_on_this_run_dir_s_config_is_taken_for_make_observe_s(tmp_path):
    assert observe.running(tmp_path) is None  # no pid file
    (tmp_path / "prometheus").mkdir()
    (tmp_path / observe.PID_FILE).write_text(f"{os.getpid()}\n")  # a live process, but this Python
    assert observe.running(tmp_path) is None
    assert observe.stop_running(tmp_path) is None  # and never signalled
    (tmp_path / observe.PID_FILE).write_text("not a pid\n")
    assert observe.running(tmp_path) is None


@pytest.mark.skipif(observe.binary() is None, reason="prometheus is not installed (make test installs it as root)")
def test_a_port_of_the_fleet_is_refused_though_nothing_listens_on_it_now(tmp_path):
    settings = rendered(tmp_path, FLEET_EDGE_PORT="18095")
    spare = settings.fast.base_port  # fast-spare's: free while the spare is stopped
    for port, whose in ((18095, "edge"), (spare, "fast-spare")):
        with pytest.raises(FleetError, match=f"observe.prometheus_port {port} is {whose}'s"):
            observe.start(settings, load(env={"FLEET_OBSERVE_PROMETHEUS_PORT": str(port)}).observe)
    assert not (tmp_path / observe.PID_FILE).exists()


def test_the_fast_p99_graph_asks_for_the_recorded_p99_and_the_heavy_outcomes():
    assert observe.FAST_P99_GRAPH.startswith("/classic/graph?g0.expr=fleet_host%3Afast_request_duration_seconds")
    assert "g1.expr=sum%20by%20%28outcome%29" in observe.FAST_P99_GRAPH and "+" not in observe.FAST_P99_GRAPH

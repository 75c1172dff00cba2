"""The series the alert rules read that no route sets: the host's logs (every instance reports them)
and the job store's tallies (the runner exports them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.common import metrics


def scrape() -> str:
    metrics.refresh()
    return generate_latest().decode()


def value(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


def test_each_log_counts_its_rotated_copies_and_the_bound_and_free_space_are_exported(tmp_path):
    sizes = {"nginx-access.log": 100, "nginx-access.log.1": 1000, "nginx-access.log.1.tmp": 10,
             "fast-01.log": 7, "fast-01.log.3": 30, "supervisord.log": 5}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / "not-a-file.log").mkdir()
    metrics.watch_logs(tmp_path, max_mb=20, backups=3)
    text = scrape()
    assert 'fleet_log_bytes{log="nginx-access.log"} 1110.0' in text
    assert 'fleet_log_bytes{log="fast-01.log"} 37.0' in text
    assert 'fleet_log_bytes{log="supervisord.log"} 5.0' in text
    assert 'log="not-a-file.log"' not in text
    assert value(text, "fleet_log_bound_bytes") == 20 * 2**20 * 4  # observe.log_max_mb x (log_backups + 1)
    assert value(text, "fleet_logs_disk_free_bytes") > 0
    (tmp_path / "supervisord.log").write_bytes(b"x" * 50)  # read again at each scrape
    assert 'fleet_log_bytes{log="supervisord.log"} 50.0' in scrape()


def test_a_run_dir_gone_between_scrapes_leaves_the_last_figures_and_no_error(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "fast-02.log").write_bytes(b"x" * 3)
    metrics.watch_logs(logs, max_mb=1, backups=1)
    assert 'fleet_log_bytes{log="fast-02.log"} 3.0' in scrape()
    (logs / "fast-02.log").unlink()
    logs.rmdir()
    assert 'fleet_log_bytes{log="fast-02.log"} 3.0' in scrape()


def test_the_job_store_s_tallies_become_counters_by_state_and_error():
    tallies = metrics.JobTallies()
    registry = CollectorRegistry()
    registry.register(tallies)
    assert "fleet_jobs_started_total 0.0" in generate_latest(registry).decode()
    tallies.update({"started": 7, "ended/succeeded/": 4, "ended/failed/worker_lost": 2, "ended/cancelled/cancelled": 1})
    text = generate_latest(registry).decode()
    assert "fleet_jobs_started_total 7.0" in text
    assert 'fleet_jobs_ended_total{error="",state="succeeded"} 4.0' in text
    assert 'fleet_jobs_ended_total{error="worker_lost",state="failed"} 2.0' in text
    assert 'fleet_jobs_ended_total{error="cancelled",state="cancelled"} 1.0' in text

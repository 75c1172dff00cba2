"""The series the alert rules read that no route sets: the host's logs (every instance reports them)
and the job store's tallies (the runner exports them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.common import metrics
from services.common.settings import load


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
    (tmp_path / "fast-01.log.4").write_bytes(b"x" * 999)  # kept by a larger log_backups before: no rotation's
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


def test_the_job_store_s_tallies_become_counters_by_store_state_and_error_every_ending_shown_from_0():
    tallies = metrics.JobTallies()
    tallies.endings = (("succeeded", ""), ("failed", "worker_lost"))
    registry = CollectorRegistry()
    registry.register(tallies)
    assert "fleet_jobs" not in generate_latest(registry).decode()  # nothing read yet: no 0 that looks like a reset
    tallies.update("sqlite:web1", {"started": 7, "ended/succeeded/": 4, "ended/cancelled/cancelled": 1})
    text = generate_latest(registry).decode()
    assert 'fleet_jobs_started_total{store="sqlite:web1"} 7.0' in text
    assert 'fleet_jobs_ended_total{error="",state="succeeded",store="sqlite:web1"} 4.0' in text
    assert 'fleet_jobs_ended_total{error="cancelled",state="cancelled",store="sqlite:web1"} 1.0' in text
    # not ended so yet, shown at 0: the first one is an increase the rules see
    assert 'fleet_jobs_ended_total{error="worker_lost",state="failed",store="sqlite:web1"} 0.0' in text


def test_every_way_a_long_job_ends_is_known_to_the_runner_s_tallies():
    import services.runner.app  # noqa: F401  (the modules whose errors a long job can end with)
    from services.slow import jobs

    endings = jobs.endings()
    assert {("succeeded", ""), ("cancelled", "cancelled"), ("failed", "worker_lost"), ("failed", "job_failed"),
            ("failed", "job_timeout"), ("failed", "worker_died"), ("failed", "shutting_down")} <= set(endings)
    assert len(endings) == len(set(endings))


def test_the_store_label_names_a_shared_redis_store_alike_on_every_host_and_never_its_password():
    from services.slow.app import store_label

    assert store_label(load(env={})) == "sqlite:local"
    redis = {"FLEET_JOBS_STORE": "redis", "FLEET_JOBS_REDIS_URL": "redis://:s3cret@10.0.0.9:8379/2"}
    assert store_label(load(env=redis)) == "redis://10.0.0.9:8379/2"

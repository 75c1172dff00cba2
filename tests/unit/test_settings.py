"""Settings: defaults from deploy/fleet.toml, FLEET_* overrides, "auto", validation, snapshots."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from services.common import settings
from services.common.settings import SCHEMA, Settings, SettingsError, env_name, load, real_ip_networks

FLEET_TOML = settings.DEFAULT_FILE
KEY_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\s*=\s*(?P<rest>.*)$")
SECTION_LINE = re.compile(r"^\[(?P<section>[A-Za-z0-9_.]+)\]\s*(#.*)?$")


def toml_key_lines() -> dict[str, str]:
    """{dotted key: its whole line} for every key assignment in deploy/fleet.toml."""
    section, lines = "", {}
    for line in FLEET_TOML.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if m := SECTION_LINE.match(stripped):
            section = m["section"]
        elif m := KEY_LINE.match(stripped):
            lines[f"{section}.{m['name']}" if section else m["name"]] = stripped
    return lines


def comment_of(line: str) -> str:
    """The text after the `#` that follows the value (a `#` inside a quoted string does not count)."""
    value_and_comment = KEY_LINE.match(line)["rest"]
    m = re.match(r'^(?:"[^"]*"|[^"#\s]+)\s*(?:#(?P<comment>.*))?$', value_and_comment)
    assert m, f"cannot parse the value of {line!r}"
    return (m["comment"] or "").strip()


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def write_toml(tmp_path: Path, replace: str, by: str) -> Path:
    """A copy of fleet.toml with one line changed."""
    text = FLEET_TOML.read_text()
    assert replace in text, f"{replace!r} not in fleet.toml"
    path = tmp_path / "fleet.toml"
    path.write_text(text.replace(replace, by, 1))
    return path


def error_of(**kwargs) -> str:
    with pytest.raises(SettingsError) as info:
        load(**kwargs)
    return str(info.value)


# defaults and the schema ------------------------------------------------------------------------

def test_defaults_load_from_fleet_toml():
    s = load(env={})
    file_values = settings.flatten(tomllib.loads(FLEET_TOML.read_text()))
    for key, raw in file_values.items():
        if raw != "auto":
            assert s.values[key] == raw, key
    assert isinstance(s.slow.job_timeout, float) and isinstance(s.edge.port, int)


def test_defaults_match_the_design_table():
    s = load(env={})
    assert (s.edge.port, s.edge.bind) == (8080, "127.0.0.1")
    assert (s.fast.instances, s.fast.base_port) == (2, 8100)
    assert (s.slow.instances, s.slow.base_port) == (1, 8200)
    assert (s.slow.job_timeout, s.slow.nice, s.tasks.fib.max_n) == (30, 10, 35)


def test_every_schema_key_is_in_fleet_toml_and_every_fleet_toml_key_is_in_the_schema():
    in_file = set(toml_key_lines())
    assert in_file == set(SCHEMA), (
        f"only in fleet.toml: {sorted(in_file - set(SCHEMA))}; only in SCHEMA: {sorted(set(SCHEMA) - in_file)}"
    )
    assert set(settings.flatten(tomllib.loads(FLEET_TOML.read_text()))) == set(SCHEMA)


def test_every_key_line_in_fleet_toml_has_a_comment():
    missing = [line for line in toml_key_lines().values() if not comment_of(line)]
    assert not missing, f"keys without a # comment: {missing}"


def test_every_numeric_key_comment_gives_the_schema_range():
    wrong = []
    for key, line in toml_key_lines().items():
        spec = SCHEMA[key]
        if spec.kind in (int, float) and f"{number(spec.low)}-{number(spec.high)}" not in comment_of(line):
            wrong.append(f"{key}: schema says {number(spec.low)}-{number(spec.high)}, comment: {comment_of(line)!r}")
    assert not wrong, "\n".join(wrong)


def test_module_docstring_example_holds():
    s = load(env={"FLEET_EDGE_PORT": "9000", "FLEET_SLOW_WORKERS": "2"})
    assert (s.edge.port, s.slow.workers, s.slow.queue_limit) == (9000, 2, 8)


# overrides --------------------------------------------------------------------------------------

def test_env_name_is_fleet_section_key_in_upper_case():
    assert env_name("tasks.fib.max_n") == "FLEET_TASKS_FIB_MAX_N"
    assert env_name("edge.port") == "FLEET_EDGE_PORT"


def test_fleet_env_vars_override_file_values():
    s = load(env={
        "FLEET_EDGE_PORT": "9000",
        "FLEET_EDGE_BIND": "::1",
        "FLEET_SLOW_JOB_TIMEOUT": "2.5",
        "FLEET_SLOW_TASK_MODULES": "services.slow.tasks, tests.support.faulty_tasks",
    })
    assert s.edge.port == 9000
    assert s.edge.bind == "::1"
    assert s.slow.job_timeout == 2.5
    assert s.slow.task_modules == "services.slow.tasks, tests.support.faulty_tasks"
    assert s.fast.base_port == 8100  # untouched keys keep the file's value


def test_fleet_tasks_fib_max_n_overrides_the_task_config():
    s = load(env={"FLEET_TASKS_FIB_MAX_N": "20"})
    assert s.tasks.fib.max_n == 20
    assert s.task_config("fib") == {"max_n": 20}


def test_override_values_are_stripped_of_surrounding_whitespace():
    assert load(env={"FLEET_EDGE_PORT": " 9001 "}).edge.port == 9001


def test_fleet_run_dir_sets_the_run_directory(tmp_path):
    assert load(env={"FLEET_RUN_DIR": str(tmp_path)}).run_dir == tmp_path.resolve()


def test_run_directory_defaults_to_dot_run_in_the_repository():
    assert load(env={}).run_dir == settings.REPO_ROOT / ".run"


def test_env_vars_that_do_not_start_with_fleet_underscore_are_ignored():
    s = load(env={"FLEET_RUN_DIR": "/tmp", "FLEETING": "x", "PATH": "/bin", "fleet_slwo_workers": "3"})
    assert s.edge.port == 8080


def test_the_fleet_s_own_variables_that_are_not_settings_are_accepted():
    file_values = settings.flatten(tomllib.loads(FLEET_TOML.read_text()))
    env = {name: "x" for name in settings.NON_SETTING_VARIABLES}
    assert settings.resolve(file_values, env, "fleet.toml")["edge.port"] == 8080


@pytest.mark.parametrize("name, closest", [
    ("FLEET_SLWO_WORKERS", "FLEET_SLOW_WORKERS"),  # a misspelt section: was silently ignored
    ("FLEET_EGDE_PORT", "FLEET_EDGE_PORT"),
    ("FLEET_TASK_FIB_MAX_N", "FLEET_TASKS_FIB_MAX_N"),
    ("FLEET_RUNDIR", "FLEET_RUN_DIR"),  # one of the fleet's own variables, misspelt
    ("FLEET_WHATEVER_X", None),
])
def test_a_fleet_env_var_that_is_neither_a_setting_nor_the_fleet_s_own_is_refused_naming_the_closest(name, closest):
    message = error_of(env={name: "3"})
    assert message.startswith(f"{name}: no such setting")
    assert "did you mean FLEET_" in message and "deploy/fleet.toml" in message
    if closest:
        assert f"did you mean {closest}?" in message


def test_every_fleet_variable_the_repository_sets_or_documents_is_a_setting_or_the_fleet_s_own():
    # What the fleet sets in its processes, tests and bench pass, and README shows: none may now be refused.
    names = re.compile(r"""["'](FLEET_[A-Z0-9_]+)["']|(?<![\w"'])(FLEET_[A-Z0-9_]+)=""")
    root = settings.REPO_ROOT
    files = [p for d in ("deploy", "services", "bench", "tests", ".ci") for p in (root / d).rglob("*")
             if p.is_file() and p.suffix != ".pyc" and p.name != "test_settings.py"]  # its misspellings are on purpose
    files += [root / "Makefile", root / "locustfile.py", root / "README.md"]
    allowed = {env_name(key) for key in SCHEMA} | settings.NON_SETTING_VARIABLES
    found = {m.group(1) or m.group(2): path for path in files for m in names.finditer(path.read_text(errors="replace"))}
    assert len(found) > 20
    assert {name: str(path) for name, path in found.items() if name not in allowed} == {}


def test_load_reads_os_environ_when_no_env_is_given(monkeypatch):
    monkeypatch.setenv("FLEET_EDGE_PORT", "9123")
    assert load().edge.port == 9123


# "auto" -----------------------------------------------------------------------------------------

def test_auto_workers_is_the_number_of_cpus_this_process_may_use():
    assert load(env={}).slow.workers == settings.usable_cpus() == len(os.sched_getaffinity(0))


def test_auto_workers_follows_the_cpu_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(settings, "_cgroup_cpu_quota", lambda: None)
    assert load(env={}).slow.workers == 1


def test_auto_workers_follows_a_cgroup_cpu_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(settings, "_cgroup_cpu_quota", lambda: 2.5)  # docker --cpus 2.5
    assert load(env={}).slow.workers == 3


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_cgroup_cpu_quota_is_read_from_the_process_s_cgroup_and_its_parents(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/system.slice/fleet.service\n")
        (tmp_path / "fs/system.slice/fleet.service").mkdir(parents=True)
        (tmp_path / "fs/system.slice/fleet.service/cpu.max").write_text("max 100000\n")
        (tmp_path / "fs/system.slice/cpu.max").write_text("150000 100000\n")  # the parent caps it
    else:
        proc.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
        (tmp_path / "fs/cpu,cpuacct/docker/abc").mkdir(parents=True)
        (tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("150000\n")
        (tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us").write_text("100000\n")
    assert settings._cgroup_cpu_quota(proc, tmp_path / "fs") == 1.5


def test_no_cgroup_quota_is_none(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs/cpu.max").write_text("max 100000\n")
    assert settings._cgroup_cpu_quota(proc, tmp_path / "fs") is None


def test_auto_long_jobs_are_the_cpus_locally_and_half_a_managed_cluster_s_threads_on_dask():
    assert load(env={}).runner.workers == settings.usable_cpus()
    dask = {"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_WORKERS": "3", "FLEET_DASK_THREADS_PER_WORKER": "2"}
    assert load(env=dask).runner.workers == 3  # the other 3 threads stay for synchronous jobs
    assert load(env={**dask, "FLEET_DASK_WORKERS": "1", "FLEET_DASK_THREADS_PER_WORKER": "1"}).runner.workers == 1
    assert load(env={**dask, "FLEET_DASK_SCHEDULER": "tcp://127.0.0.1:8786"}).runner.workers == 1  # size unknown
    # and every host's runners together: half the managed cluster's threads (None: no cluster-wide cap)
    assert load(env=dask).long_job_cluster_cap == 3 and load(env={}).long_job_cluster_cap is None
    assert load(env={**dask, "FLEET_DASK_SCHEDULER": "tcp://127.0.0.1:8786"}).long_job_cluster_cap is None


def test_auto_queue_limit_is_four_times_the_workers():
    assert load(env={}).slow.queue_limit == 4 * settings.usable_cpus()
    assert load(env={"FLEET_SLOW_WORKERS": "3"}).slow.queue_limit == 12


def test_auto_per_client_share_is_half_the_fleet_s_places_and_the_floor_half_the_workers():
    s = load(env={"FLEET_SLOW_WORKERS": "4", "FLEET_SLOW_QUEUE_LIMIT": "8", "FLEET_SLOW_INSTANCES": "2"})
    assert (s.slow.max_per_client, s.slow.min_workers) == (12, 2)
    s = load(env={"FLEET_SLOW_WORKERS": "1", "FLEET_SLOW_QUEUE_LIMIT": "0"})
    assert (s.slow.max_per_client, s.slow.min_workers) == (1, 1)


def test_auto_can_be_given_explicitly_and_numbers_replace_it():
    s = load(env={"FLEET_SLOW_WORKERS": "auto", "FLEET_SLOW_QUEUE_LIMIT": "0"})
    assert (s.slow.workers, s.slow.queue_limit) == (settings.usable_cpus(), 0)


def test_auto_sched_idle_is_on_for_dask_job_processes_only_and_either_can_be_forced():
    assert load(env={}).slow.sched_idle is False
    assert load(env={"FLEET_SLOW_BACKEND": "dask"}).slow.sched_idle is True
    assert load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_SLOW_SCHED_IDLE": "false"}).slow.sched_idle is False
    assert load(env={"FLEET_SLOW_SCHED_IDLE": "true"}).slow.sched_idle is True
    assert 'true or false or "auto"' in error_of(env={"FLEET_SLOW_SCHED_IDLE": "sometimes"})


def test_auto_is_refused_for_a_key_without_an_auto_value():
    message = error_of(env={"FLEET_EDGE_PORT": "auto"})
    assert "FLEET_EDGE_PORT" in message and "1-65535" in message


# validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["80a", "", "1.5", "0x50", "true"])
def test_a_bad_integer_is_refused_naming_the_env_var_and_the_range(raw):
    message = error_of(env={"FLEET_EDGE_PORT": raw})
    assert "FLEET_EDGE_PORT" in message
    assert "edge.port" in message
    assert "an integer 1-65535" in message


@pytest.mark.parametrize("name, raw, allowed", [
    ("FLEET_EDGE_PORT", "0", "1-65535"),
    ("FLEET_EDGE_PORT", "65536", "1-65535"),
    ("FLEET_SLOW_NICE", "20", "0-19"),
    ("FLEET_SLOW_NICE", "-1", "0-19"),
    ("FLEET_TASKS_FIB_MAX_N", "41", "0-40"),
    ("FLEET_SLOW_WORKERS", "0", "1-256"),
    ("FLEET_SLOW_JOB_TIMEOUT", "0.05", "0.1-3600"),
    ("FLEET_SLOW_JOB_TIMEOUT", "nan", "0.1-3600"),
    ("FLEET_SLOW_JOB_TIMEOUT", "inf", "0.1-3600"),
])
def test_an_out_of_range_value_is_refused_naming_the_env_var_and_the_range(name, raw, allowed):
    message = error_of(env={name: raw})
    assert name in message and allowed in message


def test_the_range_message_says_when_auto_is_allowed():
    assert '1-256 or "auto"' in error_of(env={"FLEET_SLOW_WORKERS": "many"})


def test_a_boolean_in_the_toml_file_is_refused(tmp_path):
    path = write_toml(tmp_path, "nice = 10 ", "nice = true ")
    message = error_of(path=path, env={})
    assert "slow.nice" in message and "0-19" in message and "True" in message


def test_a_fraction_in_the_toml_file_is_refused_for_an_integer_key(tmp_path):
    path = write_toml(tmp_path, "instances = 2 ", "instances = 2.5 ")
    message = error_of(path=path, env={})
    assert "fast.instances" in message and "1-64" in message


def test_a_whole_float_in_the_toml_file_is_accepted_for_an_integer_key(tmp_path):
    path = write_toml(tmp_path, "instances = 2 ", "instances = 3.0 ")
    assert load(path=path, env={}).fast.instances == 3


def test_an_unknown_fleet_env_var_in_a_settings_section_is_refused():
    message = error_of(env={"FLEET_EDGE_PROT": "9000"})
    assert "FLEET_EDGE_PROT" in message and "no such setting" in message
    assert "FLEET_EDGE_PORT" in message  # the list of known names shows the likely fix


@pytest.mark.parametrize("bind", ["localhost", "300.1.1.1", "127.0.0.1:80", ""])
def test_a_bad_bind_address_is_refused(bind):
    message = error_of(env={"FLEET_EDGE_BIND": bind})
    assert "FLEET_EDGE_BIND" in message and "IPv4 or IPv6" in message


@pytest.mark.parametrize("real_ip", ["proxy.example", "10.0.0.300", "10.0.0.0/33", "10.0.0.5;"])
def test_a_trusted_proxy_that_is_not_an_address_or_network_is_refused(real_ip):
    assert "FLEET_EDGE_REAL_IP" in error_of(env={"FLEET_EDGE_REAL_IP": real_ip})


@pytest.mark.parametrize("header", ["X Forwarded For", "X-Real-IP;", ""])
def test_a_real_ip_header_that_is_not_a_header_name_is_refused(header):
    assert "FLEET_EDGE_REAL_IP_HEADER" in error_of(env={"FLEET_EDGE_REAL_IP_HEADER": header})


def test_trusted_proxies_are_addresses_and_networks_of_either_family():
    assert real_ip_networks("10.0.0.5, 10.1.0.0/16,2001:db8::/48") == ["10.0.0.5/32", "10.1.0.0/16", "2001:db8::/48"]
    assert real_ip_networks("") == []


def test_a_bad_task_modules_value_is_refused():
    message = error_of(env={"FLEET_SLOW_TASK_MODULES": "services..slow,"})
    assert "slow.task_modules" in message and "module names" in message


def test_overlapping_fast_and_slow_ports_are_refused():
    message = error_of(env={"FLEET_SLOW_BASE_PORT": "8101"})
    assert "overlap" in message
    assert "fast.base_port" in message and "slow.base_port" in message


def test_adjacent_fast_and_slow_port_ranges_are_accepted():
    s = load(env={"FLEET_SLOW_BASE_PORT": "8103"})  # fast-spare 8100, fast 8101-8102; slow-spare 8103, slow 8104
    assert s.instances("slow") == [("slow-01", 8104)]
    assert s.spare("fast") == ("fast-spare", 8100) and s.spare("slow") == ("slow-spare", 8103)


def test_the_spare_sits_on_the_base_port_so_a_change_of_instance_count_never_moves_it():
    assert load(env={"FLEET_FAST_INSTANCES": "2"}).spare("fast") == load(env={"FLEET_FAST_INSTANCES": "5"}).spare("fast")


def test_a_slow_spare_over_a_fast_instance_port_is_refused():
    message = error_of(env={"FLEET_SLOW_BASE_PORT": "8102"})  # slow-spare would take fast-02's 8102
    assert "overlap" in message


def test_a_drain_timeout_not_longer_than_the_job_timeout_is_refused():
    message = error_of(env={"FLEET_SLOW_DRAIN_TIMEOUT": "30", "FLEET_SLOW_JOB_TIMEOUT": "30"})
    assert "slow.drain_timeout" in message and "slow.job_timeout" in message
    assert load(env={"FLEET_SLOW_DRAIN_TIMEOUT": "31", "FLEET_SLOW_JOB_TIMEOUT": "30"}).slow.drain_timeout == 31


def test_a_worker_floor_above_the_workers_is_refused():
    message = error_of(env={"FLEET_SLOW_WORKERS": "2", "FLEET_SLOW_MIN_WORKERS": "3"})
    assert "slow.min_workers" in message


def test_an_edge_port_equal_to_an_instance_port_is_refused():
    message = error_of(env={"FLEET_EDGE_PORT": "8201"})
    assert "edge.port" in message and "8201" in message


def test_an_unknown_key_in_the_file_is_refused(tmp_path):
    path = write_toml(tmp_path, "[edge]\n", "[edge]\nprot = 1\n")
    message = error_of(path=path, env={})
    assert "unknown setting edge.prot" in message


def test_a_key_missing_from_the_defaults_is_refused():
    values = settings.flatten(tomllib.loads(FLEET_TOML.read_text()))
    del values["slow.nice"]
    with pytest.raises(SettingsError, match="missing setting slow.nice"):
        settings.resolve(values, {}, "fleet.toml")


def test_another_settings_file_holds_only_what_differs_from_the_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[slow]\nworkers = 3\n")
    chosen = load(env={"FLEET_SETTINGS": str(path)})
    assert chosen.slow.workers == 3 and chosen.edge.port == load(env={}).edge.port
    assert load(env={"FLEET_SETTINGS": str(path), "FLEET_SLOW_WORKERS": "5"}).slow.workers == 5  # env still wins
    assert "no such settings file" in error_of(env={"FLEET_SETTINGS": str(tmp_path / "missing.toml")})


def test_a_file_that_is_not_toml_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[edge\nport = 1\n")
    message = error_of(path=path, env={})
    assert "broken.toml" in message and "not valid TOML" in message


# the resolved settings --------------------------------------------------------------------------

def test_instances_lists_names_and_ports_per_role():
    s = load(env={"FLEET_FAST_INSTANCES": "3"})
    assert s.instances("fast") == [("fast-01", 8101), ("fast-02", 8102), ("fast-03", 8103)]
    assert s.instances("slow") == [("slow-01", 8201)]


def test_task_config_returns_only_that_tasks_table():
    s = load(env={})
    assert s.task_config("pbkdf2") == {"max_rounds": 600000}
    assert s.task_config("sleep") == {"max_seconds": 10}
    assert s.task_config("nope") == {}


def test_snapshot_round_trips_through_from_snapshot(tmp_path):
    original = load(env={
        "FLEET_RUN_DIR": str(tmp_path / "run"),
        "FLEET_SLOW_WORKERS": "3",
        "FLEET_SLOW_JOB_TIMEOUT": "1.5",
        "FLEET_EDGE_BIND": "::1",
    })
    path = tmp_path / "settings.json"
    path.write_text(original.snapshot())
    copy = Settings.from_snapshot(path)
    assert copy.values == original.values
    assert copy.run_dir == original.run_dir == (tmp_path / "run").resolve()
    assert (copy.slow.workers, copy.slow.queue_limit, copy.slow.job_timeout) == (3, 12, 1.5)
    assert json.loads(path.read_text())["values"]["slow.queue_limit"] == 12  # "auto" resolved once


def test_from_snapshot_ignores_fleet_env_vars(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    path.write_text(load(env={}).snapshot())
    monkeypatch.setenv("FLEET_EDGE_PORT", "9999")
    assert Settings.from_snapshot(path).edge.port == 8080


def test_from_snapshot_validates_what_it_reads(tmp_path):
    data = json.loads(load(env={}).snapshot())
    data["values"]["slow.nice"] = 40
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SettingsError, match=r"slow\.nice.*0-19"):
        Settings.from_snapshot(path)


def test_a_snapshot_from_another_version_reads_with_today_s_defaults_for_what_it_lacks(tmp_path):
    # A fleet started by older code has no key added since (and may hold one removed since): newer
    # code must still stop and update it. Found when `stop` failed on such a fleet.
    data = json.loads(load(env={"FLEET_EDGE_PORT": "9090"}).snapshot())
    del data["values"]["slow.worker_max_jobs"]
    data["values"]["slow.retired_key"] = 1
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(data))
    old = Settings.from_snapshot(path)
    assert old.edge.port == 9090
    assert old.slow.worker_max_jobs == load(env={}).slow.worker_max_jobs


def test_a_worker_memory_cap_is_off_or_above_what_an_idle_worker_holds():
    assert load(env={"FLEET_SLOW_WORKER_MAX_RSS_MB": "0"}).slow.worker_max_rss_mb == 0
    assert load(env={"FLEET_SLOW_WORKER_MAX_RSS_MB": "64"}).slow.worker_max_rss_mb == 64
    with pytest.raises(SettingsError, match=r"slow\.worker_max_rss_mb \(10\) must be 0 \(no cap\) or at least 64"):
        load(env={"FLEET_SLOW_WORKER_MAX_RSS_MB": "10"})


def test_a_dask_backend_sizes_the_line_from_the_managed_cluster_and_keeps_its_ports_apart():
    s = load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_WORKERS": "4", "FLEET_DASK_THREADS_PER_WORKER": "2",
                  "FLEET_SLOW_INSTANCES": "2"})
    assert settings.heavy_capacity(s.values) == 4  # 8 threads shared by 2 instances
    assert s.slow.queue_limit == 16 and s.slow.min_workers == 2
    message = error_of(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_SCHEDULER_PORT": "8101"})
    assert "overlap" in message and "fast" in message


@pytest.mark.parametrize("address", ["10.0.0.5:8786", "http://10.0.0.5:8786", "tcp://10.0.0.5", "tcp://:8786"])
def test_a_scheduler_that_is_neither_managed_nor_an_address_is_refused(address):
    message = error_of(env={"FLEET_DASK_SCHEDULER": address})
    assert "dask.scheduler" in message and "tcp://host:port" in message


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "tcp://scheduler.example:8786", "tcp://[2001:db8::5]:8786"])
def test_a_plaintext_scheduler_beyond_this_host_is_refused_unless_said_insecure_on_purpose(address):
    message = error_of(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_SCHEDULER": address})
    assert "in clear" in message and "tls://" in message and "dask.allow_insecure" in message
    insecure = load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_SCHEDULER": address, "FLEET_DASK_ALLOW_INSECURE": "true"})
    assert insecure.scheduler_address == address and not insecure.dask_tls


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786",
                                     "tls://10.0.0.5:8786"])
def test_a_loopback_or_tls_scheduler_needs_no_insecure_setting(address):
    assert load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_SCHEDULER": address}).scheduler_address == address


# the inventory ------------------------------------------------------------------------------------

EXAMPLE = settings.REPO_ROOT / "deploy" / "hosts.example.toml"


def test_the_example_inventory_loads_for_each_of_its_hosts():
    for name, address in (("web1", "10.77.0.1"), ("heavy1", "10.77.0.2"), ("heavy2", "10.77.0.3")):
        s = load(env={"FLEET_SETTINGS": str(EXAMPLE), "FLEET_HOST": name})
        assert (s.inventory.here.name, s.address) == (name, address)
        assert s.scheduler_address == "tls://10.77.0.1:8786" and s.dask_tls


def test_an_inventory_without_fleet_host_is_refused_naming_the_hosts():
    message = error_of(env={"FLEET_SETTINGS": str(EXAMPLE)})
    assert "set FLEET_HOST" in message and "web1, web2, heavy1, heavy2, db1" in message
    assert "no such host" in error_of(env={"FLEET_SETTINGS": str(EXAMPLE), "FLEET_HOST": "heavy9"})


def test_without_hosts_the_fleet_is_one_loopback_host_whose_managed_cluster_still_speaks_tls():
    s = load(env={"FLEET_SLOW_BACKEND": "dask"})
    assert s.inventory.single and s.address == "127.0.0.1"
    assert s.scheduler_address == "tls://127.0.0.1:8786" and s.dask_tls and s.own_certs and not s.edge_tls
    assert load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_SCHEDULER": "tls://10.0.0.9:8786"}).dask_tls


def test_the_snapshot_keeps_the_inventory_and_this_host(tmp_path):
    s = load(env={"FLEET_SETTINGS": str(EXAMPLE), "FLEET_HOST": "heavy2", "FLEET_RUN_DIR": str(tmp_path)})
    (tmp_path / "settings.json").write_text(s.snapshot())
    back = Settings.from_snapshot(tmp_path / "settings.json")
    assert back.inventory == s.inventory and back.address == "10.77.0.3"

"""The fleet's settings: one TOML file, environment overrides, validation, one resolved snapshot.

deploy/fleet.toml holds every key with its default; `FLEET_SETTINGS=path` reads another file on
top of it (that file holds only what differs, e.g. deploy/hosts.example.toml).
`FLEET_<SECTION>_<KEY>` overrides a key at deploy time; the deploy step resolves the lot once
("auto" becomes a number), validates it and writes a JSON snapshot into the run directory, which
the services read back with the same code. The file's [hosts] table, if any, is the inventory of
a fleet across hosts (services/common/inventory.py); `FLEET_HOST` names this machine's host.

    >>> s = load(env={"FLEET_EDGE_PORT": "9000", "FLEET_SLOW_WORKERS": "2"})
    >>> s.edge.port, s.slow.workers, s.slow.queue_limit
    (9000, 2, 8)
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from services.common import procfs
from services.common.inventory import Host, Inventory, InventoryError, host_port
from services.common.inventory import parse as parse_inventory

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILE = REPO_ROOT / "deploy" / "fleet.toml"
DEFAULT_RUN_DIR = REPO_ROOT / ".run"


class SettingsError(ValueError):
    """A setting is missing, unknown or out of range; the message names it and what is allowed."""


# nginx's proxy_read_timeout for the fast routes (nginx/nginx.conf.j2, location /): a fast route's
# deadline (fanout.*_deadline_ms) stays a second below it, so the route, not the edge, answers.
FAST_READ_TIMEOUT_S = 10
FAST_DEADLINE_MAX_MS = (FAST_READ_TIMEOUT_S - 1) * 1000

MIN_WORKER_RSS_MB = 64  # a worker's cap below this would kill every worker at its first job


@dataclass(frozen=True)
class Spec:
    kind: type  # int, float, str or bool
    low: float | None = None
    high: float | None = None
    auto: Callable[[dict], Any] | None = None  # computes the value of "auto" from resolved values
    check: Callable[[Any], None] | None = None  # extra validation for strings

    def allowed(self) -> str:
        if self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "a string" if self.check is None else self.check.__doc__ or "a string"
        else:
            text = f"{'an integer' if self.kind is int else 'a number'} {self.low:g}-{self.high:g}"
        return text + (' or "auto"' if self.auto else "")


def _check_ip(value: str) -> None:
    """an IPv4 or IPv6 address literal"""
    ipaddress.ip_address(value)


def real_ip_networks(value: str) -> list[str]:
    """edge.real_ip as the networks nginx's set_real_ip_from takes: "10.0.0.5, 10.1.0.0/16" ->
    ["10.0.0.5/32", "10.1.0.0/16"]; "" -> [] (no proxy in front of the edge)."""
    return [str(ipaddress.ip_network(part.strip(), strict=False)) for part in value.split(",") if part.strip()]


def _check_real_ip(value: str) -> None:
    """"" (no proxy in front of the edge), or comma-separated addresses or networks (CIDR) of the proxies"""
    real_ip_networks(value)


def _check_header_name(value: str) -> None:
    """a request header's name (letters, digits and dashes), such as "X-Forwarded-For" """
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", value):
        raise ValueError(value)


def _check_event_loop(value: str) -> None:
    '''"uvloop" or "asyncio"'''
    if value not in ("uvloop", "asyncio"):
        raise ValueError(value)


def _check_backend(value: str) -> None:
    '''"local" or "dask"'''
    if value not in ("local", "dask"):
        raise ValueError(value)


def _check_job_store(value: str) -> None:
    '''"sqlite" or "redis"'''
    if value not in ("sqlite", "redis"):
        raise ValueError(value)


def _check_redis_url(value: str) -> None:
    '''"" (the fleet runs its own store), or an existing server's redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path'''
    if value and not re.fullmatch(r"(redis|rediss|unix)://\S+", value):
        raise ValueError(value)


def _check_scheduler(value: str) -> None:
    '''"managed", or a scheduler address tcp://host:port or tls://host:port'''
    if value == "managed":
        return
    scheme, _, rest = value.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme not in ("tcp", "tls") or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(value)


def _check_user(value: str) -> None:
    """"auto", "root", or the name of a system user"""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ValueError(value)


def heavy_capacity(v: Mapping[str, Any]) -> int:
    """Jobs one slow instance can run at once, as far as deploy knows: its workers (local), or its
    share of a managed cluster's threads (dask; an external cluster's is read at run time)."""
    if v["slow.backend"] == "dask" and v["dask.scheduler"] == "managed":
        return max(1, v["dask.workers"] * v["dask.threads_per_worker"] // v["slow.instances"])
    return v["slow.workers"]


def long_job_capacity(v: Mapping[str, Any]) -> int:
    """Long jobs one host's runner runs at once when runner.workers is "auto": one per CPU in job
    processes of their own (local), or half a managed cluster's threads, at least one (dask: long
    jobs run on the same threads as the synchronous ones, and the slow instances share only what
    the long ones leave, dask_pool.py; an external cluster's threads are unknown here: one)."""
    if v["slow.backend"] == "dask":
        if v["dask.scheduler"] != "managed":
            return 1
        return max(1, v["dask.workers"] * v["dask.threads_per_worker"] // 2)
    return usable_cpus()


def _check_path(value: str) -> None:
    """a directory path (relative ones are relative to the repository)"""
    if not value.strip() or "\0" in value:
        raise ValueError(value)


def _check_run_dir_path(value: str) -> None:
    """a directory inside the run dir: a relative path such as "nginx/cache", without ".." """
    parts = PurePosixPath(value).parts
    if not parts or PurePosixPath(value).is_absolute() or ".." in parts or "\0" in value or not value.strip():
        raise ValueError(value)


def _check_modules(value: str) -> None:
    """comma-separated dotted module names"""
    names = [n.strip() for n in value.split(",")]
    if not all(names) or not all(part.isidentifier() for n in names for part in n.split(".")):
        raise ValueError(value)


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by its cgroup's CPU quota.

    os.cpu_count() counts the machine's CPUs; a container or a service limited with taskset,
    cpuset or a CPU quota (systemd CPUQuota=, docker --cpus) gets fewer, and one worker per
    machine CPU would then only fight over the few it has.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_cpu_quota(proc_cgroup: Path | None = None, root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of quota of this process's cgroup and its ancestors (v2 cpu.max, v1 cfs), or None.
    `proc_cgroup`: a file in /proc/self/cgroup's format to read instead (a test's)."""
    quotas = []
    for controllers, path in procfs.cgroups("self", proc_cgroup).items():
        if controllers == "":  # cgroup v2: cpu.max = "<quota> <period>" or "max <period>"
            base, files = root, [("cpu.max", None)]
        elif "cpu" in controllers.split(","):  # cgroup v1
            base = next((root / d for d in ("cpu", "cpu,cpuacct") if (root / d).is_dir()), None)
            files = [("cpu.cfs_quota_us", "cpu.cfs_period_us")]
            if base is None:
                continue
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            for quota_file, period_file in files:
                try:
                    if period_file is None:
                        quota, period = (directory / quota_file).read_text().split()
                    else:
                        quota = (directory / quota_file).read_text().strip()
                        period = (directory / period_file).read_text().strip()
                    if quota not in ("max", "-1"):
                        quotas.append(int(quota) / int(period))
                except (OSError, ValueError):
                    pass
            if directory == base or directory.parent == directory:
                break
            directory = directory.parent
    return min(quotas) if quotas else None


# Valid ranges live here; defaults live in deploy/fleet.toml. tests/unit/test_settings.py checks
# that both name exactly the same keys.
SCHEMA: dict[str, Spec] = {
    "edge.port": Spec(int, 1, 65535),
    "edge.bind": Spec(str, check=_check_ip),
    "edge.worker_processes": Spec(int, 1, 64),
    "edge.max_body_kb": Spec(int, 1, 1048576),
    "edge.slow_rate_per_second": Spec(int, 1, 100000),
    "edge.slow_rate_burst": Spec(int, 0, 100000),
    "edge.client_timeout": Spec(float, 1, 300),
    "edge.cache_mb": Spec(int, 1, 1_000_000),
    "edge.cache_keys_mb": Spec(int, 1, 1024),
    # Inside the run dir only: the fleet empties it at each start and stop (edge.cache_keep), and
    # may only ever remove what it made there (deploy/render.py, mark_edge_cache).
    "edge.cache_dir": Spec(str, check=_check_run_dir_path),
    "edge.cache_keep": Spec(bool),
    # Trusted proxies (nginx's realip module): only from these is the client read from
    # edge.real_ip_header, so no client can choose its own address, and its per-client limits.
    "edge.real_ip": Spec(str, check=_check_real_ip),
    "edge.real_ip_header": Spec(str, check=_check_header_name),
    "edge.fast_rate_per_second": Spec(int, 1, 100000),
    "edge.fast_rate_burst": Spec(int, 0, 100000),
    "edge.fast_conn_per_client": Spec(int, 1, 65535),  # nginx refuses a limit_conn of 65536 or more
    "edge.echo_max_body_kb": Spec(int, 1, 1048576),
    "fast.instances": Spec(int, 1, 64),
    "fast.base_port": Spec(int, 1024, 65000),
    "fast.drain_timeout": Spec(float, 2, 300),
    "fast.event_loop": Spec(str, check=_check_event_loop),
    "fast.sched_slice_us": Spec(int, 0, 100_000),  # services/common/cpu_slice.py
    # The stand-in backend service the fan-out routes call (services/upstream), and how it behaves.
    "upstream.instances": Spec(int, 1, 16),
    "upstream.base_port": Spec(int, 1024, 65000),
    "upstream.drain_timeout": Spec(float, 2, 300),
    "upstream.event_loop": Spec(str, check=_check_event_loop),
    "upstream.latency_ms": Spec(float, 0, 10_000),
    "upstream.latency_spread": Spec(float, 0, 3),
    "upstream.straggler_rate": Spec(float, 0, 1),
    "upstream.straggler_ms": Spec(float, 0, 60_000),
    "upstream.error_rate": Spec(float, 0, 1),
    "upstream.max_keys": Spec(int, 1, 10_000),
    # The fast routes that call backends (services/fanout): deadlines, hedging, breakers, batching.
    "fanout.profile_deadline_ms": Spec(int, 10, FAST_DEADLINE_MAX_MS),
    "fanout.search_deadline_ms": Spec(int, 10, FAST_DEADLINE_MAX_MS),
    "fanout.lookup_deadline_ms": Spec(int, 10, FAST_DEADLINE_MAX_MS),
    "fanout.search_shards": Spec(int, 1, 64),
    "fanout.max_connections": Spec(int, 1, 4096, auto=lambda v: 64 * v["fanout.search_shards"]),
    "fanout.dns_cache_seconds": Spec(float, 0, 3600),
    "fanout.hedging": Spec(bool),
    "fanout.hedge_budget": Spec(float, 0, 1),
    "fanout.hedge_floor_per_second": Spec(float, 0, 1000),
    "fanout.hedge_percentile": Spec(float, 50, 99.9),
    "fanout.breaker_failure_rate": Spec(float, 0.05, 1),
    "fanout.breaker_min_calls": Spec(int, 1, 100_000),
    "fanout.breaker_window_seconds": Spec(float, 1, 600),
    "fanout.breaker_open_seconds": Spec(float, 0.1, 600),
    "fanout.batch_size": Spec(int, 1, 10_000),
    "slow.instances": Spec(int, 1, 16),
    "slow.base_port": Spec(int, 1024, 65000),
    "slow.workers": Spec(int, 1, 256, auto=lambda v: usable_cpus()),
    "slow.backend": Spec(str, check=_check_backend),
    "dask.scheduler": Spec(str, check=_check_scheduler),
    "dask.workers": Spec(int, 1, 256, auto=lambda v: usable_cpus()),
    "dask.threads_per_worker": Spec(int, 1, 64),
    "dask.scheduler_port": Spec(int, 1024, 65535),
    "dask.dashboard_port": Spec(int, 1024, 65535),
    "dask.worker_base_port": Spec(int, 1024, 65000),
    "dask.worker_ttl": Spec(float, 1, 3600),
    "dask.certs_dir": Spec(str, check=_check_path),
    "dask.allow_insecure": Spec(bool),
    "dask.expose_dashboards": Spec(bool),
    "slow.queue_limit": Spec(int, 0, 10000, auto=lambda v: 4 * heavy_capacity(v)),
    "slow.max_per_client": Spec(int, 1, 100000, auto=lambda v: max(
        1, (heavy_capacity(v) + v["slow.queue_limit"]) * v["slow.instances"] // 2)),
    "slow.min_workers": Spec(int, 0, 256, auto=lambda v: max(1, heavy_capacity(v) // 2)),
    "slow.job_timeout": Spec(float, 0.1, 3600),
    "slow.nice": Spec(int, 0, 19),
    "slow.instance_nice": Spec(int, 0, 19),
    # auto: on Dask only, where job processes sleep and wake once per job (the local pool's run jobs
    # back to back). perf sched under a heavy flood (python -m bench.levers sched): the fast path
    # waited 13.7 ms a second behind Dask's job processes, 6.0 with SCHED_IDLE, 0.7 behind the local
    # pool's; the local fleet's flood p99 rose with SCHED_IDLE (3.1-4.0 -> 4.1-4.6 ms, at 2a016a7).
    "slow.sched_idle": Spec(bool, auto=lambda v: v["slow.backend"] == "dask"),
    "slow.idle_cgroup": Spec(bool),
    "slow.drain_timeout": Spec(float, 2, 3600),
    "slow.max_result_mb": Spec(int, 1, 1024),
    "slow.worker_max_rss_mb": Spec(int, 0, 1 << 20),
    "slow.worker_max_jobs": Spec(int, 0, 1_000_000_000),
    "slow.coalesce": Spec(bool),
    "slow.event_loop": Spec(str, check=_check_event_loop),
    "slow.task_modules": Spec(str, check=_check_modules),
    "jobs.store": Spec(str, check=_check_job_store),
    "jobs.redis_url": Spec(str, check=_check_redis_url),
    "jobs.redis_port": Spec(int, 1024, 65535),
    "jobs.redis_maxmemory_mb": Spec(int, 16, 1 << 20),
    "jobs.store_timeout": Spec(float, 0.05, 10),
    "jobs.result_ttl": Spec(float, 60, 2_592_000),
    "jobs.max_records": Spec(int, 100, 100_000_000),
    "jobs.inline_result_kb": Spec(int, 1, 1_048_576),
    "jobs.max_active_per_client": Spec(int, 1, 100_000),
    "jobs.max_active": Spec(int, 1, 1_000_000),
    "jobs.max_run_time": Spec(float, 1, 86_400),
    "jobs.keepalive_seconds": Spec(float, 1, 300),
    "jobs.max_streams_per_client": Spec(int, 1, 65535),  # nginx refuses a limit_conn of 65536 or more
    "jobs.lost_after_seconds": Spec(float, 2, 600),
    "runner.base_port": Spec(int, 1024, 65000),
    "runner.workers": Spec(int, 1, 256, auto=lambda v: long_job_capacity(v)),
    "runner.drain_timeout": Spec(float, 2, 300),
    "runner.event_loop": Spec(str, check=_check_event_loop),
    "process.user": Spec(str, check=_check_user),
    "observe.blocked_loop_ms": Spec(int, 10, 60000),
    "observe.test_routes": Spec(bool),
    "observe.test_fast_delay_ms": Spec(int, 0, 1000),
    "observe.test_fast_delay_every": Spec(int, 1, 1000),
    "observe.log_max_mb": Spec(int, 1, 10240),
    "observe.log_backups": Spec(int, 1, 100),
    "observe.failed_request_lines_per_second": Spec(int, 1, 100000),
    "observe.fast_p99_objective_ms": Spec(int, 1, 60000),
    "observe.prometheus_port": Spec(int, 1024, 65535),
    "observe.prometheus_retention_hours": Spec(int, 1, 8760),
    "observe.prometheus_retention_mb": Spec(int, 64, 1_000_000),
    "tasks.fib.max_n": Spec(int, 0, 40),
    "tasks.pbkdf2.max_rounds": Spec(int, 1000, 10_000_000),
    "tasks.sleep.max_seconds": Spec(float, 0, 600),
    "tasks.primes.max_n": Spec(int, 0, 100_000_000),
    "tasks.digest.max_rounds": Spec(int, 1, 100_000_000),
    "tasks.report.max_seconds": Spec(float, 0.1, 86_400),
}


# The FLEET_* environment variables that are not settings: the fleet's own, read by deploy/ and
# services/ or set by the fleet in its processes' environments. Every other FLEET_* name must be a
# setting's (env_name), so that a misspelt one is refused instead of silently deploying a default.
NON_SETTING_VARIABLES = frozenset({
    "FLEET_RUN_DIR",    # the run dir (run_dir_from)
    "FLEET_SETTINGS",   # the settings file (settings_file)
    "FLEET_HOST",       # this machine's host in the inventory (load)
    "FLEET_SNAPSHOT",   # a Dask worker's settings.json (services/slow/dask_worker.py)
    "FLEET_MEMBER_OF",  # marks every process of a fleet (deploy/procs.py)
    "FLEET_WORKER_OF",  # marks a pool's workers and their children (services/slow/pool.py)
    "FLEET_PROGRAM_TMP",  # a program's own temporary directory (services/common/temp_dir.py)
})


def env_name(key: str) -> str:
    """The environment variable that overrides `key`: tasks.fib.max_n -> FLEET_TASKS_FIB_MAX_N."""
    return "FLEET_" + key.replace(".", "_").upper()


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _convert(key: str, raw: Any, origin: str) -> Any:
    spec = SCHEMA[key]
    problem = f"{origin}: {key} must be {spec.allowed()}, got {raw!r}"
    if spec.auto and raw == "auto":
        return "auto"
    if spec.kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        raise SettingsError(problem)
    if spec.kind is str:
        if not isinstance(raw, str):
            raise SettingsError(problem)
        try:
            spec.check and spec.check(raw)
        except ValueError:
            raise SettingsError(problem) from None
        return raw
    if isinstance(raw, bool):
        raise SettingsError(problem)
    try:
        value = spec.kind(raw)
        if spec.kind is int and isinstance(raw, float) and raw != value:
            raise ValueError
    except (TypeError, ValueError):
        raise SettingsError(problem) from None
    if not spec.low <= value <= spec.high:
        raise SettingsError(problem)
    return value


def resolve(file_values: Mapping[str, Any], env: Mapping[str, str], origin: str) -> dict[str, Any]:
    """Merge file values and FLEET_* overrides, validate every key, and compute "auto" values."""
    unknown = sorted(set(file_values) - set(SCHEMA))
    if unknown:
        raise SettingsError(f"{origin}: unknown setting {unknown[0]}; known: {', '.join(SCHEMA)}")
    missing = sorted(set(SCHEMA) - set(file_values))
    if missing:
        raise SettingsError(f"{origin}: missing setting {missing[0]}")
    by_env = {env_name(key): key for key in SCHEMA}
    for name in env:
        if name.startswith("FLEET_") and name not in by_env and name not in NON_SETTING_VARIABLES:
            closest = difflib.get_close_matches(name, [*by_env, *NON_SETTING_VARIABLES], n=1, cutoff=0)[0]
            raise SettingsError(f"{name}: no such setting; did you mean {closest}? (the settings are "
                                "FLEET_<SECTION>_<KEY> for the keys of deploy/fleet.toml)")
    values: dict[str, Any] = {}
    for key in SCHEMA:
        name = env_name(key)
        if name in env:
            values[key] = _convert(key, env[name].strip(), name)
        else:
            values[key] = _convert(key, file_values[key], f"{origin} [{key}]")
    for key, spec in SCHEMA.items():  # in schema order, so "auto" may use keys resolved before it
        if values[key] == "auto" and spec.auto is not None:  # else "auto" is the value itself (process.user)
            values[key] = spec.auto(values)
    _check_consistency(values)
    return values


def _check_consistency(v: Mapping[str, Any]) -> None:
    # Each role uses base_port for its spare and base_port+1 .. base_port+instances.
    fast = range(v["fast.base_port"], v["fast.base_port"] + v["fast.instances"] + 1)
    slow = range(v["slow.base_port"], v["slow.base_port"] + v["slow.instances"] + 1)
    if set(fast) & set(slow):
        raise SettingsError(
            f"fast ports {fast.start}-{fast.stop - 1} overlap slow ports {slow.start}-{slow.stop - 1}: "
            "move fast.base_port or slow.base_port"
        )
    if v["edge.port"] in fast or v["edge.port"] in slow:
        raise SettingsError(f"edge.port {v['edge.port']} is also an instance port: move one of them")
    runner = v["runner.base_port"] + 1  # the runner's port (runner-01)
    if runner in fast or runner in slow or runner == v["edge.port"]:
        raise SettingsError(f"the job runner's port {runner} (runner.base_port + 1) is also the edge's or an "
                            "instance's: move runner.base_port")
    upstream = range(v["upstream.base_port"] + 1, v["upstream.base_port"] + v["upstream.instances"] + 1)
    if set(upstream) & (set(fast) | set(slow) | {runner, v["edge.port"]}):
        raise SettingsError(f"the upstream service's ports {upstream.start}-{upstream.stop - 1} (upstream.base_port + 1 "
                            "..) overlap the edge's, an instance's or the runner's: move upstream.base_port")
    if fast.stop - 1 > 65535 or slow.stop - 1 > 65535 or upstream.stop - 1 > 65535:
        raise SettingsError("base_port + instances exceeds 65535: lower the base port")
    if v["slow.drain_timeout"] <= v["slow.job_timeout"]:
        raise SettingsError(
            f"slow.drain_timeout ({v['slow.drain_timeout']:g}) must be longer than slow.job_timeout "
            f"({v['slow.job_timeout']:g}), so that a stopping instance lets its running jobs finish"
        )
    if 0 < v["slow.worker_max_rss_mb"] < MIN_WORKER_RSS_MB:
        raise SettingsError(f"slow.worker_max_rss_mb ({v['slow.worker_max_rss_mb']}) must be 0 (no cap) or at least "
                            f"{MIN_WORKER_RSS_MB}: an idle worker alone holds about 30 MiB")
    if v["slow.min_workers"] > heavy_capacity(v):
        raise SettingsError(f"slow.min_workers ({v['slow.min_workers']}) cannot exceed the jobs an instance "
                            f"can run at once ({heavy_capacity(v)}: slow.workers, or its share of the Dask cluster)")
    if v["jobs.store"] == "redis" and not v["jobs.redis_url"] and v["jobs.redis_port"] in (
            {v["edge.port"], runner} | set(fast) | set(slow) | set(upstream)):
        raise SettingsError(f"jobs.redis_port {v['jobs.redis_port']} is also the edge's or an instance's port: move one")
    if v["slow.backend"] == "dask" and not v["dask.allow_insecure"] and _plaintext_beyond_host(v["dask.scheduler"]):
        raise SettingsError(
            f"dask.scheduler {v['dask.scheduler']}: a tcp:// scheduler beyond this host carries every job's "
            "arguments and results in clear, and runs code for anyone who reaches it; use tls:// with the "
            "fleet's certificates (make certs), or set dask.allow_insecure = true to accept it")
    if v["slow.backend"] == "dask" and v["dask.scheduler"] == "managed":
        used = {"edge.port": {v["edge.port"]}, "fast": set(fast), "slow": set(slow), "runner": {runner},
                "upstream": set(upstream)}
        if v["jobs.store"] == "redis" and not v["jobs.redis_url"]:
            used["jobs.redis_port"] = {v["jobs.redis_port"]}
        dask = {v["dask.scheduler_port"], v["dask.dashboard_port"],
                *range(v["dask.worker_base_port"] + 1, v["dask.worker_base_port"] + 2 * v["dask.workers"] + 1)}
        if v["dask.scheduler_port"] == v["dask.dashboard_port"]:
            raise SettingsError("dask.scheduler_port and dask.dashboard_port must differ")
        for what, ports in used.items():
            if dask & ports:
                raise SettingsError(f"the Dask cluster's ports (dask.scheduler_port, dask.dashboard_port, "
                                    f"dask.worker_base_port+1..+{2 * v['dask.workers']}) overlap {what}: move one")
        if max(dask) > 65535:
            raise SettingsError("dask.worker_base_port + 2 x dask.workers exceeds 65535: lower it")


def _plaintext_beyond_host(scheduler: str) -> bool:
    """A tcp:// scheduler address that is not this host's loopback."""
    if not scheduler.startswith("tcp://"):
        return False
    host = scheduler[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: wherever it points, it is not known to be this host


class Settings:
    """Resolved settings with attribute access by section: settings.slow.workers."""

    def __init__(self, values: Mapping[str, Any], run_dir: Path, inventory: Inventory | None = None):
        self.values = dict(values)
        self.run_dir = Path(run_dir)
        self.inventory = inventory or parse_inventory(None, self.values, None)
        tree: dict[str, Any] = {}
        for key, value in self.values.items():
            *path, leaf = key.split(".")
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        for section, table in tree.items():
            setattr(self, section, _namespace(table))

    def task_config(self, task_name: str) -> dict[str, Any]:
        """The [tasks.<name>] table, given to the task's argument parser."""
        prefix = f"tasks.{task_name}."
        return {k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)}

    def instances(self, role: str) -> list[tuple[str, int]]:
        """[(name, port)] for one role: [("fast-01", 8101), ("fast-02", 8102)]."""
        section = getattr(self, role)
        return [(f"{role}-{i:02d}", section.base_port + i) for i in range(1, section.instances + 1)]

    def spare(self, role: str) -> tuple[str, int]:
        """The role's spare instance, ("fast-spare", 8100): nginx's backup server, running only
        while instances are restarted or replaced, so that a role with one instance never has none.
        On base_port itself, so that changing the number of instances never moves it."""
        return f"{role}-spare", getattr(self, role).base_port

    # where things are, across hosts ----------------------------------------------------------

    @property
    def address(self) -> str:
        """The address every program of this host binds: its inventory address (loopback alone)."""
        return self.inventory.here.address

    def role_hosts(self, role: str) -> list[Host]:
        return self.inventory.with_role(role)

    @property
    def dask_tls(self) -> bool:
        """Dask traffic uses TLS with the fleet's own certificates: always on a managed cluster (on
        one host too: a scheduler anyone can reach runs whatever it is sent, as root if the fleet
        runs as root), and for a tls:// scheduler."""
        if self.slow.backend != "dask":
            return False
        return self.dask.scheduler == "managed" or self.dask.scheduler.startswith("tls://")

    @property
    def edge_tls(self) -> bool:
        """The edge reaches the instances over TLS, each side showing a certificate of the fleet's
        CA: across hosts, where the hop crosses a network. On one host it stays on loopback."""
        return not self.inventory.single

    @property
    def own_certs(self) -> bool:
        """This host's TLS files are made by deploy itself, in the run dir (a managed cluster on one
        host: nothing to copy anywhere); else they come from certs_dir (make certs)."""
        return self.inventory.single and self.dask.scheduler == "managed"

    @property
    def scheduler_address(self) -> str:
        """The Dask scheduler every client and worker connects to."""
        if self.dask.scheduler != "managed":
            return self.dask.scheduler
        host = next(iter(self.role_hosts("scheduler")), self.inventory.here)  # none: the local backend
        return f"{'tls' if self.dask_tls else 'tcp'}://{host_port(host.address, self.dask.scheduler_port)}"

    @property
    def dashboard_address(self) -> str:
        """Where this host's Dask dashboards listen: loopback, unless dask.expose_dashboards (they
        show task names, logs and stacks to anyone who reaches them, with no login)."""
        return self.address if self.dask.expose_dashboards else ("::1" if ":" in self.address else "127.0.0.1")

    @property
    def certs_dir(self) -> Path:
        return (REPO_ROOT / self.dask.certs_dir).resolve()

    def certs(self, host: str | None = None) -> dict[str, Path]:
        """This host's (or `host`'s) files of the fleet's CA, made by `make certs`, and the secrets
        every host of the fleet shares: the edge's token, the job store's password."""
        name = host or self.inventory.here.name
        return {"ca": self.certs_dir / "ca.pem", "cert": self.certs_dir / f"{name}.pem",
                "key": self.certs_dir / f"{name}-key.pem", "edge_token": self.certs_dir / "edge-token",
                "job_store_password": self.certs_dir / "job-store-password"}

    @property
    def private_dir(self) -> Path:
        """The run dir's private files (deploy/private.py): root's directory, files readable by the
        user the fleet's processes run as and nobody else."""
        return self.run_dir / "private"

    def tls_files(self) -> dict[str, Path]:
        """This host's TLS files as the fleet's processes read them, in private_dir."""
        p = self.private_dir
        return {"ca": p / "ca.pem", "cert": p / "cert.pem", "key": p / "key.pem"}

    @property
    def long_job_cluster_cap(self) -> int | None:
        """Long jobs running at once on the fleet's own Dask cluster, from every host's runners
        together: half its threads, at least one (the synchronous jobs share those threads, and
        each slow instance's share is what the long ones leave: dask_pool.py). None on the local
        backend (each host's job processes run on its own CPUs) and on an existing cluster (its
        size is not deploy's to know: runner.workers per host alone)."""
        if self.slow.backend != "dask" or self.dask.scheduler != "managed":
            return None
        threads = self.dask.workers * self.dask.threads_per_worker * len(self.role_hosts("workers"))
        return max(1, threads // 2)

    @property
    def job_store_url(self) -> str:
        """Where the slow instances find the job store (jobs.store = "redis"): jobs.redis_url, or the
        fleet's own (deploy/store.py) on the address of the host with the store role, over TLS across
        hosts (rediss://), whose password is in private/."""
        if self.jobs.redis_url:
            return self.jobs.redis_url
        host = next(iter(self.role_hosts("store")), self.inventory.here)
        return f"{'rediss' if self.job_store_tls else 'redis'}://{host_port(host.address, self.jobs.redis_port)}/0"

    @property
    def job_store_tls(self) -> bool:
        """The fleet's own store speaks TLS, each side showing a certificate of the fleet's CA (the
        instances' and Dask's): across hosts, where its traffic crosses a network."""
        return not self.jobs.redis_url and not self.inventory.single

    @property
    def job_store_password_file(self) -> Path | None:
        """The fleet's own store's password (made by deploy on one host; across hosts by make certs,
        which every host shares); None for a jobs.redis_url (its URL says)."""
        return None if self.jobs.redis_url else self.private_dir / "job-store-password"

    @property
    def edge_token_file(self) -> Path:
        """The secret nginx adds to every request it passes on (X-Fleet-Edge): instances trust a
        request's client address and request id only with it."""
        return self.private_dir / "edge-token"

    # snapshots ------------------------------------------------------------------------------

    def snapshot(self) -> str:
        return json.dumps({"run_dir": str(self.run_dir), "values": self.values,
                           "inventory": self.inventory.snapshot()}, indent=2) + "\n"

    @classmethod
    def from_snapshot(cls, path: Path | str) -> "Settings":
        data = json.loads(Path(path).read_text())
        # A fleet deployed by another version of this code may lack a key added since, or hold one
        # removed since: its snapshot still reads (a key it lacks takes today's default), so the
        # new code can stop, inspect and update the fleet the old one started.
        defaults = flatten(_read_toml(DEFAULT_FILE))
        recorded = {k: v for k, v in data["values"].items() if k in SCHEMA}
        values = resolve({**defaults, **recorded}, env={}, origin=str(path))
        inventory = Inventory.from_snapshot(data.get("inventory", {}), values)
        return cls(values, Path(data["run_dir"]), inventory)


def _namespace(table: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in table.items()})


def run_dir_from(env: Mapping[str, str]) -> Path:
    return Path(env.get("FLEET_RUN_DIR") or DEFAULT_RUN_DIR).resolve()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such settings file (FLEET_SETTINGS)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


def settings_file(env: Mapping[str, str]) -> Path:
    """$FLEET_SETTINGS (relative to the current directory), or deploy/fleet.toml."""
    return Path(env.get("FLEET_SETTINGS") or DEFAULT_FILE).resolve()


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None, any_host: bool = False) -> Settings:
    """Read the TOML file (default: settings_file(env)), apply FLEET_* overrides from `env`
    (default: os.environ), validate; the [hosts] table and FLEET_HOST give the inventory
    (`any_host`: without FLEET_HOST, as the first host; for commands about the whole fleet)."""
    env = os.environ if env is None else env
    path = settings_file(env) if path is None else Path(path)
    table = _read_toml(path)
    hosts = table.pop("hosts", None)
    file_values = flatten(table)
    if path.resolve() != DEFAULT_FILE:  # another file says only what differs from the defaults
        file_values = {**flatten(_read_toml(DEFAULT_FILE)), **file_values}
    values = resolve(file_values, env, origin=path.name)
    try:
        here = env.get("FLEET_HOST", "").strip() or None
        if here is None and any_host and isinstance(hosts, Mapping) and hosts:
            here = next(iter(hosts))
        inventory = parse_inventory(hosts, values, here)
    except InventoryError as exc:
        raise SettingsError(f"{path.name}: {exc}") from None
    return Settings(values, run_dir_from(env), inventory)

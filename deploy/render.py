"""Render the run dir from the settings: nginx.conf, supervisord.conf and the services' snapshot.

    python -m deploy.render            # into .run/ (or $FLEET_RUN_DIR), prints what changed

Every rendered file starts with a "generated ... do not edit" line. Rendering is pure (settings in,
text out) so tests render into a temp dir and run `nginx -t` on the result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

import jinja2

from deploy import certs, private, privilege, programs, rundir, store
from services.common.inventory import host_port
from services.common.settings import FAST_READ_TIMEOUT_S, REPO_ROOT, Settings, load, real_ip_networks

HEADER = "# generated from deploy/fleet.toml by deploy/render.py, do not edit"

# How long nginx leaves an instance out after one failed connect; a rolling restart waits past it.
FAIL_TIMEOUT_SECONDS = 2

# nginx's own errors, as the contract's JSON (nginx/nginx.conf.j2 renders a location for each).
EDGE_ERRORS = [
    (400, "bad_request", "malformed request"),
    (403, "forbidden", "forbidden"),
    (404, "not_found", "not found"),
    (405, "method_not_allowed", "method not allowed"),
    (408, "request_timeout", "the request did not arrive in time"),
    (411, "length_required", "a body needs a Content-Length"),
    (413, "payload_too_large", "request body too large"),
    (414, "uri_too_long", "request line too long"),
    (429, "rate_limited", "too many requests from this address; retry later"),
    (431, "headers_too_large", "request headers too large"),
    (500, "internal_error", "internal error at the edge"),
    (502, "bad_gateway", "no instance could take the request"),
    (503, "overloaded", "the fleet is overloaded; retry later"),
    (504, "gateway_timeout", "the instance did not answer in time"),
]


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_temp_dir(settings: Settings) -> Path:
    """Where nginx's workers write temp files (bodies and answers too large for memory): in the run
    dir, root's directory; nginx's master makes one subdirectory per kind and gives it to them."""
    return settings.run_dir / "nginx" / "temp"


# In edge.cache_dir, a file that says the fleet made that directory: the only kind it ever empties.
CACHE_MARK = ".made-by-fleet"


def edge_cache_dir(settings: Settings) -> Path:
    """The edge cache's directory (edge.cache_dir, inside the run dir): made by the fleet, root's,
    with CACHE_MARK in it. nginx keeps its entries one level down, in edge_cache_entries, which
    nginx's master makes and gives to its workers; the mark stays where they cannot remove it."""
    return settings.run_dir / settings.edge.cache_dir


def edge_cache_entries(settings: Settings) -> Path:
    return edge_cache_dir(settings) / "entries"


def mark_edge_cache(settings: Settings) -> None:
    """Make edge.cache_dir and mark it the fleet's; refuse one that is there without the mark, so
    the fleet never empties, nor lets nginx take over, a directory it did not make. (To give the
    cache a directory of your own, a mount point say, put an empty CACHE_MARK file in it.)"""
    directory = edge_cache_dir(settings)
    rundir.check_not_writable_by_others(directory, "edge.cache_dir")
    if directory.exists() and not edge_cache_marked(settings):
        raise rundir.RunDirError(f"edge.cache_dir {directory} is there and was not made by the fleet (no {CACHE_MARK} "
                                 "in it): the fleet empties its cache, so it takes only a directory it made; "
                                 "choose another edge.cache_dir, or remove that one")
    rundir.own_dir(directory)
    if not edge_cache_marked(settings):
        rundir.write_file(directory / CACHE_MARK, b"made by the fleet's deploy: its edge cache, emptied at each start and stop\n")


def edge_cache_marked(settings: Settings) -> bool:
    mark = edge_cache_dir(settings) / CACHE_MARK
    return mark.is_file() and not mark.is_symlink()


def nginx_user(settings: Settings) -> "privilege.User | None":
    """Whom nginx's workers run as: the fleet's user, as the instances (process.user). When those
    run as root (process.user = "root", or no other user can reach the code), so do the workers:
    they then write their temp files and cache in the run dir, which only root may reach, never in
    a directory of the system's temp dir that another user could have made first. Deployed by an
    ordinary user, nginx runs as that user (None: no `user` directive)."""
    user = privilege.run_as(settings)
    if user is None and os.geteuid() == 0:
        return privilege.User("root", 0, 0, "root")
    return user


def cached_tasks(settings: Settings) -> list[tuple[str, int]]:
    """[(task name, cache_ttl)] of the served tasks whose answers the edge caches."""
    from services.slow import registry

    return sorted((t.name, t.cache_ttl) for t in registry.load(settings.slow.task_modules).values()
                  if t.cache_ttl is not None)


def _listen(bind: str, port: int) -> str:
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def context(settings: Settings) -> dict:
    s = settings
    # The longest a heavy request may last at an instance: a job's deadline counts from its
    # admission, its wait in line included (services/slow/app.py), so however long the line, the
    # instance has answered within slow.job_timeout (plus the moment a worker's kill or a Dask
    # worker's answer takes: the margin). Past it nginx would answer its own 504 instead.
    heavy_request = s.slow.job_timeout + 5
    return {
        "header": HEADER,
        "run_dir": str(s.run_dir),
        "nginx_temp": str(nginx_temp_dir(s)),
        "cache_dir": str(edge_cache_entries(s)),
        "cache_zone": f"fleet_cache_{zlib.crc32(str(edge_cache_entries(s)).encode()):08x}",
        "nginx_user": nginx_user(s),
        "edge_header_conf": private.edge_header_conf(s),
        "edge_tls": s.edge_tls,
        "upstream_scheme": "https" if s.edge_tls else "http",
        "tls_files": {k: str(v) for k, v in s.tls_files().items()},
        "instance_tls_name": certs.INSTANCE_NAME,
        "cached_tasks": cached_tasks(s),
        "repo": str(REPO_ROOT),
        "python": sys.executable,
        "nginx": nginx_binary(),
        "edge": s.edge,
        "real_ip": real_ip_networks(s.edge.real_ip),
        "listen": _listen(s.edge.bind, s.edge.port),
        "fast": programs.upstream(s, "fast"),
        "slow": programs.upstream(s, "slow"),
        "fast_spares": programs.upstream(s, "fast", spares=True),
        "slow_spares": programs.upstream(s, "slow", spares=True),
        "address": s.address,
        "edge_here": s.inventory.runs("edge"),
        "proxy_bind": None if s.inventory.single else s.inventory.edge.address,
        "upstream_keepalive_timeout": max(1, math.floor(min(s.fast.drain_timeout, s.slow.drain_timeout)) - 1),
        "fail_timeout": FAIL_TIMEOUT_SECONDS,
        "fast_read_timeout": FAST_READ_TIMEOUT_S,
        "slow_read_timeout": math.ceil(heavy_request),
        "worker_shutdown_timeout": math.ceil(heavy_request + 5),
        "max_per_client": s.slow.max_per_client,
        "jobs_stream_read_timeout": math.ceil(s.jobs.keepalive_seconds + 10),
        "jobs": s.jobs,
        "edge_errors": EDGE_ERRORS,
        "edge_stopwaitsecs": 10,
        "programs": programs.programs(s),
        "cluster": programs.cluster_programs(s),
        "scheduler_address": s.scheduler_address,
        "dashboard_address": s.dashboard_address,
        "worker_ttl": f"{s.dask.worker_ttl:g}",
        "tls": dask_tls_options(s),
        "run_as": privilege.run_as(s),  # None: as the deploying user
        "job_store": {"binary": store.binary() or "redis-server", "port": s.jobs.redis_port} if store.managed(s) else None,
        "log_max_mb": s.observe.log_max_mb,
        "log_backups": s.observe.log_backups,
    }


def dask_tls_options(settings: Settings) -> str:
    """The command-line options that make a Dask process speak TLS with this host's certificate."""
    if not settings.dask_tls:
        return ""
    c = settings.tls_files()
    return f"--tls-ca-file {c['ca']} --tls-cert {c['cert']} --tls-key {c['key']}"


def templates() -> jinja2.Environment:
    """The fleet's templates (nginx/, deploy/), as every rendered file is made."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([REPO_ROOT / "nginx", REPO_ROOT / "deploy"]),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the render, not nginx
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["hostport"] = host_port
    return env


def render(settings: Settings) -> dict[str, str]:
    """{path relative to the run dir: text} for every file the run dir needs."""
    env = templates()
    ctx = context(settings)
    return {
        # The edge's config, on every host: nginx runs only where the edge is, but `nginx -t`
        # checks it everywhere and the file shows the whole fleet's upstreams.
        "nginx/conf/nginx.conf": env.get_template("nginx.conf.j2").render(ctx),
        "supervisord.conf": env.get_template("supervisord.conf.j2").render(ctx),
        "settings.json": settings.snapshot(),
        # The long jobs' page (/jobs/<id>/page), which the edge serves itself from the run dir.
        "nginx/html/job.html": f"<!-- {HEADER[2:]} (from nginx/job.html) -->\n" + (REPO_ROOT / "nginx" / "job.html").read_text(),
        "prometheus/targets.json": prometheus_targets(settings),
        # The fleet's alert and recording rules, for `make observe`'s Prometheus or an operator's own.
        "prometheus/rules.yml": f"{HEADER} (from deploy/prometheus/rules.yml)\n"
                                + (REPO_ROOT / "deploy" / "prometheus" / "rules.yml").read_text(),
        # The fleet's own job store's config (jobs.store = "redis", no jobs.redis_url), root's like
        # every rendered file: the store's process reads it, and cannot change it.
        **({store.CONF: store.render(settings, HEADER)} if store.managed(settings) else {}),
    }


def log_count(settings: Settings) -> int:
    """The logs this host's part of the fleet writes: supervisord's, one per program (spares
    included), and nginx's access, refused and error logs plus the launcher's output on the edge host."""
    edge = 4 if settings.inventory.runs("edge") else 0
    return (1 + len(programs.programs(settings)) + len(programs.cluster_programs(settings)) + edge
            + store.managed(settings))


def log_bound_mb(settings: Settings) -> int:
    """The most the logs hold, in MiB: each rotated past observe.log_max_mb, log_backups kept.
    (nginx's three may pass the size by what a flood writes between two checks, half a second.)"""
    return log_count(settings) * settings.observe.log_max_mb * (settings.observe.log_backups + 1)


def prometheus_targets(settings: Settings) -> str:
    """A Prometheus file_sd targets file: this host's instances' /metrics (and its Dask processes'),
    on the host's address; each host of a fleet across hosts renders its own.

    In prometheus.yml:  scrape_configs: [{job_name: fleet, file_sd_configs: [{files: [<this file>]}]}]
    Across hosts the instances speak TLS and want a certificate of the fleet's CA (__scheme__
    https): give the scrape config a tls_config with the CA, and a host's certificate and key.
    """
    host = settings.inventory.here
    labels = {} if settings.inventory.single else {"fleet_host": host.name, "__scheme__": "https"}
    groups = [
        {"targets": [host_port(host.address, p.port)], "labels": {"role": p.role, "fleet_instance": p.name, **labels}}
        for p in programs.programs(settings) if not p.spare
    ]
    dask_labels = {} if settings.inventory.single else {"fleet_host": host.name}
    groups += [{"targets": [host_port(settings.dashboard_address, c.dashboard)],
                "labels": {"role": "dask", "fleet_instance": c.name, **dask_labels}}
               for c in programs.cluster_programs(settings)]  # Dask's own /metrics, on its HTTP port
    return json.dumps(groups, indent=2) + "\n"


def write(settings: Settings, files: dict[str, str] | None = None) -> list[str]:
    """Write the rendered files into the run dir; return the ones whose content changed.

    As root, the run dir must be one nobody else can change, and what is made in it is made as
    deploy/rundir.py says (no link followed, nothing of another user's walked into)."""
    files = render(settings) if files is None else files
    run_dir = settings.run_dir
    rundir.check_not_writable_by_others(run_dir, "the run dir")
    # 0755 whatever the umask: the fleet's user reads the snapshot, nginx's workers reach their temp dir.
    for sub in ("", "logs", "nginx", "nginx/conf", "nginx/html", "nginx/temp", "prometheus", "profiles"):
        rundir.own_dir(run_dir / sub)
    if cached_tasks(settings):
        mark_edge_cache(settings)
    user = privilege.run_as(settings)
    private.write(settings, user)
    if user is not None:
        privilege.prepare(settings, user)
    else:  # Dask's local directories and the job store, ours (taken back from the fleet's user, had it run as one)
        rundir.handed_over_dir(run_dir / "dask", os.geteuid(), os.getegid())
        rundir.handed_over_dir(run_dir / "jobs", os.geteuid(), os.getegid())
    changed = []
    for relative, text in files.items():
        path = run_dir / relative
        if rundir.read_file(path) != text.encode():
            rundir.write_file(path, text.encode())  # atomic: a reader sees the old file or the new one
            changed.append(relative)
    return changed


def main() -> None:
    settings = load()
    changed = write(settings)
    print(f"rendered into {settings.run_dir}: " + (", ".join(changed) if changed else "nothing changed"))


if __name__ == "__main__":
    main()

"""The edge ceiling: nginx answering /fast itself, the most the fleet's edge path could give; the
floor's edge: the same nginx passing /fast to one Tornado instance (bench/floor.py); and a peer's
edge: the same nginx passing every path to the peer, as users deploy one (`<peer>+nginx`).

Same nginx, same worker count and client keep-alive as the fleet's defaults, the same buffered
access log, but no upstream: `location = /fast { return 200 "Hello!"; }`. Rendered into a temp dir
that holds every path nginx writes (pid, temp paths, logs), and run in the foreground:
`nginx -p DIR/ -c nginx.conf -e stderr` with `daemon off;` in the file (../shared/notes.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.common.settings import load

TEMPLATE = """\
# Rendered by bench/edge.py for one bench run: the edge ceiling (nginx answers /fast itself).
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    client_body_temp_path {dir}/temp/client_body;
    proxy_temp_path       {dir}/temp/proxy;
    fastcgi_temp_path     {dir}/temp/fastcgi;
    uwsgi_temp_path       {dir}/temp/uwsgi;
    scgi_temp_path        {dir}/temp/scgi;

    server_tokens off;
    tcp_nodelay on;
    keepalive_timeout 65s;
    log_format bench '$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent $request_time';
    access_log {dir}/access.log bench buffer=64k flush=1s;   # as the fleet: buffered

{upstream}
    server {{
        listen 127.0.0.1:{port} default_server;
        server_name _;
{locations}
    }}
}}
"""


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


ANSWER_ITSELF = """\
            default_type text/plain;
            return 200 "Hello!";"""

# As the fleet's edge passes /fast (nginx/nginx.conf.j2), to one instance.
PASS_TO_INSTANCE = """\
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";   # keep the upstream connection alive"""

UPSTREAM = """\
    upstream fast {{
{servers}
        keepalive 32;             # idle connections kept per worker, as the fleet's
        keepalive_requests 100000;
    }}"""


OWN_LOCATIONS = """\
        location = /fast {{
{fast}
        }}
        location = /healthz {{
            default_type application/json;
            return 200 '{{"status": "ok", "role": "edge"}}';
        }}
        location / {{
            return 404;
        }}"""

# A peer behind the edge: every path goes to it, heavy routes included (their jobs take tens of
# milliseconds, well inside proxy_read_timeout's default 60 s).
EVERY_PATH = """\
        location / {{
{fast}
        }}"""


def render(directory: Path, port: int, instance_port: int | None = None, every_path: bool = False,
           instances: int = 1) -> Path:
    """Write nginx.conf into `directory` (with its temp dirs); return the config's path. With
    `instance_port`, /fast goes to the instance there, or round robin to `instances` of them on
    consecutive ports (with `every_path`, every path does); without, nginx answers /fast itself."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "temp" / sub).mkdir(parents=True, exist_ok=True)
    workers = load(env={}).edge.worker_processes  # the fleet's default (deploy/fleet.toml)
    conf = directory / "nginx.conf"
    upstream = ""
    if instance_port:
        servers = "\n".join(f"        server 127.0.0.1:{instance_port + k};" for k in range(instances))
        upstream = UPSTREAM.format(servers=servers)
    fast = PASS_TO_INSTANCE if instance_port else ANSWER_ITSELF
    locations = (EVERY_PATH if every_path else OWN_LOCATIONS).format(fast=fast)
    conf.write_text(TEMPLATE.format(dir=directory, port=port, workers=workers, upstream=upstream,
                                    locations=locations))
    return conf


def command(directory: Path) -> list[str]:
    return [nginx_binary(), "-p", f"{directory}/", "-c", "nginx.conf", "-e", "stderr"]

"""The edge ceiling: nginx answering /fast itself, the most the fleet's edge path could give.

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

    server {{
        listen 127.0.0.1:{port} default_server;
        server_name _;
        location = /fast {{
            default_type text/plain;
            return 200 "Hello!";
        }}
        location = /healthz {{
            default_type application/json;
            return 200 '{{"status": "ok", "role": "edge"}}';
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def render(directory: Path, port: int) -> Path:
    """Write nginx.conf into `directory` (with its temp dirs); return the config's path."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "temp" / sub).mkdir(parents=True, exist_ok=True)
    workers = load(env={}).edge.worker_processes  # the fleet's default (deploy/fleet.toml)
    conf = directory / "nginx.conf"
    conf.write_text(TEMPLATE.format(dir=directory, port=port, workers=workers))
    return conf


def command(directory: Path) -> list[str]:
    return [nginx_binary(), "-p", f"{directory}/", "-c", "nginx.conf", "-e", "stderr"]
